import CMergeKernel
import Dispatch

/// A stored element type the kernel reads and writes eight at a time.
protocol StoredFloat {
    static var byteSize: Int { get }
    /// The largest magnitude that does not round to infinity in this type.
    static var finiteLimit: Float { get }
    static func load8(_ p: UnsafeRawPointer, _ index: Int) -> SIMD8<Float>
    static func store8(_ v: SIMD8<Float>, _ p: UnsafeMutableRawPointer, _ index: Int)
    static func load(_ p: UnsafeRawPointer, _ index: Int) -> Float
    static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ index: Int)
}

enum BF16Element: StoredFloat {
    static let byteSize = 2
    static let finiteLimit = Float(bitPattern: 0x7F7F_7FFF)
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        let h = p.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self)
        return SIMD8<Float>(bitPattern: SIMD8<UInt32>(truncatingIfNeeded: h) &<< 16)
    }
    @inline(__always) static func store8(_ v: SIMD8<Float>, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: ElementConversion.floatToBF16x8(v), toByteOffset: i * 2, as: SIMD8<UInt16>.self)
    }
    @inline(__always) static func load(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        ElementConversion.bf16ToFloat(p.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
    }
    @inline(__always) static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: ElementConversion.floatToBF16(v), toByteOffset: i * 2, as: UInt16.self)
    }
}

enum F16Element: StoredFloat {
    static let byteSize = 2
    static let finiteLimit = Float(bitPattern: 0x477F_EFFF)  // just below 65520, which rounds to infinity
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        ElementConversion.f16ToFloat8(p.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self))
    }
    @inline(__always) static func store8(_ v: SIMD8<Float>, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: ElementConversion.floatToF16x8(v), toByteOffset: i * 2, as: SIMD8<UInt16>.self)
    }
    @inline(__always) static func load(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        ElementConversion.f16ToFloat(p.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
    }
    @inline(__always) static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: ElementConversion.floatToF16(v), toByteOffset: i * 2, as: UInt16.self)
    }
}

enum F32Element: StoredFloat {
    static let byteSize = 4
    static let finiteLimit = Float.greatestFiniteMagnitude
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        p.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
    }
    @inline(__always) static func store8(_ v: SIMD8<Float>, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: v, toByteOffset: i * 4, as: SIMD8<Float>.self)
    }
    @inline(__always) static func load(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: i * 4, as: Float.self)
    }
    @inline(__always) static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: v, toByteOffset: i * 4, as: Float.self)
    }
}

/// Per-tensor statistics for `--report`: how much of the update survived rounding.
public struct UpdateStatistics: Sendable {
    /// max |Δ| in Float32 before rounding.
    public var maxAbsUpdate: Double = 0
    /// ‖Δ‖² (Float64 accumulation).
    public var updateSquared: Double = 0
    /// ‖W' − W‖² after rounding into the base dtype.
    public var appliedSquared: Double = 0

    mutating func add(_ o: UpdateStatistics) {
        maxAbsUpdate = max(maxAbsUpdate, o.maxAbsUpdate)
        updateSquared += o.updateSquared
        appliedSquared += o.appliedSquared
    }

    /// ‖W' − W‖ / ‖Δ‖: 1 when every bit of the update landed, 0 when rounding swallowed it.
    public var survival: Double { updateSquared > 0 ? (appliedSquared / updateSquared).squareRoot() : 1 }
}

/// The low-rank update of one tensor in the kernel's layout, owning its buffers (freed when it
/// goes): W' = W + L·R, L (rows × k) and R (k × cols) stored in panels of eight columns (k × 8
/// floats each) so the inner loop reads memory in order.
final class UpdateFactorStorage: @unchecked Sendable {
    let rows: Int
    let cols: Int
    let k: Int
    private let l: UnsafeMutableBufferPointer<Float>
    private let panels: UnsafeMutableBufferPointer<Float>
    /// DoRA magnitudes per row.
    private let magnitude: [Double]?

    /// Builds L and R from Float64 factors (rows × k) and (k × cols), rounding each to Float32 once.
    init(l lf: [Double], r rf: [Double], rows: Int, cols: Int, k: Int, magnitude: [Double]?) {
        self.rows = rows
        self.cols = cols
        self.k = k
        self.magnitude = magnitude
        l = .allocate(capacity: max(1, rows * k))
        for i in 0..<(rows * k) { l[i] = Float(lf[i]) }
        let blocks = (cols + 7) / 8
        panels = .allocate(capacity: max(1, blocks * k * 8))
        panels.initialize(repeating: 0)
        for b in 0..<blocks {
            for t in 0..<k {
                for c in 0..<8 where b * 8 + c < cols {
                    panels[(b * k + t) * 8 + c] = Float(rf[t * cols + b * 8 + c])
                }
            }
        }
    }

    deinit {
        l.deallocate()
        panels.deallocate()
    }

    /// The factors of rows `offset...`, valid while this storage lives (the caller keeps it).
    func rows(from offset: Int) -> UpdateFactors {
        UpdateFactors(rows: rows - offset, cols: cols, k: k, l: UnsafeMutableBufferPointer(rebasing: l[(offset * k)...]), panels: panels,
                      magnitude: magnitude.map { Array($0[offset...]) })
    }
}

/// A view of `UpdateFactorStorage` from some row on: what the kernel reads. It owns nothing.
struct UpdateFactors: @unchecked Sendable {
    let rows: Int
    let cols: Int
    let k: Int
    let l: UnsafeMutableBufferPointer<Float>
    let panels: UnsafeMutableBufferPointer<Float>
    /// DoRA magnitudes per row.
    let magnitude: [Double]?
}

/// The fused merge kernel: read W rows, add the rank-k update in Float32 registers, round once
/// into the output type, and check every result is finite.
enum MergeKernel {
    /// Merges rows `range` of a (rows × cols) tensor. Returns false when a result is not finite
    /// (or would overflow the output type).
    static func mergeRows<S: StoredFloat, D: StoredFloat>(
        _: S.Type, _: D.Type, source: UnsafeRawPointer, destination: UnsafeMutableRawPointer,
        range: Range<Int>, factors f: UpdateFactors, statistics: inout UpdateStatistics?, scratch: UnsafeMutablePointer<Float>
    ) -> Bool {
        let cols = f.cols, k = f.k
        let full = cols / 8 * 8
        let limit = SIMD8<Float>(repeating: D.finiteLimit)
        var finite = true
        for i in range {
            let src = source + i * cols * S.byteSize
            let dst = destination + i * cols * D.byteSize
            let lrow = f.l.baseAddress! + i * k
            var bad = SIMDMask<SIMD8<Int32>>(repeating: false)
            let dora = f.magnitude != nil
            var j = 0
            var panel = f.panels.baseAddress!
            while j < full {
                var update = SIMD8<Float>(repeating: 0)
                var p = panel
                for t in 0..<k {
                    update += lrow[t] * UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
                    p += 8
                }
                let w = S.load8(src, j)
                let v = w + update
                bad .|= .!((v .<= limit) .& (v .>= -limit))
                if dora {
                    UnsafeMutableRawPointer(scratch + j).storeBytes(of: v, as: SIMD8<Float>.self)
                } else {
                    D.store8(v, dst, j)
                    if statistics != nil { accumulate(&statistics, w: w, update: update, stored: D.load8(dst, j)) }
                }
                panel += k * 8
                j += 8
            }
            while j < cols {
                var update: Float = 0
                for t in 0..<k { update += lrow[t] * panel[t * 8 + (j - full)] }
                let w = S.load(src, j)
                let v = w + update
                if !(abs(v) <= D.finiteLimit) { bad = SIMDMask(repeating: true) }
                if dora {
                    scratch[j] = v
                } else {
                    D.store(v, dst, j)
                    if statistics != nil {
                        var s = SIMD8<Float>(repeating: 0), wv = s, sv = s
                        s[0] = update; wv[0] = w; sv[0] = D.load(dst, j)
                        accumulate(&statistics, w: wv, update: s, stored: sv)
                    }
                }
                j += 1
            }
            if any(bad) { finite = false }
            if let magnitude = f.magnitude {
                // DoRA: V = W + Δ, then each output row scaled to the magnitude: m / ‖V‖.
                var norm = 0.0
                for c in 0..<cols { norm += Double(scratch[c]) * Double(scratch[c]) }
                let factor = Float(magnitude[i] / norm.squareRoot())
                for c in 0..<cols {
                    let v = scratch[c] * factor
                    if !(abs(v) <= D.finiteLimit) { finite = false }
                    D.store(v, dst, c)
                }
                if statistics != nil {
                    for c in 0..<cols {
                        let w = S.load(src, c)
                        let d = Double(scratch[c] * factor) - Double(w)
                        statistics!.maxAbsUpdate = max(statistics!.maxAbsUpdate, abs(d))
                        statistics!.updateSquared += d * d
                        let a = Double(D.load(dst, c)) - Double(w)
                        statistics!.appliedSquared += a * a
                    }
                }
            }
        }
        return finite
    }

    @inline(__always) private static func accumulate(_ s: inout UpdateStatistics?, w: SIMD8<Float>, update: SIMD8<Float>, stored: SIMD8<Float>) {
        for c in 0..<8 {
            let u = Double(update[c])
            let a = Double(stored[c]) - Double(w[c])
            s!.maxAbsUpdate = max(s!.maxAbsUpdate, abs(u))
            s!.updateSquared += u * u
            s!.appliedSquared += a * a
        }
    }

    /// Merges all rows of a tensor across threads. Returns statistics when asked for, and
    /// whether every result was finite.
    static func merge(
        source: UnsafeRawPointer, sourceType: DType, destination: UnsafeMutableRawPointer, destinationType: DType,
        rows: Range<Int>, factors: UpdateFactors, wantStatistics: Bool, threads: Int
    ) -> (finite: Bool, statistics: UpdateStatistics?) {
        let n = rows.count
        let chunks = max(1, min(n, threads * 4))
        let results = UnsafeMutableBufferPointer<(Bool, UpdateStatistics?)>.allocate(capacity: chunks)
        defer { results.deallocate() }
        let src = UncheckedPointer(raw: source)
        let dst = UncheckedPointer(raw: UnsafeRawPointer(destination))
        let out = UncheckedPointer(raw: UnsafeRawPointer(results.baseAddress!))
        let work: @Sendable (Int) -> Void = { c in
            let lo = rows.lowerBound + n * c / chunks, hi = rows.lowerBound + n * (c + 1) / chunks
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: factors.magnitude != nil ? factors.cols : 1)
            defer { scratch.deallocate() }
            var stats: UpdateStatistics? = wantStatistics ? UpdateStatistics() : nil
            let s = src.raw, d = UnsafeMutableRawPointer(mutating: dst.raw)
            let ok: Bool
            if factors.magnitude == nil, let st = cElement(sourceType), let dt = cElement(destinationType) {
                // The fast path: the C kernel (AVX2 + FMA where the CPU has them). It writes the
                // output whether or not statistics are wanted, so `--report` never changes a byte.
                let rowsHere = hi - lo
                ok = adapter_merge_rows(st, s + lo * factors.cols * sourceType.byteSize, dt, d + lo * factors.cols * destinationType.byteSize,
                                        rowsHere, factors.cols, factors.l.baseAddress! + lo * factors.k, factors.panels.baseAddress!,
                                        factors.k, finiteLimit(destinationType)) == 1
                if wantStatistics {
                    statistics(&stats, source: s, sourceType: sourceType, destination: UnsafeRawPointer(d), destinationType: destinationType,
                               rows: lo..<hi, factors: factors)
                }
                UnsafeMutableRawPointer(mutating: out.raw).assumingMemoryBound(to: (Bool, UpdateStatistics?).self)[c] = (ok, stats)
                return
            }
            switch (sourceType, destinationType) {
            case (.bf16, .bf16): ok = mergeRows(BF16Element.self, BF16Element.self, source: s, destination: d, range: lo..<hi, factors: factors, statistics: &stats, scratch: scratch)
            case (.f16, .f16): ok = mergeRows(F16Element.self, F16Element.self, source: s, destination: d, range: lo..<hi, factors: factors, statistics: &stats, scratch: scratch)
            case (.f32, .f32): ok = mergeRows(F32Element.self, F32Element.self, source: s, destination: d, range: lo..<hi, factors: factors, statistics: &stats, scratch: scratch)
            case (.f32, .bf16): ok = mergeRows(F32Element.self, BF16Element.self, source: s, destination: d, range: lo..<hi, factors: factors, statistics: &stats, scratch: scratch)
            case (.f32, .f16): ok = mergeRows(F32Element.self, F16Element.self, source: s, destination: d, range: lo..<hi, factors: factors, statistics: &stats, scratch: scratch)
            default: preconditionFailure("merge kernel for \(sourceType.rawValue) → \(destinationType.rawValue)")
            }
            UnsafeMutableRawPointer(mutating: out.raw).assumingMemoryBound(to: (Bool, UpdateStatistics?).self)[c] = (ok, stats)
        }
        if chunks == 1 || threads == 1 {
            for c in 0..<chunks { work(c) }
        } else {
            DispatchQueue.concurrentPerform(iterations: chunks, execute: work)
        }
        var finite = true
        var total: UpdateStatistics? = wantStatistics ? UpdateStatistics() : nil
        for c in 0..<chunks {
            finite = finite && results[c].0
            if let s = results[c].1 { total!.add(s) }
        }
        return (finite, total)
    }

    /// `--report` figures for rows the C kernel merged: the update L·R as the same kernel computes
    /// it (added to a row of zeros, in Float32), and W' − W from the stored rows.
    private static func statistics(_ stats: inout UpdateStatistics?, source: UnsafeRawPointer, sourceType: DType,
                                   destination: UnsafeRawPointer, destinationType: DType, rows: Range<Int>, factors: UpdateFactors) {
        let cols = factors.cols
        let zeros = UnsafeMutablePointer<Float>.allocate(capacity: max(1, cols))
        let update = UnsafeMutablePointer<Float>.allocate(capacity: max(1, cols))
        let w = UnsafeMutablePointer<Double>.allocate(capacity: max(1, cols))
        let stored = UnsafeMutablePointer<Double>.allocate(capacity: max(1, cols))
        defer { zeros.deallocate(); update.deallocate(); w.deallocate(); stored.deallocate() }
        zeros.initialize(repeating: 0, count: max(1, cols))
        let f32 = Int32(ADAPTER_F32.rawValue)
        for i in rows {
            _ = adapter_merge_rows(f32, zeros, f32, update, 1, cols, factors.l.baseAddress! + i * factors.k, factors.panels.baseAddress!,
                                   factors.k, .greatestFiniteMagnitude)
            ElementConversion.toDouble(sourceType, source + i * cols * sourceType.byteSize, w, count: cols)
            ElementConversion.toDouble(destinationType, destination + i * cols * destinationType.byteSize, stored, count: cols)
            for j in 0..<cols {
                let u = Double(update[j]), a = stored[j] - w[j]
                stats!.maxAbsUpdate = max(stats!.maxAbsUpdate, abs(u))
                stats!.updateSquared += u * u
                stats!.appliedSquared += a * a
            }
        }
    }

    private static func cElement(_ d: DType) -> Int32? {
        switch d {
        case .f32: Int32(ADAPTER_F32.rawValue)
        case .bf16: Int32(ADAPTER_BF16.rawValue)
        case .f16: Int32(ADAPTER_F16.rawValue)
        default: nil
        }
    }

    private static func finiteLimit(_ d: DType) -> Float {
        switch d {
        case .bf16: BF16Element.finiteLimit
        case .f16: F16Element.finiteLimit
        default: F32Element.finiteLimit
        }
    }

    /// Whether the C kernel runs its AVX2 path on this machine.
    public static var isVectorised: Bool { adapter_merge_kernel_is_vectorised() == 1 }

    /// The Float64 path for F64 bases: W' = W + L·R accumulated in Float64, no rounding but the store.
    static func mergeRowsF64(source: UnsafeRawPointer, sourceType: DType, destination: UnsafeMutableRawPointer,
                             rows: Range<Int>, cols: Int, l: [Double], r: [Double], k: Int, magnitude: [Double]?,
                             statistics: inout UpdateStatistics?) -> Bool {
        var row = [Double](repeating: 0, count: cols)
        var finite = true
        for i in rows {
            row.withUnsafeMutableBufferPointer { buf in
                ElementConversion.toDouble(sourceType, source + i * cols * sourceType.byteSize, buf.baseAddress!, count: cols)
            }
            let original = row
            for t in 0..<k {
                let li = l[i * k + t]
                for j in 0..<cols { row[j] += li * r[t * cols + j] }
            }
            if let magnitude {
                let norm = row.reduce(0) { $0 + $1 * $1 }.squareRoot()
                let factor = magnitude[i] / norm
                for j in 0..<cols { row[j] *= factor }
            }
            for j in 0..<cols where !row[j].isFinite { finite = false }
            row.withUnsafeBufferPointer { buf in
                ElementConversion.fromDouble(.f64, buf.baseAddress!, destination + i * cols * 8, count: cols)
            }
            if statistics != nil {
                for j in 0..<cols {
                    let d = row[j] - original[j]
                    statistics!.maxAbsUpdate = max(statistics!.maxAbsUpdate, abs(d))
                    statistics!.updateSquared += d * d
                    statistics!.appliedSquared += d * d
                }
            }
        }
        return finite
    }
}

/// A raw pointer passed into concurrent work that writes disjoint ranges.
struct UncheckedPointer: @unchecked Sendable {
    let raw: UnsafeRawPointer
}

/// The fused kernel on tensors already in memory, for library users and the benchmark.
public enum LowRankUpdate {
    /// destination = round(source + L·R) in `dtype` (F32, F16 or BF16) for a (rows × cols) tensor
    /// whose bytes `source` and `destination` hold exactly, L (rows × k) and R (k × cols) given in
    /// Float64 and rounded to Float32 once. Returns false when a result is not finite.
    public static func apply(
        source: UnsafeRawBufferPointer, destination: UnsafeMutableRawBufferPointer, dtype: DType, rows: Int, cols: Int,
        l: [Double], r: [Double], k: Int, threads: Int = 1
    ) -> Bool {
        precondition(dtype == .f32 || dtype == .f16 || dtype == .bf16, "LowRankUpdate.apply needs F32, F16 or BF16")
        precondition(l.count == rows * k && r.count == k * cols, "L must be rows × k and R k × cols")
        precondition(source.count == rows * cols * dtype.byteSize && destination.count == source.count, "the buffers must hold rows × cols elements")
        guard rows * cols > 0, let src = source.baseAddress, let dst = destination.baseAddress else { return true }
        let storage = UpdateFactorStorage(l: l, r: r, rows: rows, cols: cols, k: k, magnitude: nil)
        return withExtendedLifetime(storage) {
            MergeKernel.merge(source: src, sourceType: dtype, destination: dst, destinationType: dtype,
                              rows: 0..<rows, factors: storage.rows(from: 0), wantStatistics: false, threads: threads).finite
        }
    }

    /// Whether the AVX2 + FMA path runs on this machine.
    public static var isVectorised: Bool { MergeKernel.isVectorised }
}
