import Foundation

/// `adapter merge BASE.gguf ADAPTER OUT.gguf` (docs/formats.md §11): every adapted tensor decoded,
/// the update added in Float32 by the merge kernel, and encoded again in its own GGML type by
/// ggml's reference quantizer (or in `dequantize`'s type); every other tensor and all metadata
/// copied byte for byte. A band of rows of one tensor in memory at a time.
public struct GGUFMergePlan: Sendable {
    /// The updates of one row range of a tensor's [rows, cols] view (all of it for a 2-D weight,
    /// one expert of a 3-D `_exps` tensor): L (rows × k, the scale, weight and mixer folded in, rows
    /// permuted like the base) and R (k × cols), terms side by side.
    struct Segment: Sendable {
        let rows: Range<Int>
        var l: [Double] = []
        var r: [Double] = []
        var k = 0
    }

    struct Edit: Sendable {
        let tensor: GGUFTensorInfo
        var segments: [Segment] = []
        var modules: [String] = []
        var outputType: GGMLType
        /// The 2-D view: [experts · out, in] for 3-D expert tensors.
        var viewRows: Int { tensor.shape.dropLast().reduce(1, *) }
        var viewColumns: Int { tensor.shape.last ?? 1 }

        /// Adds a term on `rows`; terms on exactly the same rows are joined, overlapping ones refused.
        mutating func add(rows: Range<Int>, l: [Double], r: [Double], k: Int) -> Bool {
            if let i = segments.firstIndex(where: { $0.rows == rows }) {
                var s = segments[i]
                let n = rows.count
                var joined = [Double](repeating: 0, count: n * (s.k + k))
                for i in 0..<n {
                    for j in 0..<s.k { joined[i * (s.k + k) + j] = s.l[i * s.k + j] }
                    for j in 0..<k { joined[i * (s.k + k) + s.k + j] = l[i * k + j] }
                }
                s.l = joined
                s.r += r
                s.k += k
                segments[i] = s
                return true
            }
            if segments.contains(where: { $0.rows.overlaps(rows) }) { return false }
            segments.append(Segment(rows: rows, l: l, r: r, k: k))
            return true
        }
    }

    public let file: GGUFFile
    let edits: [String: Edit]
    public let notes: [String]
    public let moduleCount: Int
    let dequantize: GGMLType?
    /// Every file the merge reads: OUT may not be, be inside, or contain any of them.
    let inputFiles: [String]

    public init(base path: String, inputs: [MergeInput], dropUnknown: Bool = false, dequantize: DType? = nil) throws {
        let file = try GGUFFile(path: path)
        let base = try GGUFBase(file: file)
        var problems: [String] = []
        var notes: [String] = []
        var edits: [String: Edit] = [:]
        var merged = 0, permuted = 0
        var target: GGMLType? = nil
        if let d = dequantize {
            guard let t: GGMLType = [.f32: .f32, .f16: .f16, .bf16: .bf16][d] else { throw InputError(path, "--dtype \(d.rawValue): merged GGUF tensors are written as F32, F16 or BF16") }
            target = t
        }
        for input in inputs {
            let a = input.adapter
            let label = inputs.count > 1 ? "\(a.path): " : ""
            if !a.unknownKeys.isEmpty && !dropUnknown { problems.append("\(label)\(unknownKeysPhrase(a.unknownKeys)); use --drop-unknown to merge without them") }
            if let r = a.replacements.first { problems.append("\(label)\(r.tensor.name) replaces \(r.baseName) whole (modules_to_save), which merges into GGUF do not do yet") }
            for m in a.modules {
                guard m.kind == .linear, m.magnitude == nil, m.bias == nil else {
                    problems.append("\(label)module \(m.name): \(m.magnitude != nil ? "DoRA" : m.bias != nil ? "lora_B.bias" : "a \(m.kind.rawValue) layer"), which merges into GGUF do not take yet")
                    continue
                }
                // Where the module lands: a whole 2-D weight, or expert rows of 3-D `_exps` tensors.
                let placements: [(name: String, module: LoRAModule, rows: Range<Int>?)]
                switch GGUFBase.placements(of: m, in: file) {
                case .success(let p): placements = p
                case .failure(let problem):
                    problems.append("\(label)module \(m.name): \(problem.text)")
                    continue
                }
                var ok = true
                for (name, piece, expertRows) in placements {
                    guard let t = file.tensor(name) else { problems.append("\(label)module \(m.name): the base has no \(name)"); ok = false; break }
                    guard GGMLCodec.hasCodec(t.type) else {
                        problems.append("\(label)module \(m.name): \(name) is \(t.type.name), which merges do not decode (F32, F16, BF16, Q4_0 … Q8_0 and Q2_K … Q6_K are read and written)")
                        ok = false
                        break
                    }
                    var e = edits[name] ?? Edit(tensor: t, outputType: target ?? t.type)
                    let rows = expertRows ?? 0..<e.viewRows, cols = e.viewColumns
                    guard rows.upperBound <= e.viewRows, [rows.count, cols] == [piece.outFeatures, piece.inFeatures] else {
                        problems.append("\(label)module \(m.name): the update is [\(piece.outFeatures), \(piece.inFeatures)] but \(expertRows == nil ? "\(name) is \(t.shape)" : "rows \(rows.lowerBound)..<\(rows.upperBound) of \(name) \(t.shape) are [\(rows.count), \(cols)]")")
                        ok = false
                        break
                    }
                    let (l0, r0, k) = try UpdateCompiler.factors([MergeTerm(module: piece, factor: m.scale * input.weight)], rows: 0..<rows.count, viewRows: rows.count,
                                                                 cols: cols, tensor: name)
                    var l = l0
                    switch base.permutationHeads(for: name, rows: rows.count) {
                    case .failure(let problem):
                        problems.append("\(label)module \(m.name): \(problem.text)")
                        ok = false
                    case .success(let n?):
                        l = GGUFBase.permutedRows(l, rows: rows.count, cols: k, heads: n)
                        permuted += 1
                    case .success(nil):
                        break
                    }
                    guard ok else { break }
                    guard e.add(rows: rows, l: l, r: r0, k: k) else {
                        problems.append("\(label)module \(m.name): its rows of \(name) overlap another update's without being the same rows")
                        ok = false
                        break
                    }
                    if !e.modules.contains(m.name) { e.modules.append(m.name) }
                    edits[name] = e
                }
                if ok { merged += 1 }
            }
        }
        if edits.isEmpty && problems.isEmpty { problems.append("no module of the adapter applies to this base") }
        guard problems.isEmpty else { throw ProblemList(subject: "preflight", problems: problems) }
        if permuted > 0 { notes.append("permuted the rows of \(permuted) q/k updates as convert_hf_to_gguf.py permutes \(base.architecture)'s q and k weights") }
        self.file = file
        self.edits = edits
        self.notes = notes
        self.moduleCount = merged
        self.dequantize = target
        self.inputFiles = [path] + inputs.flatMap { [$0.adapter.path] + $0.adapter.inputFiles }
    }

    /// Writes OUT (a new file beside it, renamed into place when complete).
    ///
    /// `bandValues`: values per band of rows the merge holds at once (at least one row), which bounds
    /// its memory by about 16 MB per buffer whatever the tensor's size; tests lower it to cross band edges.
    public func write(to output: String, options: MergeRunOptions = MergeRunOptions(), bandValues: Int = 1 << 22) throws -> MergeSummary {
        try OutputRules.check(output, kind: .file, inputs: inputFiles, force: options.force)
        let start = DispatchTime.now()
        var summary = MergeSummary()
        summary.notes = notes
        var metadata = file.metadata
        let types = file.tensors.map { edits[$0.name]?.outputType ?? $0.type }
        if let t = dequantize, let i = metadata.firstIndex(where: { $0.key == "general.file_type" }) {
            // The file type names the weights' type only when every matrix has it.
            let matrices = zip(file.tensors, types).filter { $0.0.dims.count >= 2 }.map(\.1)
            if matrices.allSatisfy({ $0 == t }) { metadata[i].value = .u32([GGMLType.f32: 0, .f16: 1, .bf16: 32][t]!) }
        }
        let layout = try GGUFLayout(metadata: metadata, tensors: zip(file.tensors, types).map { GGUFLayout.Tensor(name: $0.0.name, dims: $0.0.dims, type: $0.1) },
                                    alignment: file.alignment)
        let out = try TemporaryOutput(target: output, kind: .file)
        summary.notes += out.notes
        var retained: [(String, MergeExecutor.Retention)] = []
        do {
            let fd = out.file!
            try layout.write(to: fd, source: { i in
                let t = file.tensors[i]
                guard let e = edits[t.name] else {
                    summary.tensorsCopied += 1
                    return .copy(file.descriptor, offset: file.range(of: t).lowerBound)  // byte for byte, in the kernel
                }
                summary.tensorsChanged += 1
                return .stream { emit in
                    let (retention, statistics) = try Self.merge(e, from: file, bandValues: bandValues, threads: options.threads, report: options.report, emit: emit)
                    if let retention { retained.append((t.name, retention)) }
                    if options.report, let statistics {
                        summary.reports.append(.init(tensor: t.name, modules: e.modules, statistics: statistics, kept: retention?.kept))
                    }
                }
            })
            if options.sync { try fd.sync() }
            try out.commit(replacing: options.force)
        } catch {
            out.discard()
            throw error
        }
        summary.notes += OutputAssembly.retentionNotes(retained)
        if retained.contains(where: { $0.1.kept < 0.5 }) {
            summary.notes.append("merge with --dtype f16 (or bf16, f32) to keep the update: the merged tensors are then written unquantized")
        }
        summary.bytesWritten = layout.header.count + layout.tensors.reduce(0) { $0 + ($1.byteCount + file.alignment - 1) / file.alignment * file.alignment }
        summary.seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        summary.modulesMerged = moduleCount
        summary.updatesMerged = moduleCount
        return summary
    }

    /// One tensor, in bands of whole rows: each band read, decoded, W + L·R added in Float32 by the
    /// kernel on the rows an update covers, encoded in its output type and handed to `emit`; with
    /// what a block type's requantization kept of the update.
    static func merge(_ e: Edit, from file: GGUFFile, bandValues: Int, threads: Int, report: Bool, emit: ([UInt8]) throws -> Void) throws
        -> (retention: MergeExecutor.Retention?, statistics: UpdateStatistics?)
    {
        let t = e.tensor, rows = e.viewRows, cols = e.viewColumns
        let rowBytes = cols / t.type.blockSize * t.type.typeSize
        let band = max(1, min(rows, bandValues / max(cols, 1)))
        let factors = e.segments.map {
            UpdateFactorStorage(l: $0.l, r: $0.r, rows: $0.rows.count, cols: cols, k: $0.k, magnitude: nil)
        }
        let start = file.range(of: t).lowerBound
        var statistics: UpdateStatistics? = report ? UpdateStatistics() : nil
        var kept: MergeExecutor.Retention? = GGMLCodec.isQuantized(e.outputType) ? MergeExecutor.Retention() : nil
        var b0 = 0
        while b0 < rows {
            let b1 = min(rows, b0 + band), n = (b1 - b0) * cols
            let raw = try file.descriptor.readBytes(count: (b1 - b0) * rowBytes, at: start + b0 * rowBytes)
            guard raw.count == (b1 - b0) * rowBytes else { throw InputError(file.path, "the file shrank while being read") }
            guard let base = GGMLCodec.decode(t.type, raw, count: n) else { preconditionFailure("the plan admits tensors with a codec") }
            if let bad = base.firstIndex(where: { !$0.isFinite }) {
                throw MergeError(tensor: t.name, problem: "its value at row \(b0 + bad / cols), column \(bad % cols) is \(base[bad])")
            }
            // Rows no update covers stay as decoded; each segment is merged on its rows in this band.
            var merged = base
            for (segment, storage) in zip(e.segments, factors) {
                let lo = max(b0, segment.rows.lowerBound), hi = min(b1, segment.rows.upperBound)
                guard lo < hi else { continue }
                let offset = (lo - b0) * cols * 4
                let result = base.withUnsafeBytes { src in
                    merged.withUnsafeMutableBytes { dst in
                        withExtendedLifetime(storage) {
                            MergeKernel.merge(source: src.baseAddress! + offset, sourceType: .f32, destination: dst.baseAddress! + offset, destinationType: .f32,
                                              rows: 0..<(hi - lo), factors: storage.rows(from: lo - segment.rows.lowerBound), wantStatistics: report, threads: threads)
                        }
                    }
                }
                guard result.finite else { throw MergeError(tensor: t.name, problem: "the merged values hold NaN or infinity; modules: \(e.modules.joined(separator: ", "))") }
                if let s = result.statistics { statistics?.add(s) }
            }
            if e.outputType == .f16, merged.contains(where: { abs($0) > 65504 }) {
                throw MergeError(tensor: t.name, problem: "the merged values overflow F16; modules: \(e.modules.joined(separator: ", "))")
            }
            guard let bytes = GGMLCodec.encode(e.outputType, merged) else { preconditionFailure("output types have codecs") }
            if kept != nil, let q = GGMLCodec.decode(e.outputType, bytes, count: n) {
                var part = MergeExecutor.Retention()
                for i in 0..<n {
                    let d = Double(merged[i]) - Double(base[i]), g = Double(q[i]) - Double(base[i])
                    part.dot += g * d
                    part.update += d * d
                    part.applied += g * g
                    part.maxAbsUpdate = max(part.maxAbsUpdate, abs(d))
                }
                kept?.add(part)
            }
            try emit(bytes)
            b0 = b1
        }
        return (kept, statistics)
    }
}
