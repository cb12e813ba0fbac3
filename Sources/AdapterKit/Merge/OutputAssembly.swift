import CLinearAlgebra
import Dispatch
import Foundation

extension MergePlan {
    /// Writes the merged model to `output`: every shard through the executor, the folder's other
    /// files copied, the index, fsync, then the atomic replace protocol. On any error the
    /// temporaries are removed and nothing appears at (or changes at) `output`.
    ///
    /// The output rules are checked here too (`OutputRules.check`), so no caller can skip them.
    public func write(to output: String, options: MergeRunOptions = MergeRunOptions()) throws -> MergeSummary {
        try OutputRules.check(output, kind: base.isFolder ? .folder : .file, inputs: inputFiles, force: options.force)
        try checkQuantizedValues()
        var assembly = OutputAssembly(plan: self, output: output, options: options)
        return try assembly.run()
    }

    /// Every file this merge reads: OUT may not be, be inside, or contain any of them.
    public var inputFiles: [String] {
        [base.path] + base.inputFiles + inputs.flatMap { [$0.adapter.path] + $0.adapter.inputFiles }
    }
}

/// The output side of a merge: a temporary file or folder beside OUT, the shards written in base
/// order, the other files and the index, then fsync and commit. The bytes of each tensor are the
/// executor's business.
struct OutputAssembly {
    let plan: MergePlan
    let output: String
    let options: MergeRunOptions
    private var summary = MergeSummary()
    private var written = 0
    /// The bytes the progress callback counts up to: the model, or a part's shards.
    private var total: Int
    /// Shards written, to be flushed together at the end.
    private var shardPaths: [String] = []
    /// Hash every shard as it is written (a split merge's part), for `checksums`.
    var hashing = false
    private let digests = DigestList()
    /// Four 8 MiB buffers: writes of one block overlap the computation of the next.
    private let pipeline = WritePipeline(buffers: 4, blockBytes: 8 << 20)
    private let executor: MergeExecutor

    init(plan: MergePlan, output: String, options: MergeRunOptions) {
        // Memory must not grow with the number of tensors: see la_fix_allocation_threshold.
        la_fix_allocation_threshold()
        self.plan = plan
        self.output = output
        self.options = options
        total = plan.base.tensors.reduce(0) { $0 + $1.entry.byteCount }
        executor = MergeExecutor(options: options, pipeline: pipeline)
        executor.plan = plan
    }

    /// Writes OUT. With `staged` (a split merge's finish), shard i is not computed but taken from
    /// the file `staged[i]` a part wrote (hard-linked where the file system allows, else copied);
    /// everything else is done exactly as in a one-process merge, so the bytes are the same.
    mutating func run(staged: [String]? = nil) throws -> MergeSummary {
        let start = DispatchTime.now()
        let base = plan.base
        summary.notes = Self.planNotes(plan)
        let out = try TemporaryOutput(target: output, kind: base.isFolder ? .folder : .file)
        summary.notes += out.notes
        do {
            if base.isFolder {
                if let other = plan.otherFiles {
                    try other.copy(into: out.temporaryPath, sync: options.sync)
                    summary.filesCopied = other.fileCount
                    if let note = other.note { summary.notes.append(note) }
                    if let d = plan.dequantizedTo { try Self.dequantizedConfig(in: out.temporaryPath, dtype: d, sync: options.sync) }
                }
                var shapesChanged = false
                for (i, name) in base.fileNames.enumerated() {
                    try Self.makeParentFolders(of: name, in: out.temporaryPath)
                    let path = joinPath(out.temporaryPath, Self.outputName(name, base.files[i]))
                    if let staged {
                        try place(staged[i], at: path)
                        shapesChanged = Self.outputSpecs(plan, base.files[i]).changed || shapesChanged
                    } else {
                        shapesChanged = try writeShard(i, to: path) || shapesChanged
                    }
                }
                if let indexName = base.indexFileName {
                    try writeIndex(from: joinPath(base.path, indexName), to: joinPath(out.temporaryPath, indexName), regenerate: shapesChanged)
                }
                try pipeline.drain()
                TestHook.phase("before-fsync")
                try syncWrittenFiles()
                if options.sync { FileSystem.syncDirectory(out.temporaryPath) }
            } else {
                if let staged {
                    let source = try FileDescriptor.openForReading(staged[0])
                    let size = try source.status().size
                    try out.file!.copy(from: source, offset: 0, count: size)
                    written += size
                    shardPaths.append(out.temporaryPath)
                } else {
                    _ = try writeShard(0, to: out.temporaryPath, descriptor: out.file)
                }
                try pipeline.drain()
                TestHook.phase("before-fsync")
                try syncWrittenFiles()
            }
            TestHook.phase("after-fsync")
            try out.commit(replacing: options.force)
        } catch {
            try? pipeline.drain()  // let queued writes finish before their files are removed
            out.discard()
            throw error
        }
        summary.reports = executor.reports
        summary.notes += Self.retentionNotes(executor.retained)
        summary.bytesWritten = written
        summary.seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        summary.modulesMerged = plan.moduleCount
        summary.updatesMerged = plan.updateCount
        return summary
    }

    /// A split merge's part: writes the shards `indices` of the base into `folder` under their
    /// names in OUT (`fileName` for a one-file base), flushes them with `options.sync`, and returns
    /// their paths relative to `folder`.
    mutating func writeShards(_ indices: [Int], into folder: String, fileName: String) throws -> [String] {
        let start = DispatchTime.now()
        total = indices.reduce(0) { sum, i in plan.base.files[i].entries.reduce(sum) { $0 + $1.byteCount } }
        var names: [String] = []
        do {
            for i in indices {
                let name = plan.base.isFolder ? Self.outputName(plan.base.fileNames[i], plan.base.files[i]) : fileName
                try Self.makeParentFolders(of: name, in: folder)
                _ = try writeShard(i, to: joinPath(folder, name))
                names.append(name)
            }
            try pipeline.drain()
            TestHook.phase("before-fsync")
            try syncWrittenFiles()
        } catch {
            try? pipeline.drain()
            throw error
        }
        summary.seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        return names
    }

    /// With `hashing`, once `writeShards` returned: the size and SHA-256 of each shard written, in order.
    var checksums: [(size: Int, digest: String)] {
        digests.values
    }

    /// The plan's own notes and the modules `--component` left out: every run prints them.
    static func planNotes(_ plan: MergePlan) -> [String] {
        plan.notes + plan.skipped.sorted(by: { $0.key < $1.key }).map { c, n in
            "skipped \(plural(n, "\(c) module")) (not selected with --component)"
        }
    }

    /// What a part's writes add up to, once `writeShards` returned.
    var partSummary: MergeSummary {
        var s = summary
        s.reports = executor.reports
        s.notes = Self.planNotes(plan) + Self.retentionNotes(executor.retained)
        s.bytesWritten = written
        return s
    }

    /// Puts a staged shard at `path`: a second name for the same file where the file system allows
    /// (no bytes copied), else a copy.
    private mutating func place(_ staged: String, at path: String) throws {
        switch FileSystem.hardLink(staged, to: path) {
        case .done:
            break
        case .failed, .unsupported:
            try FileDescriptor.copyFile(RawPath(staged), to: RawPath(path), followingLink: false, sync: false)
        }
        written += FileSystem.treeSize(path)
        shardPaths.append(path)
    }

    /// config.json of a dequantized model: `quantization_config` removed (plain transformers then
    /// loads the plain weights), the dtype fields naming the weights' new dtype.
    static func dequantizedConfig(in folder: String, dtype: DType, sync: Bool) throws {
        let path = joinPath(folder, "config.json")
        guard FileSystem.kind(path) == .file, var root = try readJSONFile(path).objectValue else { return }
        root["quantization_config"] = nil
        let name = ["BF16": "bfloat16", "F16": "float16", "F32": "float32"][dtype.rawValue] ?? "bfloat16"
        for key in ["torch_dtype", "dtype"] where root[key] != nil { root[key] = .string(name) }
        // Written beside it and renamed over the copy (all inside the temporary output folder).
        let fresh = joinPath(folder, ".config.json.dequantized")
        try AdapterWriter.writeText(fresh, JSONWriter.pretty(.object(root), indent: 2) + "\n", sync: sync)
        try FileSystem.rename(fresh, to: path)
    }

    /// What requantized weights kept of their updates: the median and the worst tensor, and a
    /// warning line when the median is below half.
    static func retentionNotes(_ retained: [(tensor: String, retention: MergeExecutor.Retention)]) -> [String] {
        guard !retained.isEmpty else { return [] }
        let sorted = retained.sorted { $0.retention.kept < $1.retention.kept }
        let median = sorted[sorted.count / 2].retention.kept, worst = sorted[0]
        func percent(_ x: Double) -> String { formatFixed(100 * x, 1) + " %" }
        var notes = ["requantized \(plural(retained.count, "quantized weight")) with fresh scales; the update kept after requantization (⟨Q(W') − W, ΔW⟩ / ‖ΔW‖²): median \(percent(median)), worst \(percent(worst.retention.kept)) (\(worst.tensor)); --report gives it per tensor"]
        if median < 0.5 {
            notes.append("the quantized format cannot hold most of this update: requantizing keeps a median \(percent(median)) of it")
        }
        return notes
    }

    /// fsyncs every shard once all are written: one flush of everything, as `cp && sync` does,
    /// instead of a flush per shard that would stall the pipeline; still before any rename.
    private func syncWrittenFiles() throws {
        guard options.sync else { return }
        for path in shardPaths {
            try FileDescriptor.openForReading(path).sync()
        }
    }

    /// The output file name of a base file: safetensors keep theirs; a PyTorch `pytorch_model.bin`
    /// becomes `model.safetensors` (merges always write safetensors).
    static func outputName(_ name: String, _ store: any TensorContainer) -> String {
        switch store.format {
        case .safetensors:
            return name
        case .pytorch:
            if name == "pytorch_model.bin" { return "model.safetensors" }
            let stem = name.hasSuffix(".bin") || name.hasSuffix(".pt") ? String(name[..<name.lastIndex(of: ".")!]) : name
            return stem + ".safetensors"
        }
    }

    /// Creates the folders a shard named `sub/shard.safetensors` goes into, when the other files
    /// did not bring them (a subfolder that is a link is not copied).
    static func makeParentFolders(of name: String, in folder: String) throws {
        var path = folder
        for part in name.split(separator: "/").dropLast() {
            path = joinPath(path, String(part))
            if FileSystem.type(path, following: false) != .directory { try FileSystem.makeDirectory(path) }
        }
    }

    /// Writes the index: the original bytes when no tensor changed size, otherwise the same map
    /// with a recomputed total_size, formatted as transformers writes it.
    private func writeIndex(from source: String, to target: String, regenerate: Bool) throws {
        if !regenerate {
            try FileDescriptor.copyFile(RawPath(source), to: RawPath(target), followingLink: true, sync: options.sync)
            return
        }
        guard var root = try readJSONFile(source).objectValue else { throw InputError(source, "the index is not a JSON object") }
        var totalSize = 0
        var parameters = 0
        for (entry, _) in plan.base.tensors where !plan.dropped.contains(entry.name) {
            let shape = plan.changes[entry.name]?.outputShape ?? entry.shape
            let elements = shape.reduce(1, *)
            let encoding = plan.changes[entry.name]?.outputDType.map { TensorEncoding.plain($0) } ?? entry.encoding
            totalSize += encoding.byteCount(elements: elements) ?? 0
            parameters += elements
        }
        if case .object(let map)? = root["weight_map"] {
            // Dropped tensors leave the map; renamed ones (dequantized MXFP4) keep their shard.
            let members = map.members.filter { !plan.dropped.contains($0.key) }.map { m in (plan.changes[m.key]?.writtenName ?? m.key, m.value) }
            root["weight_map"] = .object(JSONObject(members))
        }
        var metadata = root["metadata"]?.objectValue ?? JSONObject()
        metadata["total_size"] = .integer(totalSize)
        // transformers 5 also records the parameter count.
        if metadata["total_parameters"] != nil {
            metadata["total_parameters"] = .integer(parameters)
        }
        root["metadata"] = .object(metadata)
        let text = JSONWriter.pretty(.object(sortedKeys(root)), indent: 2) + "\n"
        try AdapterWriter.writeText(target, text, sync: options.sync)
    }

    private func sortedKeys(_ o: JSONObject) -> JSONObject {
        JSONObject(o.members.sorted { $0.key.precedesInBytes($1.key) }.map { member in
            if case .object(let inner) = member.value { return (member.key, .object(sortedKeys(inner))) }
            return member
        })
    }

    /// The tensors of a base file's output shard, the base name of each, and whether any was
    /// dropped, renamed, or changed shape or dtype (then the index is regenerated).
    static func outputSpecs(_ plan: MergePlan, _ store: any TensorContainer) -> (specs: [TensorSpec], baseNames: [String: String], changed: Bool) {
        var changed = false
        var baseNames: [String: String] = [:]
        let specs = store.entries.filter { !plan.dropped.contains($0.name) }.map { t -> TensorSpec in
            let edit = plan.changes[t.name]
            let shape = edit?.outputShape ?? t.shape
            let dtype = edit?.outputDType ?? t.dtype
            let name = edit?.writtenName ?? t.name
            if shape != t.shape || dtype != t.dtype || name != t.name { changed = true }
            baseNames[name] = t.name
            return TensorSpec(name: name, dtype: dtype, shape: shape)
        }
        if specs.count != store.entries.count { changed = true }
        return (specs, baseNames, changed)
    }

    /// Writes shard `index` of the base with its changes; returns whether any tensor changed shape.
    ///
    /// The writer is used only from the pipeline's queue once created; this thread computes.
    private mutating func writeShard(_ index: Int, to path: String, descriptor: FileDescriptor? = nil) throws -> Bool {
        let store = plan.base.files[index]
        let (specs, baseNames, shapeChanged) = Self.outputSpecs(plan, store)
        let layout = try SafetensorsLayout(tensors: specs, metadata: store.metadataForSafetensors, file: path)
        let fd = try descriptor ?? FileDescriptor.createExclusive(path)
        let writer = try SafetensorsWriter(layout: layout, output: fd, hashing: hashing)
        written += layout.headerBytes.count
        let handoff = Handoff(value: writer as any TensorFileWriter)
        let progress = options.progress
        let total = self.total
        for t in layout.tensors {
            let name = baseNames[t.name] ?? t.name
            if let edit = plan.changes[name] {
                try executor.write(edit, from: store, to: writer)
                summary.tensorsChanged += 1
            } else {
                try executor.copy(name, from: store, to: writer)
                summary.tensorsCopied += 1
            }
            written += t.byteCount
            TestHook.afterTensor()
            let done = written
            if let progress { pipeline.submit { progress(done, total) } }
        }
        // No barrier here: the next shard is computed while this one's last blocks are written.
        let digests = hashing ? self.digests : nil
        pipeline.submit {
            try handoff.value.finish()
            if let digests, let w = handoff.value as? SafetensorsWriter { digests.append((w.layout.fileSize, w.sha256!)) }
        }
        shardPaths.append(path)
        if let e = pipeline.error { throw e }
        return shapeChanged
    }
}

/// The size and SHA-256 of each shard a part wrote, in order, filled from the writer queue.
final class DigestList: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [(size: Int, digest: String)] = []
    func append(_ d: (size: Int, digest: String)) {
        lock.lock(); list.append(d); lock.unlock()
    }
    var values: [(size: Int, digest: String)] {
        lock.lock(); defer { lock.unlock() }
        return list
    }
}
