import AdapterKit
import ArgumentParser

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a safetensors file, a model folder or an adapter holds (headers only)."
    )

    @Argument(help: "A .safetensors file, a model folder, or an adapter file or folder.")
    var path: String

    @Flag(help: "Print one JSON object instead of the summary.")
    var json = false

    @Flag(help: "List every tensor: name, dtype, shape, file.")
    var tensors = false

    func run() throws {
        let checkpoint = try Checkpoint(path: path)
        let report = CheckpointReport(checkpoint)
        if json {
            print(JSONWriter.compact(report.json()))
        } else {
            print(report.text(tensors: tensors))
        }
    }
}
