import AdapterKit
import ArgumentParser

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a safetensors or GGUF file, a model folder or an adapter holds (headers only for models).",
        discussion: """
        A model folder is either one model.safetensors or shards with model.safetensors.index.json. \
        An adapter is a PEFT / MoSLoRA folder (adapter_config.json), an mlx-lm folder, a PaddleNLP \
        folder, or a single kohya / diffusers / PEFT file; its layout is detected.
        """
    )

    @Argument(help: "A .safetensors or .gguf file, a model folder, or an adapter file or folder.")
    var path: String

    @Flag(help: "Print one JSON object instead of the summary.")
    var json = false

    @Flag(help: "List every tensor: name, dtype, shape, file.")
    var tensors = false

    func run() throws {
        // Every tensor file is opened (its header parsed) once, whichever way the path is read.
        let files = TensorFiles()
        if GGUFFile.looksLikeGGUF(path) {
            let report = GGUFReport(try GGUFFile(path: path))
            try writeOutput(json ? JSONWriter.compact(report.json()) : report.text(tensors: tensors))
            return
        }
        if Adapter.looksLikeAdapter(path, files: files) {
            let adapter = try Adapter(path: path, files: files)
            let report = try AdapterReport(adapter)
            let tensorsReport = CheckpointReport(try Checkpoint(path: adapter.store.path, files: files))
            if json {
                try writeOutput(JSONWriter.compact(tensorsReport.json(adapter: report.json())))
            } else {
                try writeOutput(report.text())
                if tensors { try writeOutput("\n" + tensorsReport.text(tensors: true)) }
            }
            return
        }
        if PipelineMergePlan.isPipeline(path) {
            let report = try PipelineReport(path: path, files: files)
            try writeOutput(json ? JSONWriter.compact(report.json()) : report.text(tensors: tensors))
            return
        }
        let checkpoint = try Checkpoint(path: path, files: files)
        for w in checkpoint.warnings { writeError("adapter: warning: \(path): \(w)") }
        let report = CheckpointReport(checkpoint)
        try writeOutput(json ? JSONWriter.compact(report.json()) : report.text(tensors: tensors))
    }
}
