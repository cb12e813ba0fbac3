/// Finds, reads and normalises adapters of every supported layout.
enum AdapterLoader {
    struct Located {
        var format: AdapterFormat
        var weights: String
        var configPath: String?
        var config: JSONObject?
        var store: any TensorContainer
    }

    struct Loaded {
        var format: AdapterFormat
        var store: any TensorContainer
        var configPath: String?
        var config: JSONObject?
        var modules: [LoRAModule]
        var replacements: [Replacement]
        var unknownKeys: [String]
        var warnings: [String]
    }

    // MARK: - Finding the files

    static func locate(_ path: String, files: TensorFiles = TensorFiles()) throws -> Located {
        switch FileSystem.kind(path) {
        case .missing: throw InputError(path, "no such file or folder")
        case .other: throw InputError(path, "not a regular file or folder but \((FileSystem.type(path) ?? .unknown).phrase)")
        case .directory: return try locateFolder(path, files: files)
        case .file:
            let folder = parentPath(path)
            let name = lastPathComponent(path)
            let config = joinPath(folder, "adapter_config.json")
            if ["adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors"].contains(name), FileSystem.kind(config) == .file {
                var located = try locateFolder(folder, files: files)
                if located.weights != path {
                    located.weights = path
                    located.store = try files.open(path)
                }
                return located
            }
            let store = try files.open(path)
            guard let format = detectFormat(store.entries.lazy.map(\.name)) else {
                throw InputError(path, "no LoRA or MoSLoRA keys found: this is not an adapter")
            }
            return Located(format: format, weights: path, configPath: nil, config: nil, store: store)
        }
    }

    private static func locateFolder(_ folder: String, files: TensorFiles) throws -> Located {
        // Whatever is at a known name is the file meant: a FIFO or a folder there is refused when
        // it is opened, instead of being passed over for a misleading "not found".
        func file(_ name: String) -> String? {
            let p = joinPath(folder, name)
            return FileSystem.kind(p) == .missing ? nil : p
        }
        if let configPath = file("adapter_config.json") {
            guard let config = try readJSONFile(configPath).objectValue else { throw InputError(configPath, "the config is not a JSON object") }
            if config["lora_parameters"] != nil || config["fine_tune_type"] != nil {
                guard let weights = file("adapters.safetensors") else { throw InputError(folder, "mlx adapter folder without adapters.safetensors") }
                return Located(format: .mlx, weights: weights, configPath: configPath, config: config, store: try files.open(weights))
            }
            guard let weights = file("adapter_model.safetensors") ?? file("adapter_model.bin") else {
                throw InputError(folder, "adapter_config.json is here but neither adapter_model.safetensors nor adapter_model.bin")
            }
            let store = try files.open(weights)
            let byKeys = detectFormat(store.entries.lazy.map(\.name))
            let format: AdapterFormat = byKeys == .mytransformers ? .mytransformers : .peft
            return Located(format: format, weights: weights, configPath: configPath, config: config, store: store)
        }
        if let weights = file("adapters.safetensors") {
            return Located(format: .mlx, weights: weights, configPath: nil, config: nil, store: try files.open(weights))
        }
        let entries = try FileSystem.contents(ofDirectory: folder)
        let tensorFiles = entries.filter { $0.hasSuffix(".safetensors") || $0.hasSuffix(".bin") || $0.hasSuffix(".pt") || $0.hasSuffix(".ckpt") }.sorted()
        if let configPath = file("lora_config.json") {
            guard let config = try readJSONFile(configPath).objectValue else { throw InputError(configPath, "the config is not a JSON object") }
            guard let name = tensorFiles.first(where: { $0.hasPrefix("lora_model") }) ?? (tensorFiles.count == 1 ? tensorFiles.first : nil) else {
                throw InputError(folder, "lora_config.json is here but no lora_model_state.safetensors")
            }
            let weights = joinPath(folder, name)
            return Located(format: .paddle, weights: weights, configPath: configPath, config: config, store: try files.open(weights))
        }
        // A sharded model folder is not an adapter: do not open its shards looking for LoRA keys.
        let isShardedModel = entries.contains { $0.hasSuffix(".safetensors.index.json") }
        for name in isShardedModel ? [] : tensorFiles.prefix(4) {
            let weights = joinPath(folder, name)
            // Subfolders are passed over; a FIFO, socket or device is refused, never opened.
            if let type = FileSystem.type(weights), type != .regular && type != .directory {
                throw InputError(weights, "not a regular file but \(type.phrase)")
            }
            guard let store = try? files.open(weights), let format = detectFormat(store.entries.lazy.map(\.name)) else { continue }
            let configPath = file("config.json")
            let config = try configPath.flatMap { try readJSONFile($0).objectValue }
            return Located(format: format, weights: weights, configPath: format == .mytransformers ? configPath : nil,
                           config: format == .mytransformers ? config : nil, store: store)
        }
        throw InputError(folder, "no adapter found (no adapter_config.json, adapters.safetensors, lora_config.json, or file of LoRA keys)")
    }

    /// Decides a layout from tensor names alone, in one pass over them (the first rule, in this
    /// order, that any name meets).
    static func detectFormat<Keys: Collection<String>>(_ keys: Keys) -> AdapterFormat? {
        var found: [Bool] = Array(repeating: false, count: 7)
        for k in keys {
            if k.hasPrefix("lora_unet_") || k.hasPrefix("lora_te") || k.hasPrefix("lora_transformer_") || k.hasPrefix("lycoris_") { return .kohya }
            // ComfyUI's LoraSave: the model's own keys under diffusion_model. / text_encoders., kohya's suffixes.
            if (k.hasPrefix("diffusion_model.") || k.hasPrefix("text_encoders.")),
               k.hasSuffix(".lora_down.weight") || k.hasSuffix(".lora_up.weight") || k.hasSuffix(".diff") || k.hasSuffix(".diff_b") { return .kohya }
            if k.hasSuffix(".lora.down.weight") || k.hasSuffix(".lora.up.weight") || k.hasSuffix(".lora_linear_layer.down.weight") { found[1] = true }
            if k.contains(".processor.qkv_lora") || k.contains(".processor.proj_lora") { found[1] = true }  // XLabs Flux
            if k.hasSuffix(".lora_A.weight") && (k.hasPrefix("unet.") || k.hasPrefix("text_encoder") || k.hasPrefix("transformer.")) { found[2] = true }
            if k.hasSuffix(".weight_a") || k.hasSuffix(".weight_ab_mixer") { found[3] = true }
            if k.hasSuffix(".lora_a") || k.hasSuffix(".lora_b") { found[4] = true }
            if k.hasSuffix(".lora_A") || k.hasSuffix(".lora_B") { found[5] = true }
            if k.hasSuffix(".lora_A.weight") || k.hasSuffix(".lora_embedding_A") || k.hasSuffix(".lora_B.weight") { found[6] = true }
        }
        let formats: [AdapterFormat?] = [.kohya, .diffusers, .diffusers, .mytransformers, .mlx, .paddle, .peft]
        return found.firstIndex(of: true).flatMap { formats[$0] }
    }

    // MARK: - Key roles

    enum Role: Sendable, Hashable {
        case a, b, mixer, alpha, magnitude, biasB, embeddingA, embeddingB
        /// A LyCORIS tensor (LoHa, LoKr, full diff, `dora_scale`).
        case lycoris(LyCORISRole)
    }

    /// Exact key suffixes per layout. Matched as whole dotted suffixes, longest first, so that
    /// `lora_AB.weight` (a mixer) is never read as `lora_A`.
    static func suffixes(_ format: AdapterFormat) -> [(suffix: String, role: Role)] {
        let rules: [(String, Role)]
        switch format {
        case .peft:
            rules = [(".lora_A.weight", .a), (".lora_B.weight", .b), (".lora_AB.weight", .mixer), (".lora_mixer.weight", .mixer),
                     (".lora_B.bias", .biasB), (".lora_magnitude_vector", .magnitude), (".lora_magnitude_vector.weight", .magnitude),
                     (".lora_embedding_A", .embeddingA), (".lora_embedding_B", .embeddingB)]
        case .kohya:
            // LyCORIS writes its modules under kohya's names (`lycoris/kohya.py`).
            rules = [(".lora_down.weight", .a), (".lora_up.weight", .b), (".lora_mixer.weight", .mixer), (".alpha", .alpha)]
                + LyCORISRole.allCases.map { ("." + $0.rawValue, .lycoris($0)) }
        case .diffusers:
            // `lora.down/up`: diffusers' old UNet attention names; `lora_linear_layer.down/up`: its old
            // text-encoder (CLIP q/k/v/out_proj) names; `lora_A/B`: PEFT's, which diffusers writes now.
            rules = [(".lora.down.weight", .a), (".lora.up.weight", .b), (".lora.downB.weight", .mixer),
                     (".lora_linear_layer.down.weight", .a), (".lora_linear_layer.up.weight", .b), (".lora_linear_layer.downB.weight", .mixer),
                     (".lora_A.weight", .a), (".lora_B.weight", .b), (".lora_AB.weight", .mixer), (".lora_mixer.weight", .mixer),
                     (".lora_magnitude_vector", .magnitude), (".alpha", .alpha),
                     // XLabs Flux processors: `<block>.processor.qkv_lora1.down.weight`.
                     (".down.weight", .a), (".up.weight", .b),
                     // Weight and bias differences beside (or instead of) a pair, as kohya and ComfyUI write them.
                     (".diff", .lycoris(.diff)), (".diff_b", .lycoris(.diffB))]
        case .mlx:
            rules = [(".lora_a", .a), (".lora_b", .b), (".m", .magnitude)]
        case .paddle:
            rules = [(".lora_A", .a), (".lora_B", .b), (".lora_AB", .mixer)]
        case .mytransformers:
            rules = [(".weight_a", .a), (".weight_b", .b), (".weight_ab_mixer", .mixer)]
        }
        return rules.sorted { $0.0.count > $1.0.count }
    }

    static func orientation(_ format: AdapterFormat) -> FactorOrientation {
        switch format {
        case .mlx, .paddle: .transposed
        default: .peft
        }
    }

    // MARK: - Loading

    static func load(_ path: String, files: TensorFiles = TensorFiles()) throws -> Loaded {
        let located = try locate(path, files: files)
        return try normalise(located, path: path)
    }

    private struct Parts {
        var tensors: [Role: TensorRef] = [:]
        var keys: [String] = []
    }

    private static func normalise(_ located: Located, path: String) throws -> Loaded {
        let format = located.format
        let store = located.store
        let config = located.config
        let settings = try AdapterSettings(format: format, config: config, configPath: located.configPath ?? located.weights,
                                           fileMetadata: store.metadataPairs, weightsPath: located.weights)
        var warnings = settings.warnings
        var problems: [String] = []
        var unknown: [String] = []
        var replacements: [Replacement] = []
        var order: [String] = []
        var parts: [String: Parts] = [:]
        let rules = suffixes(format)

        for info in store.entries {
            let key = info.name
            if let rule = rules.first(where: { key.hasSuffix($0.suffix) && key.count > $0.suffix.count }) {
                let module = String(key.dropLast(rule.suffix.count))
                if parts[module] == nil { order.append(module) }
                if parts[module, default: Parts()].tensors[rule.role] != nil {
                    problems.append("module \(module) has two tensors for one role (\(key))")
                }
                parts[module, default: Parts()].tensors[rule.role] = TensorRef(store: store, entry: info)
                parts[module, default: Parts()].keys.append(key)
                continue
            }
            if let replaced = settings.replacementTarget(key) {
                replacements.append(Replacement(tensor: TensorRef(store: store, entry: info), baseName: replaced))
                continue
            }
            unknown.append(key)
        }

        let parameterOf = format == .peft && !settings.targetParameters.isEmpty
            ? expertParameters(order.map { settings.baseName(of: $0).name }, targets: settings.targetParameters, isTargetModule: settings.targetModuleMatcher())
            : [:]
        var modules: [LoRAModule] = []
        for name in order {
            let p = parts[name]!
            if LyCORISModules.holdsFactors(p.tensors) {
                let (component, baseName) = settings.baseName(of: name)
                switch LyCORISModules.build(name: name, baseName: baseName, component: component, tensors: p.tensors) {
                case .success(let m): modules.append(m)
                case .failure(let problem): problems.append(problem.text)
                }
                continue
            }
            let isEmbedding = p.tensors[.embeddingA] != nil || p.tensors[.embeddingB] != nil
            let aRef = isEmbedding ? p.tensors[.embeddingA] : p.tensors[.a]
            let bRef = isEmbedding ? p.tensors[.embeddingB] : p.tensors[.b]
            guard let a = aRef, let b = bRef else {
                // An alpha or a magnitude alone, or half a pair: not a module we can use.
                unknown.append(contentsOf: p.keys)
                warnings.append("module \(name) lacks \(aRef == nil ? "its A (down) factor" : "its B (up) factor"); its keys are listed as unknown")
                continue
            }
            let (component, baseName) = settings.baseName(of: name)
            let orientation = orientation(format)
            var kind: LayerKind
            if isEmbedding {
                kind = .embedding
            } else if a.shape.count == 4 {
                kind = a.shape[2] == 1 && a.shape[3] == 1 ? .conv1x1 : .convKxK
            } else {
                kind = settings.fanInFanOut ? .linearFanInFanOut : .linear
            }
            var module = LoRAModule(name: name, baseName: baseName, component: component, kind: kind, a: a, mixer: p.tensors[.mixer], b: b,
                                    orientation: orientation, scale: 1, magnitude: p.tensors[.magnitude], bias: p.tensors[.biasB])
            switch parameterOf[baseName] {
            case nil: break
            case .failure(let problem)?:
                problems.append("module \(name): \(problem.text)")
                continue
            case .success(let (path, parameter))?:
                do {
                    module = try expertModule(module, path: path, parameter: parameter, settings: settings)
                } catch let e as InputError {
                    problems.append(e.problem)
                    continue
                }
            }
            // ComfyUI saves a layer's bias difference beside its LoRA pair; LyCORIS LoCon a dora_scale.
            if let diffB = p.tensors[.lycoris(.diffB)] {
                if module.bias != nil { problems.append("module \(name) has both lora_B.bias and diff_b"); continue }
                module.bias = diffB
                module.biasScale = 1
            }
            if let d = p.tensors[.lycoris(.doraScale)] {
                if module.magnitude != nil { problems.append("module \(name) has both a DoRA magnitude and a dora_scale"); continue }
                switch LyCORISModules.doraRule(d, outputs: module.outFeatures) {
                case .success(let rule): (module.magnitude, module.doraRule) = (d, rule)
                case .failure(let p): problems.append("module \(name): \(p.text)"); continue
                }
            }
            if let problem = shapeProblem(module) {
                problems.append(problem)
                continue
            }
            do {
                (module.scale, module.alpha) = try settings.scale(module: module, alpha: p.tensors[.alpha], warnings: &warnings)
            } catch let e as PatternCostError {
                throw InputError(located.configPath ?? located.weights, e.description)
            } catch let e as InputError {
                problems.append(e.problem)
                continue
            }
            modules.append(module)
        }
        // Two stored names for one module (`base_model.model.X` and `X`): PEFT applies one; adding both would apply it twice.
        var firstName: [String: String] = [:]
        for m in modules {
            let key = (m.component.map { $0 + ":" } ?? "") + m.baseName + (m.parameter.map { "." + $0.name } ?? "")
            if let other = firstName[key] {
                problems.append("modules \(other) and \(m.name) are the same module \(m.baseName); keep one of them")
            } else {
                firstName[key] = m.name
            }
        }
        guard problems.isEmpty else { throw ProblemList(subject: located.weights, problems: problems) }
        guard !modules.isEmpty || !replacements.isEmpty else {
            throw InputError(located.weights, "no LoRA modules found (\(unknown.count) keys, none understood)" + (unreadKindsNote(unknown).map { ": " + $0 } ?? ""))
        }

        if !unknown.isEmpty {
            warnings.append("\(unknownKeysPhrase(unknown)): not LoRA factors")
        }
        let withMixer = modules.filter(\.hasMixer).count
        if withMixer > 0 && withMixer < modules.count {
            warnings.append("mixers on only \(withMixer) of \(modules.count) modules; the others are plain LoRA")
        }
        if settings.useMixerFlag == true && withMixer == 0 {
            warnings.append("the config enables a mixer but no module has one")
        }
        if modules.contains(where: { $0.doraRule != .peft }) {
            warnings.append("LyCORIS DoRA: merging rescales the merged weight by dora_scale / (‖W + ΔW‖ + ε), per output row or input channel as each dora_scale is shaped")
        } else if modules.contains(where: { $0.magnitude != nil }) || settings.useDoRA {
            warnings.append("DoRA: merging rescales each output row of the merged weight by the magnitude vector")
        }
        if format == .diffusers {
            let assumed = modules.filter { m in m.component.map { settings.componentConfigs[$0] == nil } ?? true }
                .filter { parts[$0.name]?.tensors[.alpha] == nil }
            if !assumed.isEmpty {
                warnings.append("\(assumed.count) diffusers module\(assumed.count == 1 ? "" : "s") without lora_adapter_metadata or alpha: diffusers' rule alpha = r (scale 1) assumed")
            }
        }
        if format == .kohya && modules.contains(where: { _ in true }) {
            let missing = order.filter { parts[$0]?.tensors[.alpha] == nil && parts[$0]?.tensors[.a] != nil }.count
            if missing > 0 { warnings.append("\(missing) kohya module\(missing == 1 ? "" : "s") without alpha: scale 1 assumed (alpha = rank)") }
        }
        return Loaded(format: format, store: store, configPath: located.configPath, config: config, modules: modules,
                      replacements: replacements, unknownKeys: unknown, warnings: warnings)
    }

    struct Problem: Error { let text: String }

    /// Which parameter each stored module of a `target_parameters` adapter adapts, by PEFT's rule:
    /// a parameter `P.p` is targeted when it equals or ends with `.t` for an entry t; several
    /// parameters of one module nest, the first in the class's order innermost, so with k of them
    /// the stored module `P` + `.base_layer` × d adapts the (k − d)-th. Modules no entry names are
    /// absent from the result (ordinary modules), and so is a module `target_modules` names: a bare
    /// entry (`gate_up_proj`, as PEFT 0.21 writes when it converts older configs) matches every
    /// module path, but PEFT wraps only modules that have the parameter.
    static func expertParameters(_ names: [String], targets: [String], isTargetModule: (String) -> Bool = { _ in false })
        -> [String: Result<(path: String, parameter: String), Problem>]
    {
        func strip(_ name: String) -> (path: String, depth: Int) {
            var n = name, d = 0
            while n.hasSuffix(".base_layer") { n.removeLast(".base_layer".count); d += 1 }
            return (n, d)
        }
        func candidates(_ path: String) -> [String] {
            var found: [String] = []
            for t in targets {
                let p = t.split(separator: ".").last.map(String.init) ?? t
                let key = path + "." + p
                if (key == t || key.hasSuffix("." + t)) && !found.contains(p) { found.append(p) }
            }
            return found
        }
        var result: [String: Result<(path: String, parameter: String), Problem>] = [:]
        var depths: [String: Set<Int>] = [:]
        for name in names { let (path, d) = strip(name); depths[path, default: []].insert(d) }
        for name in names {
            let (path, d) = strip(name)
            let found = candidates(path)
            if found.isEmpty || (d == 0 && isTargetModule(path)) { continue }
            if found.count == 1 {
                result[name] = d == 0 ? .success((path, found[0])) : .failure(Problem(text: "target_parameters names one parameter of \(path) (\(found[0])) but the module is nested \(d) deep"))
                continue
            }
            // The parameters' order in their class: the fused expert tensors of every MoE family
            // are registered gate_up_proj first, then down_proj.
            let classOrder = ["gate_up_proj", "down_proj"]
            guard found.allSatisfy(classOrder.contains) else {
                result[name] = .failure(Problem(text: "target_parameters names \(found.joined(separator: ", ")) on \(path); their nesting order is known only for gate_up_proj and down_proj"))
                continue
            }
            let ordered = classOrder.filter(found.contains)
            guard depths[path] == Set(0..<ordered.count) else {
                result[name] = .failure(Problem(text: "target_parameters names \(ordered.joined(separator: " and ")) on \(path) but the adapter stores \(plural(depths[path]?.count ?? 0, "nested module")); which one is which is not known"))
                continue
            }
            result[name] = .success((path, ordered[ordered.count - 1 - d]))
        }
        return result
    }

    /// A stored module made a `target_parameters` module: its experts E = A's rows / the config's r.
    static func expertModule(_ module: LoRAModule, path: String, parameter: String, settings: AdapterSettings) throws -> LoRAModule {
        var m = module
        m.baseName = path
        let key = path + "." + parameter
        guard module.orientation == .peft, module.kind == .linear else {
            throw InputError(module.a.path, "module \(module.name) adapts parameter \(parameter) but its factors are not (r·E, in) and (out, r·E) matrices")
        }
        guard let (r, _, fromPattern) = try settings.parameterRank(key) else {
            throw InputError(module.a.path, "module \(module.name): target_parameters without a PEFT config")
        }
        let rows = module.rank
        guard r > 0, rows % r == 0 else {
            throw InputError(module.a.path, "module \(module.name) (\(parameter)): A has \(rows) rows, not a multiple of the config's rank \(r) (\(fromPattern ? "rank_pattern" : "r")): expected r·E rows for E experts")
        }
        if module.magnitude != nil || module.bias != nil {
            throw InputError(module.a.path, "module \(module.name) (\(parameter)): DoRA and lora_B.bias on target_parameters are not supported (PEFT has neither)")
        }
        m.parameter = ExpertParameter(name: parameter, experts: rows / r)
        if module.b.store != nil { m.split = ExpertColumnSplit(module.b, experts: rows / r) }
        return m
    }

    /// Checks that A, M and B agree (rank, mixer r×r, conv shapes); nil when they do.
    static func shapeProblem(_ m: LoRAModule) -> String? {
        let a = m.a.shape, b = m.b.shape
        let r = m.rank
        switch m.orientation {
        case .peft:
            guard a.count == 2 || a.count == 4 else { return "module \(m.name): A has shape \(a), expected (r, in) or (r, in, k, k)" }
            guard b.count == a.count else { return "module \(m.name): B has shape \(b) but A has shape \(a)" }
            guard b[1] == r else { return "module \(m.name): ranks disagree: A has rank \(r), B has \(b[1]) columns" }
            if b.count == 4 && (b[2] != 1 || b[3] != 1) { return "module \(m.name): B has shape \(b), expected (out, r, 1, 1)" }
        case .transposed:
            guard a.count == 2, b.count == 2 else { return "module \(m.name): factors must be matrices, got \(a) and \(b)" }
            guard b[0] == r else { return "module \(m.name): ranks disagree: A has rank \(r), B has \(b[0]) rows" }
        }
        guard r > 0 else { return "module \(m.name): rank 0" }
        // A layer with no inputs or no outputs has no update to merge, resize or convert.
        guard m.inFeatures > 0, m.outFeatures > 0 else {
            return "module \(m.name): A has shape \(a) and B \(b): a module needs at least one input and one output"
        }
        if let mixer = m.mixer, let p = m.parameter {
            if mixer.shape != [r, m.updateRank] {
                return "module \(m.name): mixer has shape \(mixer.shape), expected (\(r), \(m.updateRank)): one r×r mixer per expert of \(p.experts), in row blocks"
            }
        } else if let mixer = m.mixer, mixer.shape != [r, r] {
            return "module \(m.name): mixer has shape \(mixer.shape), expected (\(r), \(r))"
        }
        if let mag = m.magnitude, !m.doraRule.isPerInput, mag.entry.elementCount != m.outFeatures {
            return "module \(m.name): DoRA magnitude has \(mag.entry.elementCount) elements for \(m.outFeatures) outputs"
        }
        if let bias = m.bias, bias.entry.elementCount != m.outFeatures {
            return "module \(m.name): lora_B.bias has \(bias.entry.elementCount) elements for \(m.outFeatures) outputs"
        }
        for t in [m.a, m.b] + [m.mixer, m.magnitude, m.bias].compactMap({ $0 }) where !t.entry.dtype.isReadableAsFloat {
            return "module \(m.name): tensor \(t.name) has dtype \(t.entry.dtype.rawValue), not a float type"
        }
        return nil
    }
}
