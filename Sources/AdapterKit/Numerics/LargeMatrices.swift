import CLinearAlgebra

/// An LU factorisation with partial pivoting (P·A = L·U) of an n × n Float64 matrix, by the C kernel.
struct LUFactorization {
    let n: Int
    private let lu: [Double]
    private let pivots: [Int64]
    /// Pivots that were exactly zero: the matrix is singular when there is any.
    let zeroPivots: Int

    var isSingular: Bool { zeroPivots > 0 }

    init(_ a: [Double], n: Int) {
        precondition(a.count == n * n)
        self.n = n
        var lu = a
        var pivots = [Int64](repeating: 0, count: n)
        zeroPivots = lu.withUnsafeMutableBufferPointer { m in
            pivots.withUnsafeMutableBufferPointer { p in Int(la_lu(m.baseAddress, n, p.baseAddress)) }
        }
        self.lu = lu
        self.pivots = pivots
    }

    /// A⁻¹·B for B of n rows and `columns` columns (row-major); the matrix must not be singular.
    func solve(_ b: [Double], columns: Int) -> [Double] {
        precondition(!isSingular && b.count == n * columns)
        var x = b
        lu.withUnsafeBufferPointer { m in
            pivots.withUnsafeBufferPointer { p in
                x.withUnsafeMutableBufferPointer { la_lu_solve(m.baseAddress, n, p.baseAddress, $0.baseAddress, columns) }
            }
        }
        return x
    }

    /// x ← A⁻¹·x, or A⁻ᵀ·x.
    func solve(_ x: UnsafeMutablePointer<Double>, transposed: Bool) {
        lu.withUnsafeBufferPointer { m in
            pivots.withUnsafeBufferPointer { p in la_lu_solve_vector(m.baseAddress, n, p.baseAddress, x, transposed ? 1 : 0) }
        }
    }
}

extension LinearAlgebra {
    /// Ranks up to this get exact mixer diagnostics (one O(r³) bidiagonalisation, about a second at
    /// 1024); above it σ_min, σ_max and ‖MᵀM − I‖_F are estimated.
    public static let exactDiagnosticsRankLimit = 1024

    /// σ_max and σ_min of an n × n matrix, and ‖AᵀA − I‖_F, from one Householder bidiagonalisation:
    /// the singular values by bisection on the bidiagonal's Golub–Kahan matrix (no vectors are formed),
    /// ‖AᵀA − I‖_F from BᵀB, which AᵀA is orthogonally similar to. Inputs must be finite.
    static func bidiagonalSummary(_ a: [Double], n: Int) -> (max: Double, min: Double, gramError: Double) {
        precondition(a.count == n * n)
        guard n > 0 else { return (0, 0, 0) }
        let scale = a.reduce(0) { max($0, abs($1)) }
        guard scale > 0 else { return (0, 0, Double(n).squareRoot()) }
        // Scaled into [−1, 1] so that no square overflows; the row-major buffer read as column-major is
        // Aᵀ, which has the same singular values and ‖AAᵀ − I‖_F = ‖AᵀA − I‖_F.
        var work = a.map { $0 / scale }
        var d = [Double](repeating: 0, count: n), e = [Double](repeating: 0, count: max(n - 1, 1))
        work.withUnsafeMutableBufferPointer { w in
            d.withUnsafeMutableBufferPointer { dp in
                e.withUnsafeMutableBufferPointer { la_bidiagonalize(w.baseAddress, n, n, dp.baseAddress, $0.baseAddress) }
            }
        }
        e = Array(e.prefix(n - 1))
        // BᵀB: diagonal d_i² + e_{i−1}², off-diagonal d_i·e_i; AᵀA = scale²·(V·BᵀB·Vᵀ).
        let s2 = scale * scale
        var gram = 0.0
        for i in 0..<n {
            let diagonal = s2 * (d[i] * d[i] + (i > 0 ? e[i - 1] * e[i - 1] : 0)) - 1
            gram += diagonal * diagonal
            if i < n - 1 {
                let off = s2 * d[i] * e[i]
                gram += 2 * off * off
            }
        }
        // The Golub–Kahan matrix: zero diagonal, off-diagonals d0, e0, d1, e1, …, d_{n−1}; eigenvalues ±σ.
        var off: [Double] = []
        off.reserveCapacity(2 * n - 1)
        for i in 0..<n {
            off.append(d[i])
            if i < n - 1 { off.append(e[i]) }
        }
        let (largest, smallest) = extremeSingularValues(golubKahan: off, n: n, singular: d.contains(0))
        return (largest * scale, smallest * scale, gram.squareRoot())
    }

    /// The largest and smallest singular value of a bidiagonal, from the off-diagonals of its
    /// Golub–Kahan matrix, by Sturm-count bisection to full relative precision.
    static func extremeSingularValues(golubKahan off: [Double], n: Int, singular: Bool) -> (Double, Double) {
        let count = SturmCount(diagonal: nil, offDiagonal: off)
        // Singular values below x: (eigenvalues of the 2n × 2n matrix below x) − n, for x > 0.
        func below(_ x: Double) -> Int { count.eigenvalues(below: x) - n }
        var bound = 0.0
        for i in off.indices { bound = max(bound, abs(off[i]) + (i > 0 ? abs(off[i - 1]) : 0)) }
        guard bound > 0 else { return (0, 0) }
        // σ_max: the least x with every singular value below it; σ_min: the least x with one below it.
        // Up to 2000 halvings: σ_min may be thousands of binades below the bound.
        let largest = bisect(0, bound * (1 + 4 * Double.ulpOfOne), steps: 2000) { below($0) >= n }
        let smallest = singular ? 0 : bisect(0, largest, steps: 2000) { below($0) >= 1 }
        return (largest, smallest)
    }

    /// The least x in (lo, hi] with `isAbove(x)` (monotone), to full relative precision or `steps`
    /// halvings.
    static func bisect(_ lo: Double, _ hi: Double, steps: Int, _ isAbove: (Double) -> Bool) -> Double {
        var lo = lo, hi = hi
        for _ in 0..<steps {
            let mid = lo + (hi - lo) / 2
            if mid <= lo || mid >= hi || hi - lo <= 2 * Double.ulpOfOne * max(abs(lo), abs(hi)) { break }
            if isAbove(mid) { hi = mid } else { lo = mid }
        }
        return hi
    }

    /// Sturm counts of a symmetric tridiagonal matrix: how many eigenvalues lie below x, from the
    /// signs of the LDLᵀ pivots of T − x·I, with tiny pivots replaced by −pivmin.
    struct SturmCount {
        /// The diagonal; nil for a zero diagonal (a Golub–Kahan matrix).
        let diagonal: [Double]?
        let squares: [Double]
        let pivmin: Double

        init(diagonal: [Double]?, offDiagonal: [Double]) {
            self.diagonal = diagonal
            squares = offDiagonal.map { $0 * $0 }
            pivmin = Double.leastNormalMagnitude * max(1, squares.max() ?? 1)
        }

        func eigenvalues(below x: Double) -> Int {
            var count = 0
            var q = (diagonal?[0] ?? 0) - x
            if q < 0 { count += 1 }
            for i in squares.indices {
                if abs(q) < pivmin { q = -pivmin }
                q = (diagonal?[i + 1] ?? 0) - x - squares[i] / q
                if q < 0 { count += 1 }
            }
            return count
        }
    }

    /// The largest eigenvalue of a symmetric positive semi-definite operator of size n, estimated by
    /// Lanczos with full reorthogonalisation from a seeded start (so reports are the same every run);
    /// a lower bound that converges quickly when that eigenvalue is separated from the others.
    static func lanczosLargest(n: Int, maxSteps: Int = 40, seed: UInt64,
                               apply: (UnsafePointer<Double>, UnsafeMutablePointer<Double>) -> Void) -> Double {
        guard n > 0 else { return 0 }
        let steps = min(maxSteps, n)
        var g = SeededGenerator(seed: seed)
        var q = (0..<n).map { _ in g.gaussian() }
        let norm = q.reduce(0) { $0 + $1 * $1 }.squareRoot()
        q = q.map { $0 / norm }
        var basis: [[Double]] = [q]
        var alphas: [Double] = [], betas: [Double] = []
        var w = [Double](repeating: 0, count: n)
        var previous = 0.0
        for j in 0..<steps {
            basis[j].withUnsafeBufferPointer { qj in w.withUnsafeMutableBufferPointer { apply(qj.baseAddress!, $0.baseAddress!) } }
            let alpha = zip(basis[j], w).reduce(0) { $0 + $1.0 * $1.1 }
            alphas.append(alpha)
            // w −= α q_j + β q_{j−1}, then against every earlier vector (twice is enough).
            for _ in 0..<2 {
                for v in basis {
                    let c = zip(v, w).reduce(0) { $0 + $1.0 * $1.1 }
                    for i in 0..<n { w[i] -= c * v[i] }
                }
            }
            let theta = largestEigenvalue(tridiagonal: alphas, betas)
            let beta = w.reduce(0) { $0 + $1 * $1 }.squareRoot()
            if j > 2 && abs(theta - previous) <= 1e-13 * abs(theta) { return theta }
            previous = theta
            if beta <= 1e-14 * max(abs(theta), Double.leastNormalMagnitude) || j == steps - 1 { return theta }
            betas.append(beta)
            basis.append(w.map { $0 / beta })
        }
        return previous
    }

    /// The largest eigenvalue of a symmetric tridiagonal matrix (diagonal a, off-diagonal b), by bisection.
    static func largestEigenvalue(tridiagonal a: [Double], _ b: [Double]) -> Double {
        let n = a.count
        var lo = Double.infinity, hi = -Double.infinity
        for i in 0..<n {
            let r = (i > 0 ? abs(b[i - 1]) : 0) + (i < n - 1 ? abs(b[i]) : 0)
            lo = min(lo, a[i] - r)
            hi = max(hi, a[i] + r)
        }
        let count = SturmCount(diagonal: a, offDiagonal: Array(b.prefix(n - 1)))
        return bisect(lo, hi, steps: 200) { count.eigenvalues(below: $0) >= n }
    }

    /// σ_max, σ_min (from an LU factorisation) and ‖AᵀA − I‖_F of a large n × n matrix, estimated:
    /// Lanczos on AᵀA for σ_max², on (AᵀA)⁻¹ = A⁻¹A⁻ᵀ for 1/σ_min², and 32 random sign probes z for
    /// E‖(AᵀA − I)z‖² = ‖AᵀA − I‖_F². Costs one LU (⅔n³ flops) and O(n²) per iteration.
    static func estimatedSummary(_ a: [Double], n: Int, lu: LUFactorization? = nil) -> (max: Double, min: Double, gramError: Double) {
        precondition(a.count == n * n)
        guard n > 0 else { return (0, 0, 0) }
        let largest = a.withUnsafeBufferPointer { m in
            lanczosLargest(n: n, seed: 0x6d61_785f_7369_676d) { x, y in la_gram_apply(m.baseAddress, n, n, x, y, 1) }
        }.squareRoot()
        let factors = lu ?? LUFactorization(a, n: n)
        var smallest = 0.0
        if !factors.isSingular {
            let inverseLargest = lanczosLargest(n: n, seed: 0x6d69_6e5f_7369_676d) { x, y in
                y.update(from: x, count: n)
                factors.solve(y, transposed: true)
                factors.solve(y, transposed: false)
            }
            smallest = inverseLargest > 0 && inverseLargest.isFinite ? 1 / inverseLargest.squareRoot() : 0
        }
        // Random signs, 32 probes at once (one pass over A).
        let probes = 32
        var g = SeededGenerator(seed: 0x6772_616d)
        var z = [Double](repeating: 0, count: n * probes)
        for i in z.indices { z[i] = g.next() & 1 == 0 ? 1 : -1 }
        var y = [Double](repeating: 0, count: n * probes)
        a.withUnsafeBufferPointer { m in
            z.withUnsafeBufferPointer { zp in y.withUnsafeMutableBufferPointer { la_gram_apply(m.baseAddress, n, n, zp.baseAddress, $0.baseAddress, probes) } }
        }
        var sum = 0.0
        for i in y.indices {
            let v = y[i] - z[i]
            sum += v * v
        }
        return (largest, smallest, (sum / Double(probes)).squareRoot())
    }
}
