import CLinearAlgebra
import Dispatch

/// A truncated SVD U·diag(s)·Vᵀ of a rows × cols matrix: U (rows × k) and V (cols × k) with
/// orthonormal columns, s descending; all row-major.
struct TruncatedSVD: Sendable {
    var u: [Double]
    var s: [Double]
    var v: [Double]
    let rows: Int
    let cols: Int
    var count: Int { s.count }

    /// The factors of U·Σ·Vᵀ as a module holds them: A (k × cols), B (rows × k) and, for
    /// `.moslora`, the mixer diag(σ) (k × k). `.lora` splits √σ into both factors; `.moslora`
    /// keeps A = Vᵀ and B = U orthonormal.
    func factors(_ form: ResizeForm) -> (a: [Double], b: [Double], mixer: [Double]?) {
        let k = count
        var a = [Double](repeating: 0, count: k * cols), b = [Double](repeating: 0, count: rows * k)
        for j in 0..<k {
            let f = form == .lora ? s[j].squareRoot() : 1
            for x in 0..<cols { a[j * cols + x] = f * v[x * k + j] }
            for y in 0..<rows { b[y * k + j] = f * u[y * k + j] }
        }
        guard form == .moslora else { return (a, b, nil) }
        var m = [Double](repeating: 0, count: k * k)
        for j in 0..<k { m[j * k + j] = s[j] }
        return (a, b, m)
    }

    /// The first `k` singular triplets.
    func prefix(_ k: Int) -> TruncatedSVD {
        let c = count
        guard k < c else { return self }
        var u2 = [Double](repeating: 0, count: rows * k), v2 = [Double](repeating: 0, count: cols * k)
        for i in 0..<rows { for j in 0..<k { u2[i * k + j] = u[i * c + j] } }
        for i in 0..<cols { for j in 0..<k { v2[i * k + j] = v[i * c + j] } }
        return TruncatedSVD(u: u2, s: Array(s.prefix(k)), v: v2, rows: rows, cols: cols)
    }
}

/// Low-rank approximations of large dense Float64 matrices (the weight differences `extract`
/// factors): the randomized subspace iteration of Halko, Martinsson and Tropp (2011, algorithms
/// 4.4 and 5.1), and a full SVD for checking.
enum LowRank {
    /// The best rank-`k` approximation found by randomized subspace iteration: a sketch Y = D·Ω
    /// with `k + oversampling` Rademacher columns (±1: the same on every machine for a seed),
    /// `powerIterations` rounds of Q ← orth(D·orth(Dᵀ·Q)) with re-orthonormalisation between every
    /// product, then B = Qᵀ·D (small) and its SVD by one-sided Jacobi, U = Q·U_B. The products are
    /// blocked AVX2 GEMMs on `threads` threads. Returns all `k + oversampling` triplets (the caller
    /// truncates): D_k = U_k·Σ_k·V_kᵀ is the projection of D onto span(U_k), so
    /// ‖D − D_k‖²_F = ‖D‖²_F − Σ_{i<k} σᵢ² exactly.
    static func randomized(_ d: [Double], rows m: Int, cols n: Int, rank k: Int, oversampling p: Int = 10, powerIterations q: Int = 2,
                           seed: UInt64, threads: Int) -> TruncatedSVD {
        d.withUnsafeBufferPointer { randomized($0.baseAddress!, rows: m, cols: n, rank: k, oversampling: p, powerIterations: q, seed: seed, threads: threads) }
    }

    /// The same on a matrix held elsewhere (rows × cols, row-major), with the sketches in
    /// `buffers` (reused from module to module when the caller keeps them: no fresh pages each time).
    static func randomized(_ d: UnsafePointer<Double>, rows m: Int, cols n: Int, rank k: Int, oversampling p: Int = 10, powerIterations q: Int = 2,
                           seed: UInt64, threads: Int, buffers: Buffers = Buffers()) -> TruncatedSVD {
        // The GEMM kernel works on 8 columns at a time, so a sketch width rounded up to a multiple of
        // 8 costs nothing more and oversamples a little further.
        let l = max(1, min((k + p + 7) / 8 * 8, m, n))
        var rng = SeededGenerator(seed: seed)
        let omega = buffers.get(0, n * l), y = buffers.get(1, m * l), qt = buffers.get(2, l * m)
        let zt = buffers.get(3, l * n), z = buffers.get(4, n * l)
        for i in 0..<(n * l) { omega[i] = rng.next() & 1 == 0 ? 1 : -1 }
        // Q as its columns one after another (= Qᵀ row-major, l × m).
        multiply(d, omega, into: y, m: m, k: n, n: l, threads: threads)
        transpose(y, rows: m, cols: l, into: qt)
        _ = la_orthonormalize(qt, m, l)
        for _ in 0..<q {
            // Zᵀ = Qᵀ·D (l × n) holds Z's columns one after another.
            multiply(qt, d, into: zt, m: l, k: m, n: n, threads: threads)
            _ = la_orthonormalize(zt, n, l)
            transpose(zt, rows: l, cols: n, into: z)
            multiply(d, z, into: y, m: m, k: n, n: l, threads: threads)
            transpose(y, rows: m, cols: l, into: qt)
            _ = la_orthonormalize(qt, m, l)
        }
        // B = Qᵀ·D (l × n); its rows are the columns of Bᵀ (n × l), which Jacobi orthogonalises: Bᵀ·W = Ũ·Σ.
        let b = zt
        multiply(qt, d, into: b, m: l, k: m, n: n, threads: threads)
        var w = [Double](repeating: 0, count: l * l)
        for j in 0..<l { w[j * l + j] = 1 }
        w.withUnsafeMutableBufferPointer { wp in _ = la_jacobi_svd(b, n, l, wp.baseAddress, 60) }
        let sigma = (0..<l).map { t in UnsafeBufferPointer(start: b + t * n, count: n).reduce(0) { $0 + $1 * $1 }.squareRoot() }
        let order = (0..<l).sorted { sigma[$0] > sigma[$1] }
        // B = W·Σ·Ũᵀ, so D ≈ Q·B = (Q·W)·Σ·Ũᵀ: U's column t is Q·w_t, V's is ũ_t = (column t of Bᵀ·W) / σ_t.
        var u = [Double](repeating: 0, count: m * l), v = [Double](repeating: 0, count: n * l)
        // W's columns in σ order (W' [s][c] = w_{order[c]}[s]), then U = Q·W' by the GEMM.
        var wOrdered = [Double](repeating: 0, count: l * l)
        for (c, t) in order.enumerated() {
            let s = sigma[t]
            for j in 0..<n { v[j * l + c] = s > 0 ? b[t * n + j] / s : 0 }
            for sIndex in 0..<l { wOrdered[sIndex * l + c] = w[t * l + sIndex] }
        }
        transpose(qt, rows: l, cols: m, into: y)
        wOrdered.withUnsafeBufferPointer { wp in
            u.withUnsafeMutableBufferPointer { up in multiply(y, wp.baseAddress!, into: up.baseAddress!, m: m, k: l, n: l, threads: threads) }
        }
        return TruncatedSVD(u: u, s: order.map { sigma[$0] }, v: v, rows: m, cols: n)
    }

    /// Work buffers of the randomized SVD, kept by index and grown when a larger one is asked for.
    final class Buffers {
        private var slots: [(pointer: UnsafeMutablePointer<Double>, capacity: Int)] = []

        func get(_ index: Int, _ count: Int) -> UnsafeMutablePointer<Double> {
            while slots.count <= index { slots.append((.allocate(capacity: 1), 1)) }
            if slots[index].capacity < count {
                slots[index].pointer.deallocate()
                slots[index] = (.allocate(capacity: count), count)
            }
            return slots[index].pointer
        }

        deinit { for s in slots { s.pointer.deallocate() } }
    }

    static func transpose(_ x: UnsafePointer<Double>, rows: Int, cols: Int, into y: UnsafeMutablePointer<Double>) {
        for i in 0..<rows { for j in 0..<cols { y[j * rows + i] = x[i * cols + j] } }
    }

    /// C = A (m × k) · B (k × n) into `c`.
    static func multiply(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, into c: UnsafeMutablePointer<Double>, m: Int, k: Int, n: Int, threads: Int) {
        c.update(repeating: 0, count: m * n)
        guard m > 0, n > 0, k > 0 else { return }
        let pa = UInt(bitPattern: a), pb = UInt(bitPattern: b), pc = UInt(bitPattern: c)
        let byRows = m >= 32 * threads
        let chunks = max(1, min(threads, byRows ? m / 16 : n / 64))
        DispatchQueue.concurrentPerform(iterations: chunks) { t in
            let a = UnsafePointer<Double>(bitPattern: pa)!, b = UnsafePointer<Double>(bitPattern: pb)!
            let c = UnsafeMutablePointer<Double>(bitPattern: pc)!
            if byRows {
                let r0 = m * t / chunks, r1 = m * (t + 1) / chunks
                la_gemm(c + r0 * n, n, 1, a + r0 * k, k, b, n, r1 - r0, n, k)
            } else {
                let c0 = n * t / chunks, c1 = n * (t + 1) / chunks
                la_gemm(c + c0, n, 1, a, k, b + c0, n, m, c1 - c0, k)
            }
        }
    }

    /// The full SVD by one-sided Jacobi (O(rows·cols·min(rows, cols)) per sweep): for checking.
    static func exact(_ d: [Double], rows: Int, cols: Int) -> TruncatedSVD {
        let f = LinearAlgebra.svd(d, rows: rows, cols: cols)
        return TruncatedSVD(u: f.u, s: f.s, v: f.v, rows: rows, cols: cols)
    }

    /// Orthonormalises `columns` vectors of `length`, stored one after another, in place.
    static func orthonormalize(_ x: inout [Double], length: Int, columns: Int) {
        x.withUnsafeMutableBufferPointer { _ = la_orthonormalize($0.baseAddress, length, columns) }
    }
}
