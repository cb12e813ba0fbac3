import CLinearAlgebra

/// Small dense linear algebra in Float64 for rank-sized matrices (r ≤ a few hundred): mixer
/// diagnostics, inversion, QR and SVD for conversions. Row-major storage throughout.
public enum LinearAlgebra {
    /// The thin SVD of a (rows × cols) matrix: U (rows × k), S (k, descending), V (cols × k), k = min(rows, cols).
    ///
    /// One-sided Jacobi (Hestenes), in the C kernel with vectorised column operations: accurate for
    /// small singular values. O(r³) per sweep, a few sweeps: resize's r × r cores and small matrices;
    /// mixer diagnostics use `bidiagonalSummary` or the estimates instead.
    public static func svd(_ a: [Double], rows: Int, cols: Int) -> (u: [Double], s: [Double], v: [Double]) {
        if rows < cols {
            let t = svd(transpose(a, rows: rows, cols: cols), rows: cols, cols: rows)
            return (t.v, t.s, t.u)
        }
        let m = rows, n = cols
        // Work on columns, stored one after another: u holds column j of A at j·m, v the identity.
        var u = [Double](repeating: 0, count: m * n)
        for i in 0..<m { for j in 0..<n { u[j * m + i] = a[i * n + j] } }
        var v = [Double](repeating: 0, count: n * n)
        for j in 0..<n { v[j * n + j] = 1 }
        u.withUnsafeMutableBufferPointer { up in
            v.withUnsafeMutableBufferPointer { vp in _ = la_jacobi_svd(up.baseAddress, m, n, vp.baseAddress, 60) }
        }
        var sigma = (0..<n).map { j in u[(j * m)..<((j + 1) * m)].reduce(0) { $0 + $1 * $1 }.squareRoot() }
        let order = (0..<n).sorted { sigma[$0] > sigma[$1] }
        var uOut = [Double](repeating: 0, count: m * n), vOut = [Double](repeating: 0, count: n * n)
        for (k, j) in order.enumerated() {
            let s = sigma[j]
            for i in 0..<m { uOut[i * n + k] = s > 0 ? u[j * m + i] / s : 0 }
            for i in 0..<n { vOut[i * n + k] = v[j * n + i] }
        }
        sigma = order.map { sigma[$0] }
        return (uOut, sigma, vOut)
    }

    /// Singular values, descending.
    public static func singularValues(_ a: [Double], rows: Int, cols: Int) -> [Double] {
        svd(a, rows: rows, cols: cols).s
    }

    /// The inverse of an n×n matrix by Gauss–Jordan elimination with partial pivoting; nil when singular.
    public static func inverse(_ a: [Double], n: Int) -> [Double]? {
        var m = a
        var inv = (0..<(n * n)).map { $0 / n == $0 % n ? 1.0 : 0.0 }
        for col in 0..<n {
            var pivot = col
            for r in (col + 1)..<max(col + 1, n) where abs(m[r * n + col]) > abs(m[pivot * n + col]) { pivot = r }
            let p = m[pivot * n + col]
            if p == 0 || !p.isFinite { return nil }
            if pivot != col {
                for j in 0..<n {
                    m.swapAt(pivot * n + j, col * n + j)
                    inv.swapAt(pivot * n + j, col * n + j)
                }
            }
            for j in 0..<n {
                m[col * n + j] /= p
                inv[col * n + j] /= p
            }
            for r in 0..<n where r != col {
                let f = m[r * n + col]
                if f == 0 { continue }
                for j in 0..<n {
                    m[r * n + j] -= f * m[col * n + j]
                    inv[r * n + j] -= f * inv[col * n + j]
                }
            }
        }
        return inv
    }

    /// Thin QR of a (rows × cols) matrix with rows ≥ cols, by modified Gram–Schmidt with one
    /// re-orthogonalisation pass: Q (rows × cols) with orthonormal columns, R (cols × cols) upper triangular.
    public static func qr(_ a: [Double], rows: Int, cols: Int) -> (q: [Double], r: [Double]) {
        var q = a
        var r = [Double](repeating: 0, count: cols * cols)
        for j in 0..<cols {
            for _ in 0..<2 {
                for k in 0..<j {
                    var dot = 0.0
                    for i in 0..<rows { dot += q[i * cols + k] * q[i * cols + j] }
                    r[k * cols + j] += dot
                    for i in 0..<rows { q[i * cols + j] -= dot * q[i * cols + k] }
                }
            }
            var norm = 0.0
            for i in 0..<rows { norm += q[i * cols + j] * q[i * cols + j] }
            norm = norm.squareRoot()
            r[j * cols + j] = norm
            for i in 0..<rows { q[i * cols + j] = norm > 0 ? q[i * cols + j] / norm : 0 }
        }
        return (q, r)
    }

    /// Frobenius norm.
    public static func frobenius(_ a: [Double]) -> Double {
        a.reduce(0) { $0 + $1 * $1 }.squareRoot()
    }
}

/// How far a mixer is from the identity and from orthogonal, and how well it can be inverted.
///
/// Exact up to rank `LinearAlgebra.exactDiagnosticsRankLimit` (one bidiagonalisation, O(r³) with a
/// small constant); above it ‖MᵀM − I‖_F and σ_min/σ_max are estimates (`isEstimated`), so that a
/// rank-5000 mixer takes seconds, not hours.
public struct MixerDiagnostics: Sendable {
    /// ‖M − I‖_F / √r (always exact).
    public let distanceFromIdentity: Double
    /// ‖MᵀM − I‖_F.
    public let orthogonalityError: Double
    /// σ_min / σ_max (0 for a singular mixer): the inverse's relative accuracy is about ε / this.
    public let conditionRatio: Double
    /// Whether `orthogonalityError` and `conditionRatio` are estimates: σ_max by Lanczos on MᵀM, σ_min by
    /// Lanczos on (MᵀM)⁻¹ through an LU factorisation, ‖MᵀM − I‖_F from 32 random probes.
    public let isEstimated: Bool

    /// How the values that need a decomposition are found.
    public enum Method: Sendable {
        /// Exact up to `LinearAlgebra.exactDiagnosticsRankLimit`, estimated above.
        case automatic
        /// Exact at any rank (O(r³), memory-bound: minutes at rank 5000).
        case exact
        /// Estimated at any rank.
        case estimated
    }

    public init(mixer m: [Double], rank r: Int, method: Method = .automatic) {
        self.init(mixer: m, rank: r, lu: nil, method: method)
    }

    /// With the LU factorisation of M when the caller has one (reused for the estimate of σ_min).
    init(mixer m: [Double], rank r: Int, lu: LUFactorization?, method: Method = .automatic) {
        var squares = 0.0
        for i in 0..<r {
            for j in 0..<r {
                let v = m[i * r + j] - (i == j ? 1 : 0)
                squares += v * v
            }
        }
        distanceFromIdentity = squares.squareRoot() / Double(r).squareRoot()
        guard m.allSatisfy(\.isFinite) else {
            // Nothing to decompose: NaN or ∞ makes every norm meaningless (and the report lists the values).
            orthogonalityError = .nan
            conditionRatio = 0
            isEstimated = false
            return
        }
        let summary: (max: Double, min: Double, gramError: Double)
        if method == .exact || (method == .automatic && r <= LinearAlgebra.exactDiagnosticsRankLimit) {
            summary = LinearAlgebra.bidiagonalSummary(m, n: r)
            isEstimated = false
        } else {
            summary = LinearAlgebra.estimatedSummary(m, n: r, lu: lu)
            isEstimated = true
        }
        orthogonalityError = summary.gramError
        conditionRatio = summary.max > 0 ? summary.min / summary.max : 0
    }
}

/// The n × n identity, row-major.
func identityMatrix(_ n: Int) -> [Double] {
    var out = [Double](repeating: 0, count: n * n)
    for i in 0..<n { out[i * n + i] = 1 }
    return out
}

/// The transpose of a row-major (rows × cols) matrix.
func transpose(_ x: [Double], rows: Int, cols: Int) -> [Double] {
    var out = [Double](repeating: 0, count: x.count)
    for i in 0..<rows { for j in 0..<cols { out[j * rows + i] = x[i * cols + j] } }
    return out
}

/// Row-major (rows × inner) · (inner × cols) in Float64.
func matmul(_ x: [Double], _ y: [Double], rows: Int, inner: Int, cols: Int) -> [Double] {
    var out = [Double](repeating: 0, count: rows * cols)
    for i in 0..<rows {
        for k in 0..<inner {
            let v = x[i * inner + k]
            for j in 0..<cols { out[i * cols + j] += v * y[k * cols + j] }
        }
    }
    return out
}
