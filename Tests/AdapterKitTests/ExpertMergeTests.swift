import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

/// Every tensor of the reference `expected/moe/<reference>.safetensors` has the same values in
/// `merged`, within `tolerance` × the tensor's largest magnitude (Float32 rounding of two merges).
func expectMatches(_ merged: Checkpoint, reference: String, in folder: String = "moe", tolerance: Double = 0x1p-20, _ what: String = "",
                   sourceLocation: SourceLocation = #_sourceLocation) throws {
    let expected = try SafetensorsFile(path: fixture("expected/\(folder)/\(reference).safetensors"))
    #expect(!expected.header.tensors.isEmpty, sourceLocation: sourceLocation)
    for t in expected.header.tensors {
        let want = try expected.doubles(t.name)
        let (_, file) = try #require(merged.tensor(t.name), "\(t.name) is in the output", sourceLocation: sourceLocation)
        let got = try merged.files[file].doubles(t.name)
        let scale = want.map { abs($0) }.max()!
        let worst = got.count == want.count ? zip(got, want).map { abs($0 - $1) }.max() ?? 0 : .infinity
        #expect(worst <= tolerance * scale, "\(what)\(t.name): off by \(worst)", sourceLocation: sourceLocation)
    }
}

@Suite("merge: Mixture-of-Experts, fused and multimodal models (transformers 5 + PEFT references)")
struct ExpertMergeTests {
    /// Fixtures/expected/moe/<case>.safetensors (made by Fixtures/make_moe_fixtures.py): the tensors
    /// PEFT's merge_and_unload changed, as save_pretrained writes them, or a numpy Float64
    /// reference for adapters PEFT no longer makes. The base is named in the file's metadata.
    static let cases: [String] = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fixture("expected/moe"))) ?? []
        return names.filter { $0.hasSuffix(".safetensors") }.map { String($0.dropLast(".safetensors".count)) }.sorted()
    }()

    @Test("the references are present: target_parameters on per-expert, fused and transposed bases, per-expert adapters, shared experts, DeepSeek-V3, Llama 4, fused qkv, LLaVA, Qwen2-VL, Qwen2.5-VL, Gemma 3")
    func present() {
        #expect(Self.cases.count == 18)
    }

    @Test("every tensor the reference changed, the merge changes to the same values; nothing else changes", arguments: cases)
    func matchesReference(_ name: String) throws {
        let expected = try SafetensorsFile(path: fixture("expected/moe/\(name).safetensors"))
        let baseName = try #require(expected.header.metadata.first { $0.key == "base" }?.value)
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, _) = try merge(base: modelPath(baseName), adapters: [(adapterPath("moe-" + name), 1)], out: dir.file("out"))
        let base = try Checkpoint(path: modelPath(baseName))
        try expectMatches(merged, reference: name)
        let changed = Set(expected.header.tensors.map(\.name))
        #expect(Set(merged.tensorNames) == Set(base.tensorNames))
        for (info, file) in merged.tensors where !changed.contains(info.name) {
            let (_, baseFile) = try #require(base.tensor(info.name))
            let same = try merged.files[file].doubles(info.name) == base.files[baseFile].doubles(info.name)
            #expect(same, "\(info.name) is unchanged")
        }
    }

    @Test("a target_parameters adapter is read as E experts of rank r, its nested wrappers by the config")
    func readsParameters() throws {
        let adapter = try Adapter(path: adapterPath("moe-qwen3-moe-params"))
        let experts = adapter.modules.filter { $0.parameter != nil }
        #expect(experts.map(\.parameter!.name).sorted() == ["down_proj", "gate_up_proj"])
        for m in experts {
            #expect(m.parameter!.experts == 4)
            #expect(m.updateRank == 2)
            #expect(m.scale == 2)  // lora_alpha 4 / r 2, not / (r·E)
        }
        let gateUp = try #require(experts.first { $0.parameter!.name == "gate_up_proj" })
        #expect(gateUp.name.hasSuffix(".experts.base_layer"))  // the first in class order is the innermost
        // Expert 3's slice: rows 6..<8 of A, columns 3, 7 of B.
        let e3 = gateUp.expert(3, outputs: 6..<12, part: "up")
        let a = try gateUp.a.doubles(), b = try gateUp.b.doubles()
        let inF = gateUp.inFeatures, width = gateUp.rank
        #expect(try e3.a.doubles() == Array(a[6 * inF..<8 * inF]))
        var columns: [Double] = []
        for row in 6..<12 { columns += [b[row * width + 3], b[row * width + 7]] }
        #expect(try e3.b.doubles() == columns)
        #expect(try e3.b.doubles() == columns, "a block read more often than its slices were made is split again")
        #expect(try gateUp.expert(0).b.doubles().count == 12 * 2)
    }

    @Test("the nesting of target_parameters wrappers follows PEFT's rule, and ambiguity is refused")
    func nesting() {
        let both = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        let r = AdapterLoader.expertParameters(["model.mlp.experts.base_layer", "model.mlp.experts", "model.q_proj"], targets: both)
        #expect((try? r["model.mlp.experts.base_layer"]?.get())?.parameter == "gate_up_proj")
        #expect((try? r["model.mlp.experts"]?.get())?.parameter == "down_proj")
        #expect(r["model.q_proj"] == nil)
        let one = AdapterLoader.expertParameters(["model.mlp.experts"], targets: ["mlp.experts.down_proj"])
        #expect((try? one["model.mlp.experts"]?.get())?.parameter == "down_proj")
        // Two targeted but only one stored: which one it is cannot be told.
        let missing = AdapterLoader.expertParameters(["model.mlp.experts"], targets: both)
        #expect(throws: AdapterLoader.Problem.self) { try missing["model.mlp.experts"]!.get() }
        let unknown = AdapterLoader.expertParameters(["model.mlp.experts.base_layer", "model.mlp.experts"], targets: ["mlp.experts.w_in", "mlp.experts.w_out"])
        #expect(throws: AdapterLoader.Problem.self) { try unknown["model.mlp.experts"]!.get() }
    }

    @Test("target_modules as one regular expression also keeps its modules from being read as wrapped parameters")
    func regexTargetModules() throws {
        let dir = TempDir()
        defer { dir.remove() }
        func copy(_ targetModules: String) throws -> String {
            let folder = dir.file("ad\(UUID().uuidString.prefix(6))")
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: adapterPath("moe-deepseek-v3-shared") + "/adapter_model.safetensors", toPath: folder + "/adapter_model.safetensors")
            var config = try readJSONFile(adapterPath("moe-deepseek-v3-shared") + "/adapter_config.json").objectValue!
            config["target_modules"] = .string(targetModules)
            try JSONWriter.pretty(.object(config)).write(toFile: folder + "/adapter_config.json", atomically: true, encoding: .utf8)
            return folder
        }
        // The bare "gate_up_proj" entry matches every path; the expression says q_b_proj is a module.
        let (merged, _) = try merge(base: modelPath("tiny-deepseek-v3"), adapters: [(try copy(#".*\.q_b_proj"#), 1)], out: dir.file("out"))
        try expectMatches(merged, reference: "deepseek-v3-shared")
        // An expression that names nothing: q_b_proj is then taken for a wrapped gate_up_proj, and refused.
        #expect(throws: ProblemList.self) { try Adapter(path: try copy(#".*\.nothing"#)) }
    }

    @Test("an expert adapter that does not fit the base is refused, never skipped")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // Four experts in the adapter, onto a base whose config is the same but with tensors of another
        // family: Mixtral's per-expert names exist, Qwen's do not.
        func refusal(_ base: String, _ adapter: String) throws -> String {
            do {
                try merge(base: modelPath(base), adapters: [(adapter.hasPrefix("/") ? adapter : adapterPath(adapter), 1)], out: dir.file("o"))
                return ""
            } catch {
                #expect(!FileManager.default.fileExists(atPath: dir.file("o")))
                return "\(error)"
            }
        }
        let wrongFamily = try refusal("tiny-llava", "moe-qwen3-moe-params")
        #expect(wrongFamily.contains("model.layers.0.mlp.experts.gate_up_proj") && wrongFamily.contains("one per expert"))
        // The same factors read with r = 1 instead of 3: twelve experts, where the base has four.
        let copy = dir.file("r1")
        try FileManager.default.createDirectory(atPath: copy, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: adapterPath("moe-mixtral-gate-up") + "/adapter_model.safetensors", toPath: copy + "/adapter_model.safetensors")
        var config = try String(contentsOfFile: adapterPath("moe-mixtral-gate-up") + "/adapter_config.json", encoding: .utf8)
        config = config.replacingOccurrences(of: "\"r\": 3", with: "\"r\": 1").replacingOccurrences(of: "\"lora_alpha\": 3", with: "\"lora_alpha\": 1")
        try config.write(toFile: copy + "/adapter_config.json", atomically: true, encoding: .utf8)
        let misfit = try refusal("tiny-mixtral", copy)
        #expect(misfit.contains("holds 12 experts of gate_up_proj (A has 12 rows for rank 1) but the base has 4"), "\(misfit)")
        // An unknown family with unmatched modules: the refusal says the family is not known.
        let unknown = try refusal("tiny-llama-f32", "moe-llava")
        #expect(unknown.contains("family is not known"), "\(unknown)")
    }

    @Test("the families are recognised from config.json, and from tensor names without one")
    func families() throws {
        #expect(NameMap(base: try Checkpoint(path: modelPath("tiny-mixtral"))).family?.name == "mixtral")
        #expect(NameMap(base: try Checkpoint(path: modelPath("tiny-gpt-oss"))).family?.gateUpInterleaved == true)
        #expect(NameMap(base: try Checkpoint(path: modelPath("tiny-llava"))).family?.renames.isEmpty == false)
        #expect(NameMap(base: try Checkpoint(path: modelPath("tiny-qwen2-vl") + "/model.safetensors")).family?.name == "qwen2_vl")
        #expect(NameMap(base: try Checkpoint(path: modelPath("tiny-llama-f32"))).family == nil)
        let f = try #require(ModelFamily.named("llava"))
        #expect(f.renamed("model.language_model.layers.0.q_proj") == ["language_model.model.layers.0.q_proj"])
        #expect(f.renamed("language_model.model.layers.0.q_proj") == ["model.language_model.layers.0.q_proj"])
        #expect(f.renamed("model.vision_tower.encoder.x") == ["vision_tower.vision_model.encoder.x", "vision_tower.encoder.x"])
    }
}

@Suite("convert to-peft --experts: target_parameters ⇄ per-expert modules, exactly")
struct ExpertConversionTests {
    /// Converts `adapter` with `--experts form --base base`, merges the result into `base`, and
    /// compares with the reference of `reference` (the unconverted adapter's PEFT or numpy merge).
    func roundTrip(_ adapter: String, _ form: ExpertForm, base: String, reference: String) throws -> Adapter {
        let dir = TempDir()
        defer { dir.remove() }
        var options = ConvertOptions()
        options.experts = form
        options.base = modelPath(base)
        options.sync = false
        let converted = dir.file("converted")
        let summary = try AdapterConversion.convertLayout(input: adapterPath(adapter), output: converted, to: .peft, options: options)
        #expect(summary.experts == form)
        let (merged, _) = try merge(base: modelPath(base), adapters: [(converted, 1)], out: dir.file("merged"))
        try expectMatches(merged, reference: reference)
        return try Adapter(path: converted)
    }

    @Test("Qwen3-MoE target_parameters → per-expert modules named as the checkpoint stores them: the same merge as PEFT's")
    func qwenToPerExpert() throws {
        let a = try roundTrip("moe-qwen3-moe-params", .perExpert, base: "tiny-qwen3-moe", reference: "qwen3-moe-params")
        #expect(a.modules.allSatisfy { $0.parameter == nil })
        #expect(a.modules.contains { $0.baseName == "model.layers.0.mlp.experts.3.up_proj" })
        #expect(a.modules.count == 4 * 3 + 1)
    }

    @Test("per-expert modules → target_parameters: gate and up side by side, missing experts zero, the same merge")
    func qwenToFused() throws {
        let a = try roundTrip("moe-qwen3-moe-per-expert", .fused, base: "tiny-qwen3-moe", reference: "qwen3-moe-per-expert")
        let gateUp = try #require(a.modules.first { $0.parameter?.name == "gate_up_proj" })
        #expect(gateUp.name == "base_model.model.model.layers.0.mlp.experts.base_layer")
        #expect(gateUp.parameter?.experts == 4 && gateUp.updateRank == 4)
        #expect(a.modules.first { $0.parameter?.name == "down_proj" }?.name == "base_model.model.model.layers.0.mlp.experts")
    }

    @Test("Mixtral: w1/w3/w2 under block_sparse_moe on disk, mlp.experts.gate_up_proj in memory, both ways")
    func mixtral() throws {
        let perExpert = try roundTrip("moe-mixtral-gate-up", .perExpert, base: "tiny-mixtral", reference: "mixtral-gate-up")
        #expect(perExpert.modules.contains { $0.baseName == "model.layers.0.block_sparse_moe.experts.2.w3" })
        let fused = try roundTrip("moe-mixtral-per-expert", .fused, base: "tiny-mixtral", reference: "mixtral-per-expert")
        #expect(fused.modules.map(\.baseName).sorted() == ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts"])
    }

    @Test("what cannot be written exactly is refused with the reason, and nothing is written")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        func refusal(_ adapter: String, _ form: ExpertForm?, base: String?, to layout: TargetLayout = .peft) -> String {
            var options = ConvertOptions()
            options.experts = form
            options.base = base.map(modelPath)
            let out = dir.file("out")
            do {
                _ = try AdapterConversion.convertLayout(input: adapterPath(adapter), output: out, to: layout, options: options)
                return ""
            } catch {
                #expect(!FileManager.default.fileExists(atPath: out))
                return "\(error)"
            }
        }
        #expect(refusal("moe-gpt-oss-params", .perExpert, base: "tiny-gpt-oss").contains("keeps these experts fused"))
        #expect(refusal("moe-gpt-oss-per-expert", .fused, base: "tiny-gpt-oss").contains("[E, in, out]"))
        #expect(refusal("moe-qwen3-moe-per-expert", .fused, base: nil).contains("--experts needs --base"))
        #expect(refusal("moe-qwen3-moe-params", nil, base: nil, to: .kohya).contains("--experts per-expert"))
        #expect(refusal("moe-qwen3-moe-params", nil, base: nil, to: .mlx).contains("target_parameters"))
    }
}

@Suite("inspect: experts, targeted parameters, rank per expert; a base's family and expert storage")
struct ExpertInspectTests {
    @Test("a target_parameters adapter: experts line, kind experts×E, r per expert, JSON fields")
    func adapter() throws {
        let report = try AdapterReport(try Adapter(path: adapterPath("moe-qwen3-moe-params")))
        let text = report.text()
        #expect(text.contains("experts     gate_up_proj, down_proj as target_parameters (PEFT ParamWrapper): 4 experts of rank 2 each"))
        #expect(text.contains("mlp.experts.gate_up_proj       1  experts×4  2      4      2"), "\(text)")
        let json = JSONWriter.compact(report.json())
        #expect(json.contains(#""parameter":"gate_up_proj""#) && json.contains(#""experts":4"#) && json.contains(#""rank_per_expert":2"#))
        #expect(json.contains(#""target_parameters":["mlp.experts.gate_up_proj","mlp.experts.down_proj"]"#))
        let perExpert = try AdapterReport(try Adapter(path: adapterPath("moe-qwen3-moe-per-expert"))).text()
        #expect(perExpert.contains("per-expert modules: experts 0, 2 in 1 layer"))
    }

    @Test("a base: family, how experts are stored, expert and dense parameters, key layout")
    func base() throws {
        let oss = CheckpointReport(try Checkpoint(path: modelPath("tiny-gpt-oss"))).text(tensors: false)
        #expect(oss.contains("family      gpt_oss"))
        #expect(oss.contains("experts     4 per layer in 1 layer, stored fused [E, in, out], gate and up interleaved"))
        let qwen = CheckpointReport(try Checkpoint(path: modelPath("tiny-qwen3-moe"))).text(tensors: false)
        #expect(qwen.contains("stored per expert (2-D); 1.15 K (1152) expert parameters"))
        let llava = CheckpointReport(try Checkpoint(path: modelPath("tiny-llava"))).text(tensors: false)
        #expect(llava.contains("key layout  hub (language_model.model.…)"))
        let json = JSONWriter.compact(CheckpointReport(try Checkpoint(path: modelPath("tiny-mixtral"))).json())
        #expect(json.contains(#""layout":{"family":"mixtral","expert_storage":"per expert (2-D)","experts_per_layer":4"#), "\(json)")
    }
}

@Suite("MoSLoRA mixers on expert modules are kept per expert")
struct ExpertMixerTests {
    @Test("per-expert MoSLoRA → fused (one r×r mixer per expert, in row blocks) → per-expert: every merge is the reference")
    func mixersRoundTrip() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var options = ConvertOptions()
        options.sync = false
        let mos = dir.file("mos")
        _ = try AdapterConversion.loraToMoSLoRA(input: adapterPath("moe-qwen3-moe-per-expert"), output: mos, mixer: .orthogonal, seed: 3, options: options)
        options.base = modelPath("tiny-qwen3-moe")
        options.experts = .fused
        let fused = dir.file("fused")
        _ = try AdapterConversion.convertLayout(input: mos, output: fused, to: .peft, keepMixer: true, options: options)
        let f = try Adapter(path: fused)
        let gateUp = try #require(f.modules.first { $0.parameter?.name == "gate_up_proj" })
        #expect(gateUp.mixer?.shape == [4 * 4, 4])  // E·R rows of R×R mixers, R = r_gate + r_up
        // inspect diagnoses each expert's block (orthogonal: σ_min/σ_max = 1), the worst shown.
        let diagnosed = try AdapterReport(f).modules.compactMap(\.diagnostics)
        #expect(diagnosed.count == 2 && diagnosed.allSatisfy { abs($0.conditionRatio - 1) < 1e-6 })
        options.experts = .perExpert
        let back = dir.file("back")
        _ = try AdapterConversion.convertLayout(input: fused, output: back, to: .peft, keepMixer: true, options: options)
        // Back per expert: gate and up keep the fused rank R = 4 (their mixer block), down_proj r = 2.
        #expect(try Adapter(path: back).modules.allSatisfy { $0.mixer?.shape == [$0.rank, $0.rank] && ($0.rank == 4) == !$0.baseName.hasSuffix("down_proj") })
        for (name, adapter) in [("mos", mos), ("fused", fused), ("back", back)] {
            let (merged, _) = try merge(base: modelPath("tiny-qwen3-moe"), adapters: [(adapter, 1)], out: dir.file("m-" + name))
            // The orthogonal mixer's A' = QᵀA is rounded into F32 once: a few ulps more than a merge.
            try expectMatches(merged, reference: "qwen3-moe-per-expert", tolerance: 0x1p-18, name + ": ")
        }
    }
}
