import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

/// A copy of the safetensors file `from` at `to`, with the tensors `drop` says to leave out and
/// every other tensor's bytes as they are (optionally renamed by `rename`).
private func copyTensors(_ from: String, to: String, drop: (String) -> Bool = { _ in false }, rename: (String) -> String = { $0 }) throws -> String {
    let file = try SafetensorsFile(path: from)
    let kept = try file.header.tensors.filter { !drop($0.name) }.map { t in
        (name: rename(t.name), dtype: t.dtype, shape: t.shape, bytes: try file.withBytes(of: t.name) { Array($0) })
    }
    return try writeSafetensors(to, kept)
}

@Suite("LyCORIS: LoHa, LoKr, full diffs and dora_scale (fixtures made by lycoris-lora 4.1.3)")
struct LyCORISTests {
    /// Fixtures/expected/lycoris/<case>[.<component>].safetensors (Fixtures/make_lycoris_fixtures.py):
    /// the changed base tensors computed in numpy Float64 from the saved factors, rounded once.
    static let cases: [String] = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fixture("expected/lycoris"))) ?? []
        return names.filter { $0.hasSuffix(".safetensors") }.map { String($0.dropLast(".safetensors".count)) }.sorted()
    }()

    @Test("the references are present: LoHa (plain, Tucker), LoKr (w2 factored, both whole, w1 factored, Tucker), full, DoRA both ways, text encoder")
    func present() {
        #expect(Self.cases.count == 13)
    }

    @Test("every changed tensor equals the Float64 reference rounded once; every other tensor is copied", arguments: cases)
    func matchesReference(_ reference: String) throws {
        let expected = try SafetensorsFile(path: fixture("expected/lycoris/\(reference).safetensors"))
        let baseName = try #require(expected.header.metadata.first { $0.key == "base" }?.value)
        let adapter = "lycoris-" + String(reference.split(separator: ".")[0])
        let component = baseName == "tiny-unet" ? "unet" : "text_encoder"
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, _) = try merge(base: modelPath(baseName), adapters: [(adapterPath(adapter), 1)], out: dir.file("out.safetensors"), components: [component])
        try expectMatches(merged, reference: reference, in: "lycoris")
        let base = try Checkpoint(path: modelPath(baseName))
        let changed = Set(expected.header.tensors.map(\.name))
        #expect(Set(merged.tensorNames) == Set(base.tensorNames))
        for (info, file) in merged.tensors where !changed.contains(info.name) {
            let (_, baseFile) = try #require(base.tensor(info.name))
            #expect(try merged.files[file].doubles(info.name) == base.files[baseFile].doubles(info.name), "\(info.name) is unchanged")
        }
    }

    @Test("modules are read with LyCORIS's dims and scales: LoHa r₁·r₂ as merged, alpha / dim; LoKr with both halves whole has scale 1")
    func readsModules() throws {
        let loha = try Adapter(path: adapterPath("lycoris-loha"))
        let q = try #require(loha.modules.first { $0.name.hasSuffix("attn1_to_q") })
        #expect(q.algorithm == .loha(dim: 4, tucker: false))
        #expect(q.rank == 16)
        #expect(q.scale == 0.5)
        let conv = try #require(loha.modules.first { $0.name.hasSuffix("conv1") })
        #expect(conv.algorithm == .loha(dim: 2, tucker: false) && conv.scale == 1.5 && conv.flattened)
        let full = try Adapter(path: adapterPath("lycoris-lokr-full"))
        #expect(full.modules.allSatisfy { $0.scale == 1 && $0.algorithm == .lokr(w1Factored: false, w2Factored: false, tucker: false) })
        let tucker = try Adapter(path: adapterPath("lycoris-lokr-tucker"))
        #expect(tucker.modules.contains { $0.algorithm == .lokr(w1Factored: false, w2Factored: true, tucker: true) })
        let dora = try Adapter(path: adapterPath("lycoris-loha-dora-wd-in"))
        #expect(dora.modules.allSatisfy { $0.doraRule == .lycoris(onOutput: false, epsilon: 0x1p-23) })
        let diff = try Adapter(path: adapterPath("lycoris-full"))
        #expect(diff.modules.allSatisfy { $0.algorithm == .full && $0.scale == 1 })
        #expect(diff.modules.filter { $0.bias != nil }.count == 1)
    }

    @Test("inspect names the LyCORIS kinds")
    func inspect() throws {
        let text = try AdapterReport(try Adapter(path: adapterPath("lycoris-lokr-tucker"))).text()
        #expect(text.contains("LyCORIS (LoKr"), "\(text)")
        #expect(text.contains("LoKr (Tucker) conv"), "\(text)")
        #expect(text.contains("alpha / dim"))
    }

    @Test("DoRA at adapter weight 0 is W + s·ΔW, as LyCORIS blends k: w·(k − 1) + 1")
    func doraWeightBlend() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let plain = try copyTensors(adapterPath("lycoris-lokr-dora"), to: dir.file("plain.safetensors"), drop: { $0.hasSuffix(".dora_scale") })
        let (zero, _) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-lokr-dora"), 0)], out: dir.file("zero.safetensors"))
        let (one, _) = try merge(base: modelPath("tiny-unet"), adapters: [(plain, 1)], out: dir.file("one.safetensors"))
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        let a = try zero.files[0].doubles(q), b = try one.files[0].doubles(q), w = try Checkpoint(path: modelPath("tiny-unet")).files[0].doubles(q)
        #expect(zip(a, b).allSatisfy { abs($0 - $1) <= 0x1p-10 * max(1, abs($1)) })
        #expect(a != w, "weight 0 still adds s·ΔW")
    }

    @Test("to-lora with --keep-energy 1 merges to the same weights as the LyCORIS module; --rank 1 keeps less energy", arguments: ["loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-decomposed-w1"])
    func toLoRA(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        var options = ConvertOptions()
        options.base = modelPath("tiny-unet")
        options.sync = false
        options.dtype = .f64
        let exact = try AdapterConversion.toLoRA(input: adapterPath("lycoris-" + name), output: dir.file("exact.safetensors"), target: .energy(1), options: options)
        #expect(exact.energies.allSatisfy { $0.energyKept > 1 - 1e-12 })
        let converted = try Adapter(path: dir.file("exact.safetensors"))
        #expect(converted.modules.allSatisfy { $0.algorithm == .lora })
        // Convolutions come back with their kernel (the base gave it).
        #expect(converted.modules.first { $0.name.hasSuffix("conv1") }?.kind == .convKxK)
        let (viaLoRA, _) = try merge(base: modelPath("tiny-unet"), adapters: [(dir.file("exact.safetensors"), 1)], out: dir.file("a.safetensors"))
        let (direct, _) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-" + name), 1)], out: dir.file("b.safetensors"))
        for t in direct.tensorNames {
            let x = try viaLoRA.files[0].doubles(t), y = try direct.files[0].doubles(t)
            let worst = zip(x, y).map { abs($0 - $1) / max(abs($1), 1e-3) }.max() ?? 0
            #expect(worst <= 0x1p-10, "\(t): off by \(worst)")  // one F16 ulp: the two merges round Float32 sums of different factors
        }
        let small = try AdapterConversion.toLoRA(input: adapterPath("lycoris-" + name), output: dir.file("r1.safetensors"), target: .rank(1), options: options)
        #expect(small.energies.allSatisfy { $0.rankAfter == 1 })
        #expect(small.energies.contains { $0.energyKept < 0.999 })
    }

    @Test("a LyCORIS dora_scale is merged, never converted: the conversion is refused in one line")
    func doraNotConverted() throws {
        let dir = TempDir()
        defer { dir.remove() }
        #expect {
            _ = try AdapterConversion.toLoRA(input: adapterPath("lycoris-loha-dora"), output: dir.file("x.safetensors"), target: .rank(2))
        } throws: { "\($0)".contains("LyCORIS dora_scale") && !"\($0)".contains("\n") }
        #expect(!FileManager.default.fileExists(atPath: dir.file("x.safetensors")))
    }

    // MARK: - Malformed modules: one line each, naming the module

    private func refusal(_ keys: [(String, [Int])], dtype: DType = .f32) throws -> String {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try writeSafetensors(dir.file("bad.safetensors"), keys.map { k in
            (k.0, dtype, k.1, dtype == .f32 ? floatBytes([Float](repeating: 0.5, count: k.1.reduce(1, *))) : [UInt8](repeating: 1, count: k.1.reduce(1, *) * dtype.byteSize))
        })
        do {
            _ = try Adapter(path: path)
            return "loaded"
        } catch { return "\(error)" }
    }

    static let m = "lora_unet_down_blocks_0_attentions_0_proj_in"

    @Test("LoHa without hada_w2_b")
    func lohaIncomplete() throws {
        let m = Self.m
        let e = try refusal([(m + ".hada_w1_a", [8, 2]), (m + ".hada_w1_b", [2, 8]), (m + ".hada_w2_a", [8, 2]), (m + ".alpha", [])])
        #expect(e.contains("module \(m): LoHa lacks hada_w2_b"), "\(e)")
    }

    @Test("one Tucker core of two; factors that do not multiply; a dora_scale of the wrong shape; two kinds in one module")
    func malformed() throws {
        let m = Self.m
        let one = try refusal([(m + ".hada_w1_a", [2, 8]), (m + ".hada_w1_b", [2, 4]), (m + ".hada_w2_a", [2, 8]), (m + ".hada_w2_b", [2, 4]),
                               (m + ".hada_t1", [2, 2, 3, 3])])
        #expect(one.contains("one Tucker core of two"), "\(one)")
        let mismatch = try refusal([(m + ".lokr_w1", [2, 2]), (m + ".lokr_w2_a", [4, 2]), (m + ".lokr_w2_b", [3, 4])])
        #expect(mismatch.contains("lokr_w2_a [4, 2] and lokr_w2_b [3, 4] do not multiply"), "\(mismatch)")
        let dora = try refusal([(m + ".lokr_w1", [2, 2]), (m + ".lokr_w2", [4, 4]), (m + ".dora_scale", [8, 2])])
        #expect(dora.contains("dora_scale has shape [8, 2]"), "\(dora)")
        let two = try refusal([(m + ".lokr_w1", [2, 2]), (m + ".lokr_w2", [4, 4]), (m + ".hada_w1_a", [8, 2])])
        #expect(two.contains("more than one LyCORIS kind"), "\(two)")
        let withLoRA = try refusal([(m + ".lokr_w1", [2, 2]), (m + ".lokr_w2", [4, 4]), (m + ".lora_down.weight", [2, 8])])
        #expect(withLoRA.contains("mixes LyCORIS tensors with LoRA ones"), "\(withLoRA)")
        let ints = try refusal([(m + ".lokr_w1", [2, 2]), (m + ".lokr_w2", [4, 4])], dtype: .i32)
        #expect(ints.contains("not a float type"), "\(ints)")
    }

    @Test("OFT is named as unread; LyCORIS keys under non-kohya names are named as such")
    func unread() throws {
        let oft = try refusal([("lora_unet_x.oft_blocks", [2, 4, 4]), ("lora_unet_x.alpha", [])])
        #expect(oft.contains("LyCORIS OFT modules, which adapter does not read yet"), "\(oft)")
        #expect(unreadKindsNote(["unet.x.hada_w1_a", "unet.x.lokr_w1"]) == "LyCORIS LoHa, LoKr keys are read under kohya's module names (lora_unet_…, lora_te…, lycoris_…), which these are not")
        #expect(unreadKindsNote(["base_model.model.x.lora_A.weightx", "something.else"]) == nil)
    }

    @Test("LyCORIS's generic wrapper names (lycoris_…) are read")
    func genericPrefix() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try copyTensors(adapterPath("lycoris-loha"), to: dir.file("generic.safetensors"), rename: { $0.replacingOccurrences(of: "lora_unet_", with: "lycoris_") })
        let a = try Adapter(path: path)
        #expect(a.modules.count == 6 && a.modules.allSatisfy { $0.component == nil })
        let (merged, _) = try merge(base: modelPath("tiny-unet"), adapters: [(path, 1)], out: dir.file("out.safetensors"))
        try expectMatches(merged, reference: "loha", in: "lycoris")
    }

    @Test("a module no base tensor matches refuses the merge (nothing is skipped)")
    func unmatched() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try copyTensors(adapterPath("lycoris-lokr"), to: dir.file("renamed.safetensors"), rename: { $0.replacingOccurrences(of: "attn1_to_q", with: "attn9_to_q") })
        #expect {
            try merge(base: modelPath("tiny-unet"), adapters: [(path, 1)], out: dir.file("out.safetensors"))
        } throws: { "\($0)".contains("attn9_to_q") }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out.safetensors")))
    }
}

@Suite("LyCORIS scale rules on hand-made modules")
struct LyCORISScaleTests {
    private func module(_ keys: [(String, [Int], [Float])]) throws -> LoRAModule {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try writeSafetensors(dir.file("m.safetensors"), keys.map { ($0.0, DType.f32, $0.1, floatBytes($0.2)) })
        return try #require(try Adapter(path: path).modules.first)
    }

    @Test("LoKr with w1 and w2 whole ignores alpha (scale 1); with w2 factored, scale = alpha / w2_b's rows; no alpha is alpha = dim")
    func lokr() throws {
        let m = "lora_unet_x"
        let whole = try module([(m + ".lokr_w1", [2, 2], [1, 2, 3, 4]), (m + ".lokr_w2", [2, 2], [1, 0, 0, 1]), (m + ".alpha", [], [2])])
        #expect(whole.scale == 1 && whole.alpha == nil)
        // kron([[1,2],[3,4]], I₂) exactly, through the factors.
        let (ma, b) = try whole.mixedA()
        let dense = matmul(b, ma, rows: 4, inner: whole.rank, cols: 4)
        #expect(dense == [1, 0, 2, 0, 0, 1, 0, 2, 3, 0, 4, 0, 0, 3, 0, 4])
        let factored = try module([(m + ".lokr_w1", [2, 2], [1, 2, 3, 4]), (m + ".lokr_w2_a", [2, 1], [1, 1]), (m + ".lokr_w2_b", [1, 2], [1, 1]),
                                   (m + ".alpha", [], [3])])
        #expect(factored.scale == 3 && factored.alpha == 3)
        let noAlpha = try module([(m + ".hada_w1_a", [2, 2], [1, 0, 0, 1]), (m + ".hada_w1_b", [2, 2], [1, 0, 0, 1]),
                                  (m + ".hada_w2_a", [2, 2], [1, 0, 0, 1]), (m + ".hada_w2_b", [2, 2], [2, 0, 0, 2])])
        #expect(noAlpha.scale == 1)
        let (ha, hb) = try noAlpha.mixedA()
        #expect(matmul(hb, ha, rows: 2, inner: noAlpha.rank, cols: 2) == [2, 0, 0, 2])  // I ⊙ 2I
    }
}

@Suite("LyCORIS: the dense-rows path agrees with the exact factors")
struct LyCORISDensePathTests {
    @Test("a LoHa of dim 8 (rank 64 as factors, 16 products per element as rows) merges to W + s·(w1a·w1b)⊙(w2a·w2b) either way", arguments: [DenseRowsPolicy.always, .never])
    func loha(_ policy: DenseRowsPolicy) throws {
        let dir = TempDir()
        defer { dir.remove() }
        var g = SeededGenerator(seed: 11)
        func r(_ n: Int) -> [Float] { (0..<n).map { _ in Float(g.gaussian() * 0.3) } }
        let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
        let (w1a, w1b, w2a, w2b) = (r(8 * 8), r(8 * 8), r(8 * 8), r(8 * 8))
        let path = try writeSafetensors(dir.file("loha.safetensors"), [
            (m + ".hada_w1_a", .f32, [8, 8], floatBytes(w1a)), (m + ".hada_w1_b", .f32, [8, 8], floatBytes(w1b)),
            (m + ".hada_w2_a", .f32, [8, 8], floatBytes(w2a)), (m + ".hada_w2_b", .f32, [8, 8], floatBytes(w2b)),
            (m + ".alpha", .f32, [], floatBytes([4])),
        ])
        let module = try #require(try Adapter(path: path).modules.first)
        #expect(module.rank == 64 && module.dense?.update.costPerElement == 16)
        let (merged, _) = try merge(base: modelPath("tiny-unet"), adapters: [(path, 1)], out: dir.file("out.safetensors"), denseRows: policy)
        let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        let w = try Checkpoint(path: modelPath("tiny-unet")).files[0].doubles(name)
        let got = try merged.files[0].doubles(name)
        for i in 0..<8 {
            for j in 0..<8 {
                var x = 0.0, y = 0.0
                for t in 0..<8 {
                    x += Double(w1a[i * 8 + t]) * Double(w1b[t * 8 + j])
                    y += Double(w2a[i * 8 + t]) * Double(w2b[t * 8 + j])
                }
                let want = w[i * 8 + j] + 0.5 * x * y
                #expect(ulpDistance(got[i * 8 + j], want, .f16) <= 0.5 + 1e-9, "[\(i), \(j)]")
            }
        }
    }

    @Test("every LyCORIS fixture: the dense rows and the exact factors give the same values up to one unit", arguments: ["loha", "loha-tucker", "lokr", "lokr-full", "lokr-decomposed-w1", "lokr-tucker", "full"])
    func sameEitherWay(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (rows, _) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-" + name), 1)], out: dir.file("a.safetensors"), denseRows: .always)
        let (factors, _) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-" + name), 1)], out: dir.file("b.safetensors"), denseRows: .never)
        try expectMatches(rows, reference: name, in: "lycoris")
        for t in rows.tensorNames {
            let x = try rows.files[0].doubles(t), y = try factors.files[0].doubles(t)
            #expect(zip(x, y).allSatisfy { ulpDistance($0, $1, .f16) <= 1 }, "\(t)")
        }
    }
}
