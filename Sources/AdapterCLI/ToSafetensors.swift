import AdapterKit
import ArgumentParser

struct ToSafetensors: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-safetensors",
        abstract: "Rewrite a PyTorch checkpoint (.bin / .pt, read without running its pickle) as safetensors.",
        discussion: """
        A file becomes a file. A folder holding adapter_model.bin (or pytorch_model.bin) becomes a \
        folder with adapter_model.safetensors (model.safetensors) and every other file copied.
        """
    )

    @Argument(help: "A .bin / .pt file, or a folder holding adapter_model.bin or pytorch_model.bin.")
    var input: String

    @Argument(help: "Where to write: a .safetensors file for a file, a folder for a folder.")
    var output: String

    @Flag(help: "Replace OUT if it exists (only once the new output is complete).")
    var force = false

    @Flag(help: "No summary.")
    var quiet = false

    func run() throws {
        let r = try SafetensorsExport.convert(input: input, output: output, force: force)
        if !quiet { for n in r.notes { writeError("adapter: note: \(n)") } }
        if !quiet { writeError("adapter: wrote \(r.tensors) tensors (\(formatBytes(r.bytes, exact: false))) to \(output)") }
    }
}
