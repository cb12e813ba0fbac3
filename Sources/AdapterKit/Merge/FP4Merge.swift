import CMergeKernel
import Foundation

/// Merges into FP4 weights: MXFP4 experts (gpt-oss `…_blocks` + `…_scales`, docs/formats.md §9c)
/// and NVFP4 (compressed-tensors, §9d). The codes decoded to Float32 (MXFP4 exactly; NVFP4 as
/// compressed-tensors decompresses), the update added by the same kernel as every merge, then
/// requantized per group (32 or 16 values) with fresh scales.
extension MergeExecutor {
    /// The codes and scales of an FP4 tensor (MXFP4 or NVFP4), read a band of rows at a time.
    struct FP4Rows {
        /// Values per scale: 32 (MXFP4) or 16 (NVFP4).
        let group: Int
        /// Rows of the decoded view ([experts ·] rows) and scale groups per row.
        let rows: Int, groups: Int
        var rowBytes: Int { groups * group / 2 }
        var columns: Int { groups * group }
        /// One scale byte per group of every row (E8M0 or E4M3).
        var scales: [UInt8]
        /// NVFP4's global scale (1 for MXFP4).
        let global: Float
        let region: FileRegion?
        let whole: [UInt8]?

        init(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint) throws {
            let value = p.valueShape
            let scaleName: String
            switch p.base.encoding {
            case .mxfp4(let s):
                (group, scaleName, global) = (32, s, 1)
            case .nvfp4(let s, let g):
                (group, scaleName) = (16, s)
                guard let (entry, file) = base.tensor(g) else { preconditionFailure("the checkpoint found the global scale") }
                let v = try base.files[file].floats(entry.name)
                guard let first = v.first, first.isFinite, first > 0 else {
                    throw MergeError(tensor: p.baseName, problem: "its global scale \(g) is \(v.first.map { "\($0)" } ?? "empty"), not a finite positive scale")
                }
                global = first
            default:
                preconditionFailure("FP4 encodings only")
            }
            groups = (value.last ?? 0) / group
            rows = value.dropLast().reduce(1, *)
            precondition(p.columns == groups * group, "FP4 tensors are merged in their [rows, values] view")
            guard let (scaleEntry, scaleFile) = base.tensor(scaleName) else { preconditionFailure("the plan found the scales") }
            scales = try base.files[scaleFile].withBytes(of: scaleEntry.name) { Array($0) }
            guard scales.count == rows * groups else { preconditionFailure("the checkpoint checked the scales' shape") }
            if let problem = Self.nanScale(scales, name: scaleName, groups: groups, e8m0: group == 32) {
                throw MergeError(tensor: p.baseName, problem: problem)
            }
            region = store.region(of: p.baseName)
            whole = region == nil ? try store.withBytes(of: p.baseName) { Array($0) } : nil
        }

        /// The first NaN scale byte (E8M0 0xFF, E4M3 S.1111.111) of `groups` per row, as a problem.
        static func nanScale(_ scales: UnsafeRawBufferPointer, name: String, groups: Int, e8m0: Bool) -> String? {
            guard let bad = scales.firstIndex(where: e8m0 ? { $0 == 0xFF } : { $0 & 0x7F == 0x7F }) else { return nil }
            let g = max(1, groups)
            return "its scale \(name)[\(bad / g), \(bad % g)] is 0x\(String(scales[bad], radix: 16, uppercase: true)) (NaN in \(e8m0 ? "E8M0" : "E4M3"))"
        }

        static func nanScale(_ scales: [UInt8], name: String, groups: Int, e8m0: Bool) -> String? {
            scales.withUnsafeBytes { nanScale($0, name: name, groups: groups, e8m0: e8m0) }
        }

        /// The codes of rows lo..<hi into `raw`.
        func read(_ lo: Int, _ hi: Int, into raw: UnsafeMutableRawPointer) throws {
            let count = (hi - lo) * rowBytes
            if let region {
                let got = try region.descriptor.read(into: UnsafeMutableRawBufferPointer(start: raw, count: count), at: region.range.lowerBound + lo * rowBytes)
                guard got == count else { throw InputError(region.path, "the file shrank while being read") }
            } else {
                whole!.withUnsafeBytes { raw.copyMemory(from: $0.baseAddress! + lo * rowBytes, byteCount: count) }
            }
        }

        /// Decodes `groups` groups into both buffers (the base values and the ones the update is added to).
        func decode(_ codes: UnsafeRawPointer, _ scales: UnsafePointer<UInt8>, _ count: Int, _ base: UnsafeMutablePointer<Float>,
                    _ merged: UnsafeMutablePointer<Float>) {
            let c = codes.assumingMemoryBound(to: UInt8.self)
            if group == 32 {
                _ = adapter_mxfp4_decode(c, scales, count, base, merged)
            } else {
                _ = adapter_nvfp4_decode(c, scales, count, global, base, merged)
            }
        }

        /// Requantizes `count` groups: new codes and scale bytes, the sums of what was kept.
        func encode(_ base: UnsafePointer<Float>, _ merged: UnsafePointer<Float>, _ codes: UnsafeMutableRawPointer, _ scales: UnsafeMutablePointer<UInt8>,
                    _ count: Int, _ sums: UnsafeMutablePointer<Double>) {
            let c = codes.assumingMemoryBound(to: UInt8.self)
            if group == 32 {
                adapter_mxfp4_encode(base, merged, c, scales, count, sums)
            } else {
                adapter_nvfp4_encode(base, merged, c, scales, count, global, sums)
            }
        }
    }

    /// An FP4 tensor (MXFP4 or NVFP4) merged and requantized: rows no update covers keep their
    /// bytes; the others, band by band on every core, are decoded, merged in Float32, and encoded
    /// with fresh per-group scales (`adapter_mxfp4_encode`, `adapter_nvfp4_encode`). Writes the
    /// codes when `writer` is given and returns the whole scale tensor either way (it may sit in
    /// another shard).
    func mergeFP4(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint,
                  to writer: (any TensorFileWriter)?) throws -> (scales: [UInt8], retention: Retention) {
        let t = try FP4Rows(p, from: store, base: base)
        var scales = t.scales
        let cols = t.columns, groups = t.groups, rowBytes = t.rowBytes
        let bandRows = max(1, min(t.rows, (4 << 20) / max(1, cols)))
        let decoded = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, bandRows * cols))
        let merged = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, bandRows * cols))
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bandRows * rowBytes), alignment: 64)
        defer { decoded.deallocate(); merged.deallocate(); raw.deallocate() }
        let (dec, mer, codes) = (UncheckedMutable(decoded), UncheckedMutable(merged), UncheckedRaw(raw))
        let threads = max(1, options.threads)
        var retention = Retention()
        func emit(_ count: Int) throws {
            guard let writer else { return }
            let buffer = try pipeline.acquire(bytes: count)
            buffer.baseAddress!.copyMemory(from: raw.baseAddress!, byteCount: count)
            pipeline.write(buffer, count: count, with: writer)
        }
        for segment in p.segments {
            let factors: UpdateFactorStorage? = try segment.terms.isEmpty ? nil : {
                let (l, r, k) = try UpdateCompiler.factors(segment.terms.map { p.terms[$0] }, rows: segment.rows, viewRows: p.rows, cols: cols, tensor: p.baseName)
                return UpdateFactorStorage(l: l, r: r, rows: segment.rows.count, cols: cols, k: k, magnitude: nil)
            }()
            var lo = segment.rows.lowerBound
            while lo < segment.rows.upperBound {
                let hi = min(segment.rows.upperBound, lo + bandRows), rows = hi - lo
                try t.read(lo, hi, into: raw.baseAddress!)
                guard let factors else {
                    try emit(rows * rowBytes)  // no update on these rows: their bytes as they are
                    lo = hi
                    continue
                }
                try scales.withUnsafeMutableBufferPointer { allScales in
                    let sc = UncheckedMutable(UnsafeMutableBufferPointer(rebasing: allScales[lo * groups..<hi * groups]))
                    let reader = t
                    inRowChunks(rows) { range in
                        reader.decode(codes.at(range.lowerBound * rowBytes), sc.base.baseAddress! + range.lowerBound * groups, range.count * groups,
                                      dec.base.baseAddress! + range.lowerBound * cols, mer.base.baseAddress! + range.lowerBound * cols)
                    }
                    let result = withExtendedLifetime(factors) {
                        MergeKernel.merge(source: UnsafeRawPointer(decoded.baseAddress!), sourceType: .f32,
                                          destination: UnsafeMutableRawPointer(merged.baseAddress!), destinationType: .f32,
                                          rows: 0..<rows, factors: factors.rows(from: lo - segment.rows.lowerBound),
                                          wantStatistics: false, threads: threads)
                    }
                    guard result.finite else {
                        throw MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity; modules: \(p.moduleNames.joined(separator: ", "))")
                    }
                    let kept = Locked(Retention())
                    inRowChunks(rows) { range in
                        var sums: (Double, Double, Double, Double) = (0, 0, 0, 0)
                        withUnsafeMutableBytes(of: &sums) { s in
                            reader.encode(dec.base.baseAddress! + range.lowerBound * cols, mer.base.baseAddress! + range.lowerBound * cols,
                                          codes.at(range.lowerBound * rowBytes), sc.base.baseAddress! + range.lowerBound * groups, range.count * groups,
                                          s.baseAddress!.assumingMemoryBound(to: Double.self))
                        }
                        kept.update { $0.add(Retention(dot: sums.0, update: sums.1, applied: sums.2, maxAbsUpdate: sums.3)) }
                    }
                    retention.add(kept.value)
                }
                try emit(rows * rowBytes)
                lo = hi
            }
        }
        return (scales, retention)
    }

    /// An FP4 tensor written dequantized as `dtype` (`--dtype`), expert by expert (or whole): the
    /// decoded values (with the update added in Float64 where there is one) rounded once into
    /// `dtype`; MXFP4 experts then transposed into the model's parameter layout, as transformers'
    /// `convert_moe_packed_tensors` lays it out.
    func dequantizeFP4(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint, dtype: DType,
                       to writer: any TensorFileWriter) throws {
        guard let codec = RowCodec(.plain(dtype)) else { preconditionFailure("the plan dequantizes into float dtypes") }
        let t = try FP4Rows(p, from: store, base: base)
        var transpose = false
        if case .mxfp4 = p.base.encoding { transpose = true }
        let cols = t.columns, groups = t.groups, rowBytes = t.rowBytes
        let value = p.valueShape
        let expertRows = value.count >= 2 ? value[value.count - 2] : 1
        let experts = t.rows / max(1, expertRows)
        let pieces: [(rows: Range<Int>, l: [Double], r: [Double], k: Int)] = try p.segments.filter { !$0.terms.isEmpty }.map { segment in
            let (l, r, k) = try UpdateCompiler.factors(segment.terms.map { p.terms[$0] }, rows: segment.rows, viewRows: p.rows, cols: cols, tensor: p.baseName)
            return (segment.rows, l, r, k)
        }
        let count = expertRows * cols
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, expertRows * rowBytes), alignment: 64)
        let floats = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, count))
        let narrow = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, codec.byteCount(count)), alignment: 64)
        defer { raw.deallocate(); floats.deallocate(); narrow.deallocate() }
        var doubles: [Double] = []
        for x in 0..<experts {
            let lo = x * expertRows, hi = lo + expertRows
            try t.read(lo, hi, into: raw.baseAddress!)
            t.scales.withUnsafeBufferPointer { s in
                t.decode(raw.baseAddress!, s.baseAddress! + lo * groups, expertRows * groups, floats.baseAddress!, floats.baseAddress!)
            }
            let touching = pieces.filter { $0.rows.overlaps(lo..<hi) }
            var finite: Bool
            if touching.isEmpty {
                finite = codec.encode(floats.baseAddress!, count: count, into: narrow.baseAddress!)
            } else {
                // The update in Float64 by the project's F64 path, in place; it indexes L by the
                // piece's rows, so the expert is seen from the piece's first row.
                if doubles.count != count { doubles = [Double](repeating: 0, count: count) }
                for i in 0..<count { doubles[i] = Double(floats[i]) }
                finite = true
                for piece in touching {
                    let from = max(lo, piece.rows.lowerBound) - piece.rows.lowerBound, to = min(hi, piece.rows.upperBound) - piece.rows.lowerBound
                    var none: UpdateStatistics? = nil
                    finite = doubles.withUnsafeMutableBytes { band in
                        let view = band.baseAddress! + (piece.rows.lowerBound - lo) * cols * 8
                        return MergeKernel.mergeRowsF64(source: UnsafeRawPointer(view), sourceType: .f64, destination: view, rows: from..<to, cols: cols,
                                                        l: piece.l, r: piece.r, k: piece.k, magnitude: nil, statistics: &none)
                    } && finite
                }
                guard finite else {
                    throw MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity; modules: \(p.moduleNames.joined(separator: ", "))")
                }
                finite = doubles.withUnsafeBufferPointer { codec.encode($0.baseAddress!, count: count, into: narrow.baseAddress!) }
            }
            guard finite else {
                throw MergeError(tensor: p.baseName, problem: "the dequantized values hold NaN or infinity (or overflow \(dtype.rawValue))")
            }
            let bytes = codec.byteCount(count)
            let buffer = try pipeline.acquire(bytes: bytes)
            if transpose {
                adapter_transpose(narrow.baseAddress!, buffer.baseAddress!, expertRows, cols, dtype.byteSize)
            } else {
                buffer.baseAddress!.copyMemory(from: narrow.baseAddress!, byteCount: bytes)
            }
            pipeline.write(buffer, count: bytes, with: writer)
        }
    }
}

/// A raw band buffer the worker threads write, each its own bytes.
struct UncheckedRaw: @unchecked Sendable {
    let base: UnsafeMutableRawBufferPointer
    init(_ b: UnsafeMutableRawBufferPointer) { base = b }
    func at(_ offset: Int) -> UnsafeMutableRawPointer { base.baseAddress! + offset }
}
