import Foundation
import Testing
@testable import AdapterKit

/// Block-scaled FP8 weights (DeepSeek-V3, Qwen3-FP8 layout) are recognised across shards as one
/// logical tensor with its scale part: inspect names the encoding; E4M3 weights are merged and
/// requantized (QuantizedMergeTests), E5M2 ones refused by name instead of as an unknown dtype.
@Suite("encodings: block-scaled FP8 recognised across shards")
struct EncodingTests {
    /// A two-shard folder: `a.weight` F8 [4, 8] in shard 1, its F32 scales in shard 2.
    static func fp8Folder(_ dir: TempDir, block: [Int]?, scaleShape: [Int], codes: DType = .f8E4M3) throws -> String {
        let folder = dir.file("fp8")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try writeSafetensors(folder + "/model-00001-of-00002.safetensors", [
            ("a.weight", codes, [4, 8], [UInt8](repeating: 0x38, count: 32)),  // 0x38 is 1.0 in E4M3
            ("norm.weight", .bf16, [8], [UInt8](repeating: 0, count: 16)),
        ])
        try writeSafetensors(folder + "/model-00002-of-00002.safetensors", [
            ("a.weight_scale_inv", .f32, scaleShape, floatBytes([Float](repeating: 0.5, count: scaleShape.reduce(1, *)))),
        ])
        _ = dir.write("fp8/model.safetensors.index.json", text: #"{"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "norm.weight": "model-00001-of-00002.safetensors", "a.weight_scale_inv": "model-00002-of-00002.safetensors"}}"#)
        let quant = block.map { #", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [\#($0[0]), \#($0[1])]}"# } ?? ""
        _ = dir.write("fp8/config.json", text: #"{"model_type": "llama""# + quant + "}")
        return folder
    }

    @Test("the config's weight_block_size gives the block; the scale tensor may sit in another shard")
    func recognised() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let checkpoint = try Checkpoint(path: try Self.fp8Folder(dir, block: [2, 4], scaleShape: [2, 2]))
        #expect(checkpoint.tensor("a.weight")?.entry.encoding == .blockScaledFP8(.f8E4M3, scale: "a.weight_scale_inv", block: [2, 4]))
        #expect(checkpoint.tensor("norm.weight")?.entry.encoding == .plain(.bf16))
        #expect(checkpoint.warnings.isEmpty)
        let report = CheckpointReport(checkpoint)
        #expect(report.text(tensors: false).contains("encodings   F8_E4M3 with 2×4 block scales (F32, weight_scale_inv) × 1: 1.500 bytes per parameter, 1 scale tensor in another shard than the weight"))
        let json = JSONWriter.compact(report.json())
        #expect(json.contains(#""encoding":{"kind":"block_scaled_fp8","scale":"a.weight_scale_inv","block":[2,4]}"#))
    }

    @Test("without a config the block is 128×128; a scale of the wrong shape is named and the weight stays plain")
    func defaultsAndMismatch() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let single = try writeSafetensors(dir.file("one.safetensors"), [
            ("w.weight", .f8E4M3, [200, 130], [UInt8](repeating: 0, count: 200 * 130)),
            ("w.weight_scale_inv", .f32, [2, 2], floatBytes([1, 1, 1, 1])),
        ])
        #expect(try Checkpoint(path: single).tensor("w.weight")?.entry.encoding == .blockScaledFP8(.f8E4M3, scale: "w.weight_scale_inv", block: [128, 128]))
        let odd = try Checkpoint(path: try Self.fp8Folder(dir, block: [2, 4], scaleShape: [3, 2]))
        #expect(odd.tensor("a.weight")?.entry.encoding == .plain(.f8E4M3))
        #expect(odd.warnings.contains { $0.contains("a.weight_scale_inv is F32 [3, 2], not the F32 or F8_E8M0 [2, 2] that 2×4 block scales of a.weight [4, 8] need") })
    }

    @Test("3-D expert weights with UE8M0 (F8_E8M0) scales per expert and block")
    func expertsWithE8M0Scales() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let file = try writeSafetensors(dir.file("experts.safetensors"), [
            ("mlp.experts.down_proj.weight", .f8E4M3, [2, 130, 256], [UInt8](repeating: 0, count: 2 * 130 * 256)),
            ("mlp.experts.down_proj.weight_scale_inv", .f8E8M0, [2, 2, 2], [UInt8](repeating: 127, count: 8)),
        ])
        #expect(try Checkpoint(path: file).tensor("mlp.experts.down_proj.weight")?.entry.encoding
                == .blockScaledFP8(.f8E4M3, scale: "mlp.experts.down_proj.weight_scale_inv", block: [128, 128]))
    }

    @Test("a merge into a block-scaled E5M2 weight is refused by its encoding, before a byte is written (E4M3 is requantized)")
    func mergeRefused() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try Self.fp8Folder(dir, block: [2, 4], scaleShape: [2, 2], codes: .f8E5M2)
        // One PEFT module on `a`: A [1, 8], B [4, 1].
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.a.lora_A.weight", .f32, [1, 8], floatBytes([Float](repeating: 0.1, count: 8))),
            ("base_model.model.a.lora_B.weight", .f32, [4, 1], floatBytes([Float](repeating: 0.1, count: 4))),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1}"#)
        let error = #expect(throws: ProblemList.self) {
            try MergePlan(base: try Checkpoint(path: folder), inputs: [MergeInput(adapter: try Adapter(path: dir.file("ad")))])
        }
        #expect(error?.problems == ["module base_model.model.a: base tensor a.weight is F8_E5M2 with 2×4 block scales (a.weight_scale_inv); only E4M3 block-scaled weights are requantized"])
    }
}

/// `config.json` as transformers writes it for MoE and multimodal families: inspect names the
/// family, the experts per layer and the sub-models.
@Suite("model configs: family, experts and sub-models")
struct ModelConfigTests {
    static func describe(_ json: String) throws -> (ModelConfig?, [String]) {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("m/model.safetensors"), [("w.weight", .f32, [1], [0, 0, 0, 0])])
        _ = dir.write("m/config.json", text: json)
        let checkpoint = try Checkpoint(path: dir.file("m"))
        return (checkpoint.config, checkpoint.warnings)
    }

    @Test("Qwen3-MoE, DeepSeek-V3, Llama 4, LLaVA and a dense LLaMA, in transformers' field names")
    func families() throws {
        let qwen = try Self.describe(#"{"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128, "num_experts_per_tok": 8}"#).0
        #expect(qwen?.summary == "qwen3_moe (Qwen3MoeForCausalLM), 128 experts per layer, 8 per token")
        let deepseek = try Self.describe(#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}"#).0
        #expect(deepseek?.summary == "deepseek_v3, 256 experts per layer, 8 per token, 1 shared expert")
        #expect(deepseek?.weightBlockSize == [128, 128])
        let llama4 = try Self.describe(#"{"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 16, "num_experts_per_tok": 1}, "vision_config": {"model_type": "llama4_vision_model"}}"#).0
        #expect(llama4?.summary == "llama4, 16 experts per layer, 1 per token; text llama4_text, vision llama4_vision_model")
        let llava = try Self.describe(#"{"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "llama"}, "vision_config": {"model_type": "clip_vision_model"}}"#).0
        #expect(llava?.summary == "llava (LlavaForConditionalGeneration); text llama, vision clip_vision_model")
        #expect(llava?.isMixtureOfExperts == false)
        let report = CheckpointReport(try Checkpoint(path: fixture("models/tiny-llama")))
        #expect(report.text(tensors: false).contains("  model       llama (LlamaForCausalLM)\n"))
        #expect(JSONWriter.compact(report.json()).contains(#""model":{"model_type":"llama","architectures":["LlamaForCausalLM"],"experts":null"#))
    }

    @Test("a config.json that is not JSON is a warning, not a refusal: the folder still opens")
    func brokenConfig() throws {
        let (config, warnings) = try Self.describe("{not json")
        #expect(config == nil)
        #expect(warnings.contains { $0.hasPrefix("config.json cannot be read") })
    }
}
