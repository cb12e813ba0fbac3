import Foundation
import Testing
@testable import AdapterKit

// MARK: - Independent Float64 references

/// Row-major product, written here so the checks do not lean on the library's own helpers.
private func product(_ x: [Double], _ y: [Double], _ rows: Int, _ inner: Int, _ cols: Int) -> [Double] {
    var out = [Double](repeating: 0, count: rows * cols)
    for i in 0..<rows { for k in 0..<inner { for j in 0..<cols { out[i * cols + j] += x[i * inner + k] * y[k * cols + j] } } }
    return out
}

private func flip(_ x: [Double], _ rows: Int, _ cols: Int) -> [Double] {
    var out = [Double](repeating: 0, count: x.count)
    for i in 0..<rows { for j in 0..<cols { out[j * rows + i] = x[i * cols + j] } }
    return out
}

private func norm(_ x: [Double]) -> Double { x.reduce(0) { $0 + $1 * $1 }.squareRoot() }

/// One module's update scale·B·M·A (out × in, PEFT orientation) from the stored tensors, and the
/// size of its factors for a rounding bound.
private struct Update {
    let rows: Int, cols: Int
    let delta: [Double]
    /// scale·‖B‖·‖M‖·‖A‖ (Frobenius; ‖M‖ = √r without a mixer): what one rounding of each factor can move Δ by, per unit roundoff.
    let factorSize: Double
    let dtype: DType
}

private func updates(_ adapter: Adapter, component: String? = nil) throws -> [String: Update] {
    var out: [String: Update] = [:]
    for m in adapter.modules where component == nil || m.component == component {
        let r = m.rank, n = m.inFeatures, o = m.outFeatures
        var a = try m.a.doubles(), b = try m.b.doubles()
        var mix = try m.mixer?.doubles()
        if m.orientation == .transposed {
            a = flip(a, n, r)
            b = flip(b, r, o)
            mix = mix.map { flip($0, r, r) }
        }
        let ma = mix.map { product($0, a, r, r, n) } ?? a
        let delta = product(b, ma, o, r, n).map { $0 * m.scale }
        let size = abs(m.scale) * norm(b) * norm(a) * (mix.map(norm) ?? Double(r).squareRoot())
        // Keys comparable across layouts: component-free base name with dots as underscores (kohya's form).
        out[m.baseName.replacingOccurrences(of: ".", with: "_")] = Update(rows: o, cols: n, delta: delta, factorSize: size, dtype: m.a.entry.dtype)
    }
    return out
}

private func unitRoundoff(_ d: DType) -> Double {
    switch d {
    case .bf16: 0x1p-8
    case .f16: 0x1p-11
    case .f32: 0x1p-24
    default: 0x1p-53
    }
}

/// Every module of `before` has the same update in `after`, up to rounding each output factor once.
private func expectSameUpdates(_ before: Adapter, _ after: Adapter, exact: Bool = false, component: String? = nil,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
    var u0 = try updates(before, component: component)
    let u1 = try updates(after)
    if before.format == .paddle && after.format != .paddle {
        // Written under transformers' top-level name: PaddleNLP's `llama.` becomes `model.`.
        u0 = Dictionary(uniqueKeysWithValues: u0.map { ($0.key.hasPrefix("llama_") ? "model_" + $0.key.dropFirst(6) : $0.key, $0.value) })
    }
    #expect(Set(u0.keys) == Set(u1.keys), "modules differ: \(Set(u0.keys).symmetricDifference(u1.keys))", sourceLocation: sourceLocation)
    for (name, x) in u0 {
        guard let y = u1[name] else { continue }
        #expect(x.rows == y.rows && x.cols == y.cols, "\(name): shape", sourceLocation: sourceLocation)
        let diff = norm(zip(x.delta, y.delta).map { $0 - $1 })
        if exact {
            #expect(x.delta == y.delta, "\(name): differs by \(diff)", sourceLocation: sourceLocation)
        } else {
            let bound = 3 * unitRoundoff(y.dtype) * y.factorSize + 1e-12 * norm(x.delta)
            #expect(diff <= bound, "\(name): ‖ΔΔ‖ \(diff) > \(bound)", sourceLocation: sourceLocation)
        }
    }
}

private func load(_ path: String) throws -> Adapter { try Adapter(path: path) }

private func configOf(_ folder: String) throws -> JSONObject {
    try #require(readJSONFile(folder + "/adapter_config.json").objectValue)
}

private func options(base: String? = nil, component: String? = nil, dtype: DType? = nil, force: Bool = false) -> ConvertOptions {
    var o = ConvertOptions()
    o.base = base
    o.component = component
    o.dtype = dtype
    o.force = force
    o.sync = false
    return o
}

private func tensorBytes(_ path: String, _ name: String) throws -> [UInt8] {
    let f = try SafetensorsFile(path: path)
    return try f.withBytes(of: name) { Array($0) }
}

/// A PEFT folder with two modules of different rank and scale (rank_pattern / alpha_pattern).
private func mixedRankAdapter(_ dir: TempDir) throws -> String {
    let folder = dir.file("mixed")
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    var g = SeededGenerator(seed: 7)
    func values(_ n: Int) -> [Float] { (0..<n).map { _ in Float(g.gaussian() * 0.1) } }
    try writeSafetensors(folder + "/adapter_model.safetensors", [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", .f32, [4, 16], floatBytes(values(64))),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", .f32, [16, 4], floatBytes(values(64))),
        ("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", .f32, [2, 16], floatBytes(values(32))),
        ("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", .f32, [8, 2], floatBytes(values(16))),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", .f32, [4, 16], floatBytes(values(64))),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", .f32, [16, 4], floatBytes(values(64))),
    ])
    _ = dir.write("mixed/adapter_config.json", text: """
    {"alpha_pattern": {"layers.1.self_attn.q_proj": 2}, "lora_alpha": 8, "peft_type": "LORA", "r": 4, "rank_pattern": {"v_proj": 2}, "target_modules": ["q_proj", "v_proj"]}
    """)
    return folder
}

// MARK: - LoRA ↔ MoSLoRA

@Suite("convert: LoRA and MoSLoRA, exactly")
struct ConvertMoSLoRATests {
    @Test("identity mixer: A and B are written bit for bit, M = I, original-code layout and config")
    func identity() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("out")
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: out, options: options())
        let before = try load(adapterPath("peft-lora")), after = try load(out)
        try expectSameUpdates(before, after, exact: true)
        for m in before.modules {
            #expect(try tensorBytes(out + "/adapter_model.safetensors", m.name + ".lora_A.weight") == tensorBytes(before.store.path, m.a.name))
            #expect(try tensorBytes(out + "/adapter_model.safetensors", m.name + ".lora_B.weight") == tensorBytes(before.store.path, m.b.name))
            let mixer = try tensorBytes(out + "/adapter_model.safetensors", m.name + ".lora_AB.weight")
            #expect(mixer == floatBytes((0..<16).map { $0 / 4 == $0 % 4 ? 1 : 0 }))
        }
        let c = try configOf(out)
        #expect(c["lora_use_mixer"] == .bool(true))
        #expect(c["peft_type"] == .string("LORA"))
        #expect(c["use_moslora"] == nil)
        #expect(c["task_type"] == .string("CAUSAL_LM"))  // unrelated fields kept
        #expect(c["target_modules"] == before.config?["target_modules"])
        #expect(after.modules.allSatisfy { $0.hasMixer })
    }

    @Test("orthogonal mixer: M is orthogonal, A' = QᵀA keeps every update, the same seed gives the same bytes")
    func orthogonal() throws {
        let dir = TempDir()
        defer { dir.remove() }
        for (name, seed) in [("one", UInt64(1)), ("again", 1), ("other", 2)] {
            _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file(name), mixer: .orthogonal, seed: seed, options: options())
        }
        let after = try load(dir.file("one"))
        try expectSameUpdates(try load(adapterPath("peft-lora")), after)
        for m in after.modules {
            let q = try #require(try m.mixer?.doubles())
            let qtq = product(flip(q, 4, 4), q, 4, 4, 4)
            for i in 0..<4 { for j in 0..<4 { #expect(abs(qtq[i * 4 + j] - (i == j ? 1 : 0)) < 1e-6) } }
        }
        #expect(readBytes(dir.file("one/adapter_model.safetensors")) == readBytes(dir.file("again/adapter_model.safetensors")))
        #expect(readBytes(dir.file("one/adapter_model.safetensors")) != readBytes(dir.file("other/adapter_model.safetensors")))
    }

    @Test("the seeded generator is fixed: the same numbers on every machine")
    func generatorIsFixed() {
        var g = SeededGenerator(seed: 0)
        // SplitMix64's published first outputs for seed 0.
        #expect(g.next() == 0xE220_A839_7B1D_CDAF)
        #expect(g.next() == 0x6E78_9E6A_A1B9_65F4)
    }

    @Test("kaiming mixer: uniform within ±1/√r, A' = M⁻¹A keeps every update")
    func kaiming() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let summary = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("out"), mixer: .kaiming, seed: 3, options: options())
        let after = try load(dir.file("out"))
        try expectSameUpdates(try load(adapterPath("peft-lora")), after)
        for m in after.modules {
            #expect(try m.mixer!.doubles().allSatisfy { abs($0) <= 0.5 })
        }
        #expect((summary.worstConditionRatio ?? 0) >= AdapterConversion.defaultMinimumConditionRatio)
    }

    @Test("kaiming refuses a badly conditioned mixer (threshold injected) and writes nothing")
    func kaimingRefusal() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let error = #expect(throws: InputError.self) {
            try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("out"), mixer: .kaiming, seed: 3,
                                                minimumConditionRatio: 0.999, options: options())
        }
        #expect(error?.problem.contains("badly conditioned") == true && error?.problem.contains("--mixer orthogonal") == true)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).isEmpty)
    }

    @Test("lora_mixer key style: the PEFT pull-request layout (peft_type MOSLORA, use_moslora)")
    func pullRequestLayout() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("out"), keyStyle: .loraMixer, options: options())
        let c = try configOf(dir.file("out"))
        #expect(c["peft_type"] == .string("MOSLORA"))
        #expect(c["use_moslora"] == .bool(true))
        #expect(c["lora_use_mixer"] == nil)
        let after = try load(dir.file("out"))
        #expect(after.modules.allSatisfy { $0.mixer?.name.hasSuffix(".lora_mixer.weight") == true })
        try expectSameUpdates(try load(adapterPath("peft-lora")), after, exact: true)
    }

    @Test("modules that already have a mixer keep it; the others get one")
    func partialKeep() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let s = try AdapterConversion.loraToMoSLoRA(input: adapterPath("moslora-original-partial"), output: dir.file("out"), mixer: .orthogonal, options: options())
        #expect(s.notes.contains { $0.contains("already have a mixer") })
        let before = try load(adapterPath("moslora-original-partial")), after = try load(dir.file("out"))
        #expect(after.modules.allSatisfy { $0.hasMixer })
        for m in before.modules where m.hasMixer {
            #expect(try tensorBytes(dir.file("out/adapter_model.safetensors"), m.mixer!.name) == tensorBytes(before.store.path, m.mixer!.name))
        }
        try expectSameUpdates(before, after)
    }

    @Test("moslora-to-lora folds M into A or B; the config loses every mixer field", arguments: [FoldSide.a, .b])
    func fold(_ side: FoldSide) throws {
        let dir = TempDir()
        defer { dir.remove() }
        for name in ["moslora-original", "moslora-peft-pr", "moslora-original-partial"] {
            _ = try AdapterConversion.mosLoRAToLoRA(input: adapterPath(name), output: dir.file(name), foldInto: side, options: options())
            let after = try load(dir.file(name))
            #expect(!after.hasMixer)
            try expectSameUpdates(try load(adapterPath(name)), after)
            let c = try configOf(dir.file(name))
            #expect(c["peft_type"] == .string("LORA"))
            for key in ["lora_use_mixer", "use_moslora", "lora_use_mixer_pattern", "mixer_init"] { #expect(c[key] == nil) }
            #expect(after.warnings.isEmpty, "\(after.warnings)")
        }
        // The BF16 fixture stays BF16.
        #expect(try load(dir.file("moslora-peft-pr")).modules.allSatisfy { $0.a.entry.dtype == .bf16 && $0.b.entry.dtype == .bf16 })
    }

    @Test("round trip: lora → moslora (orthogonal) → lora gives the original updates")
    func roundTrip() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("mos"), mixer: .orthogonal, seed: 9, options: options())
        _ = try AdapterConversion.mosLoRAToLoRA(input: dir.file("mos"), output: dir.file("back"), options: options())
        try expectSameUpdates(try load(adapterPath("peft-lora")), try load(dir.file("back")))
        #expect(try configOf(dir.file("back")) == configOf(adapterPath("peft-lora")))
    }

    @Test("--dtype BF16 rounds each factor once, nearest even")
    func dtype() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("out"), options: options(dtype: .bf16))
        let before = try load(adapterPath("peft-lora")), after = try load(dir.file("out"))
        for (m, n) in zip(before.modules, after.modules) {
            #expect(n.a.entry.dtype == .bf16 && n.b.entry.dtype == .bf16 && n.mixer?.entry.dtype == .bf16)
            let want = try m.a.floats().map { ElementConversion.floatToBF16($0) }
            let got = try tensorBytes(dir.file("out/adapter_model.safetensors"), n.a.name).withUnsafeBytes { Array($0.bindMemory(to: UInt16.self)) }
            #expect(got == want)
        }
        try expectSameUpdates(before, after)
    }
}

// MARK: - Layouts

@Suite("convert: layouts")
struct ConvertLayoutTests {
    static let peftInputs: [(String, String?, String?)] = [
        ("peft-lora", nil, nil), ("peft-lora-all", nil, nil), ("moslora-original", nil, nil), ("moslora-original-partial", nil, nil),
        ("moslora-peft-pr", nil, nil), ("peft-gpt2", nil, nil), ("peft-dora", nil, nil), ("mlx", nil, nil), ("paddle", nil, nil),
        ("mytransformers", nil, nil), ("diffusers-lora", "unet", nil), ("diffusers-moslora", "unet", nil), ("diffusers-peft", "text_encoder", nil),
        ("kohya-unet", "unet", "tiny-unet"), ("kohya-moslora", "text_encoder", "tiny-text-encoder"),
    ]

    @Test("to-peft keeps every module's update, from every layout; mixers folded unless --keep-mixer", arguments: peftInputs)
    func toPEFT(_ name: String, _ component: String?, _ base: String?) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let before = try load(adapterPath(name))
        let s = try AdapterConversion.convertLayout(input: adapterPath(name), output: dir.file("out"), to: .peft,
                                                    options: options(base: base.map(modelPath), component: component))
        let after = try load(dir.file("out"))
        #expect(after.format == .peft)
        let selected = before.modules.filter { component == nil || $0.component == component }
        let mixers = selected.filter(\.hasMixer).count
        #expect(after.modules.count == selected.count)
        // What stock PEFT loads: no mixer tensors and no mixer switch in the config.
        #expect(!after.hasMixer)
        #expect(try configOf(dir.file("out"))["lora_use_mixer"] == nil)
        #expect(try configOf(dir.file("out"))["peft_type"] == .string("LORA"))
        #expect(s.mixers == 0 && s.line.hasSuffix("as peft (LoRA)"))
        #expect(s.notes.contains { $0.contains("loaded as written by stock PEFT") })
        #expect(s.notes.contains { $0.contains("folded the mixer into A") } == (mixers > 0))
        try expectSameUpdates(before, after, component: component)
        if mixers > 0 {
            let s = try AdapterConversion.convertLayout(input: adapterPath(name), output: dir.file("kept"), to: .peft, keepMixer: true,
                                                        options: options(base: base.map(modelPath), component: component))
            let kept = try load(dir.file("kept"))
            #expect(kept.modules.filter(\.hasMixer).count == mixers)
            #expect(s.mixers == mixers && s.line.contains("MoSLoRA"))
            #expect(s.notes.contains { $0.contains("stock PEFT") && ($0.contains("cannot load") || $0.contains("refuses")) }, "\(s.notes)")
            try expectSameUpdates(before, kept, component: component)
        }
        #expect(after.replacements.count == before.replacements.count)
        #expect(after.modules.allSatisfy { $0.name.hasPrefix("base_model.model.") })
    }

    @Test("per-module ranks and alphas become rank_pattern / alpha_pattern keyed by full module names")
    func patterns() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let input = try mixedRankAdapter(dir)
        _ = try AdapterConversion.convertLayout(input: input, output: dir.file("out"), to: .peft, options: options())
        let c = try configOf(dir.file("out"))
        #expect(c["r"] == .number("4"))
        #expect(c["lora_alpha"] == .number("8"))
        #expect(c["rank_pattern"] == .object(JSONObject([("model.layers.0.self_attn.v_proj", .number("2"))])))
        #expect(c["alpha_pattern"] == .object(JSONObject([("model.layers.1.self_attn.q_proj", .number("2"))])))
        try expectSameUpdates(try load(input), try load(dir.file("out")), exact: true)
        // rslora: alpha = scale·√r.
        _ = try AdapterConversion.convertLayout(input: adapterPath("peft-lora-all"), output: dir.file("all"), to: .peft, options: options())
        try expectSameUpdates(try load(adapterPath("peft-lora-all")), try load(dir.file("all")))
        #expect(try configOf(dir.file("all"))["use_rslora"] == .bool(true))
    }

    @Test("to-mlx: transposed factors, mixers folded, one rank (zero padding) and one scale (ratio folded into B)")
    func toMLX() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let input = try mixedRankAdapter(dir)
        let s = try AdapterConversion.convertLayout(input: input, output: dir.file("mlx"), to: .mlx, options: options())
        #expect(s.notes.contains { $0.contains("padded") } && s.notes.contains { $0.contains("one scale") })
        let after = try load(dir.file("mlx"))
        #expect(after.format == .mlx)
        try expectSameUpdates(try load(input), after)
        let c = try #require(readJSONFile(dir.file("mlx/adapter_config.json")).objectValue)
        #expect(c["lora_parameters"]?["rank"] == .number("4"))
        #expect(c["lora_parameters"]?["scale"] == .number("2.0"))
        #expect(c["fine_tune_type"] == .string("lora"))
        #expect(c["num_layers"] == .number("-1"))  // adapted from layer 0: mlx-lm wraps every layer
        let f = try SafetensorsFile(path: dir.file("mlx/adapters.safetensors"))
        #expect(f.info("model.layers.0.self_attn.v_proj.lora_a")?.shape == [16, 4])
        #expect(f.info("model.layers.0.self_attn.v_proj.lora_b")?.shape == [4, 8])
        #expect(f.metadataPairs.first?.value == "mlx")

        _ = try AdapterConversion.convertLayout(input: adapterPath("moslora-original"), output: dir.file("mos"), to: .mlx, options: options())
        try expectSameUpdates(try load(adapterPath("moslora-original")), try load(dir.file("mos")))
        _ = try AdapterConversion.convertLayout(input: adapterPath("mlx"), output: dir.file("same"), to: .mlx, options: options())
        try expectSameUpdates(try load(adapterPath("mlx")), try load(dir.file("same")), exact: true)
        #expect(try readJSONFile(dir.file("same/adapter_config.json")) == readJSONFile(adapterPath("mlx") + "/adapter_config.json"))
    }

    @Test("to-mlx num_layers: mlx-lm wraps the last num_layers layers, so an adapter that starts at layer L needs layers − L")
    func mlxNumLayers() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // peft-lora without its layer-0 modules.
        let source = try SafetensorsFile(path: adapterPath("peft-lora") + "/adapter_model.safetensors")
        try FileManager.default.createDirectory(atPath: dir.file("l1"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("l1/adapter_model.safetensors"), try source.entries.filter { $0.name.contains("layers.1.") }.map { t in
            (t.name, t.dtype, t.shape, try source.withBytes(of: t.name) { Array($0) })
        })
        try FileManager.default.copyItem(atPath: adapterPath("peft-lora") + "/adapter_config.json", toPath: dir.file("l1/adapter_config.json"))
        let s = try AdapterConversion.convertLayout(input: dir.file("l1"), output: dir.file("m"), to: .mlx, options: options())
        #expect(try readJSONFile(dir.file("m/adapter_config.json"))["num_layers"] == .number("-1"))
        #expect(s.notes.contains { $0.contains("starts at layer 1") })
        _ = try AdapterConversion.convertLayout(input: dir.file("l1"), output: dir.file("b"), to: .mlx, options: options(base: modelPath("tiny-llama")))
        #expect(try readJSONFile(dir.file("b/adapter_config.json"))["num_layers"] == .number("1"))  // 2 layers − 1
    }

    @Test("to-kohya: lora_unet_/lora_te_ names, alpha = scale·r per module, mixers folded (or kept as lora_mixer with ss_adapter_algorithm)",
          arguments: ["peft-lora", "moslora-original", "kohya-unet", "kohya-moslora", "diffusers-lora", "diffusers-moslora", "mlx", "paddle", "mytransformers"])
    func toKohya(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("out.safetensors")
        _ = try AdapterConversion.convertLayout(input: adapterPath(name), output: out, to: .kohya, options: options())
        let before = try load(adapterPath(name)), after = try load(out)
        #expect(after.format == .kohya)
        #expect(!after.hasMixer)
        try expectSameUpdates(before, after)
        if before.hasMixer {
            let kept = dir.file("kept.safetensors")
            _ = try AdapterConversion.convertLayout(input: adapterPath(name), output: kept, to: .kohya, keepMixer: true, options: options())
            let k = try load(kept)
            #expect(k.hasMixer)
            try expectSameUpdates(before, k)
            let meta = Dictionary(uniqueKeysWithValues: try SafetensorsFile(path: kept).metadataPairs.map { ($0.key, $0.value) })
            #expect(meta["ss_adapter_algorithm"] == "moslora")
        }
        let file = try SafetensorsFile(path: out)
        let meta = Dictionary(uniqueKeysWithValues: file.metadataPairs.map { ($0.key, $0.value) })
        #expect(meta["ss_adapter_algorithm"] == nil)
        #expect(meta["sshs_model_hash"] == nil)
        for m in after.modules {
            let alpha = try #require(file.info(m.name + ".alpha"))
            #expect(alpha.shape == [] && alpha.dtype == .f32)
            #expect(m.name.hasPrefix(m.component == "text_encoder" ? "lora_te_" : "lora_unet_"))
        }
        if name == "kohya-unet" { #expect(meta["ss_network_module"] == "networks.lora" && meta["ss_sd_model_name"] == "tiny-unet") }
    }

    @Test("round trips PEFT → kohya → PEFT and PEFT → mlx → PEFT give back the same factors and config values")
    func roundTrips() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let peft = adapterPath("peft-lora")
        _ = try AdapterConversion.convertLayout(input: peft, output: dir.file("k.safetensors"), to: .kohya, options: options())
        _ = try AdapterConversion.convertLayout(input: dir.file("k.safetensors"), output: dir.file("kp"), to: .peft,
                                                options: options(base: modelPath("tiny-llama-f32")))
        _ = try AdapterConversion.convertLayout(input: peft, output: dir.file("m"), to: .mlx, options: options())
        _ = try AdapterConversion.convertLayout(input: dir.file("m"), output: dir.file("mp"), to: .peft, options: options())
        let original = try load(peft)
        for back in ["kp", "mp"] {
            let b = try load(dir.file(back))
            try expectSameUpdates(original, b, exact: true)
            #expect(b.modules.map(\.name) == original.modules.map(\.name))
            let c = try configOf(dir.file(back))
            #expect(c["r"] == .number("4") && c["lora_alpha"] == .number("8"))
            for m in original.modules {
                #expect(try tensorBytes(dir.file(back + "/adapter_model.safetensors"), m.a.name) == tensorBytes(original.store.path, m.a.name))
            }
        }
    }

    @Test("refusals: a layout that cannot hold a module kind, kohya names without a base, several models into one")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        func refused(_ name: String, _ layout: TargetLayout, _ o: ConvertOptions, _ text: String) {
            do {
                _ = try AdapterConversion.convertLayout(input: adapterPath(name), output: dir.file("out"), to: layout, options: o)
                Issue.record("\(name) → \(layout): not refused")
            } catch {
                #expect("\(error)".contains(text), "\(name) → \(layout): \(error)")
            }
            #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
        }
        refused("kohya-unet", .mlx, options(base: modelPath("tiny-unet"), component: "unet"), "is a convolution")
        refused("peft-gpt2", .mlx, options(), "fan_in_fan_out")
        refused("peft-gpt2", .kohya, options(), "fan_in_fan_out")
        refused("peft-lora-all", .kohya, options(), "cannot hold full tensors")
        refused("peft-dora", .kohya, options(), "DoRA")
        refused("kohya-unet", .peft, options(component: "unet"), "--base")
        refused("kohya-unet", .peft, options(), "--component")
        refused("peft-unknown", .peft, options(), "--drop-unknown")
        var drop = options()
        drop.dropUnknown = true
        _ = try AdapterConversion.convertLayout(input: adapterPath("peft-unknown"), output: dir.file("ok"), to: .peft, options: drop)
        #expect(try load(dir.file("ok")).unknownKeys.isEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["ok"])
    }

    @Test("a factor holding NaN is refused, not converted")
    func nonFinite() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try writeSafetensors(dir.file("nan.safetensors"), [
            ("base_model.model.x.lora_A.weight", .f32, [1, 2], floatBytes([1, .nan])),
            ("base_model.model.x.lora_B.weight", .f32, [2, 1], floatBytes([1, 2])),
        ])
        let error = #expect(throws: InputError.self) {
            try AdapterConversion.resize(input: dir.file("nan.safetensors"), output: dir.file("out"), target: .rank(1), options: options())
        }
        #expect(error?.problem.contains("NaN") == true)
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
    }

    @Test("OUT rules: an existing OUT needs force; the input is never written over")
    func outputRules() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let existing = dir.write("exists", [1, 2, 3])
        #expect(throws: InputError.self) {
            try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: existing, to: .peft, options: options())
        }
        #expect(readBytes(existing) == [1, 2, 3])
        // force replaces only what this tool could have written: not a file where a folder goes.
        #expect(throws: InputError.self) {
            try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: existing, to: .peft, options: options(force: true))
        }
        #expect(readBytes(existing) == [1, 2, 3])
        try FileManager.default.removeItem(atPath: existing)
        _ = try AdapterConversion.convertLayout(input: adapterPath("mlx"), output: existing, to: .mlx, options: options())
        _ = try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: existing, to: .peft, options: options(force: true))
        #expect(try load(existing).modules.count == 4)
        #expect(throws: InputError.self) {
            try AdapterConversion.convertLayout(input: existing, output: existing, to: .peft, options: options(force: true))
        }
        #expect(throws: InputError.self) {
            try AdapterConversion.convertLayout(input: existing, output: existing + "/inside", to: .peft, options: options(force: true))
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["exists"])
    }

    @Test("written files load with Python's safetensors.safe_open", .enabled(if: pythonSafetensorsAvailable, pythonReferenceMissing))
    func pythonLoads() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("peft-lora"), output: dir.file("p"), mixer: .orthogonal, options: options())
        _ = try AdapterConversion.convertLayout(input: adapterPath("kohya-moslora"), output: dir.file("k.safetensors"), to: .kohya, keepMixer: true, options: options())
        _ = try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: dir.file("m"), to: .mlx, options: options())
        let script = """
        import sys
        from safetensors import safe_open
        for p in sys.argv[1:]:
            with safe_open(p, framework="numpy") as f:
                for k in f.keys():
                    f.get_tensor(k)
                print(p.rsplit("/", 1)[-1], len(list(f.keys())))
        """
        let r = try runProcess("/usr/bin/env", ["python3", "-c", script, dir.file("p/adapter_model.safetensors"), dir.file("k.safetensors"),
                                                dir.file("m/adapters.safetensors")])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "adapter_model.safetensors 12\nk.safetensors 32\nadapters.safetensors 8\n")
    }
}

// MARK: - Resize

@Suite("resize: exact SVD from the factors")
struct ConvertResizeTests {
    /// σ of the dense Float64 product B·M·A (without scale), by LinearAlgebra.svd on the out × in matrix.
    private func denseSingularValues(_ m: LoRAModule) throws -> [Double] {
        let r = m.rank, n = m.inFeatures, o = m.outFeatures
        var a = try m.a.doubles(), b = try m.b.doubles()
        var mix = try m.mixer?.doubles()
        if m.orientation == .transposed { a = flip(a, n, r); b = flip(b, r, o); mix = mix.map { flip($0, r, r) } }
        let dense = product(b, mix.map { product($0, a, r, r, n) } ?? a, o, r, n)
        return LinearAlgebra.svd(dense, rows: o, cols: n).s
    }

    @Test("singular values and energy match the dense SVD; the result is the best rank-k approximation",
          arguments: ["moslora-original", "peft-lora", "kohya-moslora"])
    func againstDense(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file(name.hasPrefix("kohya") ? "out.safetensors" : "out")
        let summary = try AdapterConversion.resize(input: adapterPath(name), output: out, target: .rank(2), options: options())
        let before = try load(adapterPath(name)), after = try load(out)
        #expect(after.format == before.format)
        let u0 = try updates(before), u1 = try updates(after)
        for (m, e) in zip(before.modules, summary.energies) {
            let dense = try denseSingularValues(m)
            for (i, s) in e.singularValues.enumerated() { #expect(abs(s - dense[i]) <= 1e-10 * dense[0], "\(m.name) σ\(i)") }
            let total = dense.reduce(0) { $0 + $1 * $1 }
            #expect(abs(e.energyKept - (dense[0] * dense[0] + dense[1] * dense[1]) / total) < 1e-10)
            #expect(e.rankAfter == 2 && e.rankBefore == 4)
            // ‖Δ − Δ_k‖_F = scale · sqrt(σ₃² + σ₄²) (Eckart–Young), up to rounding of the new factors.
            let key = m.baseName.replacingOccurrences(of: ".", with: "_")
            let x = try #require(u0[key]), y = try #require(u1[key])
            let residual = norm(zip(x.delta, y.delta).map { $0 - $1 })
            let want = abs(m.scale) * dense.dropFirst(2).prefix(2).reduce(0) { $0 + $1 * $1 }.squareRoot()
            #expect(abs(residual - want) <= 3 * unitRoundoff(y.dtype) * y.factorSize + 1e-9 * want, "\(m.name): \(residual) vs \(want)")
        }
        #expect(after.modules.allSatisfy { $0.rank == 2 && !$0.hasMixer })
        #expect(after.modules.map(\.scale) == before.modules.map(\.scale))
    }

    @Test("--form moslora: orthonormal A and B, σ on the diagonal of the mixer; full rank keeps the update")
    func moslora() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.resize(input: adapterPath("moslora-original"), output: dir.file("out"), target: .rank(4), form: .moslora, options: options())
        let before = try load(adapterPath("moslora-original")), after = try load(dir.file("out"))
        try expectSameUpdates(before, after)
        for (m, n) in zip(before.modules, after.modules) {
            let a = try n.a.doubles(), b = try n.b.doubles(), mix = try n.mixer!.doubles()
            let aat = product(a, flip(a, 4, n.inFeatures), 4, n.inFeatures, 4)
            let btb = product(flip(b, n.outFeatures, 4), b, 4, n.outFeatures, 4)
            let sigma = try denseSingularValues(m)
            for i in 0..<4 {
                for j in 0..<4 {
                    #expect(abs(aat[i * 4 + j] - (i == j ? 1 : 0)) < 1e-6)
                    #expect(abs(btb[i * 4 + j] - (i == j ? 1 : 0)) < 1e-6)
                    #expect(abs(mix[i * 4 + j] - (i == j ? sigma[i] : 0)) <= 1e-6 * sigma[0])
                }
            }
        }
        #expect(try configOf(dir.file("out"))["lora_use_mixer"] == .bool(true))
    }

    @Test("--keep-energy picks the fewest values per module; ranks that differ become rank_pattern with alphas keeping each scale")
    func keepEnergy() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let summary = try AdapterConversion.resize(input: adapterPath("moslora-original"), output: dir.file("out"), target: .energy(0.9), options: options())
        let before = try load(adapterPath("moslora-original")), after = try load(dir.file("out"))
        for (m, e) in zip(before.modules, summary.energies) {
            let s = try denseSingularValues(m)
            let total = s.reduce(0) { $0 + $1 * $1 }
            let kept = s.prefix(e.rankAfter).reduce(0) { $0 + $1 * $1 } / total
            let fewer = s.prefix(e.rankAfter - 1).reduce(0) { $0 + $1 * $1 } / total
            #expect(kept >= 0.9 - 1e-12 && fewer < 0.9)
        }
        #expect(Set(summary.energies.map(\.rankAfter)).count > 1)
        #expect(after.modules.map(\.scale) == before.modules.map(\.scale))
        #expect(after.modules.map(\.rank) == summary.energies.map(\.rankAfter))
        let c = try configOf(dir.file("out"))
        #expect(c["rank_pattern"]?.objectValue?.members.isEmpty == false)
    }

    @Test("resize of a 3×3 convolution in kohya keeps its shapes; mlx refuses --form moslora")
    func convAndRefusal() throws {
        let dir = TempDir()
        defer { dir.remove() }
        _ = try AdapterConversion.resize(input: adapterPath("kohya-unet"), output: dir.file("k.safetensors"), target: .rank(3), options: options())
        let f = try SafetensorsFile(path: dir.file("k.safetensors"))
        #expect(f.info("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")?.shape == [3, 4, 3, 3])
        #expect(f.info("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")?.shape == [8, 3, 1, 1])
        #expect(f.info("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")?.dtype == .f16)
        // The training metadata no longer claims the old ranks: conv_dim follows the new rank,
        // conv_alpha = scale·k keeps the conv modules' scale (1/4 in the fixture), other fields stay.
        let meta = Dictionary(uniqueKeysWithValues: f.metadataPairs.map { ($0.key, $0.value) })
        #expect(meta["ss_network_args"] == #"{"conv_dim":"3","conv_alpha":"0.75"}"#, "\(meta["ss_network_args"] ?? "none")")
        #expect(meta["ss_network_dim"] == "3")
        #expect(meta["ss_sd_model_name"] == "tiny-unet")
        #expect(throws: InputError.self) {
            try AdapterConversion.resize(input: adapterPath("mlx"), output: dir.file("m"), target: .rank(2), form: .moslora, options: options())
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("m")))
    }
}
