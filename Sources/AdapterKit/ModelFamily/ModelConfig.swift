/// What a model folder's `config.json` says about the model, in transformers' own field names:
/// the family (`model_type`, `architectures`), Mixture-of-Experts sizes, and the sub-models of a
/// multimodal model. Read for `inspect` and for the name maps of families that need it.
public struct ModelConfig: Sendable, Equatable {
    public let modelType: String?
    public let architectures: [String]
    /// Routed experts per MoE layer: `num_experts` (Qwen2-MoE, Qwen3-MoE), `num_local_experts`
    /// (Mixtral, gpt-oss; Llama 4 in `text_config`), `n_routed_experts` (DeepSeek-V3).
    public let experts: Int?
    /// `num_experts_per_tok`.
    public let expertsPerToken: Int?
    /// `n_shared_experts` (DeepSeek-V3).
    public let sharedExperts: Int?
    /// A multimodal model's `text_config.model_type` and `vision_config.model_type`.
    public let textModelType: String?
    public let visionModelType: String?
    /// `quantization_config.weight_block_size` of block-scaled FP8 checkpoints (two positive integers).
    public let weightBlockSize: [Int]?
    /// compressed-tensors `float-quantized` FP8 weights (llm-compressor): the weights' strategy
    /// (`channel`, `tensor`, `block`) and, for `block`, its `block_structure`; nil for other configs.
    public let compressedFP8: CompressedFP8?
    /// The (text) model's attention shape, for the q/k/v rows of a fused `qkv_proj`:
    /// `num_attention_heads`, `num_key_value_heads` and `head_dim` (else hidden_size / heads).
    public let attentionHeads: Int?
    public let keyValueHeads: Int?
    public let headDim: Int?

    /// Reads `config.json` of `folder`; nil when there is none. A file that is not a JSON object
    /// gives nil and a warning (the merge copies it unchanged; only the description is lost).
    static func read(folder: String, warnings: inout [String]) -> ModelConfig? {
        let path = joinPath(folder, "config.json")
        guard FileSystem.kind(path) == .file else { return nil }
        let root: JSONObject
        do {
            guard let object = try readJSONFile(path).objectValue else {
                warnings.append("config.json is not a JSON object: the model's family is not known")
                return nil
            }
            root = object
        } catch {
            warnings.append("config.json cannot be read (\(error)): the model's family is not known")
            return nil
        }
        return ModelConfig(root)
    }

    init(_ root: JSONObject) {
        let text = root["text_config"]?.objectValue
        func count(_ o: JSONObject?, _ keys: [String]) -> Int? {
            for k in keys {
                if let v = o?[k]?.uint64, v > 0, v <= 1 << 24 { return Int(v) }
            }
            return nil
        }
        let expertKeys = ["num_experts", "num_local_experts", "n_routed_experts"]
        modelType = root["model_type"]?.stringValue
        // diffusers' configs name the class in `_class_name` instead.
        architectures = root["architectures"]?.arrayValue?.compactMap(\.stringValue) ?? root["_class_name"]?.stringValue.map { [$0] } ?? []
        experts = count(root, expertKeys) ?? count(text, expertKeys)
        expertsPerToken = count(root, ["num_experts_per_tok"]) ?? count(text, ["num_experts_per_tok"])
        sharedExperts = count(root, ["n_shared_experts"]) ?? count(text, ["n_shared_experts"])
        textModelType = text?["model_type"]?.stringValue
        visionModelType = root["vision_config"]?.objectValue?["model_type"]?.stringValue
        let block = root["quantization_config"]?.objectValue?["weight_block_size"]?.arrayValue?
            .compactMap { $0.uint64 }.filter { $0 > 0 && $0 <= 1 << 20 }.map { Int($0) }
        weightBlockSize = block?.count == 2 ? block : nil
        compressedFP8 = Self.compressedFP8(root["quantization_config"]?.objectValue)
        let heads = count(root, ["num_attention_heads"]) ?? count(text, ["num_attention_heads"])
        attentionHeads = heads
        keyValueHeads = count(root, ["num_key_value_heads"]) ?? count(text, ["num_key_value_heads"]) ?? heads
        let hidden = count(root, ["hidden_size"]) ?? count(text, ["hidden_size"])
        var dim = count(root, ["head_dim"]) ?? count(text, ["head_dim"])
        if dim == nil, let h = hidden, let n = heads, h % n == 0 { dim = h / n }
        headDim = dim
    }

    /// compressed-tensors' `float-quantized` format with 8-bit float weights: the strategy of the
    /// first config group that quantizes weights that way (every group of an FP8 model has the same).
    static func compressedFP8(_ q: JSONObject?) -> CompressedFP8? {
        guard let q, q["quant_method"]?.stringValue == "compressed-tensors", q["format"]?.stringValue == "float-quantized",
              let groups = q["config_groups"]?.objectValue else { return nil }
        for (_, group) in groups.members {
            guard let w = group.objectValue?["weights"]?.objectValue, w["type"]?.stringValue == "float", w["num_bits"]?.uint64 == 8,
                  let strategy = w["strategy"]?.stringValue else { continue }
            let block = w["block_structure"]?.arrayValue?.compactMap { $0.uint64 }.filter { $0 > 0 && $0 <= 1 << 20 }.map { Int($0) }
            return CompressedFP8(strategy: strategy, block: block?.count == 2 ? block : nil)
        }
        return nil
    }

    public var isMixtureOfExperts: Bool { (experts ?? 0) > 1 }

    public struct CompressedFP8: Sendable, Equatable {
        public let strategy: String
        public let block: [Int]?
    }

    /// "qwen3_moe (Qwen3MoeForCausalLM), 128 experts per layer, 8 per token".
    public var summary: String {
        var s = modelType ?? (architectures.isEmpty ? "unknown model_type" : "diffusers")
        if !architectures.isEmpty { s += " (\(architectures.joined(separator: ", ")))" }
        if let experts, experts > 1 {
            s += ", \(experts) experts per layer"
            if let expertsPerToken { s += ", \(expertsPerToken) per token" }
            if let sharedExperts { s += ", \(plural(sharedExperts, "shared expert"))" }
        }
        let parts = [textModelType.map { "text \($0)" }, visionModelType.map { "vision \($0)" }].compactMap { $0 }
        if !parts.isEmpty { s += "; " + parts.joined(separator: ", ") }
        return s
    }

    var json: JSONValue {
        var o = JSONObject()
        o["model_type"] = modelType.map { .string($0) } ?? .null
        o["architectures"] = .array(architectures.map { .string($0) })
        o["experts"] = experts.map { .integer($0) } ?? .null
        o["experts_per_token"] = expertsPerToken.map { .integer($0) } ?? .null
        o["shared_experts"] = sharedExperts.map { .integer($0) } ?? .null
        o["text_model_type"] = textModelType.map { .string($0) } ?? .null
        o["vision_model_type"] = visionModelType.map { .string($0) } ?? .null
        return .object(o)
    }
}
