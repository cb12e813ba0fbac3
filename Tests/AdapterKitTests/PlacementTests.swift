import Foundation
import Testing
@testable import AdapterKit

/// Updates placed on row ranges of a tensor's 2-D view (a fused qkv weight's q and v rows), the
/// seam name maps for fused and expert tensors build on: each piece gets exactly the terms on it,
/// rows no term covers are written bit for bit, and the values equal a Float64 reference computed
/// here with plain loops.
@Suite("merge: updates placed on row ranges")
struct PlacementTests {
    /// Deterministic values in [-1, 1).
    static func values(_ n: Int, seed: UInt64) -> [Float] {
        var x = seed
        return (0..<n).map { _ in
            x = x &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(bitPattern: x >> 11) % 1_000_000) / 1_000_000
        }
    }

    static func bf16Bytes(_ values: [Float]) -> [UInt8] {
        values.flatMap { v -> [UInt8] in let h = ElementConversion.floatToBF16(v); return [UInt8(h & 0xFF), UInt8(h >> 8)] }
    }

    @Test("q, v and a whole-tensor term on a fused [12, 8] weight, in F32, BF16 and F64")
    func fusedRows() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let rows = 12, cols = 8, r = 2
        var w = Self.values(rows * cols, seed: 1)
        for j in 0..<cols { w[5 * cols + j] = -0.0 }  // a row of negative zeros in the untouched k rows
        try writeSafetensors(dir.file("base.safetensors"), [
            ("fused.weight", .f32, [rows, cols], floatBytes(w)),
            ("fused_bf16.weight", .bf16, [rows, cols], Self.bf16Bytes(w)),
            ("fused_f64.weight", .f64, [rows, cols], doubleBytes(w.map(Double.init))),
        ])
        // One PEFT adapter: q and v (4 outputs each) and `all` (12 outputs), rank 2, alpha 4 → scale 2.
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v", "all"]}"#)
        let a = ["q": Self.values(r * cols, seed: 2), "v": Self.values(r * cols, seed: 3), "all": Self.values(r * cols, seed: 4)]
        let b = ["q": Self.values(4 * r, seed: 5), "v": Self.values(4 * r, seed: 6), "all": Self.values(rows * r, seed: 7)]
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), ["q", "v", "all"].flatMap { m in [
            ("base_model.model.\(m).lora_A.weight", DType.f32, [r, cols], floatBytes(a[m]!)),
            ("base_model.model.\(m).lora_B.weight", DType.f32, [m == "all" ? rows : 4, r], floatBytes(b[m]!)),
        ] })
        let adapter = try Adapter(path: dir.file("ad"))
        let module = Dictionary(adapter.modules.map { ($0.baseName, $0) }, uniquingKeysWith: { x, _ in x })
        let base = try Checkpoint(path: dir.file("base.safetensors"))
        let placed = [MergeTerm(module: module["q"]!, factor: 2, rows: .range(0..<4)), MergeTerm(module: module["v"]!, factor: 2, rows: .range(8..<12))]
        func edit(_ name: String, _ terms: [MergeTerm]) -> TensorEdit {
            var e = TensorEdit(baseName: name, base: base.tensor(name)!.entry, file: 0)
            e.terms = terms
            return e
        }
        let edits = [edit("fused.weight", placed + [MergeTerm(module: module["all"]!, factor: 2)]),
                     edit("fused_bf16.weight", placed), edit("fused_f64.weight", placed)]
        #expect(edits[0].segments.map(\.rows) == [0..<4, 4..<8, 8..<12])
        #expect(edits[0].segments.map(\.terms) == [[0, 2], [2], [1, 2]])
        #expect(edits[1].segments.map(\.terms) == [[0], [], [1]])

        try write(try MergePlan(base: base, inputs: [MergeInput(adapter: adapter)], edits: edits), to: dir.file("out.safetensors"))
        let out = try SafetensorsFile(path: dir.file("out.safetensors"))

        // The reference: W + Σ 2·B·A over each term's rows, in Float64 with plain loops.
        func expected(withAll: Bool) -> [Double] {
            var e = w.map(Double.init)
            func add(_ m: String, firstRow: Int, count: Int) {
                for i in 0..<count { for j in 0..<cols {
                    var d = 0.0
                    for t in 0..<r { d += Double(b[m]![i * r + t]) * Double(a[m]![t * cols + j]) }
                    e[(firstRow + i) * cols + j] += 2 * d
                } }
            }
            add("q", firstRow: 0, count: 4)
            add("v", firstRow: 8, count: 4)
            if withAll { add("all", firstRow: 0, count: rows) }
            return e
        }
        let f32 = try out.doubles("fused.weight"), ref = expected(withAll: true)
        for i in 0..<(rows * cols) { #expect(ulpDistance(f32[i], ref[i], .f32) <= 4, "fused.weight[\(i)]: \(f32[i]) vs \(ref[i])") }

        let bf16 = try out.doubles("fused_bf16.weight"), refPlaced = expected(withAll: false)
        for i in 0..<(rows * cols) where !(4 * cols..<8 * cols).contains(i) {
            #expect(ulpDistance(bf16[i], refPlaced[i], .bf16) <= 1, "fused_bf16.weight[\(i)]: \(bf16[i]) vs \(refPlaced[i])")
        }
        let f64 = try out.doubles("fused_f64.weight")
        for i in 0..<(rows * cols) { #expect(abs(f64[i] - refPlaced[i]) <= 1e-12 * max(1, abs(refPlaced[i])), "fused_f64.weight[\(i)]") }

        // Rows 4..<8 (k) are not touched: the same bytes, negative zeros included.
        for name in ["fused_bf16.weight", "fused_f64.weight"] {
            let size = name.hasSuffix("f64.weight") ? 8 : 2
            let before = try base.files[0].withBytes(of: name) { Array($0[(4 * cols * size)..<(8 * cols * size)]) }
            let after = try out.withBytes(of: name) { Array($0[(4 * cols * size)..<(8 * cols * size)]) }
            #expect(before == after, "\(name): untouched rows changed")
        }
        let negativeZeros = try out.floats("fused_bf16.weight")[(5 * cols)..<(6 * cols)]
        #expect(negativeZeros.allSatisfy { $0 == 0 && $0.sign == .minus })
    }
}

/// One module model: a module whose factors are held in memory (what conversions make) merges
/// exactly as the same module read from its file.
@Suite("merge: held and stored modules are one model")
struct HeldModuleTests {
    @Test("the MoSLoRA fixture merged from held factors gives the bytes of the merge from the file")
    func heldEqualsStored() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try Checkpoint(path: fixture("models/tiny-llama-f16.safetensors"))
        let adapter = try Adapter(path: fixture("adapters/moslora-original"))
        let held = try WorkingAdapter(adapter, options: ConvertOptions()).modules
        #expect(held.allSatisfy { $0.a.store == nil && $0.b.store == nil && $0.orientation == .peft })
        let names = NameMap(base: base)
        func edits(_ modules: [LoRAModule]) -> [TensorEdit] {
            modules.map { m in
                let target = names.target(for: m, format: adapter.format)!.tensor
                var e = TensorEdit(baseName: target, base: base.tensor(target)!.entry, file: 0)
                e.terms = [MergeTerm(module: m, factor: m.scale)]
                return e
            }
        }
        for (label, modules) in [("stored", adapter.modules), ("held", held)] {
            try write(try MergePlan(base: base, inputs: [MergeInput(adapter: adapter)], edits: edits(modules)), to: dir.file(label + ".safetensors"))
        }
        let stored = readBytes(dir.file("stored.safetensors")), fromHeld = readBytes(dir.file("held.safetensors"))
        #expect(!stored.isEmpty && stored == fromHeld)
        #expect(stored != readBytes(fixture("models/tiny-llama-f16.safetensors")))
    }
}

@Suite("factor orientation: the one place stored factors are transposed")
struct FactorOrientationTests {
    @Test("fromPEFT then toPEFT gives the factors back in both orientations; padding adds zero rank")
    func roundTrip() {
        let r = 3, n = 5, out = 4
        let a = (0..<(r * n)).map { Double($0) + 0.5 }, b = (0..<(out * r)).map { -Double($0) - 0.25 }
        for o in [FactorOrientation.peft, .transposed] {
            let (sa, sb) = o.fromPEFT(a: a, b: b, rank: r, inFeatures: n, outFeatures: out, paddedRank: r)
            let back = o.toPEFT(a: sa, m: nil, b: sb, rank: r, inFeatures: n, outFeatures: out)
            #expect(back.a == a && back.b == b, "\(o)")
            let (pa, pb) = o.fromPEFT(a: a, b: b, rank: r, inFeatures: n, outFeatures: out, paddedRank: r + 2)
            let padded = o.toPEFT(a: pa, m: nil, b: pb, rank: r + 2, inFeatures: n, outFeatures: out)
            // B·A is unchanged by the zero rows of A and columns of B.
            let dense = matmul(b, a, rows: out, inner: r, cols: n), paddedDense = matmul(padded.b, padded.a, rows: out, inner: r + 2, cols: n)
            #expect(dense == paddedDense, "\(o)")
        }
        #expect(FactorOrientation.transposed.fromPEFT(a: a, b: b, rank: r, inFeatures: n, outFeatures: out, paddedRank: r).a
                == transpose(a, rows: r, cols: n))
    }
}

/// One expert of a fused 3-D expert tensor [E, out, in]: the edit's view is [E·out, in] and the
/// expert's update lands on rows e·out..<(e+1)·out; the other experts are untouched.
@Suite("merge: one expert of a 3-D tensor")
struct ExpertSliceTests {
    @Test("expert 1 of a [3, 4, 8] BF16 tensor gets its update; experts 0 and 2 keep their bytes")
    func expertSlice() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let experts = 3, out = 4, cols = 8, r = 2
        let w = PlacementTests.values(experts * out * cols, seed: 11)
        try writeSafetensors(dir.file("base.safetensors"), [("experts.down_proj", .bf16, [experts, out, cols], PlacementTests.bf16Bytes(w))])
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["e1"]}"#)
        let a = PlacementTests.values(r * cols, seed: 12), b = PlacementTests.values(out * r, seed: 13)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.e1.lora_A.weight", .f32, [r, cols], floatBytes(a)),
            ("base_model.model.e1.lora_B.weight", .f32, [out, r], floatBytes(b)),
        ])
        let adapter = try Adapter(path: dir.file("ad"))
        let base = try Checkpoint(path: dir.file("base.safetensors"))
        var edit = TensorEdit(baseName: "experts.down_proj", base: base.tensor("experts.down_proj")!.entry, file: 0)
        edit.viewColumns = cols
        edit.terms = [MergeTerm(module: adapter.modules[0], factor: 1, rows: .range(out..<(2 * out)))]
        #expect(edit.rows == experts * out && edit.columns == cols)
        try write(try MergePlan(base: base, inputs: [MergeInput(adapter: adapter)], edits: [edit]), to: dir.file("out.safetensors"))
        let merged = try SafetensorsFile(path: dir.file("out.safetensors")).doubles("experts.down_proj")
        let original = try base.files[0].doubles("experts.down_proj")
        for e in 0..<experts {
            for i in 0..<out {
                for j in 0..<cols {
                    let k = (e * out + i) * cols + j
                    guard e == 1 else { #expect(merged[k].bitPattern == original[k].bitPattern); continue }
                    var d = 0.0
                    for t in 0..<r { d += Double(b[i * r + t]) * Double(a[t * cols + j]) }
                    #expect(ulpDistance(merged[k], original[k] + d, .bf16) <= 1, "expert 1 [\(i), \(j)]")
                }
            }
        }
    }
}
