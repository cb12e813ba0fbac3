/// Where an adapter module's update lands in a base model: a tensor and the rows of its 2-D view.
public struct UpdateTarget: Sendable, Hashable {
    public let tensor: String
    public let rows: RowPlacement
    /// Columns of the tensor's 2-D view the rows are counted in (nil: every dimension after the
    /// first); a 3-D expert tensor [E, out, in] is viewed as [E·out, in].
    public var viewColumns: Int? = nil
    /// The view holds the update transposed: its rows are the update's inputs and its columns the
    /// outputs (gpt-oss and Llama 4 store experts as [E, in, out]).
    public var transposed = false
    /// The view's columns the update's columns land on (nil: all, in order): gpt-oss interleaves
    /// gate and up along the last dimension, so the gate's outputs are columns 0, 2, 4, ….
    public var columns: StridedRange? = nil

    public init(tensor: String, rows: RowPlacement, viewColumns: Int? = nil, transposed: Bool = false, columns: StridedRange? = nil) {
        self.tensor = tensor
        self.rows = rows
        self.viewColumns = viewColumns
        self.transposed = transposed
        self.columns = columns
    }
}

/// One update placed: the module (or one expert's slice of a `target_parameters` module) and where it lands.
public struct UpdatePlacement: Sendable {
    public let module: LoRAModule
    public let target: UpdateTarget
}

/// Adapter module names → base tensors, per adapter layout, as tables of rules.
///
/// Two halves: the adapter side (`component(of:format:)`: a stored module name → its component
/// and its name in base-model terms, from each layout's prefix table) and the base side
/// (`target(for:format:)`: that name → the base tensor, by each layout's ordered lookup rules
/// against an index of the base's names built once). A new model family (expert tensors, fused
/// projections, llama.cpp names, diffusion single-file layouts) is a new rule that may also return
/// a row placement; the merge plan and the converters only ask this map.
public struct NameMap: Sendable {
    /// One way to find a module's weight among the base's tensors.
    enum Rule: Sendable {
        /// `<name>.weight`.
        case exact
        /// `<prefix><name>.weight` (`model.` for adapters saved without the top-level name).
        case adding(String)
        /// `<name without prefix>.weight` (adapters saved with a top-level name the base lacks).
        case removing(String)
        /// The one base weight whose path after its first component equals the module's after
        /// its first component (PaddleNLP's `llama.` for transformers' `model.`).
        case anyFirstComponent
        /// kohya: the base weight whose path with dots replaced by underscores is the module's.
        case underscored
    }

    /// The lookup rules per layout, tried in order; the first that finds a tensor wins.
    static func rules(_ format: AdapterFormat) -> [Rule] {
        switch format {
        case .kohya: [.underscored]
        // CLIP text encoders: transformers 5 saves them without `text_model.`, adapters trained on
        // transformers 4 name modules with it (and the other way round).
        case .peft, .diffusers, .mlx, .paddle, .mytransformers:
            [.exact, .adding("model."), .removing("model."), .removing("text_model."), .adding("text_model."), .anyFirstComponent]
        }
    }

    let base: Checkpoint
    /// The base's family (renames, expert layouts), nil when neither config.json nor its names tell.
    let family: ModelFamily?
    /// kohya: base keys without `.weight`, dots replaced by underscores → base key (nil when two collide).
    let underscored: [String: String?]
    /// Base names by what follows their first component (`model.layers.0.q.weight` under
    /// `layers.0.q.weight`) → the name (nil when two share it).
    let byRest: [String: String?]
    /// The base's single-file diffusion layout (Flux, SD3, SD 1/2/XL), when its keys are one.
    let diffusion: DiffusionLayout?

    /// Indexes the base's weight names once: resolving every module then costs time linear in
    /// modules + base tensors.
    public init(base: Checkpoint) {
        self.base = base
        var map: [String: String?] = [:]
        var rest: [String: String?] = [:]
        for (entry, _) in base.tensors {
            let name = entry.name
            guard name.hasSuffix(".weight") else { continue }
            let key = KohyaNames.key(String(name.dropLast(".weight".count)))
            map[key] = map[key] == nil ? .some(name) : .some(nil)
            if let dot = name.firstIndex(of: ".") {
                let after = String(name[name.index(after: dot)...])
                rest[after] = rest[after] == nil ? .some(name) : .some(nil)
            }
        }
        underscored = map
        byRest = rest
        family = ModelFamily.of(base)
        diffusion = DiffusionLayout.detect(base)
    }

    /// The base tensor (and rows) a whole module's update lands on, or nil when no rule finds
    /// exactly one (conversions, which need a module's own weight).
    public func target(for module: LoRAModule, format: AdapterFormat) -> UpdateTarget? {
        weightName(forModule: module.baseName, format: format).map { UpdateTarget(tensor: $0, rows: .all) }
    }

    /// Where a module's update lands: its own weight; or, for Mixture-of-Experts and fused
    /// layouts, one placement per expert or per slice. Fails with the reason when nothing fits.
    public func placements(for module: LoRAModule, format: AdapterFormat) -> Result<[UpdatePlacement], PlacementProblem> {
        if let parameter = module.parameter { return parameterPlacements(module, parameter, format: format) }
        if let d = diffusion, let slots = d.slots(for: module, format: format) { return diffusionPlacements(module, slots) }
        if let t = weightName(forModule: module.baseName, format: format) {
            // A LyCORIS convolution stored flattened takes its kernel shape from the base.
            let placed = module.flattened ? module.withKernel(shape(t)) ?? module : module
            return .success([UpdatePlacement(module: placed, target: UpdateTarget(tensor: t, rows: .all))])
        }
        if format != .kohya {
            if let expert = perExpertPlacement(module, format: format) { return expert }
            if let fused = fusedDensePlacement(module, format: format) { return fused }
        }
        return .failure(PlacementProblem(text: "no base tensor \(module.baseName).weight\(format == .kohya ? " (kohya names are matched from the base's keys)" : "")"))
    }

    /// The base tensor a full replacement (`modules_to_save`) of `name` lands on: the name itself,
    /// else its module under the layout's rules and the family's renames.
    func replacedTensor(_ name: String, format: AdapterFormat) -> String? {
        if base.tensor(name) != nil { return name }
        guard let dot = name.lastIndex(of: ".") else { return nil }
        return tensorName(forModule: String(name[..<dot]), suffix: String(name[dot...]), format: format)
    }

    /// The base weight for a module name in base-model terms.
    func weightName(forModule name: String, format: AdapterFormat) -> String? {
        // compressed-tensors' packed weights (NVFP4 `X.weight_packed`) stand for `X.weight`.
        tensorName(forModule: name, suffix: ".weight", format: format) ?? tensorName(forModule: name, suffix: ".weight_packed", format: format)
    }

    /// The base tensor `<name><suffix>` by the layout's rules, then under the family's renames.
    func tensorName(forModule name: String, suffix: String, format: AdapterFormat) -> String? {
        if let found = lookup(name, suffix: suffix, format: format) { return found }
        guard format != .kohya, let family else { return nil }
        var found: String?
        // Renames are prefixes ending in a dot: a module that is a whole prefix (`lm_head`) matches too.
        for candidate in family.renamed(name + ".").map({ String($0.dropLast()) }) {
            guard let t = lookup(candidate, suffix: suffix, format: format) else { continue }
            if found != nil && found != t { return nil }  // two renames reach two tensors: ambiguous
            found = t
        }
        return found
    }

    private func lookup(_ name: String, suffix: String, format: AdapterFormat) -> String? {
        for rule in Self.rules(format) {
            switch rule {
            case .exact:
                if base.tensor(name + suffix) != nil { return name + suffix }
            case .adding(let prefix):
                if base.tensor(prefix + name + suffix) != nil { return prefix + name + suffix }
            case .removing(let prefix):
                if name.hasPrefix(prefix), base.tensor(String(name.dropFirst(prefix.count)) + suffix) != nil {
                    return String(name.dropFirst(prefix.count)) + suffix
                }
            case .anyFirstComponent:
                guard suffix == ".weight", let dot = name.firstIndex(of: ".") else { continue }
                if let found = byRest[String(name[name.index(after: dot)...]) + suffix] { return found }
            case .underscored:
                let name = KohyaNames.key(name)  // ComfyUI keeps the dots of kohya-suffixed names
                if let found = underscored[name] { return found }
                // kohya's `lora_te_text_model_…` onto a CLIP saved without `text_model.` (transformers 5), and back.
                let alias = name.hasPrefix("text_model_") ? String(name.dropFirst("text_model_".count)) : "text_model_" + name
                if let found = underscored[alias] ?? nil { return found }
            }
        }
        return nil
    }

    private func shape(_ tensor: String) -> [Int] { base.tensor(tensor)?.entry.shape ?? [] }

    /// A module on a single-file diffusion base: each slot a placement, the module restricted to
    /// the update rows a slot takes (Flux's swapped `norm_out` halves).
    private func diffusionPlacements(_ module: LoRAModule, _ slots: [DiffusionLayout.Slot]) -> Result<[UpdatePlacement], PlacementProblem> {
        var out: [UpdatePlacement] = []
        // An update split over several tensors (or halves) must be exactly as tall as its parts.
        let split = slots.compactMap(\.updateRows)
        if !split.isEmpty {
            let rows = split.reduce(0) { $0 + $1.count }
            let targets = firstSeen(slots.map(\.tensor)).joined(separator: ", ")
            guard rows == module.outFeatures, split.allSatisfy({ $0.upperBound <= module.outFeatures }) else {
                return .failure(PlacementProblem(text: "the update has \(module.outFeatures) rows, but the parts it lands on (\(targets)) take \(rows)"))
            }
            guard module.orientation == .peft, module.b.shape.count == 2, module.bias == nil, module.magnitude == nil else {
                let what = module.bias != nil ? "a bias" : module.magnitude != nil ? "DoRA" : "a \(module.kind.rawValue) layer"
                return .failure(PlacementProblem(text: "its rows land on several tensors or halves (\(targets)), and \(what) cannot be split"))
            }
        }
        for slot in slots {
            var m = module.flattened ? module.withKernel(shape(slot.tensor)) ?? module : module
            if let u = slot.updateRows {
                m.b = m.b.slice(rows: StridedRange(u), columns: .all(m.rank), name: m.b.name + "[rows \(u.lowerBound)..<\(u.upperBound)]")
                m.dense = m.dense?.rows(u)
                m.name += " (rows \(u.lowerBound)..<\(u.upperBound))"
            }
            out.append(UpdatePlacement(module: m, target: UpdateTarget(tensor: slot.tensor, rows: slot.rows.map { .range($0) } ?? .all)))
        }
        return .success(out)
    }

    /// A kohya module name (underscores) as the dotted module path of this base, when exactly one fits.
    func dottedModule(forKohya name: String) -> String? {
        lookup(name, suffix: ".weight", format: .kohya).map { String($0.dropLast(".weight".count)) }
    }

    // MARK: - The adapter side

    /// The component and base-model name of a stored module name, by the layout's prefix table.
    static func component(of module: String, format: AdapterFormat) -> (component: String?, name: String) {
        switch format {
        case .peft:
            return (nil, module.hasPrefix("base_model.model.") ? String(module.dropFirst("base_model.model.".count)) : module)
        case .kohya:
            for (prefix, component) in KohyaNames.prefixes where module.hasPrefix(prefix) {
                return (component, String(module.dropFirst(prefix.count)))
            }
            return (nil, module)
        case .diffusers:
            if let bfl = XLabsNames.bfl(module) { return ("transformer", bfl) }
            for (prefix, component) in diffusersPrefixes where module.hasPrefix(prefix) {
                return (component, String(module.dropFirst(prefix.count)))
            }
            return (nil, module)
        case .mlx, .paddle, .mytransformers:
            return (nil, module)
        }
    }

    /// diffusers' component prefixes (longest first where one is a prefix of another).
    static let diffusersPrefixes: [(String, String)] = [
        ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"),
        ("transformer.", "transformer"),
    ]
}

/// kohya's names, read and written: a component prefix, then the module path with dots replaced
/// by underscores (which is why a base model is needed to get the dots back).
enum KohyaNames {
    /// Read: stored prefix → component.
    static let prefixes: [(String, String?)] = [
        ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
        ("lora_te_", "text_encoder"), ("lora_transformer_", "transformer"),
        // LyCORIS's generic wrapper (`lycoris/wrapper.py`): any model, no component.
        ("lycoris_", nil),
        // ComfyUI's LoraSave (`comfy_extras/nodes_lora_extract.py`): the model's own dotted keys.
        ("diffusion_model.", "unet"), ("text_encoders.clip_l.transformer.", "text_encoder"), ("text_encoders.clip_g.transformer.", "text_encoder_2"),
        ("text_encoders.t5xxl.transformer.", "text_encoder_3"),
    ]

    /// Write: the prefix for a component. Modules of a single model (LLMs, PEFT and mlx inputs) get
    /// `lora_unet_`, the prefix kohya-style loaders use for the main network.
    static func prefix(for component: String?, components: [String?]) -> String {
        switch component {
        case "text_encoder": components.contains("text_encoder_2") ? "lora_te1_" : "lora_te_"
        case "text_encoder_2": "lora_te2_"
        case "text_encoder_3": "lora_te3_"
        case "transformer": "lora_transformer_"
        default: "lora_unet_"
        }
    }

    /// A dotted module path as kohya writes it.
    static func key(_ dotted: String) -> String {
        String(dotted.map { $0 == "." ? "_" : $0 })
    }
}

/// XLabs' Flux LoRAs (x-flux): attention processors' LoRA layers under the BFL blocks, read as the
/// BFL modules they adapt (diffusers' `_convert_xlabs_flux_lora_to_diffusers` reads them the same
/// way). A single block's `qkv_lora` adapts q, k and v only: the first three quarters of
/// `linear1`'s q/k/v/mlp rows, a module of its own in the diffusion layout table.
enum XLabsNames {
    static func bfl(_ module: String) -> String? {
        var name = module
        if name.hasPrefix("diffusion_model.") { name.removeFirst("diffusion_model.".count) }
        let parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 4, parts[2] == "processor", Int(parts[1]) != nil else { return nil }
        let block = parts[0] + "." + parts[1] + "."
        switch (parts[0], parts[3]) {
        case ("double_blocks", "qkv_lora1"): return block + "img_attn.qkv"
        case ("double_blocks", "qkv_lora2"): return block + "txt_attn.qkv"
        case ("double_blocks", "proj_lora1"): return block + "img_attn.proj"
        case ("double_blocks", "proj_lora2"): return block + "txt_attn.proj"
        case ("single_blocks", "qkv_lora"): return block + DiffusionLayout.singleQKV
        case ("single_blocks", "proj_lora"): return block + "linear2"
        default: return nil
        }
    }
}
