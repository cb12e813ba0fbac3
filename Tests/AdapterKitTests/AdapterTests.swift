import Foundation
import Testing
@testable import AdapterKit

private func load(_ name: String) throws -> Adapter { try Adapter(path: adapterPath(name)) }

private func module(_ a: Adapter, _ suffix: String) -> LoRAModule? {
    a.modules.first { $0.name.hasSuffix(suffix) }
}

@Suite("adapter model: every layout")
struct AdapterLayoutTests {
    @Test("layouts are detected", arguments: [
        ("peft-lora", AdapterFormat.peft), ("moslora-original", .peft), ("moslora-peft-pr", .peft), ("peft-gpt2", .peft),
        ("kohya-unet", .kohya), ("kohya-moslora", .kohya), ("diffusers-lora", .diffusers), ("diffusers-peft", .diffusers),
        ("diffusers-moslora", .diffusers), ("mlx", .mlx), ("paddle", .paddle), ("mytransformers", .mytransformers),
    ])
    func detection(name: String, format: AdapterFormat) throws {
        #expect(try load(name).format == format)
    }

    @Test("PEFT: scale = lora_alpha / r, factors in PEFT orientation, no mixer")
    func peft() throws {
        let a = try load("peft-lora")
        #expect(a.modules.count == 4)
        #expect(!a.hasMixer)
        let q = try #require(module(a, "layers.0.self_attn.q_proj"))
        #expect(q.scale == 2)  // alpha 8 / r 4
        #expect(q.rank == 4 && q.inFeatures == 16 && q.outFeatures == 16 && q.kind == .linear)
        #expect(q.baseName == "model.layers.0.self_attn.q_proj")
        #expect(module(a, "v_proj")!.outFeatures == 8)
    }

    @Test("PEFT: use_rslora, rank_pattern and alpha_pattern follow the (.*\\.)?KEY$ rule")
    func patterns() throws {
        let a = try load("peft-lora-all")
        let q = try #require(module(a, "layers.0.self_attn.q_proj"))
        #expect(abs(q.scale - 16 / 8.0.squareRoot()) < 1e-12)  // rslora: alpha / √r
        let v = try #require(module(a, "layers.0.self_attn.v_proj"))
        #expect(v.rank == 4 && abs(v.scale - 16 / 2.0) < 1e-12)  // rank_pattern v_proj=4
        let o1 = try #require(module(a, "layers.1.self_attn.o_proj"))
        #expect(abs(o1.scale - 32 / 8.0.squareRoot()) < 1e-12)  // alpha_pattern layers.1.self_attn.o_proj=32
        let o0 = try #require(module(a, "layers.0.self_attn.o_proj"))
        #expect(abs(o0.scale - 16 / 8.0.squareRoot()) < 1e-12)
        #expect(a.warnings.contains { $0.hasPrefix("rank_pattern in use") })
        #expect(a.warnings.contains { $0.hasPrefix("alpha_pattern in use") })
        // The embedding and modules_to_save.
        let e = try #require(module(a, "embed_tokens"))
        #expect(e.kind == .embedding && e.expectedBaseShape == [32, 16])
        #expect(Set(a.replacements.map(\.baseName)) == ["lm_head.weight", "model.embed_tokens.weight"])
        #expect(a.unknownKeys.isEmpty)
    }

    @Test("the pattern rule matches whole dotted suffixes only")
    func patternRule() {
        let p = [("v_proj", 1), ("layers.1.self_attn.o_proj", 2)]
        #expect(AdapterSettings.patternMatch(p, "model.layers.0.self_attn.v_proj") == 1)
        #expect(AdapterSettings.patternMatch(p, "v_proj") == 1)
        #expect(AdapterSettings.patternMatch(p, "model.layers.0.self_attn.xv_proj") == nil)
        #expect(AdapterSettings.patternMatch(p, "model.layers.1.self_attn.o_proj") == 2)
        #expect(AdapterSettings.patternMatch(p, "model.layers.11.self_attn.o_proj") == nil)
    }

    @Test("compiled pattern keys (text fast path or regex) match exactly as the regex (.*\\.)?KEY$ does")
    func patternRuleEquivalence() throws {
        let keys = ["v_proj", "q_proj", "proj", "layers.1.self_attn.o_proj", "layers\\.[0-9]+\\.mlp\\..*", "(q|k)_proj", "model.layers.0.self_attn.v_proj"]
        let names = ["model.layers.0.self_attn.v_proj", "v_proj", "model.layers.0.self_attn.xv_proj", "model.layers.1.self_attn.o_proj",
                     "model.layersX1.self_attn.o_proj", "model.layers.11.self_attn.o_proj", "model.layers.3.mlp.up_proj", "k_proj", "a.q_proj"]
        for key in keys {
            let regex = try Regex("(.*\\.)?(" + key + ")")
            let rule = PatternRule(key: key, value: 0)
            for name in names {
                #expect(rule.matches(name) == ((try regex.wholeMatch(in: name)) != nil), "\(key) vs \(name)")
            }
        }
    }

    @Test("lora_AB is a mixer, never lora_A (the original MoSLoRA trap)")
    func loraABTrap() throws {
        let a = try load("moslora-original")
        #expect(a.modules.count == 10)
        #expect(a.modules.allSatisfy { $0.hasMixer && $0.mixer!.name.hasSuffix(".lora_AB.weight") && $0.a.name.hasSuffix(".lora_A.weight") })
        #expect(a.unknownKeys.isEmpty)
        let f = try a.modules[0].factors()
        #expect(f.m?.count == 16)
    }

    @Test("mixers are decided per module")
    func partialMixers() throws {
        let a = try load("moslora-original-partial")
        #expect(a.modules.filter(\.hasMixer).count == 5)
        #expect(a.modules.filter(\.hasMixer).allSatisfy { $0.name.contains("layers.0.") })
        #expect(a.warnings.contains { $0.contains("mixers on only 5 of 10 modules") })
    }

    @Test("PEFT pull-request layout: lora_mixer with peft_type MOSLORA")
    func peftPR() throws {
        let a = try load("moslora-peft-pr")
        #expect(a.modules.allSatisfy { $0.mixer?.name.hasSuffix(".lora_mixer.weight") == true })
        #expect(a.modules[0].a.entry.dtype == .bf16)
    }

    @Test("GPT-2 Conv1D: fan_in_fan_out transposes the update; lora_B.bias is kept")
    func gpt2() throws {
        let a = try load("peft-gpt2")
        let c = try #require(module(a, "c_attn"))
        #expect(c.kind == .linearFanInFanOut && c.expectedBaseShape == [16, 48] && c.bias != nil)
        #expect(module(a, "wte")?.kind == .embedding)
    }

    @Test("DoRA magnitude vectors are read and warned about")
    func dora() throws {
        let a = try load("peft-dora")
        #expect(a.modules.allSatisfy { $0.magnitude != nil })
        #expect(a.warnings.contains { $0.hasPrefix("DoRA") })
    }

    @Test("kohya: alpha / r per module, conv 1×1 and k×k, text encoder and unet components")
    func kohya() throws {
        let a = try load("kohya-unet")
        #expect(Set(a.components) == ["unet", "text_encoder"])
        let conv = try #require(module(a, "resnets_0_conv1"))
        #expect(conv.kind == .convKxK && conv.expectedBaseShape == [8, 4, 3, 3] && conv.scale == 0.25)
        let proj = try #require(module(a, "proj_in"))
        #expect(proj.kind == .conv1x1 && proj.scale == 0.5)
        #expect(module(a, "attn1_to_q")?.baseName == "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        #expect(try load("kohya-moslora").modules.allSatisfy(\.hasMixer))
    }

    @Test("diffusers: old lora.down/up, PEFT-style lora_A/B, and the mangled lora.downB mixer")
    func diffusers() throws {
        let old = try load("diffusers-lora")
        #expect(old.modules.allSatisfy { $0.scale == 1 && $0.component != nil })
        #expect(module(old, "attn1.to_q")?.baseName == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        let mixed = try load("diffusers-moslora")
        #expect(mixed.modules.allSatisfy { $0.mixer?.name.hasSuffix(".lora.downB.weight") == true })
        #expect(try load("diffusers-peft").modules.count == 6)
    }

    @Test("mlx-lm: transposed factors and the config's scale")
    func mlx() throws {
        let a = try load("mlx")
        let q = try #require(module(a, "layers.0.self_attn.q_proj"))
        #expect(q.orientation == .transposed && q.scale == 20 && q.rank == 4 && q.inFeatures == 16 && q.outFeatures == 16)
        let f = try q.factors()
        let raw = try q.a.doubles()  // stored (in, r)
        #expect(f.a[1] == raw[1 * 4])  // A[0][1] = lora_a[1][0]
    }

    @Test("PaddleNLP: everything transposed, mixer too; rslora scale")
    func paddle() throws {
        let a = try load("paddle")
        let q = try #require(module(a, "layers.0.self_attn.q_proj"))
        #expect(q.orientation == .transposed && q.hasMixer && q.scale == 4)
        let f = try q.factors()
        let rawM = try q.mixer!.doubles()
        #expect(f.m![1] == rawM[4])  // M[0][1] = stored[1][0]
    }

    @Test("MyTransformers: weight_a / weight_ab_mixer / weight_b with lora_scaler / rank")
    func mytransformers() throws {
        let a = try load("mytransformers")
        #expect(a.modules.count == 4 && a.modules.allSatisfy { $0.hasMixer && $0.scale == 2 })
    }

    @Test("unknown keys are listed, never dropped; pissa init is warned about")
    func unknownAndWarnings() throws {
        let a = try load("peft-unknown")
        #expect(Set(a.unknownKeys) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", "some.random.tensor"])
        #expect(a.warnings.contains { $0.contains("2 unknown keys") })
        #expect(try load("peft-pissa").warnings.contains { $0.contains("pissa") && $0.contains("modified base") })
    }

    @Test("a bare PEFT file without config: rank from shapes, scale 1, and a warning saying so")
    func noConfig() throws {
        let a = try Adapter(path: fixture("adapters/peft-lora/adapter_model.safetensors"))
        #expect(a.configPath != nil)  // the sibling config is found
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.copyItem(atPath: fixture("adapters/peft-lora/adapter_model.safetensors"), toPath: dir.file("lora.safetensors"))
        let bare = try Adapter(path: dir.file("lora.safetensors"))
        #expect(bare.format == .peft && bare.configPath == nil)
        #expect(bare.modules.allSatisfy { $0.scale == 1 && $0.rank == 4 })
        #expect(bare.warnings.contains { $0.contains("no adapter_config.json") })
    }

    @Test("a model is not an adapter")
    func notAdapter() {
        #expect(!Adapter.looksLikeAdapter(fixture("models/tiny-llama")))
        #expect(!Adapter.looksLikeAdapter(fixture("models/tiny-gpt2.safetensors")))
        #expect(throws: InputError.self) { try Adapter(path: fixture("models/tiny-gpt2.safetensors")) }
    }
}

@Suite("adapter inspect report")
struct AdapterReportTests {
    @Test("mixer diagnostics match independently computed values")
    func diagnostics() throws {
        // An orthogonal mixer (rotation): ‖MᵀM − I‖ = 0, σmin/σmax = 1, ‖M − I‖_F/√2 = √(2(1−cos θ)²+2 sin²θ)/√2.
        let t = 0.3
        let m = [cos(t), -sin(t), sin(t), cos(t)]
        let d = MixerDiagnostics(mixer: m, rank: 2)
        #expect(abs(d.orthogonalityError) < 1e-12)
        #expect(abs(d.conditionRatio - 1) < 1e-12)
        #expect(abs(d.distanceFromIdentity - (2 * (1 - cos(t)) * (1 - cos(t)) + 2 * sin(t) * sin(t)).squareRoot() / 2.0.squareRoot()) < 1e-12)
        // diag(4, 1): σmin/σmax = 0.25.
        let s = MixerDiagnostics(mixer: [4, 0, 0, 1], rank: 2)
        #expect(abs(s.conditionRatio - 0.25) < 1e-12)
        #expect(abs(s.orthogonalityError - 15) < 1e-12)
    }

    @Test("singular values of a random matrix agree with the eigenvalues of AᵀA")
    func svd() {
        var rng = SystemRandomNumberGenerator()
        let a = (0..<30).map { _ in Double.random(in: -1...1, using: &rng) }  // 6 × 5
        let (u, s, v) = LinearAlgebra.svd(a, rows: 6, cols: 5)
        // Reconstruct A = U·diag(S)·Vᵀ.
        for i in 0..<6 { for j in 0..<5 {
            var x = 0.0
            for k in 0..<5 { x += u[i * 5 + k] * s[k] * v[j * 5 + k] }
            #expect(abs(x - a[i * 5 + j]) < 1e-10)
        } }
        #expect(zip(s, s.dropFirst()).allSatisfy { $0 >= $1 })
    }

    @Test("the JSON object carries format, mixer, modules, unknown keys and warnings")
    func json() throws {
        let r = try AdapterReport(try Adapter(path: adapterPath("moslora-original-partial")))
        let j = r.json()
        #expect(j["format"]?.stringValue == "peft")
        #expect(j["mixer"]?.boolValue == true)
        let modules = try #require(j["modules"]?.arrayValue)
        #expect(modules.count == 10)
        let first = modules[0]
        for key in ["name", "kind", "rank", "scale", "mixer", "in", "out"] { #expect(first[key] != nil, "\(key)") }
        #expect(first["name"]?.stringValue?.hasSuffix("lora_A") == false)
        #expect(j["unknown_keys"]?.arrayValue?.isEmpty == true)
        #expect(j["warnings"]?.arrayValue?.isEmpty == false)
    }

    @Test("the text report: sizes, base model, version, scale rule, targets, r and alpha per target, aligned and short lines")
    func textReport() throws {
        let r = try AdapterReport(try Adapter(path: adapterPath("real-lora-rslora-patterns")))
        let text = r.text()
        #expect(text.contains("written by  PEFT 0.21.2"))
        #expect(text.contains("scale       lora_alpha / √r (use_rslora)"))
        #expect(text.contains("in 32 tensors"))
        #expect(text.contains("targets     "))
        // o_proj has lora_alpha 8 in layer 0 and 16 (alpha_pattern) in layer 1; v_proj rank 2: scale 8/√2.
        let o = try #require(text.split(separator: "\n").first { $0.contains("self_attn.o_proj") })
        #expect(o.split(separator: " ").map(String.init) == ["self_attn.o_proj", "2", "linear", "4", "8,16", "4,8", "no", "F32"])
        let v = try #require(text.split(separator: "\n").first { $0.contains("self_attn.v_proj") })
        #expect(v.contains(" 5.657 "))
        for line in text.split(separator: "\n") { #expect(line.count <= 110, "\(line)") }
        #expect(!text.contains("× 1 layer"))
        // Columns line up: every table row has its "linear"/"embedding" kind where the header has "kind".
        let lines = text.split(separator: "\n").map(String.init)
        let header = try #require(lines.first { $0.contains("target") && $0.contains("kind") })
        let column = header.range(of: "kind")!.lowerBound.utf16Offset(in: header)
        for row in lines where row.contains(" linear ") || row.contains(" embedding ") {
            let kindStart = row.range(of: row.contains(" linear ") ? "linear" : "embedding")!.lowerBound.utf16Offset(in: row)
            #expect(kindStart == column, "\(row)")
        }
        let j = r.json()
        #expect(j["tensor_count"]?.int == 32)
        #expect(j["written_by"]?.stringValue == "PEFT 0.21.2")
        #expect(j["modules"]?.arrayValue?.allSatisfy { $0["alpha"]?.double != nil } == true)
    }

    @Test("kohya training metadata is shown as a block")
    func kohyaTraining() throws {
        let r = try AdapterReport(try Adapter(path: adapterPath("kohya-unet.safetensors")))
        let training = Dictionary(uniqueKeysWithValues: r.training.map { ($0.label, $0.value) })
        #expect(training["base model"] == "tiny-unet (sd_v1)")
        #expect(training["network"] == "networks.lora, dim 4, alpha 2.0, conv_dim=4 conv_alpha=1")
        #expect(training["training"] == "1 epoch, 100 steps")
        #expect(training["precision"] == "fp16")
        #expect(training["comment"] == nil)  // "None" is not shown
        #expect(r.text().contains("  training (kohya metadata)"))
    }

    @Test("a nearly singular mixer gets a warning that says inverting is unsafe and folding is exact")
    func singularMixer() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // M = diag(1, 1e-4): σ_min/σ_max = 1e-4 < 1e-3.
        let p = try writeSafetensors(dir.file("a.safetensors"), [
            (name: "base_model.model.x.lora_A.weight", dtype: .f32, shape: [2, 2], bytes: floatBytes([1, 0, 0, 1])),
            (name: "base_model.model.x.lora_AB.weight", dtype: .f32, shape: [2, 2], bytes: floatBytes([1, 0, 0, 1e-4])),
            (name: "base_model.model.x.lora_B.weight", dtype: .f32, shape: [2, 2], bytes: floatBytes([1, 0, 0, 1])),
        ])
        let r = try AdapterReport(try Adapter(path: p))
        let verdict = try #require(r.mixerVerdict)
        #expect(verdict.isWarning)
        #expect(r.warnings.contains { $0.contains("nearly singular") && $0.contains("inverting M is unsafe") && $0.contains("folding it into A or B") && $0.contains("still exact") })
        let good = try AdapterReport(try Adapter(path: adapterPath("moslora-original")))
        #expect(good.mixerVerdict?.isWarning == false)
        #expect(good.text().contains("verdict            every mixer is well conditioned"))
    }

    @Test("formatShort: four significant digits, no trailing zeros")
    func numbers() {
        #expect(formatShort(2) == "2")
        #expect(formatShort(5.656854) == "5.657")
        #expect(formatShort(0.0205) == "0.0205")
        #expect(formatShort(0.25) == "0.25")
        #expect(formatShort(1234.5) == "1235")
        #expect(formatShort(1.2e-5) == "1.2e-5")
        #expect(formatShort(-0.5) == "-0.5")
    }

    @Test("NaN and Inf are counted per tensor")
    func nonFinite() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let p = try writeSafetensors(dir.file("a.safetensors"), [
            (name: "base_model.model.x.lora_A.weight", dtype: .f32, shape: [1, 2], bytes: floatBytes([.nan, .infinity])),
            (name: "base_model.model.x.lora_B.weight", dtype: .f32, shape: [2, 1], bytes: floatBytes([1, -.infinity])),
        ])
        let r = try AdapterReport(try Adapter(path: p))
        #expect(r.nonFinite.count == 2)
        #expect(r.nonFinite.first { $0.tensor.hasSuffix("lora_A.weight") }.map { ($0.nan, $0.inf) } ?? (0, 0) == (1, 1))
        #expect(r.warnings.contains { $0.contains("1 NaN and 1 infinite") })
    }
}

