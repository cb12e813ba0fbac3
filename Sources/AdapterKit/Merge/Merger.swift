import Dispatch
import Foundation

/// Options of a merge run.
public struct MergeRunOptions: Sendable {
    /// Replace an existing OUT (only after the new one is complete).
    public var force = false
    /// Collect per-tensor statistics for `--report`.
    public var report = false
    /// Worker threads for the kernel.
    public var threads = max(1, ProcessInfo.processInfo.activeProcessorCount)
    /// fsync each output file before it is renamed into place.
    public var sync = true
    /// Called with (bytes written, total bytes) as the merge progresses.
    public var progress: (@Sendable (Int, Int) -> Void)? = nil

    public init() {}
}

/// What a merge did.
public struct MergeSummary: Sendable {
    public struct TensorReport: Sendable {
        public let tensor: String
        public let modules: [String]
        public let statistics: UpdateStatistics
    }

    public var modulesMerged = 0
    public var tensorsChanged = 0
    public var tensorsCopied = 0
    public var filesCopied = 0
    public var bytesWritten = 0
    public var seconds = 0.0
    public var reports: [TensorReport] = []
    public var notes: [String] = []

    /// "merged 64 modules into 64 tensors, copied 227 tensors, wrote 2.00 GiB in 3.1 s"
    public var line: String {
        "merged \(modulesMerged) module\(modulesMerged == 1 ? "" : "s") into \(tensorsChanged) tensor\(tensorsChanged == 1 ? "" : "s"), copied \(tensorsCopied) tensor\(tensorsCopied == 1 ? "" : "s")"
            + (filesCopied > 0 ? " and \(filesCopied) other file\(filesCopied == 1 ? "" : "s")" : "")
            + ", wrote \(formatBytes(bytesWritten, exact: false)) in \(formatFixed(seconds, 2)) s"
    }
}

/// A merge stopped by a result it must not write.
public struct MergeError: Error, Sendable, CustomStringConvertible {
    public let tensor: String
    public let problem: String
    public var description: String { "merge stopped at tensor \(tensor): \(problem); nothing was written" }
}

/// Executes a `MergePlan`: streams the base through the kernel into OUT, atomically.
public final class Merger {
    public let plan: MergePlan
    public let output: String
    public let options: MergeRunOptions
    private var summary = MergeSummary()
    private var written = 0
    private var total = 0
    /// Four 8 MiB buffers: writes of one block overlap the computation of the next.
    private let pipeline = WritePipeline(buffers: 4, blockBytes: 8 << 20)
    /// Rows read from the base for the block being computed.
    private var inputBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 64)

    /// Where a tensor's rows come from.
    enum RowSource {
        case memory(UnsafeRawPointer)
        case file(FileDescriptor, Int)
    }

    public init(plan: MergePlan, output: String, options: MergeRunOptions = MergeRunOptions()) {
        self.plan = plan
        self.output = output
        self.options = options
    }

    deinit { inputBuffer.deallocate() }

    /// Shards written, to be flushed together at the end.
    private var shardPaths: [String] = []

    /// fsyncs every shard once all are written: one flush of everything, as `cp && sync` does,
    /// instead of a flush per shard that would stall the pipeline; still before any rename.
    private func syncWrittenFiles() throws {
        guard options.sync else { return }
        for path in shardPaths {
            try FileDescriptor.openForReading(path).sync()
        }
    }

    /// Runs the merge. On any error the temporaries are removed and nothing appears at OUT.
    public func run() throws -> MergeSummary {
        let start = DispatchTime.now()
        let base = plan.base
        total = plan.base.tensors.reduce(0) { $0 + $1.entry.byteCount }
        summary.notes = plan.notes
        for (c, n) in plan.skipped.sorted(by: { $0.key < $1.key }) {
            summary.notes.append("skipped \(n) \(c) module\(n == 1 ? "" : "s") (not selected with --component)")
        }
        let out = try TemporaryOutput(target: output, kind: base.isFolder ? .folder : .file)
        summary.notes += out.notes
        do {
            if base.isFolder {
                if let other = plan.otherFiles {
                    try other.copy(into: out.temporaryPath, sync: options.sync)
                    summary.filesCopied = other.fileCount
                    if let note = other.note { summary.notes.append(note) }
                }
                var shapesChanged = false
                for (i, name) in base.fileNames.enumerated() {
                    try Self.makeParentFolders(of: name, in: out.temporaryPath)
                    shapesChanged = try writeShard(i, to: joinPath(out.temporaryPath, Self.outputName(name, base.files[i]))) || shapesChanged
                }
                if let indexName = base.indexFileName {
                    try writeIndex(from: joinPath(base.path, indexName), to: joinPath(out.temporaryPath, indexName), regenerate: shapesChanged)
                }
                try pipeline.drain()
                TestHook.phase("before-fsync")
                try syncWrittenFiles()
                if options.sync { FileSystem.syncDirectory(out.temporaryPath) }
            } else {
                _ = try writeShard(0, to: out.temporaryPath, descriptor: out.file)
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
        summary.bytesWritten = written
        summary.seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        summary.modulesMerged = plan.moduleCount
        return summary
    }

    /// The output file name of a base file: safetensors keep theirs; a PyTorch `pytorch_model.bin`
    /// becomes `model.safetensors` (merges always write safetensors).
    static func outputName(_ name: String, _ store: any TensorContainer) -> String {
        guard store.format != .safetensors else { return name }
        if name == "pytorch_model.bin" { return "model.safetensors" }
        let stem = name.hasSuffix(".bin") || name.hasSuffix(".pt") ? String(name[..<name.lastIndex(of: ".")!]) : name
        return stem + ".safetensors"
    }

    // MARK: - Files

    /// Creates the folders a shard named `sub/shard.safetensors` goes into, when the other files
    /// did not bring them (a subfolder that is a link is not copied).
    static func makeParentFolders(of name: String, in folder: String) throws {
        var path = folder
        for part in name.split(separator: "/").dropLast() {
            path = joinPath(path, String(part))
            if FileSystem.type(path, following: false) != .directory { try FileSystem.makeDirectory(path) }
        }
    }

    /// Copies one regular file (the index, when it is kept as it is).
    private func copyFile(_ source: String, to target: String) throws {
        let input = try FileDescriptor.openForReading(source)
        let outFD = try FileDescriptor.createExclusive(target)
        try outFD.copy(from: input, offset: 0, count: try input.status().size)
        if options.sync { try outFD.sync() }
    }

    /// Writes the index: the original bytes when no tensor changed size, otherwise the same map
    /// with a recomputed total_size, formatted as transformers writes it.
    private func writeIndex(from source: String, to target: String, regenerate: Bool) throws {
        if !regenerate {
            try copyFile(source, to: target)
            return
        }
        guard var root = try readJSONFile(source).objectValue else { throw InputError(source, "the index is not a JSON object") }
        var totalSize = 0
        for (info, _) in plan.base.tensors {
            let shape = plan.changes[info.name]?.outputShape ?? info.shape
            totalSize += shape.reduce(1, *) * info.dtype.byteSize
        }
        var metadata = root["metadata"]?.objectValue ?? JSONObject()
        metadata["total_size"] = .integer(totalSize)
        // transformers 5 also records the parameter count.
        if metadata["total_parameters"] != nil {
            metadata["total_parameters"] = .integer(plan.base.tensors.reduce(0) { $0 + (plan.changes[$1.entry.name]?.outputShape ?? $1.entry.shape).reduce(1, *) })
        }
        root["metadata"] = .object(metadata)
        let text = JSONWriter.pretty(.object(sortedKeys(root)), indent: 2) + "\n"
        let fd = try FileDescriptor.createExclusive(target)
        try fd.writeAll(Array(text.utf8))
        if options.sync { try fd.sync() }
    }

    private func sortedKeys(_ o: JSONObject) -> JSONObject {
        JSONObject(o.members.sorted { Array($0.key.utf8).lexicographicallyPrecedes(Array($1.key.utf8)) }.map { member in
            if case .object(let inner) = member.value { return (member.key, .object(sortedKeys(inner))) }
            return member
        })
    }

    /// Writes shard `index` of the base with its changes; returns whether any tensor changed shape.
    ///
    /// The writer is used only from the pipeline's queue once created; this thread computes.
    private func writeShard(_ index: Int, to path: String, descriptor: FileDescriptor? = nil) throws -> Bool {
        let store = plan.base.files[index]
        var shapeChanged = false
        let specs = store.entries.map { t -> TensorSpec in
            let shape = plan.changes[t.name]?.outputShape ?? t.shape
            if shape != t.shape { shapeChanged = true }
            return TensorSpec(name: t.name, dtype: t.dtype, shape: shape)
        }
        let metadata = store.metadataForSafetensors
        let layout = try SafetensorsLayout(tensors: specs, metadata: metadata, file: path)
        let fd = try descriptor ?? FileDescriptor.createExclusive(path)
        let writer = try SafetensorsWriter(layout: layout, output: fd)
        written += layout.headerBytes.count
        let handoff = Handoff(value: writer)
        let progress = options.progress
        let total = self.total
        for t in layout.tensors {
            if let change = plan.changes[t.name] {
                try writeChanged(change, store: store, writer: writer)
                store.release(t.name)
                summary.tensorsChanged += 1
            } else if let region = store.region(of: t.name) {
                store.prefetch(t.name)
                let file = Handoff(value: store)
                pipeline.submit {
                    try handoff.value.append(region)
                    file.value.release(t.name)
                }
                summary.tensorsCopied += 1
            } else {
                let bytes = try store.withBytes(of: t.name) { Array($0) }
                pipeline.submit { try bytes.withUnsafeBytes { try handoff.value.append($0) } }
                store.release(t.name)
                summary.tensorsCopied += 1
            }
            written += t.byteCount
            TestHook.afterTensor()
            let done = written
            if let progress { pipeline.submit { progress(done, total) } }
        }
        // No barrier here: the next shard is computed while this one's last blocks are written.
        pipeline.submit { try handoff.value.finish() }
        shardPaths.append(path)
        if let e = pipeline.error { throw e }
        return shapeChanged
    }

    // MARK: - Changed tensors

    private func writeChanged(_ p: TensorPlan, store: any TensorContainer, writer: any TensorFileWriter) throws {
        let dtype = p.base.dtype
        if !p.biasTerms.isEmpty {
            try writeBias(p, store: store, writer: writer)
            return
        }
        // The source values: the base tensor, or a replacement widened without rounding.
        var replacementValues: [Float]? = nil
        var replacementDoubles: [Double]? = nil
        if let r = p.replacement {
            // An F64 replacement is kept in Float64 whatever the base dtype: going through Float32
            // would round it twice.
            if dtype == .f64 || r.tensor.entry.dtype == .f64 { replacementDoubles = try r.tensor.doubles() } else { replacementValues = try r.tensor.floats() }
            if (replacementValues?.contains { !$0.isFinite } ?? false) || (replacementDoubles?.contains { !$0.isFinite } ?? false) {
                throw MergeError(tensor: p.baseName, problem: "the replacement \(r.tensor.name) holds NaN or infinity")
            }
        }
        let shape = p.outputShape
        let rows = shape.first ?? 1
        let cols = shape.count > 1 ? shape.dropFirst().reduce(1, *) : 1
        if p.terms.isEmpty {
            // Replacement only: convert into the base dtype with one rounding.
            let n = rows * cols
            var bytes = [UInt8](repeating: 0, count: n * dtype.byteSize)
            bytes.withUnsafeMutableBytes { dst in
                if let d = replacementDoubles { d.withUnsafeBufferPointer { ElementConversion.fromDouble(dtype, $0.baseAddress!, dst.baseAddress!, count: n) } }
                if let f = replacementValues { f.withUnsafeBufferPointer { ElementConversion.fromFloat(dtype, $0.baseAddress!, dst.baseAddress!, count: n) } }
            }
            try checkFinite(bytes, dtype: dtype, tensor: p.baseName)
            submit(bytes, writer)
            return
        }
        let (l, r, k) = try updateFactors(p, rows: rows, cols: cols)
        let magnitude = try p.dora.map { try $0.module.magnitude!.doubles() }
        var stats: UpdateStatistics? = options.report ? UpdateStatistics() : nil

        func source(_ body: (UnsafeRawPointer, DType) throws -> Void) throws {
            if let v = replacementValues { try v.withUnsafeBytes { try body($0.baseAddress!, .f32) }; return }
            if let v = replacementDoubles { try v.withUnsafeBytes { try body($0.baseAddress!, .f64) }; return }
            try store.withBytes(of: p.baseName) { raw in try body(raw.baseAddress ?? UnsafeRawPointer(bitPattern: 8)!, dtype) }
        }

        if dtype == .f64 || replacementDoubles != nil {
            // Float64 accumulation: F64 bases, and F64 replacements into any base (rounded once at the end).
            var out = [UInt8](repeating: 0, count: rows * cols * 8)
            var finite = true
            try source { src, srcType in
                finite = out.withUnsafeMutableBytes { dst in
                    MergeKernel.mergeRowsF64(source: src, sourceType: srcType, destination: dst.baseAddress!, rows: 0..<rows, cols: cols,
                                             l: l, r: r, k: k, magnitude: magnitude, statistics: &stats)
                }
            }
            guard finite else { throw nonFinite(p) }
            if dtype != .f64 {
                var narrow = [UInt8](repeating: 0, count: rows * cols * dtype.byteSize)
                out.withUnsafeBytes { src in
                    narrow.withUnsafeMutableBytes { dst in
                        ElementConversion.fromDouble(dtype, src.baseAddress!.assumingMemoryBound(to: Double.self), dst.baseAddress!, count: rows * cols)
                    }
                }
                try checkFinite(narrow, dtype: dtype, tensor: p.baseName)
                out = narrow
            }
            submit(out, writer)
        } else {
            let factors = UpdateFactors(l: l, r: r, rows: rows, cols: cols, k: k, magnitude: magnitude)
            defer { factors.deallocate() }
            if p.replacement == nil, let region = store.region(of: p.baseName) {
                // Read rows with pread: a copy from the page cache costs less than faulting in and
                // later dropping a mapping.
                try mergeInBlocks(p, source: .file(region.descriptor, region.range.lowerBound), sourceType: dtype, factors: factors, writer: writer, statistics: &stats)
            } else {
                try source { src, srcType in
                    try mergeInBlocks(p, source: .memory(src), sourceType: srcType, factors: factors, writer: writer, statistics: &stats)
                }
            }
        }
        if let stats {
            summary.reports.append(.init(tensor: p.baseName, modules: p.terms.map(\.module.name), statistics: stats))
        }
    }

    /// Queues a small computed tensor for writing.
    private func submit(_ bytes: [UInt8], _ writer: any TensorFileWriter) {
        let handoff = Handoff(value: writer)
        pipeline.submit { try bytes.withUnsafeBytes { try handoff.value.append($0) } }
    }

    /// Computes row blocks into pipeline buffers; each block is written while the next is computed.
    private func mergeInBlocks(_ p: TensorPlan, source: RowSource, sourceType: DType, factors: UpdateFactors,
                               writer: any TensorFileWriter, statistics: inout UpdateStatistics?) throws {
        let dtype = p.base.dtype
        let rowBytes = factors.cols * dtype.byteSize
        let sourceRowBytes = factors.cols * sourceType.byteSize
        let blockRows = max(1, min(factors.rows, pipeline.blockBytes / max(1, rowBytes)))
        var row = 0
        while row < factors.rows {
            let end = min(factors.rows, row + blockRows)
            let buffer = try pipeline.acquire(bytes: (end - row) * rowBytes)
            // The kernel indexes rows from the block's start: shift the pointers to the block.
            let src: UnsafeRawPointer
            switch source {
            case .memory(let base):
                src = base + row * sourceRowBytes
            case .file(let fd, let offset):
                let count = (end - row) * sourceRowBytes
                if inputBuffer.count < count {
                    inputBuffer.deallocate()
                    inputBuffer = .allocate(byteCount: count, alignment: 64)
                }
                let got = try fd.read(into: UnsafeMutableRawBufferPointer(rebasing: inputBuffer[0..<count]), at: offset + row * sourceRowBytes)
                guard got == count else {
                    pipeline.giveBack(buffer)
                    throw InputError(fd.path, "the file shrank while being read")
                }
                src = UnsafeRawPointer(inputBuffer.baseAddress!)
            }
            let shifted = UpdateFactors(shifting: factors, by: row)
            let result = MergeKernel.merge(source: src, sourceType: sourceType, destination: buffer.baseAddress!, destinationType: dtype,
                                           rows: 0..<(end - row), factors: shifted, wantStatistics: statistics != nil, threads: options.threads)
            guard result.finite else {
                pipeline.giveBack(buffer)
                throw nonFinite(p)
            }
            if let s = result.statistics { statistics!.add(s) }
            pipeline.write(buffer, count: (end - row) * rowBytes, with: writer)
            row = end
        }
    }

    private func nonFinite(_ p: TensorPlan) -> MergeError {
        MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity (or overflow \(p.base.dtype.rawValue)); modules: \(p.moduleNames.joined(separator: ", "))")
    }

    /// L (rows × K) and R (K × cols) in Float64 for all terms, K the sum of their ranks.
    private func updateFactors(_ p: TensorPlan, rows: Int, cols: Int) throws -> (l: [Double], r: [Double], k: Int) {
        let k = p.terms.reduce(0) { $0 + $1.module.rank }
        var l = [Double](repeating: 0, count: rows * k)
        var r = [Double](repeating: 0, count: k * cols)
        var offset = 0
        for term in p.terms {
            let m = term.module
            let rank = m.rank
            let (ma, b) = try m.mixedA()  // M·A formed once per module
            // The factors are copied out: drop their mapped pages, so memory stays flat however
            // large the adapter is.
            for t in [m.a, m.b] + (m.mixer.map { [$0] } ?? []) { t.store.release(t.name) }
            for v in ma + b where !v.isFinite {
                throw MergeError(tensor: p.baseName, problem: "module \(m.name) has NaN or infinite factors")
            }
            if m.kind.isTransposed {
                // Base holds (B·M·A)ᵀ: rows index A's inputs, columns B's outputs.
                for i in 0..<rows { for t in 0..<rank { l[i * k + offset + t] = ma[t * rows + i] } }
                for t in 0..<rank { for j in 0..<cols { r[(offset + t) * cols + j] = term.factor * b[j * rank + t] } }
            } else {
                for i in 0..<rows { for t in 0..<rank { l[i * k + offset + t] = term.factor * b[i * rank + t] } }
                for t in 0..<rank { for j in 0..<cols { r[(offset + t) * cols + j] = ma[t * cols + j] } }
            }
            offset += rank
        }
        return (l, r, k)
    }

    private func writeBias(_ p: TensorPlan, store: any TensorContainer, writer: any TensorFileWriter) throws {
        var values = try store.doubles(p.baseName)
        for (bias, factor, module) in p.biasTerms {
            let b = try bias.doubles()
            for (i, v) in b.enumerated() {
                guard v.isFinite else { throw MergeError(tensor: p.baseName, problem: "module \(module) has a NaN or infinite lora_B.bias") }
                values[i] += factor * v
            }
        }
        var bytes = [UInt8](repeating: 0, count: values.count * p.base.dtype.byteSize)
        bytes.withUnsafeMutableBytes { dst in
            values.withUnsafeBufferPointer { ElementConversion.fromDouble(p.base.dtype, $0.baseAddress!, dst.baseAddress!, count: values.count) }
        }
        try checkFinite(bytes, dtype: p.base.dtype, tensor: p.baseName)
        submit(bytes, writer)
    }

    /// Checks stored values in chunks: a replaced lm_head must not cost another copy of itself in Float64.
    private func checkFinite(_ bytes: [UInt8], dtype: DType, tensor: String) throws {
        let n = bytes.count / dtype.byteSize
        let chunk = 4096
        let finite = bytes.withUnsafeBytes { raw in
            withUnsafeTemporaryAllocation(of: Double.self, capacity: chunk) { tmp in
                var i = 0
                while i < n {
                    let m = min(chunk, n - i)
                    ElementConversion.toDouble(dtype, raw.baseAddress! + i * dtype.byteSize, tmp.baseAddress!, count: m)
                    if tmp[0..<m].contains(where: { !$0.isFinite }) { return false }
                    i += m
                }
                return true
            }
        }
        if !finite {
            throw MergeError(tensor: tensor, problem: "the result holds NaN or infinity (or overflows \(dtype.rawValue))")
        }
    }
}

extension UpdateFactors {
    /// The same factors seen from row `offset` on (L's rows shifted; R and magnitudes shared).
    init(shifting f: UpdateFactors, by offset: Int) {
        self.rows = f.rows - offset
        self.cols = f.cols
        self.k = f.k
        self.l = UnsafeMutableBufferPointer(rebasing: f.l[(offset * f.k)...])
        self.panels = f.panels
        self.magnitude = f.magnitude.map { Array($0[offset...]) }
    }
}

