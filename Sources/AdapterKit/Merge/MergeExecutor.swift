import Foundation

/// Writes the tensors of a merge's output, one at a time, into a tensor file writer: unchanged
/// tensors are copied (in the kernel where the container gives a file region), changed ones run
/// their `TensorEdit` through one row-block loop. Writes go through the pipeline's queue while
/// this thread computes the next block; memory in flight is the pipeline's buffers plus one block
/// of input rows, whatever the tensor's size.
final class MergeExecutor {
    let options: MergeRunOptions
    let pipeline: WritePipeline
    /// Per-tensor statistics, when `options.report`.
    private(set) var reports: [MergeSummary.TensorReport] = []
    /// Rows read from the base for the block being computed.
    private var inputBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 64)
    /// The plan being written (quantized weights need their scales, which may be in another shard).
    var plan: MergePlan?
    /// Fresh scales of requantized weights, by scale tensor, until the scale tensor is written.
    private var pendingScales: [String: [UInt8]] = [:]
    /// What requantization kept of each quantized tensor's update.
    private(set) var retained: [(tensor: String, retention: Retention)] = []
    private var writtenScales: Set<String> = []

    /// Where a tensor's rows come from.
    enum RowSource {
        case memory(UnsafeRawPointer)
        case file(FileRegion)
    }

    init(options: MergeRunOptions, pipeline: WritePipeline) {
        self.options = options
        self.pipeline = pipeline
    }

    deinit { inputBuffer.deallocate() }

    /// Copies a tensor unchanged.
    func copy(_ name: String, from store: any TensorContainer, to writer: any TensorFileWriter) throws {
        let handoff = Handoff(value: writer)
        if let region = store.region(of: name) {
            store.prefetch(name)
            let file = Handoff(value: store)
            pipeline.submit {
                try handoff.value.append(region)
                file.value.release(name)
            }
        } else {
            let bytes = try store.withBytes(of: name) { Array($0) }
            pipeline.submit { try bytes.withUnsafeBytes { try handoff.value.append($0) } }
            store.release(name)
        }
    }

    /// Writes a changed tensor: its edit applied to the base's values.
    func write(_ p: TensorEdit, from store: any TensorContainer, to writer: any TensorFileWriter) throws {
        defer { store.release(p.baseName) }
        if let scaleName = p.base.encoding.scaleTensors.first, let plan {
            // A quantized weight: dequantized (`--dtype`), or requantized with fresh scales that
            // its scale tensor (perhaps in another shard) is written from.
            let fp8: Bool
            if case .blockScaledFP8 = p.base.encoding { fp8 = true } else { fp8 = false }
            if let dtype = p.outputDType {
                try fp8 ? dequantizeBlockScaledFP8(p, from: store, base: plan.base, dtype: dtype, to: writer)
                        : dequantizeFP4(p, from: store, base: plan.base, dtype: dtype, to: writer)
                return
            }
            let (scales, retention) = try requantize(p, from: store, base: plan.base, to: writer)
            if !writtenScales.contains(scaleName) { pendingScales[scaleName] = scales }
            retained.append((p.baseName, retention))
            if options.report {
                reports.append(.init(tensor: p.baseName, modules: p.terms.map(\.module.name),
                                     statistics: UpdateStatistics(maxAbsUpdate: retention.maxAbsUpdate, updateSquared: retention.update, appliedSquared: retention.applied),
                                     kept: retention.kept))
            }
            return
        }
        if let weight = p.scalesOf, let plan {
            // The scales of a requantized weight: kept from its merge, or computed now (the
            // weight comes later and its merge makes the same scales again).
            var bytes = pendingScales.removeValue(forKey: p.baseName)
            if bytes == nil, let edit = plan.changes[weight], let (_, file) = plan.base.tensor(weight) {
                bytes = try requantize(edit, from: plan.base.files[file], base: plan.base, to: nil).scales
            }
            guard let bytes else { preconditionFailure("a scale edit names the weight it belongs to") }
            writtenScales.insert(p.baseName)
            submit(bytes, writer)
            return
        }
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
        let rows = p.rows, cols = p.columns
        guard let codec = RowCodec(p.base.encoding) else { preconditionFailure("the plan admits only encodings with a codec") }
        if p.terms.isEmpty {
            // Replacement only: convert into the base dtype with one rounding.
            if let d = replacementDoubles { submit(try codec.encode(d, tensor: p.baseName), writer) }
            if let f = replacementValues { submit(try codec.encode(f, tensor: p.baseName), writer) }
            return
        }
        if let d = p.dora, case .lycoris(let onOutput, let epsilon) = d.module.doraRule {
            submit(try lycorisDoRA(p, term: d, onOutput: onOutput, epsilon: epsilon, store: store, codec: codec), writer)
            return
        }
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
                for segment in p.segments {
                    let (l, r, k) = try UpdateCompiler.factors(segment.terms.map { p.terms[$0] }, rows: segment.rows, viewRows: rows, cols: cols, tensor: p.baseName)
                    let first = segment.rows.lowerBound
                    finite = out.withUnsafeMutableBytes { dst in
                        MergeKernel.mergeRowsF64(source: src + first * cols * srcType.byteSize, sourceType: srcType, destination: dst.baseAddress! + first * cols * 8,
                                                 rows: 0..<segment.rows.count, cols: cols, l: l, r: r, k: k,
                                                 magnitude: magnitude.map { Array($0[segment.rows]) }, statistics: &stats)
                    } && finite
                }
            }
            guard finite else { throw nonFinite(p) }
            if dtype != .f64 {
                let count = rows * cols
                var narrow = [UInt8](repeating: 0, count: codec.byteCount(count))
                let finite = count == 0 || out.withUnsafeBytes { src in
                    narrow.withUnsafeMutableBytes { codec.encode(src.baseAddress!.assumingMemoryBound(to: Double.self), count: count, into: $0.baseAddress!) }
                }
                guard finite else {
                    throw MergeError(tensor: p.baseName, problem: "the result holds NaN or infinity (or overflows \(dtype.rawValue))")
                }
                out = narrow
            }
            submit(out, writer)
        } else {
            // Float32: the fused kernel, one row block at a time. Rows are read with pread where the
            // container gives a file region: a copy from the page cache costs less than faulting in
            // and later dropping a mapping.
            let region = p.replacement == nil ? store.region(of: p.baseName) : nil
            func run(_ source: RowSource, _ sourceType: DType) throws {
                for segment in p.segments {
                    try mergeInBlocks(p, rows: segment.rows, terms: segment.terms.map { p.terms[$0] }, source: source, sourceType: sourceType,
                                      magnitude: magnitude, writer: writer, statistics: &stats)
                }
            }
            if let region {
                try run(.file(region), dtype)
            } else {
                try source { src, srcType in try run(.memory(src), srcType) }
            }
        }
        if let stats {
            reports.append(.init(tensor: p.baseName, modules: p.terms.map(\.module.name), statistics: stats, kept: nil))
        }
    }

    /// A quantized weight merged and requantized in its own scheme: its codes written when `writer`
    /// is given, its scale tensor's new bytes returned either way.
    private func requantize(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint,
                            to writer: (any TensorFileWriter)?) throws -> (scales: [UInt8], retention: Retention) {
        if case .blockScaledFP8 = p.base.encoding {
            let (scales, retention) = try mergeBlockScaledFP8(p, from: store, base: base, to: writer)
            return (scales.encoded(), retention)
        }
        return try mergeFP4(p, from: store, base: base, to: writer)
    }

    /// Queues a small computed tensor for writing.
    private func submit(_ bytes: [UInt8], _ writer: any TensorFileWriter) {
        let handoff = Handoff(value: writer)
        pipeline.submit { try bytes.withUnsafeBytes { try handoff.value.append($0) } }
    }

    /// Computes the blocks of `rows` into pipeline buffers; each block is written while the next is
    /// computed. Rows no term covers are converted (or copied) unchanged, never added to.
    private func mergeInBlocks(_ p: TensorEdit, rows: Range<Int>, terms: [MergeTerm], source: RowSource, sourceType: DType,
                               magnitude: [Double]?, writer: any TensorFileWriter, statistics: inout UpdateStatistics?) throws {
        let dtype = p.base.dtype
        let cols = p.columns
        let rowBytes = cols * dtype.byteSize
        let sourceRowBytes = cols * sourceType.byteSize
        // LyCORIS updates whose exact factors are dearer than their rows (a Kronecker row is one
        // product per element, the factors' rank k·k₂ products) are added row by row in Float64;
        // `--report` and DoRA keep the factor path, which they measure.
        let useRows = { (t: MergeTerm) in Self.rowsAreCheaper(t, policy: self.options.denseRows) }
        // `--report` measures on the same path (so it never changes a byte) where every term is
        // dense; mixed with low-rank terms, the kernel measures and the factors are used.
        let candidates = magnitude == nil ? terms.filter(useRows) : []
        let dense = statistics == nil || candidates.count == terms.count ? candidates : []
        let lowRank = dense.isEmpty ? terms : terms.filter { !useRows($0) }
        defer { for t in dense { t.module.dense?.update.release() } }
        let factors: UpdateFactorStorage? = try lowRank.isEmpty ? nil : {
            let (l, r, k) = try UpdateCompiler.factors(lowRank, rows: rows, viewRows: p.rows, cols: cols, tensor: p.baseName)
            return UpdateFactorStorage(l: l, r: r, rows: rows.count, cols: cols, k: k, magnitude: magnitude.map { Array($0[rows]) })
        }()
        let blockRows = max(1, min(rows.count, pipeline.blockBytes / max(1, rowBytes)))
        var sum: [Double] = [], narrowed: [Float] = []
        var row = rows.lowerBound
        while row < rows.upperBound {
            let end = min(rows.upperBound, row + blockRows)
            let buffer = try pipeline.acquire(bytes: (end - row) * rowBytes)
            // The kernel indexes rows from the block's start: shift the pointers to the block.
            let src: UnsafeRawPointer
            switch source {
            case .memory(let base):
                src = base + row * sourceRowBytes
            case .file(let region):
                let count = (end - row) * sourceRowBytes
                if inputBuffer.count < count {
                    inputBuffer.deallocate()
                    inputBuffer = .allocate(byteCount: count, alignment: 64)
                }
                let got = try region.descriptor.read(into: UnsafeMutableRawBufferPointer(rebasing: inputBuffer[0..<count]),
                                                     at: region.range.lowerBound + row * sourceRowBytes)
                guard got == count else {
                    pipeline.giveBack(buffer)
                    throw InputError(region.path, "the file shrank while being read")
                }
                src = UnsafeRawPointer(inputBuffer.baseAddress!)
            }
            if !dense.isEmpty {
                // W + Σ factor·ΔW rows in Float64; then one rounding into the base dtype, or, with
                // low-rank terms as well, into Float32 for the kernel to add them and round once more.
                let n = (end - row) * cols
                if sum.count < n { sum = [Double](repeating: 0, count: n) }
                if factors != nil && narrowed.count < n { narrowed = [Float](repeating: 0, count: n) }
                var finite: Bool
                do {
                    finite = try sum.withUnsafeMutableBufferPointer { sp in
                        try narrowed.withUnsafeMutableBufferPointer { np in
                            try addDenseRows(p, rows: row..<end, terms: dense, source: src, sourceType: sourceType, sum: sp.baseAddress!,
                                             narrowTo: factors == nil ? nil : np.baseAddress!, out: buffer.baseAddress!)
                        }
                    }
                } catch {
                    pipeline.giveBack(buffer)
                    throw error
                }
                if statistics != nil && factors == nil && finite {
                    // Δ = the Float64 sum − W before rounding; W' − W after it.
                    var block = UpdateStatistics()
                    var w = [Double](repeating: 0, count: n), merged = [Double](repeating: 0, count: n)
                    w.withUnsafeMutableBufferPointer { ElementConversion.toDouble(sourceType, src, $0.baseAddress!, count: n) }
                    merged.withUnsafeMutableBufferPointer { ElementConversion.toDouble(dtype, UnsafeRawPointer(buffer.baseAddress!), $0.baseAddress!, count: n) }
                    for i in 0..<n {
                        let d = sum[i] - w[i], a = merged[i] - w[i]
                        block.maxAbsUpdate = max(block.maxAbsUpdate, abs(d))
                        block.updateSquared += d * d
                        block.appliedSquared += a * a
                    }
                    statistics!.add(block)
                }
                if let factors {
                    finite = withExtendedLifetime(factors) {
                        narrowed.withUnsafeBytes { f in
                            MergeKernel.merge(source: f.baseAddress!, sourceType: .f32, destination: buffer.baseAddress!, destinationType: dtype,
                                              rows: 0..<(end - row), factors: factors.rows(from: row - rows.lowerBound), wantStatistics: false,
                                              threads: options.threads).finite
                        }
                    }
                }
                guard finite else {
                    pipeline.giveBack(buffer)
                    throw nonFinite(p)
                }
            } else if let factors {
                // The kernel indexes rows from the block's start: the factors seen from its first row.
                let result = withExtendedLifetime(factors) {
                    MergeKernel.merge(source: src, sourceType: sourceType, destination: buffer.baseAddress!, destinationType: dtype,
                                      rows: 0..<(end - row), factors: factors.rows(from: row - rows.lowerBound),
                                      wantStatistics: statistics != nil, threads: options.threads)
                }
                guard result.finite else {
                    pipeline.giveBack(buffer)
                    throw nonFinite(p)
                }
                if let s = result.statistics { statistics!.add(s) }
            } else if sourceType == dtype {
                buffer.baseAddress!.copyMemory(from: src, byteCount: (end - row) * rowBytes)
            } else {
                // Rows of a replacement that no term covers: one rounding into the base dtype.
                let n = (end - row) * cols
                guard let from = RowCodec(.plain(sourceType)), let to = RowCodec(p.base.encoding) else { preconditionFailure("plain float rows") }
                let finite = withUnsafeTemporaryAllocation(of: Float.self, capacity: max(1, n)) { tmp in
                    from.decode(src, count: n, into: tmp.baseAddress!)
                    return to.encode(tmp.baseAddress!, count: n, into: buffer.baseAddress!)
                }
                guard finite else {
                    pipeline.giveBack(buffer)
                    throw nonFinite(p)
                }
            }
            pipeline.write(buffer, count: (end - row) * rowBytes, with: writer)
            row = end
        }
    }

    /// Rows `rows` of a tensor's view (the block at `source`): W + Σ factor·ΔW of the dense terms in
    /// Float64 into `sum`, on all cores; then Float32 rows into `narrowTo` for the kernel, or, without
    /// it, each value rounded once into `out`. Returns whether every value written to `out` is finite.
    private func addDenseRows(_ p: TensorEdit, rows: Range<Int>, terms: [MergeTerm], source: UnsafeRawPointer, sourceType: DType,
                              sum: UnsafeMutablePointer<Double>, narrowTo: UnsafeMutablePointer<Float>?, out: UnsafeMutableRawPointer) throws -> Bool {
        guard let codec = RowCodec(p.base.encoding) else { preconditionFailure("plain float rows") }
        let cols = p.columns, dtype = p.base.dtype
        let chunks = max(1, min(rows.count, options.threads * 2))
        let failure = LockedValue<Error?>(nil), nonFinite = LockedValue(false)
        let sums = UncheckedPointer(raw: UnsafeRawPointer(sum)), input = UncheckedPointer(raw: source), output = UncheckedPointer(raw: UnsafeRawPointer(out))
        let narrow = narrowTo.map { UncheckedPointer(raw: UnsafeRawPointer($0)) }
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            let lo = rows.lowerBound + rows.count * c / chunks, hi = rows.lowerBound + rows.count * (c + 1) / chunks
            guard hi > lo else { return }
            let first = (lo - rows.lowerBound) * cols, count = (hi - lo) * cols
            let s = UnsafeMutableRawPointer(mutating: sums.raw).assumingMemoryBound(to: Double.self) + first
            ElementConversion.toDouble(sourceType, input.raw + first * sourceType.byteSize, s, count: count)
            for t in terms {
                let placed = t.rows.rows(of: p.rows)
                do {
                    try t.module.dense!.add((lo - placed.lowerBound)..<(hi - placed.lowerBound), times: t.factor, into: s)
                } catch is NonFiniteFactors {
                    failure.set(MergeError(tensor: p.baseName, problem: "module \(t.module.name) has NaN or infinite factors"))
                    return
                } catch {
                    failure.set(error)
                    return
                }
            }
            if let narrow {
                let f = UnsafeMutableRawPointer(mutating: narrow.raw).assumingMemoryBound(to: Float.self) + first
                for i in 0..<count { f[i] = Float(s[i]) }
            } else if !codec.encode(UnsafePointer(s), count: count, into: UnsafeMutableRawPointer(mutating: output.raw) + first * dtype.byteSize) {
                nonFinite.set(true)
            }
        }
        if let e = failure.value { throw e }
        return !nonFinite.value
    }

    /// A LyCORIS DoRA module's weight, whole, in Float64 (its norms may run down columns):
    /// V = W + s·ΔW, each output row's (or input channel's) norm, the `dora_scale` ratio blended
    /// by the adapter weight, one rounding into the base dtype.
    private func lycorisDoRA(_ p: TensorEdit, term: MergeTerm, onOutput: Bool, epsilon: Double, store: any TensorContainer, codec: RowCodec) throws -> [UInt8] {
        let m = term.module
        let weight = term.factor / m.scale
        let rows = p.rows, cols = p.columns
        var v = [Double](repeating: 0, count: rows * cols)
        var stats: UpdateStatistics? = nil
        let (l, r, k) = try UpdateCompiler.factors([MergeTerm(module: m, factor: m.scale)], rows: 0..<rows, viewRows: rows, cols: cols, tensor: p.baseName)
        let dtype = p.base.dtype
        let finite = try store.withBytes(of: p.baseName) { raw in
            v.withUnsafeMutableBytes { dst in
                MergeKernel.mergeRowsF64(source: raw.baseAddress ?? UnsafeRawPointer(bitPattern: 8)!, sourceType: dtype, destination: dst.baseAddress!,
                                         rows: 0..<rows, cols: cols, l: l, r: r, k: k, magnitude: nil, statistics: &stats)
            }
        }
        guard finite else { throw nonFinite(p) }
        let scale = try m.magnitude!.doubles()
        // Per output: each row; per input: channel c is the columns c·kernel ..< (c+1)·kernel of every row.
        let kernel = onOutput ? cols : max(1, p.outputShape.dropFirst(2).reduce(1, *))
        let groups = onOutput ? rows : cols / kernel
        guard scale.count == groups else {
            throw MergeError(tensor: p.baseName, problem: "module \(m.name): dora_scale has \(scale.count) values for \(groups) \(onOutput ? "outputs" : "input channels")")
        }
        var norms = [Double](repeating: 0, count: groups)
        for i in 0..<rows {
            for j in 0..<cols { norms[onOutput ? i : j / kernel] += v[i * cols + j] * v[i * cols + j] }
        }
        let ratio = (0..<groups).map { g in weight * (scale[g] / (norms[g].squareRoot() + epsilon) - 1) + 1 }
        for i in 0..<rows {
            for j in 0..<cols { v[i * cols + j] *= ratio[onOutput ? i : j / kernel] }
        }
        return try codec.encode(v, tensor: p.baseName)
    }

    /// Whether a term is cheaper as dense rows than as its exact factors. The fused kernel does a
    /// rank-k element in about k/50 ns on this class of machine; the rows path costs a few ns per
    /// element whatever the rank, plus its products (measured with Benchmarks/lycoris.sh): rows win
    /// from rank 256 up, and for a Hadamard row of r₁ + r₂ products from rank 12·(r₁ + r₂).
    private static func rowsAreCheaper(_ t: MergeTerm, policy: DenseRowsPolicy) -> Bool {
        guard let d = t.module.dense, !t.holdsTranspose, t.columns == nil, policy != .never else { return false }
        return policy == .always || t.module.rank > max(256, 12 * d.update.costPerElement)
    }

    private func nonFinite(_ p: TensorEdit) -> MergeError {
        MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity (or overflow \(p.base.dtype.rawValue)); modules: \(p.moduleNames.joined(separator: ", "))")
    }

    private func writeBias(_ p: TensorEdit, store: any TensorContainer, writer: any TensorFileWriter) throws {
        var values = try store.doubles(p.baseName)
        for (bias, factor, module) in p.biasTerms {
            let b = try bias.doubles()
            for (i, v) in b.enumerated() {
                guard v.isFinite else { throw MergeError(tensor: p.baseName, problem: "module \(module) has a NaN or infinite lora_B.bias") }
                values[i] += factor * v
            }
        }
        guard let codec = RowCodec(p.base.encoding) else { preconditionFailure("the plan admits only encodings with a codec") }
        submit(try codec.encode(values, tensor: p.baseName), writer)
    }
}

/// A value several workers may set, read once they are done.
final class LockedValue<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T {
        lock.lock()
        defer { lock.unlock() }
        return stored
    }
    func set(_ v: T) {
        lock.lock()
        stored = v
        lock.unlock()
    }
}
