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
    private var rank: Int?
    private var alpha: Double?
    private var rankPattern: [(String, Int)] = []
    private var alphaPattern: [(String, Double)] = []
    /// The patterns compiled once (a config may hold thousands of keys, applied to every module).
    private var rankRules: [PatternRule<Int>] = []
    private var alphaRules: [PatternRule<Double>] = []
    private var modulesToSave: [String] = []
    private var mlxScale: Double?

    init(format: AdapterFormat, config: JSONObject?, configPath: String) throws {
        self.format = format
        self.config = config
        self.configPath = configPath
        guard let config else {
            switch format {
            case .peft: warnings.append("no adapter_config.json: scale 1 assumed (lora_alpha = r), no fan_in_fan_out")
            case .mlx: warnings.append("no adapter_config.json: mlx-lm's default scale 20.0 assumed")
            case .paddle: warnings.append("no lora_config.json: scale 1 assumed (lora_alpha = r)")
            case .mytransformers: warnings.append("no config: scale 1 assumed")
            case .kohya, .diffusers: break
            }
            return
        }
        switch format {
        case .peft:
            if let type = config["peft_type"]?.stringValue, !["LORA", "MOSLORA"].contains(type.uppercased()) {
                throw InputError(configPath, "peft_type \(type) is not LoRA or MoSLoRA; only LoRA-family adapters are supported")
            }
            rank = config["r"]?.int
            alpha = config["lora_alpha"]?.double
            useRSLoRA = config["use_rslora"]?.boolValue ?? false
            fanInFanOut = config["fan_in_fan_out"]?.boolValue ?? false
            useDoRA = config["use_dora"]?.boolValue ?? false
            if let p = config["rank_pattern"]?.objectValue {
                rankPattern = p.members.compactMap { k, v in v.int.map { (k, $0) } }
            }
            if let p = config["alpha_pattern"]?.objectValue {
                alphaPattern = p.members.compactMap { k, v in v.double.map { (k, $0) } }
            }
            for key in rankPattern.map(\.0) + alphaPattern.map(\.0) where !Self.isSafePattern(key) {
                throw InputError(configPath, "pattern key \(quotedForMessage(key)) is a regular expression too costly to match (nested quantifiers, or more than \(Self.maximumPatternQuantifiers) quantifiers)")
            }
            rankRules = rankPattern.map { PatternRule(key: $0.0, value: $0.1) }
            alphaRules = alphaPattern.map { PatternRule(key: $0.0, value: $0.1) }
            if !rankPattern.isEmpty { warnings.append("rank_pattern in use: \(rankPattern.map { "\($0.0)=\($0.1)" }.joined(separator: ", "))") }
            if !alphaPattern.isEmpty {
                warnings.append("alpha_pattern in use: \(alphaPattern.map { "\($0.0)=\(formatNumber($0.1))" }.joined(separator: ", "))")
            }
            if let list = config["modules_to_save"]?.arrayValue { modulesToSave = list.compactMap(\.stringValue) }
            let flag = config["lora_use_mixer"] ?? config["use_moslora"]
            if let flag {
                useMixerFlag = flag.boolValue ?? (flag.stringValue.map { !$0.isEmpty && $0 != "false" })
            }
            if let initValue = config["init_lora_weights"]?.stringValue?.lowercased(),
               ["pissa", "olora", "corda", "lora_ga"].contains(where: { initValue.hasPrefix($0) }) {
                warnings.append("init_lora_weights is \(initValue): the adapter was trained against a modified base; merging it onto the original base model is wrong")
            }
        case .mlx:
            let params = config["lora_parameters"]?.objectValue
            rank = params?["rank"]?.int
            if let s = params?["scale"]?.double {
                mlxScale = s
            } else if let a = params?["alpha"]?.double {
                alpha = a
            } else {
                warnings.append("lora_parameters has no scale: mlx-lm's default 20.0 assumed")
            }
            useDoRA = config["fine_tune_type"]?.stringValue == "dora"
            if let t = config["fine_tune_type"]?.stringValue, !["lora", "dora"].contains(t) {
                throw InputError(configPath, "fine_tune_type \(t) is not lora or dora")
            }
        case .paddle:
            rank = config["r"]?.int
            alpha = config["lora_alpha"]?.double
            useRSLoRA = config["rslora"]?.boolValue ?? false
            useMixerFlag = config["lora_use_mixer"]?.boolValue
        case .mytransformers:
            rank = config["lora_rank"]?.int
            alpha = config["lora_scaler"]?.double
            useMixerFlag = config["use_mos_lora"]?.boolValue
        case .kohya, .diffusers:
            break
        }
    }

    /// The component and base-model name of a stored module name.
    func baseName(of module: String) -> (component: String?, name: String) {
        switch format {
        case .peft:
            return (nil, module.hasPrefix("base_model.model.") ? String(module.dropFirst("base_model.model.".count)) : module)
        case .kohya:
            for (prefix, component) in Self.kohyaPrefixes where module.hasPrefix(prefix) {
                return (component, String(module.dropFirst(prefix.count)))
            }
            return (nil, module)
        case .diffusers:
            for (prefix, component) in Self.diffusersPrefixes where module.hasPrefix(prefix) {
                return (component, String(module.dropFirst(prefix.count)))
            }
            return (nil, module)
        case .mlx, .paddle, .mytransformers:
            return (nil, module)
        }
    }

    static let kohyaPrefixes: [(String, String)] = [
        ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
        ("lora_te_", "text_encoder"), ("lora_transformer_", "transformer"),
    ]
    static let diffusersPrefixes: [(String, String)] = [
        ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"),
        ("transformer.", "transformer"),
    ]

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
            if modulesToSave.contains(where: { module == $0 || module.hasSuffix("." + $0) }) { return name }
        }
        return nil
    }

    /// The module's scale, from the layout's rule.
    func scale(module: LoRAModule, alpha alphaTensor: TensorRef?, warnings: inout [String]) throws -> Double {
        let r = module.rank
        switch format {
        case .peft, .paddle, .mytransformers:
            var configRank = rank ?? r
            var a = alpha ?? Double(configRank)
            if config == nil { a = Double(r); configRank = r }
            if let p = rankRules.first(where: { $0.matches(module.baseName) }) { configRank = p.value }
            if let p = alphaRules.first(where: { $0.matches(module.baseName) }) { a = p.value }
            if configRank != r {
                throw InputError(configPath, "module \(module.name): the config gives rank \(configRank) but its tensors have rank \(r)")
            }
            if format == .mytransformers { return config == nil ? 1 : a / Double(r) }
            return useRSLoRA ? a / Double(r).squareRoot() : a / Double(r)
        case .kohya, .diffusers:
            guard let alphaTensor else { return 1 }
            guard alphaTensor.info.elementCount == 1, let v = try alphaTensor.doubles().first, v.isFinite else {
                throw InputError(configPath, "module \(module.name): alpha is not one finite number")
            }
            return v / Double(r)
        case .mlx:
            if let mlxScale { return mlxScale }
            if let alpha { return alpha / Double(r) }
            return 20
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

/// A number for messages: integers without a fraction, others with up to 6 significant digits.
func formatNumber(_ v: Double) -> String {
    if v.isFinite, v.rounded() == v, abs(v) < 1e15 { return String(Int64(v)) }
    var s = String(v)
    if s.count > 10, let d = Double(s) { s = String(Float(d)) }
    return s
}
