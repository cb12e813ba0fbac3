/// What `adapter inspect` shows of an adapter: layout, modules grouped by target, ranks, scales,
/// mixer diagnostics, non-finite values and warnings.
public struct AdapterReport: Sendable {
    public struct ModuleLine: Sendable {
        public let module: LoRAModule
        public let diagnostics: MixerDiagnostics?
    }

    public let adapter: Adapter
    public let modules: [ModuleLine]
    /// Non-finite element counts per tensor (only tensors that have any).
    public let nonFinite: [(tensor: String, nan: Int, inf: Int)]
    public let parameterCount: Int

    /// Reads every tensor once: mixers for their diagnostics, every tensor for NaN / Inf counts.
    ///
    /// Diagnostics do not depend on orientation (those of Mᵀ are those of M), so a mixer is used as stored.
    public init(_ adapter: Adapter) throws {
        self.adapter = adapter
        // A target_parameters mixer is E blocks of r×r in rows: each is diagnosed, the worst shown.
        var mixerRank: [String: (rank: Int, blocks: Int)] = [:]
        for m in adapter.modules { if let mixer = m.mixer { mixerRank[mixer.name] = (m.updateRank, m.parameter?.experts ?? 1) } }
        var diagnostics: [String: MixerDiagnostics] = [:]
        var bad: [(String, Int, Int)] = []
        var params = 0
        for t in adapter.store.entries {
            params += t.elementCount
            guard t.dtype.isReadableAsFloat, t.elementCount > 0 else { continue }
            var nan = 0, inf = 0
            if let (r, blocks) = mixerRank[t.name] {
                let values = try adapter.store.doubles(t.name)
                for v in values where !v.isFinite { if v.isNaN { nan += 1 } else { inf += 1 } }
                diagnostics[t.name] = (0..<blocks).map { e in MixerDiagnostics(mixer: Array(values[e * r * r..<(e + 1) * r * r]), rank: r) }
                    .min { $0.conditionRatio < $1.conditionRatio }
            } else {
                let values = try adapter.store.floats(t.name)
                for v in values where !v.isFinite { if v.isNaN { nan += 1 } else { inf += 1 } }
            }
            if nan + inf > 0 { bad.append((t.name, nan, inf)) }
        }
        modules = adapter.modules.map { m in ModuleLine(module: m, diagnostics: m.mixer.flatMap { diagnostics[$0.name] }) }
        nonFinite = bad
        parameterCount = params
    }

    /// All warnings: the adapter's, plus non-finite values.
    public var warnings: [String] {
        var w = adapter.warnings
        for (t, nan, inf) in nonFinite { w.append("tensor \(t) has \(nan) NaN and \(inf) infinite values") }
        if let v = mixerVerdict, v.isWarning { w.append(v.text) }
        return w
    }

    public var dtypes: [DType] {
        var set = Set<DType>()
        for m in adapter.modules { set.insert(m.a.entry.dtype); set.insert(m.b.entry.dtype) }
        return DType.allCases.filter(set.contains)
    }

    // MARK: - Grouping

    /// A module name with its numeric components replaced by `*` (the layer-independent target).
    /// kohya names have underscores where the model has dots, so they split on `_`.
    static func targetPattern(_ name: String) -> String {
        let separator: Character = name.contains(".") ? "." : "_"
        return name.split(separator: separator, omittingEmptySubsequences: false)
            .map { $0.allSatisfy(\.isNumber) && !$0.isEmpty ? "*" : String($0) }
            .joined(separator: String(separator))
    }

    struct Group {
        var targets: [String]
        var count: Int
        var ranks: Set<Int>
        var scales: Set<Double>
        var mixer: String
        var kind: String
        var component: String?
    }

    /// Targets with the same layer count, ranks, scales, mixer and kind, listed together.
    func groups() -> [Group] {
        var byPattern: [(pattern: String, modules: [LoRAModule])] = []
        for m in adapter.modules {
            let p = (m.component.map { $0 + ":" } ?? "") + Self.targetPattern(m.targetName)
            if let i = byPattern.firstIndex(where: { $0.pattern == p }) { byPattern[i].modules.append(m) } else { byPattern.append((p, [m])) }
        }
        let shortNames = Self.shortNames(byPattern.map { Self.targetPattern($0.modules[0].baseName) })
        var groups: [Group] = []
        for ((_, ms), short) in zip(byPattern, shortNames) {
            let mixers = ms.filter(\.hasMixer).count
            let g = Group(targets: [short], count: ms.count, ranks: Set(ms.map(\.rank)), scales: Set(ms.map(\.scale)),
                          mixer: mixers == 0 ? "no" : mixers == ms.count ? "yes" : "\(mixers)/\(ms.count)",
                          kind: Set(ms.map(\.kindDescription)).sorted().joined(separator: "/"), component: ms[0].component)
            if let i = groups.firstIndex(where: { $0.count == g.count && $0.ranks == g.ranks && $0.scales == g.scales && $0.mixer == g.mixer && $0.kind == g.kind && $0.component == g.component }) {
                groups[i].targets.append(short)
            } else {
                groups.append(g)
            }
        }
        return groups
    }

    /// The shortest trailing part of each pattern that still tells them apart: from the last
    /// layer index on (`self_attn.q_proj` → `q_proj`; `attn1.to_out.*` → `to_out.*`).
    static func shortNames(_ patterns: [String]) -> [String] {
        let split: [(parts: [String], separator: String)] = patterns.map { p in
            let sep = p.contains(".") ? "." : "_"
            return (p.components(separatedBy: sep), sep)
        }
        func start(_ parts: [String]) -> Int {
            // After the last `*` that has a name after it.
            var i = parts.count - 1
            while i > 0 && parts[i] == "*" { i -= 1 }
            var s = i
            while s > 0 && parts[s - 1] != "*" { s -= 1 }
            return s
        }
        var from = split.map { start($0.parts) }
        var names: [String] { zip(split, from).map { $0.parts[$1...].joined(separator: $0.separator) } }
        for _ in 0..<16 {
            let current = names
            var changed = false
            for i in current.indices where from[i] > 0 && current.filter({ $0 == current[i] }).count > 1 {
                from[i] -= 1
                changed = true
            }
            if !changed { break }
        }
        return names
    }

    // MARK: - What the config and metadata say

    /// σ_min/σ_max below this: inverting the mixer is unsafe (its inverse amplifies rounding by
    /// about the reciprocal); folding it into A or B stays exact.
    public static let conditionWarningThreshold = 1e-3

    /// Bytes of the adapter's weights file and of its tensors.
    public var fileBytes: Int {
        (try? FileDescriptor.openForReading(adapter.store.path).status().size) ?? 0
    }

    public var tensorCount: Int { adapter.store.entries.count }

    /// The base model the adapter names, if any.
    public var baseModel: String? {
        let c = adapter.config
        if let s = c?["base_model_name_or_path"]?.stringValue ?? c?["model"]?.stringValue ?? c?["base_model"]?.stringValue, !s.isEmpty { return s }
        let meta = metadata
        if let name = meta["ss_sd_model_name"] {
            return meta["ss_base_model_version"].map { "\(name) (\($0))" } ?? name
        }
        return nil
    }

    /// The library that wrote it and its version, when recorded.
    public var writtenBy: String? {
        if let v = adapter.config?["peft_version"]?.stringValue { return "PEFT \(v)" }
        let meta = metadata
        if let v = meta["ss_sd_scripts_commit_hash"] { return "kohya sd-scripts (commit \(v.prefix(10)))" }
        if meta["ss_network_module"] != nil { return "kohya sd-scripts (\(meta["ss_network_module"]!))" }
        if meta["lora_adapter_metadata"] != nil { return "diffusers (lora_adapter_metadata)" }
        return nil
    }

    private var metadata: [String: String] {
        var m: [String: String] = [:]
        for (k, v) in adapter.store.metadataPairs where m[k] == nil { m[k] = v }
        return m
    }

    /// How the scale of each module is found.
    public var scaleRule: String {
        let c = adapter.config
        switch adapter.format {
        case .peft, .paddle:
            guard c != nil else { return "1 (no config: lora_alpha = r assumed)" }
            let rs = adapter.format == .paddle ? c?["rslora"]?.boolValue == true : c?["use_rslora"]?.boolValue == true
            return rs ? "lora_alpha / √r (use_rslora)" : "lora_alpha / r"
        case .mytransformers: return c == nil ? "1 (no config)" : "lora_scaler / r"
        case .kohya:
            if adapter.modules.contains(where: \.algorithm.isLyCORIS) {
                return "LyCORIS: alpha / dim (LoHa: hada_w1_b's rows; LoKr: the factored half's rank, 1 when w1 and w2 are whole; full diffs: 1)"
            }
            return "alpha / r (alpha tensor per module; 1 without one)"
        case .diffusers:
            return metadata["lora_adapter_metadata"] != nil ? "lora_alpha / r from lora_adapter_metadata (per component)" : "alpha / r (alpha tensors; 1 without one)"
        case .mlx: return "lora_parameters.scale (used as it is)"
        }
    }

    /// PEFT's `target_modules` (a list, or one regular expression).
    public var targetModules: [String]? {
        guard let v = adapter.config?["target_modules"] else { return nil }
        if let s = v.stringValue { return [s] }
        return v.arrayValue?.compactMap(\.stringValue)
    }

    /// PEFT's `target_parameters` (nil when absent or empty).
    public var targetParameters: [String]? {
        let t = adapter.config?["target_parameters"]?.arrayValue?.compactMap(\.stringValue) ?? []
        return t.isEmpty ? nil : t
    }

    /// "gate_up_proj, down_proj as target_parameters: 128 experts per layer of rank 16, in 48
    /// layers", and / or "per-expert modules: experts 0–127 in 48 layers"; nil without experts.
    public var expertSummary: String? {
        var parts: [String] = []
        let wrapped = adapter.modules.filter { $0.parameter != nil }
        if !wrapped.isEmpty {
            let names = wrapped.reduce(into: [String]()) { if !$0.contains($1.parameter!.name) { $0.append($1.parameter!.name) } }
            let experts = Set(wrapped.map(\.parameter!.experts)).sorted().map(String.init).joined(separator: "/")
            let ranks = Set(wrapped.map(\.updateRank)).sorted().map(String.init).joined(separator: "/")
            let layers = Set(wrapped.map(\.baseName)).count
            parts.append("\(names.joined(separator: ", ")) as target_parameters (PEFT ParamWrapper): \(experts) experts of rank \(ranks) each, on \(plural(layers, "expert module"))")
        }
        let perExpert = adapter.modules.compactMap { NameMap.expertModule($0.baseName) }
        if !perExpert.isEmpty {
            let indices = Set(perExpert.map(\.index))
            let groups = Set(perExpert.map(\.experts)).count
            let shared = adapter.modules.filter { $0.baseName.contains("shared_expert") }.count
            let sorted = indices.sorted()
            let which = sorted.count <= 8 ? "experts " + sorted.map(String.init).joined(separator: ", ") : "\(sorted.count) experts (\(sorted[0])–\(sorted.last!))"
            parts.append("per-expert modules: \(which) in \(plural(groups, "layer"))\(shared > 0 ? ", and \(plural(shared, "shared-expert module"))" : "")")
        } else if adapter.modules.contains(where: { $0.baseName.contains("shared_expert") }) {
            parts.append("shared-expert modules: \(adapter.modules.filter { $0.baseName.contains("shared_expert") }.count)")
        }
        return parts.isEmpty ? nil : parts.joined(separator: "; ")
    }

    /// kohya's training metadata, as (label, value) lines in a fixed order; empty for other layouts.
    public var training: [(label: String, value: String)] {
        let m = metadata
        guard m.keys.contains(where: { $0.hasPrefix("ss_") }) else { return [] }
        var out: [(String, String)] = []
        func add(_ label: String, _ value: String?) {
            if let value, !value.isEmpty, value != "None" { out.append((label, value)) }
        }
        add("output name", m["ss_output_name"])
        add("base model", [m["ss_sd_model_name"], m["ss_base_model_version"].map { "(\($0))" }].compactMap { $0 }.joined(separator: " "))
        add("resolution", m["ss_resolution"])
        var network = m["ss_network_module"].map { [$0] } ?? []
        if let d = m["ss_network_dim"] { network.append("dim \(d)") }
        if let a = m["ss_network_alpha"] { network.append("alpha \(a)") }
        if let raw = m["ss_network_args"], case .object(let o)? = try? JSONParser.parse(Array(raw.utf8)) {
            network.append(o.members.map { "\($0.key)=\($0.value.stringValue ?? JSONWriter.compact($0.value))" }.joined(separator: " "))
        }
        add("network", network.joined(separator: ", "))
        var schedule: [String] = []
        if let e = m["ss_num_epochs"] { schedule.append("\(e) epoch\(e == "1" ? "" : "s")") }
        if let st = m["ss_max_train_steps"] ?? m["ss_steps"] { schedule.append("\(st) steps") }
        if let n = m["ss_num_train_images"] { schedule.append("\(n) images") }
        add("training", schedule.joined(separator: ", "))
        var rates: [String] = []
        if let lr = m["ss_learning_rate"] { rates.append(lr) }
        if let u = m["ss_unet_lr"], u != m["ss_learning_rate"] { rates.append("unet \(u)") }
        if let t = m["ss_text_encoder_lr"] { rates.append("text encoder \(t)") }
        add("learning rate", rates.joined(separator: ", "))
        add("precision", m["ss_mixed_precision"])
        if let raw = m["ss_tag_frequency"], case .object(let dirs)? = try? JSONParser.parse(Array(raw.utf8)) {
            var counts: [String: Double] = [:]
            for (_, tags) in dirs.members {
                for (tag, n) in tags.objectValue?.members ?? [] { counts[tag, default: 0] += n.double ?? 0 }
            }
            let top = counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.prefix(8)
            add("tags", top.map { "\($0.key) (\(formatShort($0.value)))" }.joined(separator: ", ") + (counts.count > 8 ? ", … \(counts.count) in all" : ""))
        }
        add("comment", m["ss_training_comment"].map { truncated($0, 200) })
        return out
    }

    /// The mixers' verdict: one line, and whether it is a warning.
    public var mixerVerdict: (text: String, isWarning: Bool)? {
        let lines = modules.filter { $0.diagnostics != nil }
        guard let worst = lines.min(by: { $0.diagnostics!.conditionRatio < $1.diagnostics!.conditionRatio }) else { return nil }
        let ratio = worst.diagnostics!.conditionRatio
        let bad = lines.filter { $0.diagnostics!.conditionRatio < Self.conditionWarningThreshold }.count
        let estimate = worst.diagnostics!.isEstimated ? " (estimated)" : ""
        if bad > 0 {
            return ("\(bad) mixer\(bad == 1 ? " is" : "s are") nearly singular (σ_min/σ_max down to \(formatShort(ratio))\(estimate) in \(worst.module.name), below \(formatShort(Self.conditionWarningThreshold))): inverting M is unsafe (rounding grows by about 1/\(formatShort(ratio))); folding it into A or B (moslora-to-lora, to-peft) is still exact", true)
        }
        return ("every mixer is well conditioned (σ_min/σ_max ≥ \(formatShort(ratio))\(estimate)): inverting M is safe and folding it is exact", false)
    }

    // MARK: - Output

    public func text() -> String {
        var lines: [String] = []
        let mixerCount = adapter.modules.filter(\.hasMixer).count
        lines.append("\(adapter.path)")
        var layout = adapter.format.rawValue
        if mixerCount > 0 {
            let key = adapter.modules.first { $0.hasMixer }!.mixer!.name
            let style = key.hasSuffix("lora_AB.weight") || key.hasSuffix("lora_AB") ? "lora_AB" : key.hasSuffix("weight_ab_mixer") ? "weight_ab_mixer"
                : key.hasSuffix("lora.downB.weight") ? "lora.downB" : "lora_mixer"
            layout += ", MoSLoRA (\(style) mixers on \(mixerCount) of \(adapter.modules.count) modules)"
        } else if adapter.modules.contains(where: \.algorithm.isLyCORIS) {
            let kinds = firstSeen(adapter.modules.map(\.algorithm.name))
            let counts = kinds.map { k in "\(k) on \(plural(adapter.modules.filter { $0.algorithm.name == k }.count, "module"))" }
            layout += ", LyCORIS (" + counts.joined(separator: ", ") + "; r is the rank of each update as merged)"
        } else {
            layout += ", LoRA"
        }
        lines.append("  layout      \(layout)")
        lines.append("  file        \(adapter.store.path)")
        if let c = adapter.configPath { lines.append("  config      \(c)") }
        lines.append("  size        \(formatBytes(fileBytes, exact: false)) in \(tensorCount) tensor\(tensorCount == 1 ? "" : "s"), \(formatCount(parameterCount)) parameters, \(dtypes.map(\.rawValue).joined(separator: "/"))")
        if let b = baseModel { lines.append("  base model  \(b)") }
        if let w = writtenBy { lines.append("  written by  \(w)") }
        lines.append("  scale       \(scaleRule)")
        if let t = targetModules { lines += wrapped("  targets     ", t) }
        if let e = expertSummary { lines += wrapped("  experts     ", [e]) }
        lines.append("  modules     \(adapter.modules.count)\(adapter.replacements.isEmpty ? "" : ", and \(adapter.replacements.count) full tensor replacement\(adapter.replacements.count == 1 ? "" : "s")")")
        lines.append("")
        lines += table()
        for r in adapter.replacements { lines.append("  replaces \(r.baseName) (\(r.tensor.entry.dtype.rawValue) \(r.tensor.shape))") }
        let training = self.training
        if !training.isEmpty {
            lines.append("")
            lines.append("  training (kohya metadata)")
            let width = training.map(\.label.count).max()!
            for (label, value) in training { lines += wrapped("    " + pad(label, width) + "  ", [value]) }
        }
        let diags = modules.compactMap(\.diagnostics)
        if !diags.isEmpty {
            func range(_ xs: [Double]) -> String {
                let lo = xs.min()!, hi = xs.max()!
                return lo == hi ? formatShort(lo) : "\(formatShort(lo)) – \(formatShort(hi))"
            }
            lines.append("")
            lines.append("  mixers (\(diags.count) module\(diags.count == 1 ? "" : "s"))")
            let estimated = diags.filter(\.isEstimated).count
            let note = estimated == 0 ? "" : estimated == diags.count ? "  (estimated: rank above \(LinearAlgebra.exactDiagnosticsRankLimit))"
                : "  (estimated for \(estimated) of rank above \(LinearAlgebra.exactDiagnosticsRankLimit))"
            lines.append("    ‖M − I‖_F / √r     \(range(diags.map(\.distanceFromIdentity)))")
            lines.append("    ‖MᵀM − I‖_F        \(range(diags.map(\.orthogonalityError)))\(note)")
            lines.append("    σ_min / σ_max      \(range(diags.map(\.conditionRatio)))\(note)")
            if let v = mixerVerdict, !v.isWarning { lines += wrapped("    verdict            ", [v.text]) }
        }
        lines.append("")
        lines.append("  NaN / Inf   \(nonFinite.isEmpty ? "none" : "\(nonFinite.count) tensor\(nonFinite.count == 1 ? "" : "s") (see warnings)")")
        let w = warnings
        if !w.isEmpty {
            lines.append("")
            for x in w { lines += wrapped("  warning: ", [x]) }
        }
        return lines.joined(separator: "\n")
    }

    /// One row per target (the module name with layer indices as `*`): layers, kind, r, alpha,
    /// scale, mixer, dtype, in aligned columns.
    func table() -> [String] {
        var byPattern: [(component: String?, pattern: String, modules: [LoRAModule])] = []
        for m in adapter.modules {
            let p = Self.targetPattern(m.targetName)
            if let i = byPattern.firstIndex(where: { $0.pattern == p && $0.component == m.component }) { byPattern[i].modules.append(m) } else {
                byPattern.append((m.component, p, [m]))
            }
        }
        let short = Self.shortNames(byPattern.map(\.pattern))
        func values<T: Hashable & Comparable>(_ xs: [T], _ show: (T) -> String) -> String {
            Set(xs).sorted().map(show).joined(separator: ",")
        }
        let hasComponents = byPattern.contains { $0.component != nil }
        var rows: [[String]] = [(hasComponents ? ["component"] : []) + ["target", "layers", "kind", "r", "alpha", "scale", "mixer", "dtype"]]
        for ((component, _, ms), name) in zip(byPattern, short) {
            let mixers = ms.filter(\.hasMixer).count
            let alphas = ms.compactMap(\.alpha)
            rows.append((hasComponents ? [component ?? "-"] : []) + [
                name, String(ms.count), values(ms.map(\.kindDescription)) { $0 }, values(ms.map(\.updateRank)) { String($0) },
                alphas.count == ms.count ? values(alphas, formatShort) : "-", values(ms.map(\.scale), formatShort),
                mixers == 0 ? "no" : mixers == ms.count ? "yes" : "\(mixers)/\(ms.count)",
                values(ms.map(\.a.entry.dtype.rawValue)) { $0 },
            ])
        }
        let numeric: Set<Int> = Set([1, 2, 4, 5, 6].map { $0 + (hasComponents ? 1 : 0) }).subtracting([2 + (hasComponents ? 1 : 0)])
        var widths = [Int](repeating: 0, count: rows[0].count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], min(cell.count, 48)) } }
        return rows.map { row in
            var line = " "
            for (i, cell) in row.enumerated() {
                let text = cell.count > 48 ? String(cell.prefix(47)) + "…" : cell
                let padded = numeric.contains(i) && row != rows[0] ? String(repeating: " ", count: widths[i] - text.count) + text : pad(text, widths[i])
                line += " " + padded + (i < row.count - 1 ? " " : "")
            }
            while line.last == " " { line.removeLast() }
            return line
        }
    }

    /// The `adapter` member of the `--json` object.
    public func json() -> JSONValue {
        var o = JSONObject()
        o["format"] = .string(adapter.format.rawValue)
        o["mixer"] = .bool(adapter.hasMixer)
        o["file"] = .string(adapter.store.path)
        o["config"] = adapter.configPath.map { .string($0) } ?? .null
        o["byte_count"] = .integer(fileBytes)
        o["tensor_count"] = .integer(tensorCount)
        o["module_count"] = .integer(adapter.modules.count)
        o["parameter_count"] = .integer(parameterCount)
        o["base_model"] = baseModel.map { .string($0) } ?? .null
        o["written_by"] = writtenBy.map { .string($0) } ?? .null
        o["scale_rule"] = .string(scaleRule)
        o["target_modules"] = targetModules.map { .array($0.map { .string($0) }) } ?? .null
        o["target_parameters"] = targetParameters.map { .array($0.map { .string($0) }) } ?? .null
        o["experts"] = expertSummary.map { .string($0) } ?? .null
        o["training"] = .object(JSONObject(training.map { ($0.label, JSONValue.string($0.value)) }))
        o["modules"] = .array(modules.map { line in
            let m = line.module
            var mo = JSONObject([
                ("name", .string(m.name)), ("kind", .string(m.kind.rawValue)), ("algorithm", .string(m.algorithm.name)), ("rank", .integer(m.rank)),
                ("alpha", m.alpha.map { .real($0) } ?? .null),
                ("scale", .real(m.scale)), ("mixer", .bool(m.hasMixer)), ("in", .integer(m.inFeatures)), ("out", .integer(m.outFeatures)),
                ("target", .string(m.baseName)), ("dtype", .string(m.a.entry.dtype.rawValue)),
                ("dora", .bool(m.magnitude != nil)), ("bias", .bool(m.bias != nil)),
            ])
            if let c = m.component { mo["component"] = .string(c) }
            if let p = m.parameter {
                mo["parameter"] = .string(p.name)
                mo["experts"] = .integer(p.experts)
                mo["rank_per_expert"] = .integer(m.updateRank)
            } else if let e = NameMap.expertModule(m.baseName)?.index {
                mo["expert"] = .integer(e)
            }
            if let d = line.diagnostics {
                mo["mixer_diagnostics"] = .object(JSONObject([
                    ("distance_from_identity", .real(d.distanceFromIdentity)),
                    ("orthogonality_error", .real(d.orthogonalityError)),
                    ("condition_ratio", .real(d.conditionRatio)),
                    ("estimated", .bool(d.isEstimated)),
                ]))
            }
            return .object(mo)
        })
        o["mixer_verdict"] = mixerVerdict.map { .string($0.text) } ?? .null
        o["replacements"] = .array(adapter.replacements.map { .object(JSONObject([("key", .string($0.tensor.name)), ("target", .string($0.baseName))])) })
        o["unknown_keys"] = .array(adapter.unknownKeys.map { .string($0) })
        o["non_finite"] = .array(nonFinite.map { .object(JSONObject([("tensor", .string($0.tensor)), ("nan", .integer($0.nan)), ("inf", .integer($0.inf))])) })
        o["warnings"] = .array(warnings.map { .string($0) })
        return .object(o)
    }
}

/// A number with at most four significant digits and no trailing zeros (`2`, `5.657`, `0.0205`,
/// `1.2e-05`): the one format of inspect's values.
public func formatShort(_ v: Double) -> String {
    guard v.isFinite else { return String(v) }
    if v == 0 { return "0" }
    let magnitude = abs(v)
    if magnitude >= 1e6 || magnitude < 1e-3 {
        var s = formatSig(v)  // m.mmme±x
        if let e = s.firstIndex(of: "e") {
            var mantissa = String(s[..<e])
            while mantissa.contains(".") && (mantissa.last == "0" || mantissa.last == ".") { mantissa.removeLast() }
            s = mantissa + s[e...]
        }
        return s
    }
    var s = formatSig(v)
    if magnitude >= 1000 { s = formatFixed(v, 0) }
    while s.contains(".") && (s.last == "0" || s.last == ".") { s.removeLast() }
    return s
}

