import CMergeKernel
import Foundation

/// Merges into quantized weights: decode to Float32, add the update with the same kernel, encode
/// again in the weight's own scheme with fresh scales (docs/formats.md §9a).
extension MergeExecutor {
    /// What requantization kept of one tensor's update: ⟨deq(Q(W')) − W, ΔW⟩ / ‖ΔW‖², with
    /// W the decoded base, W' = W + ΔW in Float32 (1: all of it; 0: none).
    struct Retention: Sendable {
        var dot = 0.0
        var update = 0.0
        var applied = 0.0
        var maxAbsUpdate = 0.0
        var kept: Double { update > 0 ? dot / update : 1 }

        mutating func add(_ o: Retention) {
            dot += o.dot
            update += o.update
            applied += o.applied
            maxAbsUpdate = max(maxAbsUpdate, o.maxAbsUpdate)
        }
    }

    /// A block-scaled FP8 weight merged and requantized band by band (block[0] rows of one expert
    /// at a time): codes × scales decoded, the update added in Float32, a fresh scale per block
    /// (amax / 448 in the scale's dtype), codes rounded to nearest even and saturating at ±448.
    /// Writes the codes when `writer` is given; returns the new scales either way (the scale
    /// tensor, perhaps in another shard, is written from them).
    func mergeBlockScaledFP8(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint,
                             to writer: (any TensorFileWriter)?) throws -> (scales: FP8BlockScales, retention: Retention) {
        guard case .blockScaledFP8(let codes, let scaleName, let block) = p.base.encoding, codes == .f8E4M3 else {
            preconditionFailure("the plan admits only E4M3 block-scaled weights")
        }
        let bands = try FP8Bands(p, block: block, scale: scaleName, from: store, base: base)
        let (k, b0, b1, blockRows, blockCols) = (bands.k, bands.b0, bands.b1, bands.blockRows, bands.blockCols)
        var scales = bands.scales
        var retention = Retention()
        // Each piece of rows with the same terms, compiled once.
        let pieces: [(rows: Range<Int>, factors: UpdateFactorStorage)] = try p.segments.filter { !$0.terms.isEmpty }.map { segment in
            let (l, r, kk) = try UpdateCompiler.factors(segment.terms.map { p.terms[$0] }, rows: segment.rows, viewRows: p.rows, cols: k, tensor: p.baseName)
            return (segment.rows, UpdateFactorStorage(l: l, r: r, rows: segment.rows.count, cols: k, k: kk, magnitude: nil))
        }
        let decoded = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, b0 * k))
        let merged = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, b0 * k))
        let raw = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: max(1, b0 * k))
        let bandScales = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, blockCols))
        defer { decoded.deallocate(); merged.deallocate(); raw.deallocate(); bandScales.deallocate() }
        let threads = max(1, options.threads)
        let (dec, mer, codesOut, sc) = (UncheckedMutable(decoded), UncheckedMutable(merged), UncheckedMutable(raw), UncheckedMutable(bandScales))
        try bands.forEach { x, j, lo, hi in
            let rows = hi - lo
            try bands.read(lo, hi, into: raw)
            let scaleRow = (x * blockRows + j) * blockCols
            for cb in 0..<blockCols { bandScales[cb] = scales.values[scaleRow + cb] }
            let badCode = Locked<Int?>(nil)
            inRowChunks(rows) { range in
                for i in range {
                    var finite = true
                    for cb in 0..<blockCols {
                        let c0 = i * k + cb * b1, count = min(k, cb * b1 + b1) - cb * b1
                        finite = adapter_fp8_decode(codesOut.base.baseAddress! + c0, count, sc[cb],
                                                    dec.base.baseAddress! + c0, mer.base.baseAddress! + c0) == 1 && finite
                    }
                    if !finite, let c = (0..<k).first(where: { !dec[i * k + $0].isFinite }) { badCode.set(i * k + c) }
                }
            }
            if let bad = badCode.value {
                throw MergeError(tensor: p.baseName, problem: "code \(raw[bad]) at row \(lo + bad / k), column \(bad % k) decodes to NaN")
            }
            // The update, where terms cover these rows.
            for piece in pieces where piece.rows.overlaps(lo..<hi) {
                let from = max(lo, piece.rows.lowerBound), to = min(hi, piece.rows.upperBound)
                let result = withExtendedLifetime(piece.factors) {
                    MergeKernel.merge(source: UnsafeRawPointer(decoded.baseAddress! + (from - lo) * k), sourceType: .f32,
                                      destination: UnsafeMutableRawPointer(merged.baseAddress! + (from - lo) * k), destinationType: .f32,
                                      rows: 0..<(to - from), factors: piece.factors.rows(from: from - piece.rows.lowerBound),
                                      wantStatistics: false, threads: threads)
                }
                guard result.finite else {
                    throw MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity; modules: \(p.moduleNames.joined(separator: ", "))")
                }
            }
            // Fresh scales: the largest magnitude per block, over the band's rows.
            let partial = Locked<[Float]>([Float](repeating: 0, count: blockCols))
            inRowChunks(rows) { range in
                var amax = [Float](repeating: 0, count: blockCols)
                amax.withUnsafeMutableBufferPointer { amax in
                    for i in range {
                        for cb in 0..<blockCols {
                            let c0 = i * k + cb * b1, count = min(k, cb * b1 + b1) - cb * b1
                            amax[cb] = max(amax[cb], adapter_max_abs(mer.base.baseAddress! + c0, count))
                        }
                    }
                }
                partial.update { for cb in 0..<blockCols { $0[cb] = max($0[cb], amax[cb]) } }
            }
            let amax = partial.value
            for cb in 0..<blockCols {
                let s = scales.fresh(amax: Double(amax[cb]), old: bandScales[cb])
                scales.values[scaleRow + cb] = s
                bandScales[cb] = s
            }
            // The codes, and what they keep of the update.
            let kept = Locked(Retention())
            inRowChunks(rows) { range in
                var part = Retention()
                for i in range {
                    var sums: (Double, Double, Double, Double) = (0, 0, 0, 0)
                    withUnsafeMutableBytes(of: &sums) { raw in
                        let out = raw.baseAddress!.assumingMemoryBound(to: Double.self)
                        for cb in 0..<blockCols {
                            let s = sc[cb]
                            guard s > 0 else { continue }  // a block of zeros keeps its codes
                            let c0 = i * k + cb * b1, count = min(k, cb * b1 + b1) - cb * b1
                            adapter_fp8_e4m3_encode(dec.base.baseAddress! + c0, mer.base.baseAddress! + c0, codesOut.base.baseAddress! + c0,
                                                    count, s, out)
                        }
                    }
                    part.dot += sums.0
                    part.update += sums.1
                    part.applied += sums.2
                    part.maxAbsUpdate = max(part.maxAbsUpdate, sums.3)
                }
                kept.update { $0.add(part) }
            }
            retention.add(kept.value)
            if let writer {
                let buffer = try pipeline.acquire(bytes: rows * k)
                buffer.baseAddress!.copyMemory(from: raw.baseAddress!, byteCount: rows * k)
                pipeline.write(buffer, count: rows * k, with: writer)
            }
        }
        return (scales, retention)
    }

    /// Rows of a band in chunks, one per thread, so that every element loop of a quantized merge
    /// runs on all cores; each chunk its own rows.
    func inRowChunks(_ rows: Int, _ body: @Sendable (Range<Int>) -> Void) {
        let chunks = max(1, min(max(1, options.threads), rows))
        DispatchQueue.concurrentPerform(iterations: chunks) { c in body(rows * c / chunks..<rows * (c + 1) / chunks) }
    }

    /// A scale tensor's values decoded: F32 as stored, UE8M0 as 2^(b − 127).
    static func readScales(_ entry: TensorEntry, from store: any TensorContainer) throws -> FP8BlockScales {
        switch entry.dtype {
        case .f8E8M0:
            let bytes = try store.withBytes(of: entry.name) { Array($0) }
            return FP8BlockScales(dtype: .f8E8M0, values: bytes.map(FP8.e8m0))
        default:
            return FP8BlockScales(dtype: entry.dtype, values: try store.floats(entry.name))
        }
    }
}

extension MergeExecutor {
    /// A block-scaled FP8 weight written dequantized as `dtype` (`--dtype`): per band, code × scale
    /// in Float64 (exact: four significant bits times a Float32), the update added in Float64,
    /// then one rounding into `dtype`. A weight without an update is dequantized the same way.
    func dequantizeBlockScaledFP8(_ p: TensorEdit, from store: any TensorContainer, base: Checkpoint, dtype: DType,
                                  to writer: any TensorFileWriter) throws {
        guard case .blockScaledFP8(let codes, let scaleName, let block) = p.base.encoding, codes == .f8E4M3 || codes == .f8E5M2,
              let codec = RowCodec(.plain(dtype)) else {
            preconditionFailure("the plan dequantizes only block-scaled FP8 weights")
        }
        let bands = try FP8Bands(p, block: block, scale: scaleName, from: store, base: base)
        let (k, b0, b1, blockRows, blockCols) = (bands.k, bands.b0, bands.b1, bands.blockRows, bands.blockCols)
        let scales = bands.scales.values
        let pieces: [(rows: Range<Int>, l: [Double], r: [Double], k: Int)] = try p.segments.filter { !$0.terms.isEmpty }.map { segment in
            let (l, r, kk) = try UpdateCompiler.factors(segment.terms.map { p.terms[$0] }, rows: segment.rows, viewRows: p.rows, cols: k, tensor: p.baseName)
            return (segment.rows, l, r, kk)
        }
        let raw = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: max(1, b0 * k))
        defer { raw.deallocate() }
        var values = [Double](repeating: 0, count: b0 * k)
        try bands.forEach { x, j, lo, hi in
            let rows = hi - lo
            try bands.read(lo, hi, into: raw)
            let scaleRow = (x * blockRows + j) * blockCols
            for i in 0..<rows {
                for c in 0..<k {
                    let code = raw[i * k + c]
                    let v = codes == .f8E4M3 ? ElementConversion.f8E4M3ToFloat(code) : ElementConversion.f8E5M2ToFloat(code)
                    guard v.isFinite else { throw MergeError(tensor: p.baseName, problem: "code \(code) at row \(lo + i), column \(c) decodes to NaN") }
                    values[i * k + c] = Double(v) * Double(scales[scaleRow + c / b1])
                }
            }
            // The update in Float64 by the project's F64 path, in place: it indexes L by the
            // piece's rows, so the band is seen from the piece's first row.
            for piece in pieces where piece.rows.overlaps(lo..<hi) {
                let from = max(lo, piece.rows.lowerBound) - piece.rows.lowerBound, to = min(hi, piece.rows.upperBound) - piece.rows.lowerBound
                var none: UpdateStatistics? = nil
                let finite = values.withUnsafeMutableBytes { band in
                    let view = band.baseAddress! + (piece.rows.lowerBound - lo) * k * 8
                    return MergeKernel.mergeRowsF64(source: UnsafeRawPointer(view), sourceType: .f64, destination: view, rows: from..<to, cols: k,
                                                    l: piece.l, r: piece.r, k: piece.k, magnitude: nil, statistics: &none)
                }
                guard finite else {
                    throw MergeError(tensor: p.baseName, problem: "the merged values hold NaN or infinity; modules: \(p.moduleNames.joined(separator: ", "))")
                }
            }
            let bytes = codec.byteCount(rows * k)
            let buffer = try pipeline.acquire(bytes: bytes)
            let finite = values.withUnsafeBufferPointer { codec.encode($0.baseAddress!, count: rows * k, into: buffer.baseAddress!) }
            guard finite else {
                pipeline.giveBack(buffer)
                throw MergeError(tensor: p.baseName, problem: "the dequantized values hold NaN or infinity (or overflow \(dtype.rawValue))")
            }
            pipeline.write(buffer, count: bytes, with: writer)
        }
    }
}


/// How a block-scaled FP8 weight is walked: [experts ×] n × k codes in bands of b₀ rows within
/// one expert, b₁ columns per scale; and where its codes are read from.
struct FP8Bands {
    let experts: Int, n: Int, k: Int, b0: Int, b1: Int
    var blockRows: Int { (n + b0 - 1) / b0 }
    var blockCols: Int { (k + b1 - 1) / b1 }
    let region: FileRegion?
    let whole: [UInt8]?
    /// The decoded scales, checked finite and not negative.
    let scales: FP8BlockScales

    init(_ p: TensorEdit, block: [Int], scale scaleName: String, from store: any TensorContainer, base: Checkpoint) throws {
        let shape = p.base.shape
        experts = shape.count == 3 ? shape[0] : 1
        n = shape[shape.count - 2]
        k = shape[shape.count - 1]
        (b0, b1) = (block[0], block[1])
        precondition(p.columns == k, "FP8 weights are merged in their [rows, in] view")
        guard let (scaleEntry, scaleFile) = base.tensor(scaleName) else { preconditionFailure("the plan found the scales") }
        scales = try MergeExecutor.readScales(scaleEntry, from: base.files[scaleFile])
        if let bad = scales.values.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
            throw MergeError(tensor: p.baseName, problem: "its scale \(scaleName)[\(bad)] is \(scales.values[bad]), not a finite scale")
        }
        region = store.region(of: p.baseName)
        whole = region == nil ? try store.withBytes(of: p.baseName) { Array($0) } : nil
    }

    /// Every band: expert x, block row j, view rows lo..<hi.
    func forEach(_ body: (_ x: Int, _ j: Int, _ lo: Int, _ hi: Int) throws -> Void) rethrows {
        for x in 0..<experts {
            for j in 0..<blockRows { try body(x, j, x * n + j * b0, x * n + min(n, (j + 1) * b0)) }
        }
    }

    /// The codes of view rows lo..<hi into `raw`.
    func read(_ lo: Int, _ hi: Int, into raw: UnsafeMutableBufferPointer<UInt8>) throws {
        let count = (hi - lo) * k
        if let region {
            let got = try region.descriptor.read(into: UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(raw)[0..<count]),
                                                 at: region.range.lowerBound + lo * k)
            guard got == count else { throw InputError(region.path, "the file shrank while being read") }
        } else {
            _ = UnsafeMutableBufferPointer(rebasing: raw[0..<count]).initialize(from: whole![lo * k..<hi * k])
        }
    }
}

/// A band buffer written by the worker threads, each its own rows.
struct UncheckedMutable<T>: @unchecked Sendable {
    let base: UnsafeMutableBufferPointer<T>
    init(_ b: UnsafeMutableBufferPointer<T>) { base = b }
    subscript(i: Int) -> T {
        get { base[i] }
        nonmutating set { base[i] = newValue }
    }
}

/// A value the worker threads combine into under a lock.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T { lock.lock(); defer { lock.unlock() }; return stored }
    func set(_ v: T) { lock.lock(); stored = v; lock.unlock() }
    func update(_ body: (inout T) -> Void) { lock.lock(); body(&stored); lock.unlock() }
}

extension MergePlan {
    /// The preflight of the quantized weights this merge rewrites, before anything is written:
    /// every scale finite and not negative (FP8), no 0xFF exponent (MXFP4, E8M0's NaN), no NaN
    /// scale and a finite positive global scale (NVFP4), and no NaN code (0x7F, 0xFF) in an E4M3
    /// weight an update changes. The first problem is one line. The codes of weights `--dtype`
    /// only dequantizes are checked as they are decoded (reading every weight twice would double
    /// the I/O of the run); either way nothing is left at OUT.
    func checkQuantizedValues() throws {
        var checked = Set<String>()
        for (name, edit) in changes.sorted(by: { $0.key.precedesInBytes($1.key) }) where edit.scalesOf == nil {
            let encoding = edit.base.encoding
            for scale in encoding.scaleTensors where checked.insert(scale).inserted {
                guard let (entry, file) = base.tensor(scale) else { continue }
                let store = base.files[file]
                switch encoding {
                case .plain: break
                case .blockScaledFP8:
                    let values = try MergeExecutor.readScales(entry, from: store).values
                    if let bad = values.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
                        throw MergeError(tensor: name, problem: "its scale \(scale)[\(bad)] is \(values[bad]), not a finite scale")
                    }
                case .mxfp4, .nvfp4(scale, _):
                    let groups = entry.shape.last ?? 1
                    let isMX: Bool
                    if case .mxfp4 = encoding { isMX = true } else { isMX = false }
                    if let problem = try store.withBytes(of: scale, { MergeExecutor.FP4Rows.nanScale($0, name: scale, groups: groups, e8m0: isMX) }) {
                        throw MergeError(tensor: name, problem: problem)
                    }
                case .nvfp4:
                    let g = try store.floats(scale)
                    guard let v = g.first, v.isFinite, v > 0 else {
                        throw MergeError(tensor: name, problem: "its global scale \(scale) is \(g.first.map { "\($0)" } ?? "empty"), not a finite positive scale")
                    }
                }
            }
            if case .blockScaledFP8(.f8E4M3, _, _) = encoding, !edit.terms.isEmpty {
                let k = max(1, edit.base.shape.last ?? 1)
                let store = base.files[edit.file]
                let bad = try store.withBytes(of: name) { raw -> Int? in
                    guard let start = raw.baseAddress, raw.count > 0 else { return nil }
                    // memchr for each NaN code (S.1111.111): the first of the two.
                    let found = [UInt8(0x7F), 0xFF].compactMap { memchr(start, Int32($0), raw.count).map { start.distance(to: UnsafeRawPointer($0)) } }
                    return found.min()
                }
                if let bad {
                    let code = try store.withBytes(of: name) { $0[bad] }
                    throw MergeError(tensor: name, problem: "code \(code) at row \(bad / k), column \(bad % k) decodes to NaN")
                }
            }
        }
    }
}
