import Foundation
import Testing
@testable import AdapterKit

/// `extract` on Fixtures/models/extract-{base,tuned}: every projection of the tuned model is the
/// base's plus an exact rank-8 update plus N(0, 1e-5) noise; numpy's full SVD of each difference
/// (Fixtures/expected/extract/svd.json) is the reference.
@Suite("extract: low-rank adapters from a base and a fine-tuned model")
struct ExtractTests {
    let base = modelPath("extract-base"), tuned = modelPath("extract-tuned")

    struct Reference {
        let singularValues: [Double]
        let normSquared: Double
        let ranks: [String: Int]

        func energy(_ k: Int) -> Double { singularValues.prefix(k).reduce(0) { $0 + $1 * $1 } / normSquared }
    }

    func reference() throws -> [String: Reference] {
        let json = try JSONParser.parse(readBytes(fixture("expected/extract/svd.json")))
        var out: [String: Reference] = [:]
        for (name, v) in json.objectValue!.members {
            out[name] = Reference(singularValues: v["singular_values"]!.arrayValue!.map { $0.double! }, normSquared: v["norm_squared"]!.double!,
                                  ranks: ["0.999": Int(v["rank_for_0.999"]!.double!), "0.9999999": Int(v["rank_for_0.9999999"]!.double!)])
        }
        return out
    }

    /// D = tuned − base of one module, Float64.
    func difference(_ module: String) throws -> [Double] {
        let b = try Checkpoint(path: base), t = try Checkpoint(path: tuned)
        let name = module + ".weight"
        let x = try b.files[b.tensor(name)!.file].doubles(name), y = try t.files[t.tensor(name)!.file].doubles(name)
        return zip(y, x).map { $0 - $1 }
    }

    /// The update an adapter module applies, scale·B·M·A, Float64.
    func update(_ m: LoRAModule) throws -> [Double] {
        let a = try m.a.doubles(), b = try m.b.doubles(), r = m.rank, out = m.outFeatures, n = m.inFeatures
        let ma = try m.mixer.map { matmul(try $0.doubles(), a, rows: r, inner: r, cols: n) } ?? a
        return matmul(b, ma, rows: out, inner: r, cols: n).map { $0 * m.scale }
    }

    func options(_ target: ExtractTarget, _ edit: (inout ExtractOptions) -> Void = { _ in }) -> ExtractOptions {
        var o = ExtractOptions()
        o.target = target
        o.sync = false
        edit(&o)
        return o
    }

    @Test("rank 8 reproduces each update within the noise: energies and errors are numpy's, B·A is the best rank-8 approximation")
    func rank8() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let refs = try reference()
        let s = try Extraction.extract(base: base, tuned: tuned, output: dir.file("out"), options: options(.rank(8)))
        #expect(s.modules.count == 14 && s.modules.count == refs.count)
        let adapter = try Adapter(path: dir.file("out"))
        #expect(adapter.modules.count == 14 && adapter.format == .peft)
        for m in s.modules {
            let ref = try #require(refs[m.name])
            #expect(m.rank == 8)
            #expect(abs(m.energyKept - ref.energy(8)) <= 1e-9, "\(m.name)")
            #expect(abs(m.relativeError - (1 - ref.energy(8)).squareRoot()) <= 1e-6, "\(m.name)")
            // The adapter's update against D: the error of the best rank-8 approximation, which is the noise.
            let am = try #require(adapter.modules.first { $0.baseName == m.name })
            let d = try difference(m.name), u = try update(am)
            let err = zip(d, u).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }.squareRoot() / ref.normSquared.squareRoot()
            let best = ref.singularValues.dropFirst(8).reduce(0) { $0 + $1 * $1 }.squareRoot() / ref.normSquared.squareRoot()
            #expect(abs(err - best) <= 1e-6 && err < 2e-3, "\(m.name): \(err) vs the best \(best)")
        }
        #expect(s.leftOut.map(\.tensor).sorted() == ["lm_head.weight", "model.layers.1.post_attention_layernorm.weight"])
        #expect(s.notes.contains { $0.contains("leaves out 2 tensors that differ") })
    }

    @Test("--keep-energy picks numpy's smallest ranks, written with a rank_pattern and alpha_pattern that keep every scale 1")
    func keepEnergy() throws {
        let refs = try reference()
        for f in ["0.999", "0.9999999"] {
            let dir = TempDir()
            defer { dir.remove() }
            let s = try Extraction.extract(base: base, tuned: tuned, output: dir.file("out"), options: options(.energy(Double(f)!, maxRank: 64)))
            for m in s.modules { #expect(m.rank == refs[m.name]!.ranks[f], "\(m.name) at \(f)") }
            let adapter = try Adapter(path: dir.file("out"))
            for m in adapter.modules {
                #expect(m.rank == refs[m.baseName]!.ranks[f] && abs(m.scale - 1) < 1e-12, "\(m.baseName): r \(m.rank), scale \(m.scale)")
            }
        }
        // A cap below what the energy needs: the cap, and a note naming the modules.
        let dir = TempDir()
        defer { dir.remove() }
        let s = try Extraction.extract(base: base, tuned: tuned, output: dir.file("out"), options: options(.energy(0.9999999, maxRank: 12)))
        #expect(s.modules.allSatisfy { $0.rank == 12 })
        #expect(s.notes.contains { $0.hasPrefix("14 modules reached --max-rank 12") })
    }

    @Test("--exact (full SVD) and the randomized SVD agree; the same seed writes the same bytes")
    func exactAgrees() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try Extraction.extract(base: base, tuned: tuned, output: dir.file("r"), options: options(.rank(10)))
        let e = try Extraction.extract(base: base, tuned: tuned, output: dir.file("e"), options: options(.rank(10)) { $0.exact = true })
        for (x, y) in zip(r.modules, e.modules) {
            // Ranks 9 and 10 are noise (a flat spectrum, the randomized method's hardest case): still within 1e-6.
            #expect(x.name == y.name && abs(x.energyKept - y.energyKept) <= 1e-6, "\(x.name)")
        }
        _ = try Extraction.extract(base: base, tuned: tuned, output: dir.file("r2"), options: options(.rank(10)))
        #expect(readBytes(dir.file("r/adapter_model.safetensors")) == readBytes(dir.file("r2/adapter_model.safetensors")))
    }

    @Test("--form moslora: orthonormal A and B, the singular values on the mixer's diagonal, in the lora_AB layout")
    func moslora() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let refs = try reference()
        _ = try Extraction.extract(base: base, tuned: tuned, output: dir.file("out"), options: options(.rank(8)) { $0.form = .moslora })
        let adapter = try Adapter(path: dir.file("out"))
        #expect(adapter.hasMixer && adapter.modules.allSatisfy { $0.mixer?.name.hasSuffix(".lora_AB.weight") == true })
        for m in adapter.modules {
            let mixer = try m.mixer!.doubles(), a = try m.a.doubles(), sv = refs[m.baseName]!.singularValues
            for i in 0..<8 {
                for j in 0..<8 { #expect(i == j ? abs(mixer[i * 8 + j] - sv[i]) <= 1e-6 * sv[i] : mixer[i * 8 + j] == 0) }
                for j in 0..<8 {
                    let dot = (0..<m.inFeatures).reduce(0.0) { $0 + a[i * m.inFeatures + $1] * a[j * m.inFeatures + $1] }
                    #expect(abs(dot - (i == j ? 1 : 0)) <= 1e-6)
                }
            }
        }
    }

    @Test("--save-full keeps the differing head and norm whole (modules_to_save, TUNED's bytes); --include selects modules")
    func saveFullAndSelection() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let s = try Extraction.extract(base: base, tuned: tuned, output: dir.file("out"),
                                       options: options(.rank(4)) { $0.saveFull = ["lm_head", "post_attention_layernorm"] })
        // Every module with those leaves, the unchanged layer-0 norm too (PEFT wraps them all).
        #expect(s.leftOut.isEmpty && s.savedFull.sorted() == ["lm_head.weight", "model.layers.0.post_attention_layernorm.weight",
                                                                "model.layers.1.post_attention_layernorm.weight"])
        let config = try JSONParser.parse(readBytes(dir.file("out/adapter_config.json")))
        #expect(config["modules_to_save"]?.arrayValue?.compactMap(\.stringValue) == ["lm_head", "post_attention_layernorm"])
        let out = try SafetensorsFile(path: dir.file("out/adapter_model.safetensors"))
        let t = try SafetensorsFile(path: tuned + "/model.safetensors")
        for name in s.savedFull {
            #expect(try out.withBytes(of: "base_model.model." + name) { Array($0) } == t.withBytes(of: name) { Array($0) }, "\(name)")
        }
        let adapter = try Adapter(path: dir.file("out"))
        #expect(adapter.replacements.map(\.baseName).sorted() == s.savedFull.sorted())

        let attention = try Extraction.extract(base: base, tuned: tuned, output: dir.file("attn"),
                                               options: options(.rank(4)) { $0.include = #"self_attn\.(q|v)_proj"#; $0.exclude = "layers\\.1\\." })
        #expect(attention.modules.map(\.name) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
        #expect(attention.leftOut.filter { $0.reason.contains("--include/--exclude") }.count == 12)
    }

    @Test("a 3×3 convolution is factored flattened, as PEFT's conv LoRA: A [r, in, 3, 3], B [out, r, 1, 1]; F16 factors by default")
    func convolution() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let unet = try SafetensorsFile(path: modelPath("tiny-unet"))
        let name = "down_blocks.0.resnets.0.conv1.weight"
        let w = try unet.doubles(name)
        // An exact rank-2 change of the [8, 36] view, small enough to stay visible in F16.
        var tunedValues = w
        for i in 0..<8 { for j in 0..<36 { tunedValues[i * 36 + j] += 0.01 * (Double(i % 3) - 1) * Double(j % 5) + 0.02 * Double(i % 2) * (Double(j % 7) - 3) } }
        func f16(_ v: [Double]) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: v.count * 2)
            v.withUnsafeBufferPointer { src in out.withUnsafeMutableBytes { ElementConversion.fromDouble(.f16, src.baseAddress!, $0.baseAddress!, count: v.count) } }
            return out
        }
        try writeSafetensors(dir.file("base.safetensors"), [(name, .f16, [8, 4, 3, 3], f16(w))])
        try writeSafetensors(dir.file("tuned.safetensors"), [(name, .f16, [8, 4, 3, 3], f16(tunedValues))])
        let s = try Extraction.extract(base: dir.file("base.safetensors"), tuned: dir.file("tuned.safetensors"), output: dir.file("out"), options: options(.rank(2)))
        #expect(s.modules.count == 1 && s.modules[0].rows == 8 && s.modules[0].cols == 36 && s.modules[0].energyKept > 0.999, "rank 2 and the F16 rounding of TUNED")
        let out = try SafetensorsFile(path: dir.file("out/adapter_model.safetensors"))
        let a = try #require(out.entry("base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight"))
        let b = try #require(out.entry("base_model.model.down_blocks.0.resnets.0.conv1.lora_B.weight"))
        #expect(a.shape == [2, 4, 3, 3] && b.shape == [8, 2, 1, 1] && a.dtype == .f16 && b.dtype == .f16)
        let m = try #require(try Adapter(path: dir.file("out")).modules.first)
        #expect(m.kind == .convKxK)
        let d = try zip(SafetensorsFile(path: dir.file("tuned.safetensors")).doubles(name), SafetensorsFile(path: dir.file("base.safetensors")).doubles(name)).map { $0 - $1 }
        let u = try update(m), scale = d.map(abs).max()!
        #expect(zip(u, d).allSatisfy { abs($0 - $1) <= 2e-3 * scale }, "the F16 factors hold the exact rank-2 difference")
    }

    @Test("refused with one line, nothing written: different models, nothing to extract, a bad pattern, OUT that exists")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let other = #expect(throws: ProblemList.self) {
            try Extraction.extract(base: base, tuned: modelPath("tiny-llama"), output: dir.file("a"), options: options(.rank(4)))
        }
        #expect(other?.problems.contains { $0.contains("model.embed_tokens.weight is [32, 64] in BASE but [32, 16] in TUNED") } == true)
        let names = #expect(throws: ProblemList.self) {
            try Extraction.extract(base: base, tuned: fixture("models/tiny-gpt2.safetensors"), output: dir.file("a"), options: options(.rank(4)))
        }
        #expect(names?.problems.contains { $0.contains("21 tensors of BASE are not in TUNED (model.embed_tokens.weight, ") } == true)
        let same = #expect(throws: InputError.self) { try Extraction.extract(base: base, tuned: base, output: dir.file("b"), options: options(.rank(4))) }
        #expect(same?.problem.contains("TUNED is the same as BASE") == true)
        #expect(throws: InputError.self) { try Extraction.extract(base: base, tuned: tuned, output: dir.file("c"), options: options(.rank(4)) { $0.include = "(" }) }
        // A NaN in a tuned weight is refused by name, never read as "unchanged".
        let w: [Float] = [1, 2, 3, 4], bad: [Float] = [1, .nan, 3, 4]
        try writeSafetensors(dir.file("b.safetensors"), [("m.weight", .f32, [2, 2], floatBytes(w))])
        try writeSafetensors(dir.file("t.safetensors"), [("m.weight", .f32, [2, 2], floatBytes(bad))])
        let nan = #expect(throws: InputError.self) {
            try Extraction.extract(base: dir.file("b.safetensors"), tuned: dir.file("t.safetensors"), output: dir.file("e"), options: options(.rank(1)))
        }
        #expect(nan?.problem.contains("m.weight: TUNED − BASE is not finite") == true)
        _ = dir.write("d/x.txt", text: "")
        #expect(throws: InputError.self) { try Extraction.extract(base: base, tuned: tuned, output: dir.file("d"), options: options(.rank(4))) }
        for name in ["a", "b", "c", "e"] { #expect(!FileManager.default.fileExists(atPath: dir.file(name))) }
    }
}

@Suite("randomized SVD")
struct LowRankTests {
    @Test("on a matrix of known singular values (orthogonal factors built by QR): the top values to 1e-12 relative")
    func knownSpectrum() {
        let m = 300, n = 200, k = 12
        var rng = SeededGenerator(seed: 9)
        func orthonormal(_ rows: Int, _ cols: Int) -> [Double] {
            var x = (0..<(rows * cols)).map { _ in rng.unit() - 0.5 }
            x = transpose(x, rows: rows, cols: cols)
            LowRank.orthonormalize(&x, length: rows, columns: cols)
            return transpose(x, rows: cols, cols: rows)
        }
        let u = orthonormal(m, n), v = orthonormal(n, n)
        let sigma = (0..<n).map { i in pow(0.7, Double(i)) }
        var us = u
        for i in 0..<m { for j in 0..<n { us[i * n + j] *= sigma[j] } }
        let d = matmul(us, transpose(v, rows: n, cols: n), rows: m, inner: n, cols: n)
        let svd = LowRank.randomized(d, rows: m, cols: n, rank: k, seed: 1, threads: 2)
        for i in 0..<k { #expect(abs(svd.s[i] - sigma[i]) <= 1e-12 * sigma[0] + 1e-9 * sigma[i], "σ\(i): \(svd.s[i]) vs \(sigma[i])") }
    }
}
