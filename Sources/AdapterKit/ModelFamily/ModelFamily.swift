/// What a model family changes in the name map: the renames between the module names an adapter
/// is trained on (transformers 5's in-memory names) and the tensor names of checkpoints on disk,
/// and how its fused expert tensors are laid out.
///
/// transformers 5 keeps these renames per `model_type` in `conversion_mapping.py` (applied when
/// loading, reversed by `save_pretrained`); checkpoints on the hub are often older than either
/// direction, so every rename is tried both ways and a name must find exactly one tensor.
struct ModelFamily: Sendable {
    /// One rename: `from` → `to` at the start of a name (`anchored`) or its first occurrence inside it.
    struct Rename: Sendable {
        let from: String
        let to: String
        var anchored = true
    }

    let name: String
    let renames: [Rename]
    /// Fused expert tensors are stored [E, in, out] (`x @ W`): gpt-oss, Aria (transformers'
    /// `use_experts_implementation(is_transposed=True)`), and Llama 4, which multiplies the same way.
    let expertsTransposed: Bool
    /// The transposed gate_up's last dimension alternates gate and up (gpt-oss: `gate_up[..., ::2]`);
    /// otherwise gate is the first half.
    let gateUpInterleaved: Bool
    /// PEFT's ParamWrapper treats these classes as `is_transposed` (the delta of expert e is
    /// (B·A)ᵀ): transformers' experts marked `is_transposed=True`. Llama 4 is not marked, so PEFT
    /// adds B·A in the stored [in, out] orientation there.
    let parameterWrapperTransposed: Bool

    /// LLaVA-style multimodal models (`conversion_mapping.py` "llava", "LlavaModel"): language model
    /// under `model.language_model.` in memory, `language_model.model.` on the hub; the vision
    /// tower with or without CLIP's / SigLIP's `vision_model.`.
    static let llavaRenames: [Rename] = [
        Rename(from: "model.language_model.", to: "language_model.model."),
        Rename(from: "lm_head.", to: "language_model.lm_head."),
        Rename(from: "model.vision_tower.", to: "vision_tower.vision_model."),
        Rename(from: "model.vision_tower.", to: "vision_tower."),
        Rename(from: "model.multi_modal_projector.", to: "multi_modal_projector."),
    ]
    /// Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`): `model.language_model.` and
    /// `model.visual.` in memory, `model.` and `visual.` on disk.
    static let qwenVLRenames: [Rename] = [
        Rename(from: "model.language_model.", to: "model."),
        Rename(from: "model.visual.", to: "visual."),
    ]
    /// Mixtral (`conversion_mapping.py` "mixtral"): `.mlp.` in memory, `.block_sparse_moe.` on disk.
    static let mixtralRenames: [Rename] = [
        Rename(from: ".mlp.experts.", to: ".block_sparse_moe.experts.", anchored: false),
        Rename(from: ".mlp.gate.", to: ".block_sparse_moe.gate.", anchored: false),
    ]

    static let llava: Set<String> = ["llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava", "mistral3", "aya_vision",
                                     "gemma3", "paligemma", "internvl", "got_ocr2", "aria"]
    static let qwenVL: Set<String> = ["qwen2_vl", "qwen2_5_vl"]
    static let mixtral: Set<String> = ["mixtral", "minimax"]
    /// Families whose names need no rename, known so that `inspect` can name them.
    static let plain: Set<String> = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "qwen2_moe", "qwen3_moe",
                                     "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4", "llama4_text", "olmoe", "gpt2", "phi"]

    static func named(_ type: String) -> ModelFamily? {
        let transposed = ["gpt_oss", "aria", "llama4", "llama4_text"].contains(type)
        let wrapperTransposed = ["gpt_oss", "aria"].contains(type)
        let renames: [Rename]
        if llava.contains(type) { renames = llavaRenames } else if qwenVL.contains(type) { renames = qwenVLRenames } else if mixtral.contains(type) {
            renames = mixtralRenames
        } else if plain.contains(type) { renames = [] } else { return nil }
        return ModelFamily(name: type, renames: renames, expertsTransposed: transposed, gateUpInterleaved: type == "gpt_oss",
                           parameterWrapperTransposed: wrapperTransposed)
    }

    /// The family of a base: its `config.json`'s `model_type`; without a config (a single file),
    /// what its tensor names show (nil when they show nothing known).
    static func of(_ base: Checkpoint) -> ModelFamily? {
        if let type = base.config?.modelType { return named(type) }
        var sawRouterBias = false, sawGateUpBias = false
        for (entry, _) in base.tensors {
            let n = entry.name
            if n.contains(".block_sparse_moe.experts.") { return named("mixtral") }
            if n.hasPrefix("language_model.model.") || n.hasPrefix("multi_modal_projector.") { return named("llava") }
            if n.hasPrefix("visual.blocks.") { return named("qwen2_vl") }
            if n.hasSuffix(".mlp.router.bias") { sawRouterBias = true }
            if n.hasSuffix(".mlp.experts.gate_up_proj_bias") { sawGateUpBias = true }
        }
        return sawRouterBias && sawGateUpBias ? named("gpt_oss") : nil
    }

    /// `name` under every rename that applies, either way, in table order (the name itself not included).
    func renamed(_ name: String) -> [String] {
        var out: [String] = []
        for r in renames {
            for (a, b) in [(r.from, r.to), (r.to, r.from)] {
                if r.anchored {
                    if name.hasPrefix(a) { out.append(b + name.dropFirst(a.count)) }
                } else if let range = name.range(of: a) {
                    out.append(name.replacingCharacters(in: range, with: b))
                }
            }
        }
        return out
    }
}

/// What `inspect` says of a base's layout: the family recognised, how its experts are stored, how
/// many parameters are experts' and how many dense, and the multimodal key layout.
struct BaseLayout: Sendable {
    let family: String?
    /// "per expert (2-D)", "fused [E, out, in]", "fused [E, in, out]" (with gpt-oss's interleave).
    let expertStorage: String?
    let expertsPerLayer: Int?
    let expertLayers: Int
    let expertParameters: Int
    let denseParameters: Int
    /// The multimodal prefix style: "hub (language_model.model.…)" or "transformers 5 (model.language_model.…)".
    let keyLayout: String?

    /// The components a single-file diffusion checkpoint holds, in diffusers' names.
    let components: [String]

    init(_ base: Checkpoint) {
        let family = ModelFamily.of(base)
        let diffusion = DiffusionLayout.detect(base)
        self.family = diffusion.map { "\($0.family.rawValue) (\($0.family.description))" } ?? family?.name
        components = diffusion.map { d in ["unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"].filter { d.modules[$0] != nil } } ?? []
        var perExpert = Set<Int>(), layers = Set<String>(), fused = false, fusedExperts: Int?, mxfp4 = false
        var expert = 0, dense = 0
        var hub = false, memory = false, qwenDisk = false
        for (entry, _) in base.tensors {
            let n = entry.name
            if n.hasPrefix("language_model.model.") || n.hasPrefix("vision_tower.vision_model.") { hub = true }
            if n.hasPrefix("model.language_model.") { memory = true }
            if n.hasPrefix("visual.") { qwenDisk = true }
            // Parameters are values: MXFP4 blocks hold two per byte; their exponents are not parameters.
            if case .mxfp4 = entry.encoding { mxfp4 = true }
            if base.scaleTensorNames.contains(n) { continue }
            guard let range = n.range(of: ".experts.") else { dense += entry.valueCount; continue }
            expert += entry.valueCount
            layers.insert(String(n[..<range.lowerBound]))
            let rest = n[range.upperBound...]
            if let e = rest.split(separator: ".").first.flatMap({ Int($0) }) {
                perExpert.insert(e)
            } else if entry.encoding.valueShape(entry.shape).count == 3 {
                fused = true
                fusedExperts = entry.shape[0]
            }
        }
        expertParameters = expert
        denseParameters = dense
        expertLayers = layers.count
        if fused {
            let transposed = family?.expertsTransposed == true
            let layout = transposed ? "fused [E, in, out]" + (family?.gateUpInterleaved == true ? ", gate and up interleaved" : "") : "fused [E, out, in]"
            expertStorage = mxfp4 ? "as MXFP4 blocks [E, out, in/32, 16] (the parameter: \(layout))" : layout
            expertsPerLayer = fusedExperts
        } else if !perExpert.isEmpty {
            expertStorage = "per expert (2-D)"
            expertsPerLayer = perExpert.count
        } else {
            expertStorage = nil
            expertsPerLayer = nil
        }
        if let diffusion {
            keyLayout = diffusion.layout
        } else if hub {
            keyLayout = "hub (language_model.model.…)"
        } else if memory {
            keyLayout = "transformers 5 (model.language_model.…)"
        } else if qwenDisk {
            keyLayout = "Qwen2-VL on disk (model.… and visual.…)"
        } else {
            keyLayout = nil
        }
    }

    var lines: [String] {
        var out: [String] = []
        if let family { out.append("family      \(family)") }
        if let expertStorage, let expertsPerLayer {
            out.append("experts     \(expertsPerLayer) per layer in \(plural(expertLayers, "layer")), stored \(expertStorage); \(formatCount(expertParameters)) expert parameters, \(formatCount(denseParameters)) dense")
        }
        if let keyLayout { out.append("key layout  \(keyLayout)") }
        if !components.isEmpty { out.append("components  \(components.joined(separator: ", ")) (adapter modules in diffusers' names are placed on these keys)") }
        return out
    }

    var json: JSONValue {
        .object(JSONObject([
            ("family", family.map { .string($0) } ?? .null),
            ("expert_storage", expertStorage.map { .string($0) } ?? .null),
            ("experts_per_layer", expertsPerLayer.map { .integer($0) } ?? .null),
            ("expert_layers", .integer(expertLayers)),
            ("expert_parameters", .integer(expertParameters)),
            ("dense_parameters", .integer(denseParameters)),
            ("key_layout", keyLayout.map { .string($0) } ?? .null),
            ("components", .array(components.map { .string($0) })),
        ]))
    }
}
