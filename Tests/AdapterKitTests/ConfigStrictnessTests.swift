import Foundation
import Testing
@testable import AdapterKit

/// A copy of the peft-lora fixture (r 4, lora_alpha 8, q_proj and v_proj in two layers) with its
/// config's members changed: nil removes a member.
private func peftLora(_ dir: TempDir, _ changes: [String: String?]) throws -> String {
    let folder = dir.file("a\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    try FileManager.default.copyItem(atPath: fixture("adapters/peft-lora/adapter_model.safetensors"), toPath: folder + "/adapter_model.safetensors")
    var config = try readJSONFile(fixture("adapters/peft-lora/adapter_config.json")).objectValue!
    for (key, text) in changes {
        config[key] = try text.map { try JSONParser.parse(Array($0.utf8)) }
        if text == nil { config[key] = nil }
    }
    _ = dir.write(String(folder.dropFirst(dir.path.count + 1)) + "/adapter_config.json", text: JSONWriter.pretty(.object(config)))
    return folder
}

private func refusal(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch { return String(describing: error) }
}

@Suite("adapter configs: one type per field, PEFT's defaults when missing, nothing non-finite")
struct ConfigStrictnessTests {
    @Test("a field of the wrong type is refused with the field named", arguments: [
        ("lora_alpha", #""8""#, "lora_alpha must be a finite number"),
        ("lora_alpha", "true", "lora_alpha must be a finite number"),
        ("lora_alpha", "null", "lora_alpha must be a finite number"),
        ("lora_alpha", "1e400", "lora_alpha must be a finite number"),
        ("r", #""4""#, "r must be an integer"),
        ("r", "4.5", "r must be an integer"),
        ("r", "1e20", "r must be an integer"),
        ("r", "0", "r must be an integer in 1…"),
        ("use_rslora", #""true""#, "use_rslora must be true or false"),
        ("use_rslora", "1", "use_rslora must be true or false"),
        ("fan_in_fan_out", "0", "fan_in_fan_out must be true or false"),
        ("use_dora", #""yes""#, "use_dora must be true or false"),
        ("alpha_pattern", #"{"q_proj": "32"}"#, #"alpha_pattern["q_proj"] must be a finite number"#),
        ("rank_pattern", #"{"q_proj": 4.0}"#, #"rank_pattern["q_proj"] must be a positive integer"#),
        ("rank_pattern", "[]", "rank_pattern must be an object"),
        ("peft_type", "5", "peft_type must be a string"),
        ("modules_to_save", #""lm_head""#, "modules_to_save must be a list of strings"),
        ("lora_use_mixer", #""yes""#, "lora_use_mixer must be true or false"),
        ("peft_type", #""lora""#, #"peft_type must be written "LORA""#),
        ("peft_type", #""LOHA""#, "only LoRA-family adapters are supported"),
    ])
    func wrongType(key: String, value: String, message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try peftLora(dir, [key: value])
        let text = try #require(refusal { _ = try Adapter(path: path) }, "\(key): \(value) was accepted")
        #expect(text.contains(message), "\(text)")
        #expect(text.contains("adapter_config.json"), "\(text)")
        #expect(!text.contains("\n"))
    }

    @Test("a missing lora_alpha takes PEFT's default 8, and says so")
    func missingAlpha() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let a = try Adapter(path: try peftLora(dir, ["lora_alpha": nil]))
        // r 4, PEFT's default lora_alpha 8: scale 2 (not 1).
        #expect(a.modules.allSatisfy { $0.scale == 2 && $0.alpha == 8 })
        #expect(a.warnings.contains { $0.contains("lora_alpha is missing: PEFT's default 8 assumed") }, "\(a.warnings)")
    }

    @Test("a missing r takes PEFT's default 8, which these rank-4 tensors contradict")
    func missingRank() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let text = try #require(refusal { _ = try Adapter(path: try peftLora(dir, ["r": nil])) })
        #expect(text.contains("the config gives rank 8 (PEFT's default r) but its tensors have rank 4"), "\(text)")
    }

    @Test("an integer-valued alpha_pattern and alpha of another value are used; 8.0 reads as 8")
    func wellTyped() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let a = try Adapter(path: try peftLora(dir, ["lora_alpha": "8.0", "alpha_pattern": #"{"q_proj": 32}"#, "use_rslora": "true"]))
        let q = try #require(a.modules.first { $0.name.hasSuffix("q_proj") })
        let v = try #require(a.modules.first { $0.name.hasSuffix("v_proj") })
        #expect(q.scale == 32 / 2 && q.alpha == 32)  // rsLoRA: alpha / √4
        #expect(v.scale == 8 / 2 && v.alpha == 8)
    }

    @Test("one module under two stored names is refused, naming both")
    func sameModuleTwice() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try peftLora(dir, [:])
        let store = try SafetensorsFile(path: folder + "/adapter_model.safetensors")
        var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
        for t in store.entries {
            let bytes = try store.withBytes(of: t.name) { Array($0) }
            tensors.append((t.name, t.dtype, t.shape, bytes))
            tensors.append((String(t.name.dropFirst("base_model.model.".count)), t.dtype, t.shape, bytes))
        }
        try FileManager.default.removeItem(atPath: folder + "/adapter_model.safetensors")
        try writeSafetensors(folder + "/adapter_model.safetensors", tensors)
        let text = try #require(refusal { _ = try Adapter(path: folder) })
        #expect(text.contains("modules base_model.model.model.layers.0.self_attn.q_proj and model.layers.0.self_attn.q_proj are the same module"), "\(text)")
        #expect(text.contains("4 problems"), "\(text)")
    }

    @Test("a config with a non-finite number is never written")
    func neverWriteInfinity() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let config = JSONObject([("r", .integer(4)), ("alpha_pattern", .object(JSONObject([("q", .real(.infinity))])))])
        let error = #expect(throws: InputError.self) {
            try AdapterWriter.writeConfig(dir.file("adapter_config.json"), config, indent: 2, sync: false)
        }
        #expect(error?.description.contains("alpha_pattern.q would be written as inf") == true, "\(String(describing: error))")
        #expect(!FileManager.default.fileExists(atPath: dir.file("adapter_config.json")))
    }

    @Test("mlx and MyTransformers fields are typed too", arguments: [
        ("mlx", "adapter_config.json", #"{"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": "20"}}"#, "lora_parameters.scale must be a finite number"),
        ("mlx", "adapter_config.json", #"{"fine_tune_type": "lora", "lora_parameters": {"rank": 4.5, "scale": 2}}"#, "lora_parameters.rank must be an integer"),
        ("mytransformers", "config.json", #"{"lora_rank": 4, "lora_scaler": "2", "use_mos_lora": true}"#, "lora_scaler must be a finite number"),
    ])
    func otherLayouts(fixtureName: String, configName: String, config: String, message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = dir.file("a")
        try FileManager.default.copyItem(atPath: fixture("adapters/" + fixtureName), toPath: folder)
        try FileManager.default.removeItem(atPath: folder + "/" + configName)
        _ = dir.write("a/" + configName, text: config)
        let text = try #require(refusal { _ = try Adapter(path: folder) })
        #expect(text.contains(message), "\(text)")
    }
}

@Suite("diffusers lora_adapter_metadata: each component's LoraConfig")
struct DiffusersMetadataTests {
    /// A diffusers-saved LoRA (PEFT keys under component prefixes): unet modules x (rank 2) and
    /// y (rank 2), text_encoder module z (rank 2); every factor filled with ones.
    private func write(_ dir: TempDir, metadata: String?) throws -> String {
        var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
        for name in ["unet.down.x", "unet.down.y", "text_encoder.layers.0.z"] {
            tensors.append((name + ".lora_A.weight", .f32, [2, 3], floatBytes([Float](repeating: 1, count: 6))))
            tensors.append((name + ".lora_B.weight", .f32, [3, 2], floatBytes([Float](repeating: 1, count: 6))))
        }
        var meta: [(key: String, value: String)] = [("format", "pt")]
        if let metadata { meta.append(("lora_adapter_metadata", metadata)) }
        return try writeSafetensors(dir.file("pytorch_lora_weights.safetensors"), tensors, metadata: meta)
    }

    @Test("r, lora_alpha, alpha_pattern and use_rslora of every component give the scales diffusers uses")
    func scales() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // As diffusers writes it: json.dumps(_pack_dict_with_prefix(config.to_dict(), component), indent=2, sort_keys=True).
        let metadata = """
        {
          "text_encoder.lora_alpha": 4,
          "text_encoder.r": 2,
          "text_encoder.use_rslora": true,
          "unet.alpha_pattern": {"down.y": 2},
          "unet.lora_alpha": 6,
          "unet.peft_type": "LORA",
          "unet.r": 2,
          "unet.rank_pattern": {},
          "unet.target_modules": ["x", "y"],
          "unet.use_dora": false
        }
        """
        let a = try Adapter(path: try write(dir, metadata: metadata))
        #expect(a.format == .diffusers)
        func scale(_ suffix: String) -> Double? { a.modules.first { $0.name.hasSuffix(suffix) }?.scale }
        #expect(scale("down.x") == 3)            // 6 / 2
        #expect(scale("down.y") == 1)            // alpha_pattern 2 / 2
        #expect(scale("layers.0.z") == 4 / 2.0.squareRoot())  // rsLoRA 4 / √2
        #expect(!a.warnings.contains { $0.contains("assumed") }, "\(a.warnings)")
    }

    @Test("without metadata the scale is diffusers' assumption alpha = r, and it is said")
    func assumption() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let a = try Adapter(path: try write(dir, metadata: nil))
        #expect(a.modules.allSatisfy { $0.scale == 1 })
        #expect(a.warnings.contains { $0.contains("3 diffusers modules without lora_adapter_metadata or alpha: diffusers' rule alpha = r (scale 1) assumed") }, "\(a.warnings)")
    }

    @Test("malformed metadata is refused in one line", arguments: [
        (#"{"unet.r": "2"}"#, "lora_adapter_metadata unet.r must be an integer"),
        (#"{"unet.lora_alpha": 1e400, "unet.r": 2}"#, "lora_adapter_metadata unet.lora_alpha must be a finite number"),
        (#"{"r": 2}"#, "has no component prefix"),
        ("[1]", "not a JSON object"),
        ("{", "lora_adapter_metadata is not valid JSON"),
        (#"{"unet.r": 4, "unet.lora_alpha": 8}"#, "the config gives rank 4 (r) but its tensors have rank 2"),
    ])
    func malformed(metadata: String, message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = try write(dir, metadata: metadata)
        let text = try #require(refusal { _ = try Adapter(path: path) })
        #expect(text.contains(message), "\(text)")
        #expect(!text.contains("\n"))
    }
}

@Suite("PaddleNLP config rules")
struct PaddleRuleTests {
    private func paddle(_ dir: TempDir, _ extra: String) throws -> String {
        let folder = dir.file("p")
        try FileManager.default.copyItem(atPath: fixture("adapters/paddle"), toPath: folder)
        var config = try readJSONFile(folder + "/lora_config.json").objectValue!
        for (k, v) in try JSONParser.parse(Array(extra.utf8)).objectValue!.members { config[k] = v }
        try FileManager.default.removeItem(atPath: folder + "/lora_config.json")
        _ = dir.write("p/lora_config.json", text: JSONWriter.pretty(.object(config)))
        return folder
    }

    @Test("pissa: scale 1.0 whatever lora_alpha says, with a warning; use_mora is refused")
    func pissaAndMora() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let a = try Adapter(path: try paddle(dir, #"{"pissa": true, "lora_alpha": 32}"#))
        #expect(a.modules.allSatisfy { $0.scale == 1 })
        #expect(a.warnings.contains { $0.contains("pissa") })
        try FileManager.default.removeItem(atPath: dir.file("p"))
        #expect(throws: InputError.self) { try Adapter(path: try paddle(dir, #"{"use_mora": true}"#)) }
    }
}

@Suite("kohya and diffusers key rules")
struct KohyaDiffusersRuleTests {
    @Test("kohya alpha 0 means alpha = rank, as sd-scripts reads it, and says so")
    func alphaZero() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let p = try writeSafetensors(dir.file("k.safetensors"), [
            (name: "lora_unet_x.lora_down.weight", dtype: .f32, shape: [2, 3], bytes: floatBytes([Float](repeating: 1, count: 6))),
            (name: "lora_unet_x.lora_up.weight", dtype: .f32, shape: [3, 2], bytes: floatBytes([Float](repeating: 1, count: 6))),
            (name: "lora_unet_x.alpha", dtype: .f32, shape: [], bytes: floatBytes([0])),
            (name: "lora_unet_y.lora_down.weight", dtype: .f32, shape: [2, 3], bytes: floatBytes([Float](repeating: 1, count: 6))),
            (name: "lora_unet_y.lora_up.weight", dtype: .f32, shape: [3, 2], bytes: floatBytes([Float](repeating: 1, count: 6))),
            (name: "lora_unet_y.alpha", dtype: .f32, shape: [], bytes: floatBytes([1])),
        ])
        let a = try Adapter(path: p)
        #expect(a.modules.first { $0.name == "lora_unet_x" }?.scale == 1)
        #expect(a.modules.first { $0.name == "lora_unet_y" }?.scale == 0.5)
        #expect(a.warnings.contains { $0.contains("alpha 0 read as alpha = rank") })
    }

    @Test("diffusers' old text-encoder keys (lora_linear_layer.down/up) are LoRA factors, not unknown keys")
    func loraLinearLayer() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let p = try writeSafetensors(dir.file("d.safetensors"), [
            (name: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight", dtype: .f32, shape: [2, 3],
             bytes: floatBytes([1, 2, 3, 4, 5, 6])),
            (name: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", dtype: .f32, shape: [3, 2],
             bytes: floatBytes([1, 0, 0, 1, 1, 1])),
            (name: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", dtype: .f32, shape: [2, 3],
             bytes: floatBytes([Float](repeating: 1, count: 6))),
            (name: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight", dtype: .f32, shape: [3, 2],
             bytes: floatBytes([Float](repeating: 1, count: 6))),
        ])
        let a = try Adapter(path: p)
        #expect(a.format == .diffusers)
        #expect(a.unknownKeys.isEmpty)
        #expect(a.modules.count == 2)
        let te = try #require(a.modules.first { $0.component == "text_encoder" })
        #expect(te.baseName == "text_model.encoder.layers.0.self_attn.q_proj")
        #expect(try te.factors().a == [1, 2, 3, 4, 5, 6])
    }
}

@Suite("degenerate modules")
struct DegenerateModuleTests {
    @Test("a module with no inputs or no outputs is refused at load, so merge, convert and resize agree", arguments: [
        ([4, 0], [3, 4]), ([4, 3], [0, 4]),
    ])
    func zeroWidth(a: [Int], b: [Int]) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let p = try writeSafetensors(dir.file("z.safetensors"), [
            (name: "base_model.model.x.lora_A.weight", dtype: .f32, shape: a, bytes: floatBytes([Float](repeating: 1, count: a.reduce(1, *)))),
            (name: "base_model.model.x.lora_B.weight", dtype: .f32, shape: b, bytes: floatBytes([Float](repeating: 1, count: b.reduce(1, *)))),
        ])
        let error = #expect(throws: ProblemList.self) { try Adapter(path: p) }
        #expect(error?.description.contains("a module needs at least one input and one output") == true)
        #expect(throws: (any Error).self) {
            try AdapterConversion.resize(input: p, output: dir.file("r"), target: .rank(1))
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("r")))
    }
}
