import Foundation
import Testing
@testable import AdapterKit

// The mixer diagnostics and the Kaiming inverse use C kernels (bidiagonalisation, LU, GEMM); they are
// checked here against the one-sided Jacobi SVD (the slow, accurate reference) and plain products.

private func randomMatrix(_ n: Int, _ g: inout SeededGenerator, cols: Int? = nil) -> [Double] {
    (0..<(n * (cols ?? n))).map { _ in g.gaussian() }
}

private func relativeError(_ a: Double, _ b: Double) -> Double {
    a == b ? 0 : abs(a - b) / max(abs(a), abs(b))
}

@Suite("Large mixers")
struct LargeMixerTests {
    /// Matrices with known troubles: graded, nearly singular, exactly singular, orthogonal, tiny and huge.
    static func cases() -> [(name: String, n: Int, m: [Double])] {
        var g = SeededGenerator(seed: 7)
        var out: [(String, Int, [Double])] = []
        for n in [1, 2, 3, 5, 8, 17, 33, 64, 100] { out.append(("gaussian \(n)", n, randomMatrix(n, &g))) }
        var graded = randomMatrix(20, &g)
        for i in 0..<20 { for j in 0..<20 { graded[i * 20 + j] *= pow(10, -Double(j) / 2) } }
        out.append(("graded columns 1 … 1e-9.5", 20, graded))
        var nearly = randomMatrix(12, &g)
        for j in 0..<12 { nearly[11 * 12 + j] = nearly[10 * 12 + j] * (1 + 1e-9) }
        out.append(("two rows equal to 1e-9", 12, nearly))
        var singular = randomMatrix(9, &g)
        for j in 0..<9 { singular[8 * 9 + j] = singular[0 * 9 + j] + singular[1 * 9 + j] }
        out.append(("rank 8 of 9", 9, singular))
        out.append(("zero", 4, [Double](repeating: 0, count: 16)))
        out.append(("orthogonal", 30, LinearAlgebra.qr(randomMatrix(30, &g), rows: 30, cols: 30).q))
        out.append(("huge entries", 6, randomMatrix(6, &g).map { $0 * 1e200 }))
        out.append(("tiny entries", 6, randomMatrix(6, &g).map { $0 * 1e-200 }))
        out.append(("identity", 7, (0..<49).map { $0 / 7 == $0 % 7 ? 1 : 0 }))
        return out
    }

    @Test("σ_max, σ_min and ‖MᵀM − I‖_F from the bidiagonalisation match the Jacobi SVD")
    func exactSummary() {
        for (name, n, m) in Self.cases() {
            // The reference is run on the matrix scaled to [−1, 1] (its squares would overflow or underflow).
            let big = m.map(abs).max()!
            let s = big == 0 ? [Double](repeating: 0, count: n) : LinearAlgebra.singularValues(m.map { $0 / big }, rows: n, cols: n).map { $0 * big }
            let summary = LinearAlgebra.bidiagonalSummary(m, n: n)
            #expect(relativeError(summary.max, s[0]) < 1e-13, "\(name): σ_max \(summary.max) vs \(s[0])")
            // σ_min is accurate relative to σ_max (absolute error about ε·σ_max), as from any backward-stable method.
            #expect(abs(summary.min - s[n - 1]) <= 1e-13 * max(s[0], Double.leastNormalMagnitude) * Double(n), "\(name): σ_min \(summary.min) vs \(s[n - 1])")
            let gram = (s.reduce(0) { $0 + ($1 * $1 - 1) * ($1 * $1 - 1) }).squareRoot()
            if s[0] < 1e100 && s[0] > 1e-100 {
                #expect(abs(summary.gramError - gram) <= 1e-12 * max(1, gram, s[0] * s[0]), "\(name): ‖MᵀM − I‖ \(summary.gramError) vs \(gram)")
            }
        }
    }

    @Test("diagnostics of an orthogonal, a diagonal and a singular mixer")
    func knownDiagnostics() {
        let d = MixerDiagnostics(mixer: [4, 0, 0, 1], rank: 2)
        #expect(abs(d.conditionRatio - 0.25) < 1e-15 && abs(d.orthogonalityError - 15) < 1e-13 && !d.isEstimated)
        let singular = MixerDiagnostics(mixer: [1, 2, 2, 4], rank: 2)
        #expect(singular.conditionRatio < 1e-15)
        let bad = MixerDiagnostics(mixer: [1, .nan, 0, 1], rank: 2)
        #expect(bad.conditionRatio == 0 && bad.orthogonalityError.isNaN)
    }

    @Test("the estimates (Lanczos, LU, random probes) are close to the exact values")
    func estimates() {
        var g = SeededGenerator(seed: 11)
        for n in [50, 200, 400] {
            // A Kaiming-like mixer (uniform in ±1/√n) and one pushed towards orthogonal.
            let kaiming = (0..<(n * n)).map { _ in (2 * g.unit() - 1) / Double(n).squareRoot() }
            var nearOrthogonal = LinearAlgebra.qr(randomMatrix(n, &g), rows: n, cols: n).q
            for i in nearOrthogonal.indices { nearOrthogonal[i] += 1e-4 * g.gaussian() }
            for m in [kaiming, nearOrthogonal] {
                let exact = LinearAlgebra.bidiagonalSummary(m, n: n)
                let estimate = LinearAlgebra.estimatedSummary(m, n: n)
                #expect(relativeError(estimate.max, exact.max) < 1e-3, "n \(n): σ_max \(estimate.max) vs \(exact.max)")
                #expect(relativeError(estimate.min, exact.min) < 1e-4, "n \(n): σ_min \(estimate.min) vs \(exact.min)")
                #expect(relativeError(estimate.gramError, exact.gramError) < 0.35, "n \(n): ‖MᵀM − I‖ \(estimate.gramError) vs \(exact.gramError)")
            }
        }
    }

    @Test("above the exact limit the diagnostics say they are estimates")
    func estimatedAboveLimit() {
        var g = SeededGenerator(seed: 5)
        let n = LinearAlgebra.exactDiagnosticsRankLimit + 1
        let m = (0..<(n * n)).map { _ in (2 * g.unit() - 1) / Double(n).squareRoot() }
        let d = MixerDiagnostics(mixer: m, rank: n)
        #expect(d.isEstimated)
        #expect(d.conditionRatio > 0 && d.conditionRatio < 1e-2)
        #expect(MixerDiagnostics(mixer: Array(m.prefix(100 * 100)), rank: 100).isEstimated == false)
    }

    @Test("inspect of a rank-1100 mixer says its diagnostics are estimated, in the text and the JSON", .timeLimit(.minutes(1)))
    func reportSaysEstimated() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = 1100, d = 4
        var g = SeededGenerator(seed: 9)
        let folder = dir.file("a")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try writeSafetensors(folder + "/adapter_model.safetensors", [
            ("base_model.model.q.lora_A.weight", .f32, [r, d], floatBytes((0..<(r * d)).map { _ in Float(g.gaussian()) })),
            ("base_model.model.q.lora_B.weight", .f32, [d, r], floatBytes((0..<(d * r)).map { _ in Float(g.gaussian()) })),
            ("base_model.model.q.lora_AB.weight", .f32, [r, r], floatBytes((0..<(r * r)).map { _ in Float(2 * g.unit() - 1) })),
        ])
        _ = dir.write("a/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1100, "lora_alpha": 1100, "lora_use_mixer": true}"#)
        let report = try AdapterReport(try Adapter(path: folder))
        let diagnostics = try #require(report.modules.first?.diagnostics)
        #expect(diagnostics.isEstimated)
        #expect(report.text().contains("σ_min / σ_max      \(formatShort(diagnostics.conditionRatio))  (estimated: rank above 1024)"))
        #expect(report.json()["modules"]?.arrayValue?.first?["mixer_diagnostics"]?["estimated"]?.boolValue == true)
    }

    @Test("LU solves A·X = B and Aᵀ·x = b; a singular matrix is reported")
    func luSolve() {
        var g = SeededGenerator(seed: 3)
        for (n, cols) in [(1, 1), (3, 2), (70, 5), (130, 300), (257, 9)] {
            let a = randomMatrix(n, &g)
            let x = randomMatrix(n, &g, cols: cols)
            let b = matmul(a, x, rows: n, inner: n, cols: cols)
            let lu = LUFactorization(a, n: n)
            #expect(!lu.isSingular)
            let solved = lu.solve(b, columns: cols)
            let worst = zip(solved, x).map { abs($0 - $1) }.max() ?? 0
            #expect(worst < 1e-8, "n \(n): \(worst)")
            // One vector, transposed: Aᵀ·v = c.
            let v = (0..<n).map { _ in g.gaussian() }
            var c = matmul(transpose(a, rows: n, cols: n), v, rows: n, inner: n, cols: 1)
            c.withUnsafeMutableBufferPointer { lu.solve($0.baseAddress!, transposed: true) }
            #expect(zip(c, v).map { abs($0 - $1) }.max() ?? 0 < 1e-8)
        }
        #expect(LUFactorization([1, 2, 2, 4], n: 2).isSingular)
        #expect(LUFactorization([0, 0, 0, 0], n: 2).zeroPivots == 2)
    }

    @Test("lora-to-moslora --mixer kaiming at rank 1500 writes B·M·A' = B·A", .timeLimit(.minutes(2)))
    func kaimingLargeRank() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = 1500, d = 8
        var g = SeededGenerator(seed: 1)
        let a = (0..<(r * d)).map { _ in Float(g.gaussian() * 0.01) }
        let b = (0..<(d * r)).map { _ in Float(g.gaussian() * 0.01) }
        let folder = dir.file("in")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try writeSafetensors(folder + "/adapter_model.safetensors", [
            ("base_model.model.q.lora_A.weight", .f32, [r, d], floatBytes(a)),
            ("base_model.model.q.lora_B.weight", .f32, [d, r], floatBytes(b)),
        ])
        _ = dir.write("in/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1500, "lora_alpha": 1500}"#)
        var options = ConvertOptions()
        options.sync = false
        options.dtype = .f64
        // Random r × r mixers have σmin/σmax near 1/r: accept what this one draws.
        let summary = try AdapterConversion.loraToMoSLoRA(input: folder, output: dir.file("out"), mixer: .kaiming, seed: 2,
                                                          minimumConditionRatio: 1e-9, options: options)
        #expect(summary.notes.contains { $0.contains("estimated") })
        let out = try Adapter(path: dir.file("out"))
        let f = try out.modules[0].factors()
        let m = try #require(f.m)
        let ma = matmul(m, f.a, rows: r, inner: r, cols: d)
        let before = matmul(b.map(Double.init), a.map(Double.init), rows: d, inner: r, cols: d)
        let after = matmul(f.b, ma, rows: d, inner: r, cols: d)
        let scale = before.map(abs).max()!
        let worst = zip(before, after).map { abs($0 - $1) }.max()!
        #expect(worst <= 1e-6 * scale, "\(worst) vs \(scale)")
    }
}
