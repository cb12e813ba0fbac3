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

    /// Reads the factors it needs (mixers for diagnostics, every tensor for NaN / Inf counts).
    public init(_ adapter: Adapter) throws {
        self.adapter = adapter
        modules = try adapter.modules.map { m in
            guard m.hasMixer else { return ModuleLine(module: m, diagnostics: nil) }
            let f = try m.factors()
            return ModuleLine(module: m, diagnostics: f.m.map { MixerDiagnostics(mixer: $0, rank: m.rank) })
        }
        var bad: [(String, Int, Int)] = []
        var params = 0
        for t in adapter.store.tensorInfos {
            params += t.elementCount
            guard t.dtype.isReadableAsFloat, t.elementCount > 0 else { continue }
            let values = try adapter.store.floats(t.name)
            var nan = 0, inf = 0
            for v in values where !v.isFinite { if v.isNaN { nan += 1 } else { inf += 1 } }
            if nan + inf > 0 { bad.append((t.name, nan, inf)) }
        }
        nonFinite = bad
        parameterCount = params
    }

    /// All warnings: the adapter's, plus non-finite values.
    public var warnings: [String] {
        var w = adapter.warnings
        for (t, nan, inf) in nonFinite { w.append("tensor \(t) has \(nan) NaN and \(inf) infinite values") }
        return w
    }

    public var dtypes: [DType] {
        var set = Set<DType>()
        for m in adapter.modules { set.insert(m.a.info.dtype); set.insert(m.b.info.dtype) }
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
            let p = (m.component.map { $0 + ":" } ?? "") + Self.targetPattern(m.baseName)
            if let i = byPattern.firstIndex(where: { $0.pattern == p }) { byPattern[i].modules.append(m) } else { byPattern.append((p, [m])) }
        }
        let shortNames = Self.shortNames(byPattern.map { Self.targetPattern($0.modules[0].baseName) })
        var groups: [Group] = []
        for ((_, ms), short) in zip(byPattern, shortNames) {
            let mixers = ms.filter(\.hasMixer).count
            let g = Group(targets: [short], count: ms.count, ranks: Set(ms.map(\.rank)), scales: Set(ms.map(\.scale)),
                          mixer: mixers == 0 ? "no" : mixers == ms.count ? "yes" : "\(mixers)/\(ms.count)",
                          kind: Set(ms.map(\.kind.rawValue)).sorted().joined(separator: "/"), component: ms[0].component)
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

    // MARK: - Output

    public func text() -> String {
        var lines: [String] = []
        lines.append("\(adapter.path)")
        lines.append("  format      \(adapter.format.rawValue)\(adapter.hasMixer ? " (MoSLoRA: mixer)" : "")")
        lines.append("  file        \(adapter.store.path)")
        if let c = adapter.configPath { lines.append("  config      \(c)") }
        lines.append("  modules     \(adapter.modules.count)\(adapter.replacements.isEmpty ? "" : ", \(adapter.replacements.count) full tensor replacement\(adapter.replacements.count == 1 ? "" : "s")")")
        lines.append("  parameters  \(formatCount(parameterCount))")
        lines.append("  dtypes      \(dtypes.map(\.rawValue).joined(separator: ", "))")
        lines.append("")
        for g in groups() {
            let ranks = g.ranks.sorted().map(String.init).joined(separator: ",")
            let scales = g.scales.sorted().map { formatNumber($0) }.joined(separator: ",")
            let who = (g.component.map { $0 + ": " } ?? "") + g.targets.joined(separator: ", ")
            lines.append("  \(who) × \(g.count) \(g.count == 1 ? "layer" : "layers")  \(g.kind)  rank \(ranks)  scale \(scales)  mixer \(g.mixer)")
        }
        for r in adapter.replacements { lines.append("  replaces \(r.baseName) (\(r.tensor.info.dtype.rawValue) \(r.tensor.shape))") }
        let diags = modules.compactMap(\.diagnostics)
        if !diags.isEmpty {
            func range(_ xs: [Double]) -> String {
                let lo = xs.min()!, hi = xs.max()!
                return lo == hi ? formatSig(lo) : "\(formatSig(lo))–\(formatSig(hi))"
            }
            lines.append("")
            lines.append("  mixers (\(diags.count) modules)")
            lines.append("    ‖M − I‖_F / √r     \(range(diags.map(\.distanceFromIdentity)))")
            lines.append("    ‖MᵀM − I‖_F        \(range(diags.map(\.orthogonalityError)))")
            lines.append("    σ_min / σ_max      \(range(diags.map(\.conditionRatio)))")
            let worst = modules.filter { $0.diagnostics != nil }.min { $0.diagnostics!.conditionRatio < $1.diagnostics!.conditionRatio }!
            lines.append("    worst conditioned  \(worst.module.name)")
        }
        if nonFinite.isEmpty { lines.append("\n  NaN / Inf   none") }
        let w = warnings
        if !w.isEmpty {
            lines.append("")
            for x in w { lines.append("  warning: \(x)") }
        }
        return lines.joined(separator: "\n")
    }

    /// The `adapter` member of the `--json` object.
    public func json() -> JSONValue {
        var o = JSONObject()
        o["format"] = .string(adapter.format.rawValue)
        o["mixer"] = .bool(adapter.hasMixer)
        o["file"] = .string(adapter.store.path)
        o["config"] = adapter.configPath.map { .string($0) } ?? .null
        o["module_count"] = .integer(adapter.modules.count)
        o["parameter_count"] = .integer(parameterCount)
        o["modules"] = .array(modules.map { line in
            let m = line.module
            var mo = JSONObject([
                ("name", .string(m.name)), ("kind", .string(m.kind.rawValue)), ("rank", .integer(m.rank)),
                ("scale", .real(m.scale)), ("mixer", .bool(m.hasMixer)), ("in", .integer(m.inFeatures)), ("out", .integer(m.outFeatures)),
                ("target", .string(m.baseName)), ("dtype", .string(m.a.info.dtype.rawValue)),
                ("dora", .bool(m.magnitude != nil)), ("bias", .bool(m.bias != nil)),
            ])
            if let c = m.component { mo["component"] = .string(c) }
            if let d = line.diagnostics {
                mo["mixer_diagnostics"] = .object(JSONObject([
                    ("distance_from_identity", .real(d.distanceFromIdentity)),
                    ("orthogonality_error", .real(d.orthogonalityError)),
                    ("condition_ratio", .real(d.conditionRatio)),
                ]))
            }
            return .object(mo)
        })
        o["replacements"] = .array(adapter.replacements.map { .object(JSONObject([("key", .string($0.tensor.name)), ("target", .string($0.baseName))])) })
        o["unknown_keys"] = .array(adapter.unknownKeys.map { .string($0) })
        o["non_finite"] = .array(nonFinite.map { .object(JSONObject([("tensor", .string($0.tensor)), ("nan", .integer($0.nan)), ("inf", .integer($0.inf))])) })
        o["warnings"] = .array(warnings.map { .string($0) })
        return .object(o)
    }
}

/// A number with about four significant digits, for diagnostics.
public func formatSig(_ v: Double) -> String {
    guard v.isFinite else { return String(v) }
    if v == 0 { return "0" }
    let magnitude = abs(v)
    if magnitude >= 1000 || magnitude < 0.001 {
        var e = 0
        var m = magnitude
        while m >= 10 { m /= 10; e += 1 }
        while m < 1 { m *= 10; e -= 1 }
        return (v < 0 ? "-" : "") + formatFixed(m, 3) + "e" + String(e)
    }
    let digits = magnitude >= 100 ? 1 : magnitude >= 10 ? 2 : magnitude >= 1 ? 3 : 4
    return formatFixed(v, digits)
}
