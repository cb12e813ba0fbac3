/// `adapter convert to-safetensors`: PyTorch checkpoints (or any readable tensor file) rewritten
/// as reference-layout safetensors, names kept.
public enum SafetensorsExport {
    /// What was written.
    public struct Result: Sendable {
        public let tensors: Int
        public let bytes: Int
        public let files: [String]
        /// Notes for the user: what was left out of the copy (links that leave the folder, .git, …),
        /// temporaries of killed runs removed.
        public let notes: [String]
    }

    /// Converts `input` (a `.bin` / `.pt` file, or a folder holding `adapter_model.bin` or
    /// `pytorch_model.bin`) to `output`: a file for a file, a folder for a folder, with every other
    /// file of the folder (adapter_config.json, config.json, …) copied unchanged.
    public static func convert(input: String, output: String, force: Bool) throws -> Result {
        let inputKind = FileSystem.kind(input)
        guard inputKind == .file || inputKind == .directory else { throw InputError(input, "no such file or folder") }
        // Every file of an input folder is read (converted or copied), through links too.
        let read = inputKind == .directory ? ((try? FileSystem.contents(ofDirectory: input)) ?? []).map { joinPath(input, $0) } : []
        try OutputRules.check(output, kind: inputKind == .directory ? .folder : .file, inputs: [input] + read, force: force)
        let out = try TemporaryOutput(target: output, kind: inputKind == .directory ? .folder : .file)
        do {
            let result: Result
            switch inputKind {
            case .file:
                let (tensors, bytes) = try write(try openTensorFile(input), to: out.temporaryPath, descriptor: out.file)
                result = Result(tensors: tensors, bytes: bytes, files: [lastPathComponent(output)], notes: out.notes)
            case .directory:
                // Every PyTorch checkpoint the folder's loaders look for is converted (both, when a
                // folder holds an adapter and a model); every other file is copied unchanged,
                // other .bin and .pt files (training_args.bin, optimizer.pt) included.
                let entries = try FileSystem.contents(ofDirectory: input).sorted()
                let sources = [("adapter_model.bin", "adapter_model.safetensors"), ("pytorch_model.bin", "model.safetensors")]
                    .filter { entries.contains($0.0) }
                guard !sources.isEmpty else {
                    throw InputError(input, "the folder holds neither adapter_model.bin nor pytorch_model.bin")
                }
                if entries.contains(where: { $0.hasSuffix(".bin.index.json") }) {
                    throw InputError(input, "the folder holds a sharded PyTorch checkpoint (an .bin.index.json); convert each shard file on its own")
                }
                for (_, target) in sources where entries.contains(target) {
                    throw InputError(input, "the folder already holds \(target)")
                }
                // Found before anything is written, so that what cannot be copied is refused first.
                let other = try FolderCopy(folder: input, excluding: Set(sources.map(\.0)))
                var tensors = 0, bytes = 0
                var files: [String] = []
                for (name, target) in sources {
                    let (t, b) = try write(try openTensorFile(joinPath(input, name)), to: joinPath(out.temporaryPath, target))
                    tensors += t
                    bytes += b
                    files.append(target)
                }
                try other.copy(into: out.temporaryPath, sync: true)
                files += other.items.compactMap { if case .file(let rel, _) = $0 { rel.display } else { nil } }
                result = Result(tensors: tensors, bytes: bytes, files: files, notes: out.notes + (other.note.map { [$0] } ?? []))
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

    private static func write(_ store: any TensorContainer, to path: String, descriptor: FileDescriptor? = nil) throws -> (Int, Int) {
        let specs = store.entries.map(TensorSpec.init)
        // A rewritten safetensors file keeps non-empty metadata only (what `inspect` shows).
        let metadata = store.format == .safetensors ? (store.metadataPairs.isEmpty ? nil : store.metadataPairs) : store.metadataForSafetensors
        let layout = try SafetensorsWriter.write(into: try descriptor ?? FileDescriptor.createExclusive(path), path: path,
                                                 tensors: specs, metadata: metadata, sync: true) { t, writer in
            try store.withBytes(of: t.name) { try writer.append($0) }
            store.release(t.name)
        }
        return (layout.tensors.count, layout.fileSize)
    }
}
