/// Diffusion checkpoints in their original single-file layouts (SD 1.x/2.x and SDXL ldm, Flux
/// BFL, SD3 MMDiT), recognised by their keys, with the table that places diffusers module names
/// (what diffusers, PEFT and kohya's SD1 LoRAs name) on the original tensors: whole tensors, row
/// slices of fused ones (q/k/v in `qkv` and OpenCLIP's `in_proj_weight`, q/k/v/mlp in Flux's
/// `linear1`), and Flux/SD3's `norm_out`, whose two halves are stored the other way round.
///
/// The table is built forward, from the base's own keys to diffusers names, by the rules
/// diffusers' single-file converters apply (`loaders/single_file_utils.py`); the rules are in
/// docs/formats.md §15. The original names themselves (kohya's SDXL and Flux LoRAs use them) map
/// to their whole tensors.
struct DiffusionLayout: Sendable {
    enum Family: String, Sendable {
        case sd1 = "sd1", sd2 = "sd2", sdxl = "sdxl", fluxDev = "flux-dev", fluxSchnell = "flux-schnell", sd3 = "sd3", sd35 = "sd3.5"

        var description: String {
            switch self {
            case .sd1: "Stable Diffusion 1.x"
            case .sd2: "Stable Diffusion 2.x"
            case .sdxl: "Stable Diffusion XL"
            case .fluxDev: "Flux.1 dev"
            case .fluxSchnell: "Flux.1 schnell"
            case .sd3: "Stable Diffusion 3"
            case .sd35: "Stable Diffusion 3.5"
            }
        }
    }

    /// Where (part of) a module's update lands.
    struct Slot: Sendable, Hashable {
        let tensor: String
        /// Rows of the tensor (nil: all).
        var rows: Range<Int>? = nil
        /// Rows of the update that land there (nil: all of them).
        var updateRows: Range<Int>? = nil
    }

    let family: Family
    /// How `inspect` names the layout.
    let layout: String
    /// Component → module name (diffusers names, and the original names) → slots.
    private(set) var modules: [String: [String: [Slot]]] = [:]
    /// Component → kohya name (dots as underscores) → module name; nil where two collide.
    private(set) var kohya: [String: [String: String?]] = [:]

    /// Rows of a diffusers module and of an original module that are the same weights: what
    /// conversions between the two naming dialects move factors by. Both row ranges are resolved
    /// (never "all"); `originalRows` / `diffusersRows` totals are each module's full height.
    struct NamePair: Sendable, Hashable {
        let component: String
        let diffusers: String
        let diffusersRows: Range<Int>
        let original: String
        let originalRows: Range<Int>
    }
    private(set) var pairs: [NamePair] = []
    /// Rows of every module named in `pairs`, per component and name (diffusers and original names).
    private(set) var heights: [String: [String: Int]] = [:]
    /// Inputs (columns of the 2-D view) of every module named in `pairs`; the two sides of a pair share them.
    private(set) var widths: [String: [String: Int]] = [:]

    /// The denoiser's component name in diffusers (`unet` or `transformer`).
    var denoiser: String { [.sd1, .sd2, .sdxl].contains(family) ? "unet" : "transformer" }

    // MARK: - Recognising

    /// The layout of a base, or nil when its keys are not one of these layouts.
    static func detect(_ base: Checkpoint) -> DiffusionLayout? {
        func has(_ k: String) -> Bool { base.tensor(k) != nil }
        let prefixes = ["", "model.diffusion_model."]
        if let p = prefixes.first(where: { has($0 + "double_blocks.0.img_attn.qkv.weight") }) {
            let dev = has(p + "guidance_in.in_layer.weight")
            var d = DiffusionLayout(family: dev ? .fluxDev : .fluxSchnell,
                                    layout: "BFL single file" + (p.isEmpty ? "" : " under \(p) (ComfyUI)"))
            d.index(base, prefixes: [(p, "transformer", DiffusionLayout.flux)])
            return d
        }
        if let p = prefixes.first(where: { has($0 + "joint_blocks.0.x_block.attn.qkv.weight") }) {
            let v35 = base.tensors.contains { $0.entry.name.contains(".ln_q.") }
            var d = DiffusionLayout(family: v35 ? .sd35 : .sd3, layout: "MMDiT single file (joint_blocks.…)" + (p.isEmpty ? "" : " under \(p)"))
            d.index(base, prefixes: [(p, "transformer", DiffusionLayout.mmdit),
                                     ("text_encoders.clip_l.transformer.", "text_encoder", DiffusionLayout.clip),
                                     ("text_encoders.clip_g.transformer.", "text_encoder_2", DiffusionLayout.clip),
                                     ("text_encoders.t5xxl.transformer.", "text_encoder_3", DiffusionLayout.same)])
            return d
        }
        if let d = detectDiffusers(base) { return d }
        guard base.tensors.contains(where: { $0.entry.name.hasPrefix("model.diffusion_model.input_blocks.") }) else { return nil }
        let unet = ("model.diffusion_model.", "unet", ldmUNet(base))
        if base.tensors.contains(where: { $0.entry.name.hasPrefix("conditioner.embedders.1.model.") }) {
            var d = DiffusionLayout(family: .sdxl, layout: "ldm single file (model.diffusion_model.…, conditioner.embedders.0/1.…)")
            d.index(base, prefixes: [unet, ("conditioner.embedders.0.transformer.", "text_encoder", DiffusionLayout.clip),
                                     ("conditioner.embedders.1.model.", "text_encoder_2", DiffusionLayout.openCLIP)])
            return d
        }
        if base.tensors.contains(where: { $0.entry.name.hasPrefix("cond_stage_model.model.") }) {
            var d = DiffusionLayout(family: .sd2, layout: "ldm single file (model.diffusion_model.…, cond_stage_model.model.…)")
            d.index(base, prefixes: [unet, ("cond_stage_model.model.", "text_encoder", DiffusionLayout.openCLIP)])
            return d
        }
        var d = DiffusionLayout(family: .sd1, layout: "ldm single file (model.diffusion_model.…, cond_stage_model.transformer.…)")
        d.index(base, prefixes: [unet, ("cond_stage_model.transformer.", "text_encoder", DiffusionLayout.clip)])
        return d
    }

    /// A denoiser in diffusers' own names (a pipeline's `transformer/` or `unet/`, or such a file):
    /// its names need no table, but adapters in the original names (kohya's SDXL and Flux LoRAs,
    /// ComfyUI's) do, so the table maps those onto it, the other way round.
    private static func detectDiffusers(_ base: Checkpoint) -> DiffusionLayout? {
        func has(_ k: String) -> Bool { base.tensor(k) != nil }
        func rows(_ k: String) -> Int? { base.tensor(k)?.entry.shape.first }
        if has("single_transformer_blocks.0.proj_mlp.weight"), let d = rows("single_transformer_blocks.0.attn.to_q.weight") ?? rows("transformer_blocks.0.attn.to_q.weight"),
           d > 0, d < 1 << 31 {
            var l = DiffusionLayout(family: has("time_text_embed.guidance_embedder.linear_1.weight") ? .fluxDev : .fluxSchnell,
                                    layout: "diffusers (FluxTransformer2DModel names; BFL names are mapped onto them)")
            l.index(base, prefixes: [("", "transformer", fluxFromDiffusers(d))], forward: false)
            return l
        }
        if has("transformer_blocks.0.attn.add_q_proj.weight"), has("pos_embed.proj.weight") {
            let v35 = base.tensors.contains { $0.entry.name.contains(".norm_q.") }
            var l = DiffusionLayout(family: v35 ? .sd35 : .sd3, layout: "diffusers (SD3Transformer2DModel names; MMDiT names are mapped onto them)")
            l.index(base, prefixes: [("", "transformer", mmditFromDiffusers)], forward: false)
            return l
        }
        if has("conv_in.weight"), has("down_blocks.0.resnets.0.conv1.weight"), has("up_blocks.0.resnets.0.conv1.weight") {
            let family: Family = has("add_embedding.linear_1.weight") ? .sdxl : .sd1
            var l = DiffusionLayout(family: family, layout: "diffusers (UNet2DConditionModel names; ldm names are mapped onto them)")
            l.index(base, prefixes: [("", "unet", ldmFromDiffusers(base))], forward: false)
            return l
        }
        return nil
    }

    private init(family: Family, layout: String) {
        self.family = family
        self.layout = layout
    }

    /// A rule: the module path of a weight after its component prefix (without `.weight`), and
    /// its shape → the diffusers modules it holds.
    typealias Rule = @Sendable (_ path: String, _ shape: [Int]) -> [(String, Slot)]

    private mutating func index(_ base: Checkpoint, prefixes: [(prefix: String, component: String, rule: Rule)], forward: Bool = true) {
        for (entry, _) in base.tensors {
            let name = entry.name
            // The longest prefix that fits (`model.diffusion_model.` before "").
            guard let p = prefixes.filter({ name.hasPrefix($0.prefix) }).max(by: { $0.prefix.count < $1.prefix.count }) else { continue }
            let rest = String(name.dropFirst(p.prefix.count))
            let path: String
            if rest.hasSuffix(".weight") { path = String(rest.dropLast(".weight".count)) } else if rest.hasSuffix("_weight") {
                path = String(rest.dropLast("_weight".count))  // OpenCLIP's attn.in_proj_weight
            } else if rest.hasSuffix(".scale") {
                path = String(rest.dropLast(".scale".count))  // BFL's RMSNorm weights (query_norm.scale)
            } else { continue }
            let shape = entry.shape
            // A weight of no elements or of absurd dimensions is no module of these layouts (and
            // would overflow the row arithmetic): left out of the table, so nothing lands on it.
            guard !shape.isEmpty, shape.allSatisfy({ $0 > 0 && $0 < 1 << 31 }) else { continue }
            if !rest.hasSuffix("_weight") { add(p.component, path, Slot(tensor: name)) }
            let height = shape.first ?? 1
            for (module, slot) in p.rule(path, shape) {
                let placed = Slot(tensor: name, rows: slot.rows, updateRows: slot.updateRows)
                add(p.component, module, placed)
                // forward: `module` is a diffusers name whose update rows `updateRows` are rows `rows` of
                // this original tensor; otherwise `module` is an original name whose update rows
                // `updateRows` are rows `rows` of this diffusers tensor.
                let tensorRows = slot.rows ?? 0..<height
                let moduleRows = slot.updateRows ?? 0..<tensorRows.count
                pairs.append(forward
                    ? NamePair(component: p.component, diffusers: module, diffusersRows: moduleRows, original: path, originalRows: tensorRows)
                    : NamePair(component: p.component, diffusers: path, diffusersRows: tensorRows, original: module, originalRows: moduleRows))
                // The tensor's own name is as tall as the tensor; a module as tall as its rows reach.
                heights[p.component, default: [:]][path] = height
                heights[p.component, default: [:]][module] = max(heights[p.component]?[module] ?? 0, moduleRows.upperBound)
                let width = shape.dropFirst().reduce(1, *)
                widths[p.component, default: [:]][path] = width
                widths[p.component, default: [:]][module] = width
                // transformers 5 saves CLIP without `text_model.`; adapters trained on it name modules so.
                if module.hasPrefix("text_model.") { add(p.component, String(module.dropFirst("text_model.".count)), placed) }
            }
        }
    }

    private mutating func add(_ component: String, _ module: String, _ slot: Slot) {
        if modules[component, default: [:]][module]?.contains(slot) == true { return }
        modules[component, default: [:]][module, default: []].append(slot)
        let key = KohyaNames.key(module)
        if let existing = kohya[component]?[key], existing != module {
            kohya[component]![key] = .some(nil)
        } else {
            kohya[component, default: [:]][key] = .some(module)
        }
    }

    // MARK: - Looking up

    /// The component of the base a module's component stands for: kohya's `lora_unet_` and a
    /// single-model adapter (no component) are the denoiser of every family.
    func component(_ c: String?) -> String {
        switch c {
        case nil, "unet", "transformer": denoiser
        default: c!
        }
    }

    /// Where a module lands: nil when the table has no such module (the ordinary rules are tried then).
    func slots(for module: LoRAModule, format: AdapterFormat) -> [Slot]? {
        let c = component(module.component)
        var name = module.baseName
        if format == .kohya {
            // kohya's names have underscores for dots; ComfyUI's keep the dots.
            guard let found = kohya[c]?[KohyaNames.key(name)] ?? nil else { return nil }
            name = found
        }
        for candidate in [name] + Self.strippable.compactMap({ name.hasPrefix($0) ? String(name.dropFirst($0.count)) : nil }) {
            if let s = modules[c]?[candidate] { return s }
        }
        return nil
    }

    /// The module name of a Flux single block's q, k and v rows of `linear1` together (XLabs' `qkv_lora`).
    static let singleQKV = "linear1.qkv"

    /// Prefixes adapters put before module names that the table holds without them (ComfyUI
    /// saves BFL names under `diffusion_model.`).
    static let strippable = ["diffusion_model.", "model.diffusion_model.", "transformer.", "unet."]

    // MARK: - Rules

    static let same: Rule = { _, _ in [] }

    /// A block index small enough for the index arithmetic (nil otherwise).
    static func blockIndex(_ s: String) -> Int? {
        guard let i = Int(s), i >= 0, i < 1 << 20 else { return nil }
        return i
    }

    /// Thirds of a fused [q; k; v] weight.
    private static func thirds(_ shape: [Int], _ names: [String]) -> [(String, Slot)] {
        guard let rows = shape.first, rows % 3 == 0 else { return [] }
        let d = rows / 3
        return names.enumerated().map { i, n in (n, Slot(tensor: "", rows: i * d..<(i + 1) * d)) }
    }

    /// [shift; scale] stored, [scale; shift] in diffusers: each half of the update lands on the other half.
    private static func swapped(_ shape: [Int], _ name: String) -> [(String, Slot)] {
        guard let rows = shape.first, rows % 2 == 0 else { return [] }
        let d = rows / 2
        return [(name, Slot(tensor: "", rows: d..<rows, updateRows: 0..<d)), (name, Slot(tensor: "", rows: 0..<d, updateRows: d..<rows))]
    }

    private static func whole(_ name: String) -> [(String, Slot)] { [(name, Slot(tensor: ""))] }

    /// Flux.1 (BFL) → diffusers `FluxTransformer2DModel` (`convert_flux_transformer_checkpoint_to_diffusers`).
    static let flux: Rule = { path, shape in
            let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            if parts.count >= 3, parts[0] == "double_blocks" {
                let b = "transformer_blocks.\(parts[1])."
                switch parts.dropFirst(2).joined(separator: ".") {
                case "img_attn.qkv": return DiffusionLayout.thirds(shape, [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"])
                case "txt_attn.qkv": return DiffusionLayout.thirds(shape, [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"])
                case "img_attn.proj": return DiffusionLayout.whole(b + "attn.to_out.0")
                case "txt_attn.proj": return DiffusionLayout.whole(b + "attn.to_add_out")
                case "img_mlp.0": return DiffusionLayout.whole(b + "ff.net.0.proj")
                case "img_mlp.2": return DiffusionLayout.whole(b + "ff.net.2")
                case "txt_mlp.0": return DiffusionLayout.whole(b + "ff_context.net.0.proj")
                case "txt_mlp.2": return DiffusionLayout.whole(b + "ff_context.net.2")
                case "img_mod.lin": return DiffusionLayout.whole(b + "norm1.linear")
                case "txt_mod.lin": return DiffusionLayout.whole(b + "norm1_context.linear")
                case "img_attn.norm.query_norm": return DiffusionLayout.whole(b + "attn.norm_q")
                case "img_attn.norm.key_norm": return DiffusionLayout.whole(b + "attn.norm_k")
                case "txt_attn.norm.query_norm": return DiffusionLayout.whole(b + "attn.norm_added_q")
                case "txt_attn.norm.key_norm": return DiffusionLayout.whole(b + "attn.norm_added_k")
                default: return []
                }
            }
            if parts.count >= 3, parts[0] == "single_blocks" {
                let b = "single_transformer_blocks.\(parts[1])."
                switch parts.dropFirst(2).joined(separator: ".") {
                case "linear1":
                    // [q; k; v; mlp]: q, k, v are the hidden size (the weight's inputs) each.
                    guard shape.count == 2, shape[0] > 3 * shape[1] else { return [] }
                    let d = shape[1]
                    return [(b + "attn.to_q", Slot(tensor: "", rows: 0..<d)), (b + "attn.to_k", Slot(tensor: "", rows: d..<2 * d)),
                            (b + "attn.to_v", Slot(tensor: "", rows: 2 * d..<3 * d)), (b + "proj_mlp", Slot(tensor: "", rows: 3 * d..<shape[0])),
                            ("single_blocks.\(parts[1]).\(DiffusionLayout.singleQKV)", Slot(tensor: "", rows: 0..<3 * d))]
                case "linear2": return DiffusionLayout.whole(b + "proj_out")
                case "modulation.lin": return DiffusionLayout.whole(b + "norm.linear")
                case "norm.query_norm": return DiffusionLayout.whole(b + "attn.norm_q")
                case "norm.key_norm": return DiffusionLayout.whole(b + "attn.norm_k")
                default: return []
                }
            }
            let embedders = ["time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"]
            if parts.count == 2, let e = embedders[parts[0]] {
                return DiffusionLayout.whole("time_text_embed.\(e)." + (parts[1] == "in_layer" ? "linear_1" : "linear_2"))
            }
            switch path {
            case "img_in": return DiffusionLayout.whole("x_embedder")
            case "txt_in": return DiffusionLayout.whole("context_embedder")
            case "final_layer.linear": return DiffusionLayout.whole("proj_out")
            case "final_layer.adaLN_modulation.1": return DiffusionLayout.swapped(shape, "norm_out.linear")
            default: return []
            }
    }

    /// SD3 / 3.5 (MMDiT) → diffusers `SD3Transformer2DModel` (`convert_sd3_transformer_checkpoint_to_diffusers`).
    static let mmdit: Rule = { path, shape in
            let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            if parts.count >= 4, parts[0] == "joint_blocks" {
                let b = "transformer_blocks.\(parts[1])."
                let context = parts[2] == "context_block"
                switch (parts[2], parts.dropFirst(3).joined(separator: ".")) {
                case ("x_block", "attn.qkv"): return DiffusionLayout.thirds(shape, [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"])
                case ("context_block", "attn.qkv"): return DiffusionLayout.thirds(shape, [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"])
                case ("x_block", "attn2.qkv"): return DiffusionLayout.thirds(shape, [b + "attn2.to_q", b + "attn2.to_k", b + "attn2.to_v"])
                case ("x_block", "attn.proj"): return DiffusionLayout.whole(b + "attn.to_out.0")
                case ("context_block", "attn.proj"): return DiffusionLayout.whole(b + "attn.to_add_out")
                case ("x_block", "attn2.proj"): return DiffusionLayout.whole(b + "attn2.to_out.0")
                case (_, "mlp.fc1"): return DiffusionLayout.whole(b + (context ? "ff_context" : "ff") + ".net.0.proj")
                case (_, "mlp.fc2"): return DiffusionLayout.whole(b + (context ? "ff_context" : "ff") + ".net.2")
                case ("x_block", "adaLN_modulation.1"): return DiffusionLayout.whole(b + "norm1.linear")
                case ("context_block", "adaLN_modulation.1"):
                    // The last block's context branch (context_pre_only) holds [shift; scale] only.
                    guard let rows = shape.first, let cols = shape.last else { return [] }
                    return rows == 2 * cols ? DiffusionLayout.swapped(shape, b + "norm1_context.linear") : DiffusionLayout.whole(b + "norm1_context.linear")
                default: return []
                }
            }
            switch path {
            case "x_embedder.proj": return DiffusionLayout.whole("pos_embed.proj")
            case "t_embedder.mlp.0": return DiffusionLayout.whole("time_text_embed.timestep_embedder.linear_1")
            case "t_embedder.mlp.2": return DiffusionLayout.whole("time_text_embed.timestep_embedder.linear_2")
            case "y_embedder.mlp.0": return DiffusionLayout.whole("time_text_embed.text_embedder.linear_1")
            case "y_embedder.mlp.2": return DiffusionLayout.whole("time_text_embed.text_embedder.linear_2")
            case "final_layer.linear": return DiffusionLayout.whole("proj_out")
            case "final_layer.adaLN_modulation.1": return DiffusionLayout.swapped(shape, "norm_out.linear")
            default: return []
            }
    }

    /// CLIP in Hugging Face names: the path is the diffusers name.
    static let clip: Rule = { path, _ in whole(path) }

    /// OpenCLIP (SDXL's second encoder, SD2's) → `CLIPTextModel(WithProjection)` names (`convert_open_clip_checkpoint`).
    static let openCLIP: Rule = { path, shape in
        let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 5, parts[0] == "transformer", parts[1] == "resblocks" else { return [] }
        let l = "text_model.encoder.layers.\(parts[2])."
        switch parts.dropFirst(3).joined(separator: ".") {
        case "attn.in_proj": return thirds(shape, [l + "self_attn.q_proj", l + "self_attn.k_proj", l + "self_attn.v_proj"])
        case "attn.out_proj": return whole(l + "self_attn.out_proj")
        case "mlp.c_fc": return whole(l + "mlp.fc1")
        case "mlp.c_proj": return whole(l + "mlp.fc2")
        default: return []
        }
    }

    /// The ldm UNet → diffusers `UNet2DConditionModel` (`convert_ldm_unet_checkpoint`): L resnets
    /// per down level (its downsampler is input block 1 + b(L+1) + L), L + 1 per up level.
    static func ldmUNet(_ base: Checkpoint) -> Rule {
        var inputs = Set<Int>(), downsamplers: [Int] = []
        for (entry, _) in base.tensors {
            let n = entry.name
            guard n.hasPrefix("model.diffusion_model.input_blocks.") else { continue }
            let parts = n.dropFirst("model.diffusion_model.input_blocks.".count).split(separator: ".")
            guard let i = parts.first.flatMap({ blockIndex(String($0)) }) else { continue }
            inputs.insert(i)
            if parts.count >= 3, parts[1] == "0", parts[2] == "op" { downsamplers.append(i) }
        }
        // L + 1 (L ≥ 1: a downsampler at input block 0 or 1 is no layout these rules know).
        let perLevel = max(2, (downsamplers.min().map { $0 - 1 } ?? max(1, inputs.max() ?? 1)) + 1)
        let resnet: [String: String] = ["in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                                        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"]
        let resnetName: @Sendable ([String]) -> String? = { resnet[$0.joined(separator: ".")] }
        return { path, _ in
            let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            switch parts.first {
            case "input_blocks":
                if path == "input_blocks.0.0" { return whole("conv_in") }
                guard parts.count >= 4, let i = blockIndex(parts[1]), i > 0 else { return [] }
                let b = (i - 1) / perLevel, j = (i - 1) % perLevel
                if j == perLevel - 1 { return parts[2] == "0" && parts[3] == "op" && parts.count == 4 ? whole("down_blocks.\(b).downsamplers.0.conv") : [] }
                if parts[2] == "0" { return resnetName(Array(parts.dropFirst(3))).map { whole("down_blocks.\(b).resnets.\(j).\($0)") } ?? [] }
                if parts[2] == "1" { return whole("down_blocks.\(b).attentions.\(j)." + parts.dropFirst(3).joined(separator: ".")) }
                return []
            case "middle_block":
                guard parts.count >= 3 else { return [] }
                switch parts[1] {
                case "0": return resnetName(Array(parts.dropFirst(2))).map { whole("mid_block.resnets.0.\($0)") } ?? []
                case "1": return whole("mid_block.attentions.0." + parts.dropFirst(2).joined(separator: "."))
                case "2": return resnetName(Array(parts.dropFirst(2))).map { whole("mid_block.resnets.1.\($0)") } ?? []
                default: return []
                }
            case "output_blocks":
                guard parts.count >= 4, let i = blockIndex(parts[1]) else { return [] }
                let b = i / perLevel, j = i % perLevel
                if parts[2] == "0" { return resnetName(Array(parts.dropFirst(3))).map { whole("up_blocks.\(b).resnets.\(j).\($0)") } ?? [] }
                if parts[3] == "conv" && parts.count == 4 { return whole("up_blocks.\(b).upsamplers.0.conv") }
                if parts[2] == "1" { return whole("up_blocks.\(b).attentions.\(j)." + parts.dropFirst(3).joined(separator: ".")) }
                return []
            case "time_embed":
                return path == "time_embed.0" ? whole("time_embedding.linear_1") : path == "time_embed.2" ? whole("time_embedding.linear_2") : []
            case "label_emb":
                return path == "label_emb.0.0" ? whole("add_embedding.linear_1") : path == "label_emb.0.2" ? whole("add_embedding.linear_2") : []
            case "out":
                return path == "out.0" ? whole("conv_norm_out") : path == "out.2" ? whole("conv_out") : []
            default:
                return []
            }
        }
    }

    // MARK: - The other way: original names onto a diffusers denoiser

    /// Thirds of an original fused [q; k; v] update, each `d` rows, landing on q, k and v.
    private static func third(_ module: String, _ i: Int, _ d: Int) -> [(String, Slot)] {
        [(module, Slot(tensor: "", updateRows: i * d..<(i + 1) * d))]
    }

    /// [scale; shift] in diffusers, [shift; scale] in the original: the original update's first half lands on the second.
    private static func unswapped(_ shape: [Int], _ module: String) -> [(String, Slot)] {
        guard let rows = shape.first, rows % 2 == 0 else { return [] }
        let d = rows / 2
        return [(module, Slot(tensor: "", rows: d..<rows, updateRows: 0..<d)), (module, Slot(tensor: "", rows: 0..<d, updateRows: d..<rows))]
    }

    /// diffusers Flux names → the BFL module each is part of; `d` the hidden width (q's rows).
    static func fluxFromDiffusers(_ d: Int) -> Rule {
        { path, shape in
            let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            if parts.count >= 3, parts[0] == "transformer_blocks" {
                let b = "double_blocks.\(parts[1])."
                switch parts.dropFirst(2).joined(separator: ".") {
                case "attn.to_q": return third(b + "img_attn.qkv", 0, d)
                case "attn.to_k": return third(b + "img_attn.qkv", 1, d)
                case "attn.to_v": return third(b + "img_attn.qkv", 2, d)
                case "attn.add_q_proj": return third(b + "txt_attn.qkv", 0, d)
                case "attn.add_k_proj": return third(b + "txt_attn.qkv", 1, d)
                case "attn.add_v_proj": return third(b + "txt_attn.qkv", 2, d)
                case "attn.to_out.0": return whole(b + "img_attn.proj")
                case "attn.to_add_out": return whole(b + "txt_attn.proj")
                case "ff.net.0.proj": return whole(b + "img_mlp.0")
                case "ff.net.2": return whole(b + "img_mlp.2")
                case "ff_context.net.0.proj": return whole(b + "txt_mlp.0")
                case "ff_context.net.2": return whole(b + "txt_mlp.2")
                case "norm1.linear": return whole(b + "img_mod.lin")
                case "norm1_context.linear": return whole(b + "txt_mod.lin")
                case "attn.norm_q": return whole(b + "img_attn.norm.query_norm")
                case "attn.norm_k": return whole(b + "img_attn.norm.key_norm")
                case "attn.norm_added_q": return whole(b + "txt_attn.norm.query_norm")
                case "attn.norm_added_k": return whole(b + "txt_attn.norm.key_norm")
                default: return []
                }
            }
            if parts.count >= 3, parts[0] == "single_transformer_blocks" {
                let b = "single_blocks.\(parts[1])."
                switch parts.dropFirst(2).joined(separator: ".") {
                case "attn.to_q": return third(b + "linear1", 0, d) + third(b + singleQKV, 0, d)
                case "attn.to_k": return third(b + "linear1", 1, d) + third(b + singleQKV, 1, d)
                case "attn.to_v": return third(b + "linear1", 2, d) + third(b + singleQKV, 2, d)
                case "proj_mlp": return [(b + "linear1", Slot(tensor: "", updateRows: 3 * d..<3 * d + (shape.first ?? 0)))]
                case "proj_out": return whole(b + "linear2")
                case "norm.linear": return whole(b + "modulation.lin")
                case "attn.norm_q": return whole(b + "norm.query_norm")
                case "attn.norm_k": return whole(b + "norm.key_norm")
                default: return []
                }
            }
            let embedders = ["timestep_embedder": "time_in", "text_embedder": "vector_in", "guidance_embedder": "guidance_in"]
            if parts.count == 3, parts[0] == "time_text_embed", let e = embedders[parts[1]] {
                return whole(e + (parts[2] == "linear_1" ? ".in_layer" : ".out_layer"))
            }
            switch path {
            case "x_embedder": return whole("img_in")
            case "context_embedder": return whole("txt_in")
            case "proj_out": return whole("final_layer.linear")
            case "norm_out.linear": return unswapped(shape, "final_layer.adaLN_modulation.1")
            default: return []
            }
        }
    }

    /// diffusers SD3 names → the MMDiT module each is part of.
    static let mmditFromDiffusers: Rule = { path, shape in
        let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        let d = shape.first ?? 0
        if parts.count >= 3, parts[0] == "transformer_blocks" {
            let b = "joint_blocks.\(parts[1])."
            switch parts.dropFirst(2).joined(separator: ".") {
            case "attn.to_q": return third(b + "x_block.attn.qkv", 0, d)
            case "attn.to_k": return third(b + "x_block.attn.qkv", 1, d)
            case "attn.to_v": return third(b + "x_block.attn.qkv", 2, d)
            case "attn.add_q_proj": return third(b + "context_block.attn.qkv", 0, d)
            case "attn.add_k_proj": return third(b + "context_block.attn.qkv", 1, d)
            case "attn.add_v_proj": return third(b + "context_block.attn.qkv", 2, d)
            case "attn2.to_q": return third(b + "x_block.attn2.qkv", 0, d)
            case "attn2.to_k": return third(b + "x_block.attn2.qkv", 1, d)
            case "attn2.to_v": return third(b + "x_block.attn2.qkv", 2, d)
            case "attn.to_out.0": return whole(b + "x_block.attn.proj")
            case "attn.to_add_out": return whole(b + "context_block.attn.proj")
            case "attn2.to_out.0": return whole(b + "x_block.attn2.proj")
            case "ff.net.0.proj": return whole(b + "x_block.mlp.fc1")
            case "ff.net.2": return whole(b + "x_block.mlp.fc2")
            case "ff_context.net.0.proj": return whole(b + "context_block.mlp.fc1")
            case "ff_context.net.2": return whole(b + "context_block.mlp.fc2")
            case "norm1.linear": return whole(b + "x_block.adaLN_modulation.1")
            case "norm1_context.linear":
                guard let rows = shape.first, let cols = shape.last else { return [] }
                return rows == 2 * cols ? unswapped(shape, b + "context_block.adaLN_modulation.1") : whole(b + "context_block.adaLN_modulation.1")
            default: return []
            }
        }
        switch path {
        case "pos_embed.proj": return whole("x_embedder.proj")
        case "time_text_embed.timestep_embedder.linear_1": return whole("t_embedder.mlp.0")
        case "time_text_embed.timestep_embedder.linear_2": return whole("t_embedder.mlp.2")
        case "time_text_embed.text_embedder.linear_1": return whole("y_embedder.mlp.0")
        case "time_text_embed.text_embedder.linear_2": return whole("y_embedder.mlp.2")
        case "proj_out": return whole("final_layer.linear")
        case "norm_out.linear": return unswapped(shape, "final_layer.adaLN_modulation.1")
        default: return []
        }
    }

    /// diffusers UNet names → ldm names (the inverse of `ldmUNet`): L resnets per down level, read from the base.
    static func ldmFromDiffusers(_ base: Checkpoint) -> Rule {
        var resnets = Set<String>(), upAttention = Set<Int>()
        for (entry, _) in base.tensors {
            let parts = entry.name.split(separator: ".")
            if parts.count > 3, parts[0] == "down_blocks", parts[1] == "0", parts[2] == "resnets" { resnets.insert(String(parts[3])) }
            if parts.count > 2, parts[0] == "up_blocks", parts[2] == "attentions", let b = blockIndex(String(parts[1])) { upAttention.insert(b) }
        }
        let perLevel = max(1, resnets.count) + 1  // L + 1
        let withAttention = upAttention
        let resnet: [String: String] = ["norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                                        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"]
        let inner: @Sendable ([String]) -> String? = { resnet[$0.joined(separator: ".")] }
        return { path, _ in
            let parts = path.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            switch parts.first {
            case "down_blocks", "up_blocks":
                guard parts.count >= 4, let b = blockIndex(parts[1]) else { return [] }
                let down = parts[0] == "down_blocks"
                if parts[2] == "downsamplers" || parts[2] == "upsamplers" {
                    guard parts.count == 5, parts[3] == "0", parts[4] == "conv" else { return [] }
                    return down ? whole("input_blocks.\(1 + b * perLevel + perLevel - 1).0.op")
                        : whole("output_blocks.\(b * perLevel + perLevel - 1).\(withAttention.contains(b) ? 2 : 1).conv")
                }
                guard let j = blockIndex(parts[3]) else { return [] }
                let block = down ? "input_blocks.\(1 + b * perLevel + j)" : "output_blocks.\(b * perLevel + j)"
                if parts[2] == "resnets" { return inner(Array(parts.dropFirst(4))).map { whole(block + ".0." + $0) } ?? [] }
                if parts[2] == "attentions" { return whole(block + ".1." + parts.dropFirst(4).joined(separator: ".")) }
                return []
            case "mid_block":
                guard parts.count >= 4 else { return [] }
                switch (parts[1], parts[2]) {
                case ("resnets", "0"): return inner(Array(parts.dropFirst(3))).map { whole("middle_block.0." + $0) } ?? []
                case ("attentions", "0"): return whole("middle_block.1." + parts.dropFirst(3).joined(separator: "."))
                case ("resnets", "1"): return inner(Array(parts.dropFirst(3))).map { whole("middle_block.2." + $0) } ?? []
                default: return []
                }
            default:
                let top = ["conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"]
                return top[path].map { whole($0) } ?? []
            }
        }
    }
}
