/// `adapter convert to-safetensors`: PyTorch checkpoints (or any readable tensor file) rewritten
/// as reference-layout safetensors, names kept.
public enum SafetensorsExport {
    /// What was written.
    public struct Result: Sendable {
        public let tensors: Int
        public let bytes: Int
        public let files: [String]
    }

    /// Converts `input` (a `.bin` / `.pt` file, or a folder holding `adapter_model.bin` or
    /// `pytorch_model.bin`) to `output`: a file for a file, a folder for a folder, with every other
    /// file of the folder (adapter_config.json, config.json, …) copied unchanged.
    public static func convert(input: String, output: String, force: Bool) throws -> Result {
        try Merger.checkOutput(output, base: input, adapters: [], force: force)
        let out = TemporaryOutput(target: output)
        do {
            let result: Result
            switch FileSystem.kind(input) {
            case .file:
                let (tensors, bytes) = try write(try openTensorFile(input), to: out.temporaryPath)
                result = Result(tensors: tensors, bytes: bytes, files: [lastPathComponent(output)])
            case .directory:
                let entries = try FileSystem.contents(ofDirectory: input)
                let sources = ["adapter_model.bin": "adapter_model.safetensors", "pytorch_model.bin": "model.safetensors"]
                guard let (name, target) = sources.first(where: { entries.contains($0.key) }) else {
                    throw InputError(input, "the folder holds neither adapter_model.bin nor pytorch_model.bin")
                }
                if entries.contains(target) { throw InputError(input, "the folder already holds \(target)") }
                try FileSystem.makeDirectory(out.temporaryPath)
                let (tensors, bytes) = try write(try openTensorFile(joinPath(input, name)), to: joinPath(out.temporaryPath, target))
                var files = [target]
                for entry in entries where entry != name && !entry.hasSuffix(".bin") && !entry.hasSuffix(".pt") {
                    try copyFile(joinPath(input, entry), to: joinPath(out.temporaryPath, entry))
                    files.append(entry)
                }
                result = Result(tensors: tensors, bytes: bytes, files: files)
            default:
                throw InputError(input, "no such file or folder")
            }
            try out.commit(replacing: force)
            return result
        } catch {
            out.discard()
            throw error
        }
    }

    private static func write(_ store: any TensorStore, to path: String) throws -> (Int, Int) {
        let specs = store.tensorInfos.map(TensorSpec.init)
        let metadata = store is SafetensorsFile ? (store.metadataPairs.isEmpty ? nil : store.metadataPairs) : [("format", "pt")]
        let layout = try SafetensorsLayout(tensors: specs, metadata: metadata, file: path)
        let fd = try FileDescriptor.createExclusive(path)
        let writer = try SafetensorsWriter(layout: layout, output: fd)
        for t in layout.tensors {
            try store.withBytes(of: t.name) { try writer.append($0) }
            store.release(t.name)
        }
        try writer.finish()
        try fd.sync()
        return (layout.tensors.count, layout.fileSize)
    }

    private static func copyFile(_ source: String, to target: String) throws {
        guard FileSystem.kind(source) == .file else { throw InputError(source, "cannot copy: not a regular file") }
        let input = try FileDescriptor.openForReading(source)
        let outFD = try FileDescriptor.createExclusive(target)
        try outFD.copy(from: input, offset: 0, count: try input.status().size)
        try outFD.sync()
    }
}
