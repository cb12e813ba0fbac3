/// Reads the fields of a config object strictly: every field has one JSON type, and anything
/// else is refused with the field named. Absent fields (and `null` where the library writes it
/// for "none") are nil, so the caller applies the library's documented default.
struct ConfigFields {
    let object: JSONObject
    let path: String
    /// Prefixed to field names in messages (`unet.` for a diffusers component).
    var prefix = ""

    private func fail(_ key: String, _ expected: String, _ value: JSONValue) -> InputError {
        var shown = JSONWriter.compact(value)
        if shown.count > 40 { shown = String(shown.prefix(37)) + "…" }
        return InputError(path, "\(prefix)\(key) must be \(expected), not \(shown)")
    }

    /// An integer written as one (`8`; not `8.5`, `"8"`, `1e20`), within `range`.
    func int(_ key: String, in range: ClosedRange<Int> = 1...(1 << 24)) throws -> Int? {
        guard let v = object[key] else { return nil }
        return try Self.int(v, range: range) ?? { throw fail(key, "an integer in \(range.lowerBound)…\(range.upperBound)", v) }()
    }

    static func int(_ v: JSONValue, range: ClosedRange<Int>) -> Int? {
        guard case .number(let text) = v, let i = Int(text), range.contains(i) else { return nil }
        return i
    }

    /// A finite number (integer or not; never a string, a boolean, null or one that overflows to infinity).
    func number(_ key: String) throws -> Double? {
        guard let v = object[key] else { return nil }
        return try Self.number(v) ?? { throw fail(key, "a finite number", v) }()
    }

    static func number(_ v: JSONValue) -> Double? {
        guard case .number(let text) = v, let d = Double(text), d.isFinite else { return nil }
        return d
    }

    func bool(_ key: String) throws -> Bool? {
        guard let v = object[key] else { return nil }
        return try v.boolValue ?? { throw fail(key, "true or false", v) }()
    }

    func string(_ key: String, nullable: Bool = false) throws -> String? {
        guard let v = object[key], !(nullable && v.isNull) else { return nil }
        return try v.stringValue ?? { throw fail(key, "a string", v) }()
    }

    /// null or absent → nil; otherwise an object.
    func object(_ key: String) throws -> JSONObject? {
        guard let v = object[key], !v.isNull else { return nil }
        return try v.objectValue ?? { throw fail(key, "an object", v) }()
    }

    /// null or absent → nil; otherwise a list of strings (or one string when `allowString`).
    func strings(_ key: String, allowString: Bool = false) throws -> [String]? {
        guard let v = object[key], !v.isNull else { return nil }
        if allowString, let s = v.stringValue { return [s] }
        guard let a = v.arrayValue else { throw fail(key, allowString ? "a string or a list of strings" : "a list of strings", v) }
        return try a.map { try $0.stringValue ?? { throw fail(key, "a list of strings", v) }() }
    }
}

/// The fields of a PEFT `LoraConfig` that decide scales and layer rules, read strictly, with
/// PEFT's defaults (peft 0.21: r 8, lora_alpha 8, use_rslora, use_dora, fan_in_fan_out false,
/// rank_pattern and alpha_pattern empty) where a field is missing.
struct PEFTFields {
    static let defaultRank = 8
    static let defaultAlpha = 8.0

    var rank = defaultRank
    var alpha = defaultAlpha
    var rankGiven = false
    var alphaGiven = false
    var useRSLoRA = false
    var useDoRA = false
    var fanInFanOut = false
    var rankPattern: [(String, Int)] = []
    var alphaPattern: [(String, Double)] = []
    /// The pattern keys, indexed: matching costs about a module name's length however many keys there are.
    var rankIndex = PatternIndex(field: "rank_pattern", keys: [])
    var alphaIndex = PatternIndex(field: "alpha_pattern", keys: [])
    var modulesToSave: [String] = []
    var targetModules: [String]?
    /// `target_parameters`: parameters (not modules) adapted through PEFT's ParamWrapper, as
    /// `module.path.parameter` names matched by suffix (`mlp.experts.gate_up_proj`).
    var targetParameters: [String] = []
    /// `target_modules` given as one regular expression (PEFT full-matches it against module names).
    var targetModulesPattern: String?
    /// Defaults taken, for messages: `lora_alpha missing: PEFT's default 8 assumed`.
    var assumptions: [String] = []

    init(_ f: ConfigFields) throws {
        if let r = try f.int("r") { rank = r; rankGiven = true } else {
            assumptions.append("\(f.prefix)r is missing: PEFT's default \(Self.defaultRank) assumed")
        }
        if let a = try f.number("lora_alpha") { alpha = a; alphaGiven = true } else {
            assumptions.append("\(f.prefix)lora_alpha is missing: PEFT's default \(formatNumber(Self.defaultAlpha)) assumed")
        }
        useRSLoRA = try f.bool("use_rslora") ?? false
        useDoRA = try f.bool("use_dora") ?? false
        fanInFanOut = try f.bool("fan_in_fan_out") ?? false
        if let p = try f.object("rank_pattern") {
            rankPattern = try p.members.map { k, v in
                guard let i = ConfigFields.int(v, range: 1...(1 << 24)) else {
                    throw InputError(f.path, "\(f.prefix)rank_pattern[\(quotedForMessage(k))] must be a positive integer, not \(JSONWriter.compact(v).prefix(40))")
                }
                return (k, i)
            }
        }
        if let p = try f.object("alpha_pattern") {
            alphaPattern = try p.members.map { k, v in
                guard let d = ConfigFields.number(v) else {
                    throw InputError(f.path, "\(f.prefix)alpha_pattern[\(quotedForMessage(k))] must be a finite number, not \(JSONWriter.compact(v).prefix(40))")
                }
                return (k, d)
            }
        }
        for key in rankPattern.map(\.0) + alphaPattern.map(\.0) where !AdapterSettings.isSafePattern(key) {
            throw InputError(f.path, "pattern key \(quotedForMessage(key)) is a regular expression too costly to match (nested quantifiers, or more than \(AdapterSettings.maximumPatternQuantifiers) quantifiers)")
        }
        rankIndex = PatternIndex(field: f.prefix + "rank_pattern", keys: rankPattern.map(\.0))
        alphaIndex = PatternIndex(field: f.prefix + "alpha_pattern", keys: alphaPattern.map(\.0))
        modulesToSave = try f.strings("modules_to_save") ?? []
        targetModules = try f.strings("target_modules", allowString: true)
        targetModulesPattern = f.object["target_modules"]?.stringValue
        targetParameters = try f.strings("target_parameters") ?? []
    }

    /// The rank and alpha PEFT gives module `name`: the first matching pattern key, else r and lora_alpha,
    /// and whether the rank came from `rank_pattern`.
    func rankAndAlpha(_ name: String) throws -> (rank: Int, alpha: Double, rankFromPattern: Bool) {
        let r = try rankIndex.firstMatch(name).map { rankPattern[$0].1 }
        let a = try alphaIndex.firstMatch(name).map { alphaPattern[$0].1 }
        return (r ?? rank, a ?? alpha, r != nil)
    }

    /// The patterns, the first ten entries of each and how many more.
    var patternWarnings: [String] {
        func listed<T>(_ p: [(String, T)], _ show: (T) -> String) -> String {
            let shown = p.prefix(10).map { "\($0.0)=\(show($0.1))" }.joined(separator: ", ")
            return p.count > 10 ? shown + ", … (\(p.count) keys)" : shown
        }
        var w: [String] = []
        if !rankPattern.isEmpty { w.append("rank_pattern in use: " + listed(rankPattern) { String($0) }) }
        if !alphaPattern.isEmpty { w.append("alpha_pattern in use: " + listed(alphaPattern, formatNumber)) }
        return w
    }
}

/// What a layout's config (or its absence) says about scales, names and options.
struct AdapterSettings {
    let format: AdapterFormat
    let config: JSONObject?
    let configPath: String
    private(set) var warnings: [String] = []
    /// PEFT `fan_in_fan_out`.
    var fanInFanOut = false
    var useDoRA = false
    var useRSLoRA = false
    /// The config's mixer switch (`lora_use_mixer`, `use_moslora`, `use_mos_lora`), when it has one.
    var useMixerFlag: Bool?
    /// PEFT (and PaddleNLP) fields; nil for other layouts or without a config.
    private(set) var peft: PEFTFields?
    /// diffusers: each component's LoraConfig from the file's `lora_adapter_metadata`.
    private(set) var componentConfigs: [String: PEFTFields] = [:]
    private var rank: Int?
    private var alpha: Double?
    private var mlxScale: Double?
    private var paddlePiSSA = false

    init(format: AdapterFormat, config: JSONObject?, configPath: String, fileMetadata: [(key: String, value: String)] = [],
         weightsPath: String = "") throws {
        self.format = format
        self.config = config
        self.configPath = configPath
        if format == .diffusers {
            try readDiffusersMetadata(fileMetadata, path: weightsPath.isEmpty ? configPath : weightsPath)
        }
        guard let config else {
            switch format {
            case .peft: warnings.append("no adapter_config.json: scale 1 assumed (lora_alpha = r), no fan_in_fan_out")
            case .mlx: warnings.append("no adapter_config.json: mlx-lm's default scale 20.0 assumed (10.0 in mlx-lm before mid-2025)")
            case .paddle: warnings.append("no lora_config.json: scale 1 assumed (lora_alpha = r)")
            case .mytransformers: warnings.append("no config: scale 1 assumed")
            case .kohya, .diffusers: break
            }
            return
        }
        let f = ConfigFields(object: config, path: configPath)
        switch format {
        case .peft:
            if let v = config["peft_type"] {
                guard let type = v.stringValue else { throw InputError(configPath, "peft_type must be a string, not \(JSONWriter.compact(v).prefix(40))") }
                guard ["LORA", "MOSLORA"].contains(type.uppercased()) else {
                    throw InputError(configPath, "peft_type \(type) is not LoRA or MoSLoRA; only LoRA-family adapters are supported")
                }
                // PEFT looks the name up as written: "lora" is a KeyError there.
                guard type == type.uppercased() else {
                    throw InputError(configPath, "peft_type must be written \"\(type.uppercased())\" (PEFT does not accept \"\(type)\")")
                }
            } else {
                warnings.append("peft_type is missing (PEFT needs it to load the adapter): LoRA assumed")
            }
            let p = try PEFTFields(f)
            peft = p
            warnings += p.assumptions
            useRSLoRA = p.useRSLoRA
            fanInFanOut = p.fanInFanOut
            useDoRA = p.useDoRA
            warnings += p.patternWarnings
            useMixerFlag = try f.bool("lora_use_mixer")
            // The PEFT pull requests' `use_moslora` is a switch or the mixer's init method ("kai", "orth").
            if useMixerFlag == nil, let v = config["use_moslora"] {
                guard let flag = v.boolValue ?? v.stringValue.map({ !$0.isEmpty && $0.lowercased() != "false" }) else {
                    throw InputError(configPath, "use_moslora must be true, false or a mixer init (\"kai\", \"orth\"), not \(JSONWriter.compact(v).prefix(40))")
                }
                useMixerFlag = flag
            }
            if let v = config["init_lora_weights"], !v.isNull, v.boolValue == nil, v.stringValue == nil {
                throw InputError(configPath, "init_lora_weights must be true, false or a method name, not \(JSONWriter.compact(v).prefix(40))")
            }
            if let initValue = config["init_lora_weights"]?.stringValue?.lowercased(),
               ["pissa", "olora", "corda", "lora_ga"].contains(where: { initValue.hasPrefix($0) }) {
                warnings.append("init_lora_weights is \(initValue): the adapter was trained against a modified base; merging it onto the original base model is wrong")
            }
        case .mlx:
            let params = try f.object("lora_parameters")
            let pf = params.map { ConfigFields(object: $0, path: configPath, prefix: "lora_parameters.") }
            rank = try pf?.int("rank")
            if let s = try pf?.number("scale") {
                mlxScale = s
            } else if let a = try pf?.number("alpha") {
                alpha = a
            } else {
                warnings.append("lora_parameters has no scale: mlx-lm's default 20.0 assumed (10.0 in mlx-lm before mid-2025)")
            }
            let t = try f.string("fine_tune_type")
            if let t, !["lora", "dora"].contains(t) {
                throw InputError(configPath, "fine_tune_type \(t) is not lora or dora")
            }
            useDoRA = t == "dora"
        case .paddle:
            // PaddleNLP's LoRAConfig: r and lora_alpha default to 8, like PEFT's.
            var p = try PEFTFields(f)
            p.useRSLoRA = try f.bool("rslora") ?? false
            if try f.bool("use_mora") == true {
                throw InputError(configPath, "use_mora: a MoRA adapter is not a low-rank product A·B; only LoRA and MoSLoRA are supported")
            }
            // PaddleNLP's LoRALinear: scaling is 1.0 with pissa, whatever lora_alpha says.
            paddlePiSSA = try f.bool("pissa") ?? false
            if paddlePiSSA { warnings.append("pissa: PaddleNLP's scale 1.0 used; the adapter was trained against a modified base, so merging it onto the original base is wrong") }
            peft = p
            warnings += p.assumptions.map { $0.replacingOccurrences(of: "PEFT's", with: "PaddleNLP's") }
            useRSLoRA = p.useRSLoRA
            useMixerFlag = try f.bool("lora_use_mixer")
        case .mytransformers:
            rank = try f.int("lora_rank")
            alpha = try f.number("lora_scaler")
            if alpha == nil { warnings.append("lora_scaler is missing: scale 1 assumed") }
            useMixerFlag = try f.bool("use_mos_lora")
        case .kohya, .diffusers:
            break
        }
    }

    /// diffusers writes each component's LoraConfig as JSON under the safetensors metadata key
    /// `lora_adapter_metadata`, its fields prefixed with the component (`unet.r`, `unet.lora_alpha`,
    /// `text_encoder.alpha_pattern`, …); diffusers' loader builds a LoraConfig from them.
    private mutating func readDiffusersMetadata(_ metadata: [(key: String, value: String)], path: String) throws {
        guard let raw = metadata.first(where: { $0.key == "lora_adapter_metadata" })?.value else { return }
        let root: JSONValue
        do { root = try JSONParser.parse(Array(raw.utf8)) } catch {
            throw InputError(path, "lora_adapter_metadata is not valid JSON: \(error.description)")
        }
        guard let object = root.objectValue else { throw InputError(path, "lora_adapter_metadata is not a JSON object") }
        var byComponent: [(String, JSONObject)] = []
        for (key, value) in object.members {
            guard let dot = key.firstIndex(of: "."), dot != key.startIndex else {
                throw InputError(path, "lora_adapter_metadata key \(quotedForMessage(key)) has no component prefix (unet., text_encoder., transformer., …)")
            }
            let component = String(key[..<dot]), field = String(key[key.index(after: dot)...])
            if let i = byComponent.firstIndex(where: { $0.0 == component }) { byComponent[i].1[field] = value } else {
                byComponent.append((component, JSONObject([(field, value)])))
            }
        }
        for (component, fields) in byComponent {
            if let v = fields["peft_type"], let t = v.stringValue, t.uppercased() != "LORA" {
                throw InputError(path, "lora_adapter_metadata: \(component) is a \(t) adapter; only LoRA is supported")
            }
            let p = try PEFTFields(ConfigFields(object: fields, path: path, prefix: "lora_adapter_metadata \(component)."))
            warnings += p.assumptions
            warnings += p.patternWarnings.map { "\(component): \($0)" }
            if p.useDoRA { useDoRA = true }
            componentConfigs[component] = p
        }
    }

    /// PEFT's `target_parameters` (empty for other layouts).
    var targetParameters: [String] { peft?.targetParameters ?? [] }

    /// Whether PEFT's `target_modules` names a module (model terms), by PEFT's rule: a list entry
    /// equal to the name or to its last components, or one regular expression that matches the
    /// whole name. The expression is checked and compiled once, here, not per module.
    func targetModuleMatcher() -> (String) -> Bool {
        guard let p = peft else { return { _ in false } }
        if let pattern = p.targetModulesPattern {
            // Only to tell modules from wrapped parameters: a pattern too costly to run is not used
            // (the module is then read as a parameter's, and a mismatch is refused, never skipped).
            guard AdapterSettings.isSafePattern(pattern), let regex = try? Regex(pattern) else { return { _ in false } }
            return { (try? regex.wholeMatch(in: $0)) != nil }
        }
        let entries = p.targetModules ?? []
        return { name in entries.contains { name == $0 || name.hasSuffix("." + $0) } }
    }

    /// The rank and alpha PEFT gives the parameter `key` (`module.path.gate_up_proj`), nil without a PEFT config.
    func parameterRank(_ key: String) throws -> (rank: Int, alpha: Double, rankFromPattern: Bool)? {
        try peft?.rankAndAlpha(key)
    }

    /// The component and base-model name of a stored module name.
    func baseName(of module: String) -> (component: String?, name: String) {
        NameMap.component(of: module, format: format)
    }

    /// For a key that is a full tensor replacing a base tensor, the base tensor's name.
    func replacementTarget(_ key: String) -> String? {
        guard format == .peft else { return nil }
        var name = key
        if name.hasPrefix("base_model.model.") { name.removeFirst("base_model.model.".count) }
        // PEFT saves a resized embedding as `<module>.base_layer.weight`.
        if name.hasSuffix(".base_layer.weight") {
            return String(name.dropLast(".base_layer.weight".count)) + ".weight"
        }
        // Older saves keep `<module>.modules_to_save.<adapter>.weight`.
        if let range = name.range(of: ".modules_to_save.") {
            let rest = name[range.upperBound...]
            guard let dot = rest.firstIndex(of: ".") else { return nil }
            return String(name[..<range.lowerBound]) + String(rest[dot...])
        }
        for suffix in [".weight", ".bias"] where name.hasSuffix(suffix) {
            let module = String(name.dropLast(suffix.count))
            if (peft?.modulesToSave ?? []).contains(where: { module == $0 || module.hasSuffix("." + $0) }) { return name }
        }
        return nil
    }

    /// The module's scale from the layout's rule, and the alpha it came from (nil where the
    /// layout stores a scale, as mlx-lm does).
    func scale(module: LoRAModule, alpha alphaTensor: TensorRef?, warnings: inout [String]) throws -> (scale: Double, alpha: Double?) {
        let r = module.updateRank
        func peftRule(_ p: PEFTFields, _ path: String, rsLoRA: Bool) throws -> (Double, Double?) {
            // A target_parameters module's patterns match `module.parameter`, as PEFT's current_key.
            let key = module.parameter.map { module.baseName + "." + $0.name } ?? module.baseName
            let (configRank, a, fromPattern) = try p.rankAndAlpha(key)
            if configRank != r {
                let origin = fromPattern ? "rank_pattern" : p.rankGiven ? "r" : "PEFT's default r"
                throw InputError(path, "module \(module.name): the config gives rank \(configRank) (\(origin)) but its tensors have rank \(r)")
            }
            return (rsLoRA ? a / Double(r).squareRoot() : a / Double(r), a)
        }
        switch format {
        case .peft, .paddle:
            guard let p = peft else { return (1, Double(r)) }
            let rule = try peftRule(p, configPath, rsLoRA: p.useRSLoRA)
            return paddlePiSSA ? (1, rule.1) : rule
        case .mytransformers:
            if let rank, rank != r {
                throw InputError(configPath, "module \(module.name): the config gives rank \(rank) but its tensors have rank \(r)")
            }
            guard let alpha else { return (1, Double(r)) }
            return (alpha / Double(r), alpha)
        case .diffusers:
            if let component = module.component, let p = componentConfigs[component] {
                if alphaTensor != nil {
                    throw InputError(configPath, "module \(module.name) has an alpha tensor and lora_adapter_metadata gives \(component)'s alpha; diffusers refuses both together")
                }
                return try peftRule(p, configPath, rsLoRA: p.useRSLoRA)
            }
            fallthrough
        case .kohya:
            guard let alphaTensor else { return (1, Double(r)) }
            guard alphaTensor.entry.elementCount == 1, let v = try alphaTensor.doubles().first, v.isFinite else {
                throw InputError(configPath, "module \(module.name): alpha is not one finite number")
            }
            // sd-scripts (networks/lora.py) reads alpha 0 as alpha = rank.
            if v == 0 && format == .kohya {
                warnings.append("module \(module.name): alpha 0 read as alpha = rank (scale 1), as kohya sd-scripts does")
                return (1, Double(r))
            }
            return (v / Double(r), v)
        case .mlx:
            if let rank, rank != r {
                throw InputError(configPath, "module \(module.name): lora_parameters.rank is \(rank) but its tensors have rank \(r)")
            }
            if let mlxScale { return (mlxScale, nil) }
            if let alpha { return (alpha / Double(r), alpha) }
            return (20, nil)
        }
    }

    static let maximumPatternQuantifiers = 2

    /// Whether matching `key` as a regular expression stays cheap on the backtracking matcher.
    ///
    /// A config key such as `(.*)*z` or `(a|a)*!` takes exponential time per module name (a hostile
    /// adapter_config.json hung the tool); several `.*` take a high power of the name's length.
    /// Real keys are module names, at most with one `.*` or a class. Refused: a quantifier on a group
    /// that holds a quantifier or an alternation, and more than two quantifiers.
    static func isSafePattern(_ key: String) -> Bool {
        var quantifiers = 0
        var groupIsRisky: [Bool] = [false]  // per open group: holds a quantifier or `|`
        var afterRiskyGroup = false
        var afterQuantifier = false
        var previous: Unicode.Scalar? = nil
        var scalars = key.unicodeScalars.makeIterator()
        while let c = scalars.next() {
            var closesRiskyGroup = false
            var isQuantifier = false
            switch c {
            case "\\":
                _ = scalars.next()  // an escaped character is one atom
            case "[":
                // A class is one atom: skip to its closing bracket (a `]` first in it is literal).
                var first = true
                while let d = scalars.next() {
                    if d == "\\" { _ = scalars.next() } else if d == "]" && !first { break }
                    if d != "^" { first = false }
                }
            case "(":
                groupIsRisky.append(false)
            case ")":
                if groupIsRisky.count > 1 {
                    closesRiskyGroup = groupIsRisky.removeLast()
                    if closesRiskyGroup { groupIsRisky[groupIsRisky.count - 1] = true }
                }
            case "|":
                groupIsRisky[groupIsRisky.count - 1] = true
            case "*", "+", "?", "{":
                // `(?` opens a group modifier; `*?` and `*+` make a quantifier lazy or possessive.
                isQuantifier = !(c == "?" && previous == "(") && !((c == "?" || c == "+") && afterQuantifier)
                if isQuantifier {
                    if afterRiskyGroup { return false }
                    quantifiers += 1
                    groupIsRisky[groupIsRisky.count - 1] = true
                    if c == "{" { while let d = scalars.next(), d != "}" {} }
                }
            default:
                break
            }
            afterRiskyGroup = closesRiskyGroup
            afterQuantifier = isQuantifier
            previous = c
        }
        return quantifiers <= maximumPatternQuantifiers
    }

    /// PEFT's pattern rule: key K applies to module N when N matches `(.*\.)?K$`; the first match wins.
    static func patternMatch<T>(_ patterns: [(String, T)], _ name: String) -> T? {
        patterns.lazy.map { PatternRule(key: $0.0, value: $0.1) }.first { $0.matches(name) }?.value
    }
}

/// One `rank_pattern` / `alpha_pattern` entry, compiled once. A key without regular-expression
/// characters (the common case: module names) is matched as text: equal, or a dotted suffix.
struct PatternRule<T> {
    let key: String
    let value: T
    private let regex: Regex<AnyRegexOutput>?
    private let literal: Bool

    init(key: String, value: T) {
        self.key = key
        self.value = value
        // Exactly the regex's meaning: with no metacharacter (not even "."), `(.*\.)?(KEY)` matches
        // the key itself or the key after a dot.
        literal = !key.contains { "\\^$.|?*+()[]{}".contains($0) }
        regex = literal ? nil : try? Regex("(.*\\.)?(" + key + ")")
    }

    /// PEFT's rule: the module name matches `(.*\.)?KEY$`.
    func matches(_ name: String) -> Bool {
        if key == name { return true }
        if literal { return name.hasSuffix("." + key) }
        guard let regex else { return false }
        return (try? regex.wholeMatch(in: name)) != nil
    }
}

