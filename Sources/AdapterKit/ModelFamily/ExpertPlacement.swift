/// Why a module's update has nowhere to land, for the preflight's list.
public struct PlacementProblem: Error, Sendable {
    public let text: String
}

/// Placements of Mixture-of-Experts and fused updates: expert slices of 3-D tensors, the gate and
/// up halves of fused projections, q/k/v rows of a fused attention input (docs/model-families.md).
extension NameMap {
    /// A fused expert parameter's parts as per-expert 2-D tensors (transformers' `save_pretrained`
    /// reverts the fusion: Qwen / DeepSeek names first, Mixtral's second). gate is the first half
    /// of gate_up's rows.
    static let expertParts: [String: [(part: String, names: [String])]] = [
        "gate_up_proj": [("gate", ["gate_proj", "w1"]), ("up", ["up_proj", "w3"])],
        "down_proj": [("down", ["down_proj", "w2"])],
    ]

    /// A per-expert module name split: `…mlp.experts.3.gate_proj` → (`…mlp.experts`, 3,
    /// `gate_proj`); nil when the name is not `<path>.experts.<number>.<leaf>`.
    static func expertModule(_ name: String) -> (experts: String, index: Int, leaf: String)? {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 3, parts[parts.count - 3] == "experts", let e = Int(parts[parts.count - 2]) else { return nil }
        return (parts.dropLast(2).joined(separator: "."), e, String(parts[parts.count - 1]))
    }

    /// A per-expert module name's fused parameter and its part index there (nil for the whole).
    static func fusedParameter(ofExpertProjection name: String) -> (parameter: String, part: Int?)? {
        switch name {
        case "gate_proj", "w1": ("gate_up_proj", 0)
        case "up_proj", "w3": ("gate_up_proj", 1)
        case "down_proj", "w2": ("down_proj", nil)
        default: nil
        }
    }

    /// A PEFT `target_parameters` module: one placement per expert on the fused 3-D tensor, or
    /// per expert and part on per-expert 2-D tensors.
    func parameterPlacements(_ m: LoRAModule, _ p: ExpertParameter, format: AdapterFormat) -> Result<[UpdatePlacement], PlacementProblem> {
        let e = p.experts, out = m.outFeatures, inputs = m.inFeatures
        let label = "\(m.baseName).\(p.name)"
        if let t = tensorName(forModule: label, suffix: "", format: format) {
            let s = base.tensor(t)?.entry.shape ?? []
            guard s.count == 3 else {
                return .failure(PlacementProblem(text: "\(t) has shape \(s), not the [experts, ·, ·] of a fused expert parameter"))
            }
            guard s[0] == e else {
                return .failure(PlacementProblem(text: "the adapter holds \(e) experts of \(p.name) (A has \(m.rank) rows for rank \(m.updateRank)) but \(t) has \(s[0])"))
            }
            let normal = s[1] == out && s[2] == inputs, transposed = s[1] == inputs && s[2] == out
            guard normal || transposed else {
                return .failure(PlacementProblem(text: "each expert's update is [\(out), \(inputs)] but \(t) holds experts of [\(s[1]), \(s[2])]"))
            }
            // PEFT's rule where both fit (square experts): (B·A)ᵀ for is_transposed classes only.
            let flip = normal && transposed ? family?.parameterWrapperTransposed ?? false : transposed
            return .success((0..<e).map { i in
                UpdatePlacement(module: m.expert(i), target: UpdateTarget(tensor: t, rows: .range(i * s[1]..<(i + 1) * s[1]), viewColumns: s[2], transposed: flip))
            })
        }
        if let packed = tensorName(forModule: label + "_blocks", suffix: "", format: format), let entry = base.tensor(packed)?.entry {
            return mxfp4Placements(m, p, packed: packed, entry: entry)
        }
        guard let parts = Self.expertParts[p.name] else {
            return .failure(PlacementProblem(text: "no base tensor \(label), and per-expert tensors are known only for gate_up_proj and down_proj"))
        }
        guard out % parts.count == 0 else {
            return .failure(PlacementProblem(text: "\(p.name)'s update has \(out) outputs, which do not split into \(parts.map(\.part).joined(separator: " and "))"))
        }
        let partRows = out / parts.count
        func perExpert(_ i: Int, _ names: [String]) -> String? {
            names.lazy.compactMap { self.weightName(forModule: "\(m.baseName).\(i).\($0)", format: format) }.first
        }
        // The base's experts first (bounded by the base): the adapter's count is only a claim.
        let have = expertCount(m.baseName, names: parts[0].names, format: format)
        if have == 0 {
            return .failure(PlacementProblem(text: "no base tensor \(label) (fused experts) nor \(m.baseName).0.\(parts[0].names[0]).weight (one per expert)"))
        }
        if have != e {
            return .failure(PlacementProblem(text: "the adapter holds \(e) experts of \(p.name) (A has \(m.rank) rows for rank \(m.updateRank)) but the base has \(have) (\(m.baseName).0 … \(have - 1))"))
        }
        var placements: [UpdatePlacement] = []
        var missing: [String] = []
        for i in 0..<e {
            for (k, part) in parts.enumerated() {
                guard let t = perExpert(i, part.names) else {
                    missing.append("\(m.baseName).\(i).\(part.names[0]).weight")
                    continue
                }
                let rows = parts.count == 1 ? nil : k * partRows..<(k + 1) * partRows
                placements.append(UpdatePlacement(module: m.expert(i, outputs: rows, part: parts.count == 1 ? nil : part.part), target: UpdateTarget(tensor: t, rows: .all)))
            }
        }
        if let first = missing.first {
            return .failure(PlacementProblem(text: "the base lacks \(first)\(missing.count > 1 ? " and \(missing.count - 1) more" : "") of the \(e) experts of \(p.name)"))
        }
        return .success(placements)
    }

    /// A `target_parameters` module on MXFP4 experts (gpt-oss `…experts.gate_up_proj_blocks`):
    /// one placement per expert on the decoded blocks, [E, rows, 32·G]. Those rows are the
    /// parameter's columns (transformers transposes the decoded blocks into the [E, in, out]
    /// parameter), so where PEFT adds (B·A)ᵀ to the parameter, B·A lands on the blocks as it is.
    func mxfp4Placements(_ m: LoRAModule, _ p: ExpertParameter, packed: String, entry: TensorEntry) -> Result<[UpdatePlacement], PlacementProblem> {
        guard case .mxfp4 = entry.encoding else {
            return .failure(PlacementProblem(text: "\(packed) \(entry.dtype.rawValue) \(entry.shape) is not read as MXFP4 blocks (the base's warnings say why)"))
        }
        let v = entry.encoding.valueShape(entry.shape), e = p.experts
        guard v.count == 3 else {
            return .failure(PlacementProblem(text: "\(packed) holds values \(v), not the [experts, ·, ·] of a fused expert parameter"))
        }
        guard v[0] == e else {
            return .failure(PlacementProblem(text: "the adapter holds \(e) experts of \(p.name) (A has \(m.rank) rows for rank \(m.updateRank)) but \(packed) has \(v[0])"))
        }
        let out = m.outFeatures, inputs = m.inFeatures
        let normal = v[1] == out && v[2] == inputs, transposed = v[1] == inputs && v[2] == out
        guard normal || transposed else {
            return .failure(PlacementProblem(text: "each expert's update is [\(out), \(inputs)] but the MXFP4 \(packed) holds experts of [\(v[1]), \(v[2])] values"))
        }
        let flip = normal && transposed ? !(family?.parameterWrapperTransposed ?? true) : transposed
        return .success((0..<e).map { i in
            UpdatePlacement(module: m.expert(i), target: UpdateTarget(tensor: packed, rows: .range(i * v[1]..<(i + 1) * v[1]), viewColumns: v[2], transposed: flip))
        })
    }

    /// How many experts the base stores per expert under `prefix` (`prefix.0.<name>.weight`, `prefix.1.…`, …
    /// with one of `names`): counted up from 0 while they exist, so bounded by the base's tensors.
    func expertCount(_ prefix: String, names: [String], format: AdapterFormat) -> Int {
        var n = 0
        while names.contains(where: { weightName(forModule: "\(prefix).\(n).\($0)", format: format) != nil }) { n += 1 }
        return n
    }

    /// An older per-expert module (`…experts.3.gate_proj`, Mixtral `…experts.3.w1`) on a base that
    /// keeps the experts fused: expert 3's rows of `…experts.gate_up_proj` ([E, 2I, H]: gate the
    /// first I rows), or, for [E, in, out] layouts, its rows transposed with the gate's columns
    /// (the first half, or every other one for gpt-oss). nil when the name is not an expert's.
    func perExpertPlacement(_ m: LoRAModule, format: AdapterFormat) -> Result<[UpdatePlacement], PlacementProblem>? {
        guard let (prefix, e, leaf) = Self.expertModule(m.baseName), let (parameter, part) = Self.fusedParameter(ofExpertProjection: leaf) else { return nil }
        if let packed = tensorName(forModule: prefix + "." + parameter + "_blocks", suffix: "", format: format) {
            return .failure(PlacementProblem(text: "\(packed) holds MXFP4 experts; per-expert updates (experts.N.\(leaf)) onto them are not supported yet: use an adapter trained with PEFT target_parameters, or a dequantized base"))
        }
        guard let t = tensorName(forModule: prefix + "." + parameter, suffix: "", format: format) else { return nil }
        let s = base.tensor(t)?.entry.shape ?? []
        let out = m.outFeatures, inputs = m.inFeatures, k = part == nil ? 1 : 2
        guard s.count == 3, m.kind == .linear else {
            return .failure(PlacementProblem(text: "\(t) has shape \(s), not the [experts, ·, ·] a per-expert \(m.kind.rawValue) update can land on"))
        }
        guard e < s[0] else { return .failure(PlacementProblem(text: "expert \(e) but \(t) holds \(s[0]) experts")) }
        let normal = s[1] == out * k && s[2] == inputs, transposed = s[1] == inputs && s[2] == out * k
        guard normal || transposed else {
            return .failure(PlacementProblem(text: "the update is [\(out), \(inputs)] but \(t) holds experts of [\(s[1]), \(s[2])]\(k == 2 ? " (gate and up)" : "")"))
        }
        let flip = normal && transposed ? family?.expertsTransposed ?? false : transposed
        let target: UpdateTarget
        if flip {
            let columns = part.map { p in family?.gateUpInterleaved == true ? StridedRange(start: p, step: 2, count: out) : StridedRange(start: p * out, count: out) }
            target = UpdateTarget(tensor: t, rows: .range(e * s[1]..<(e + 1) * s[1]), viewColumns: s[2], transposed: true, columns: columns)
        } else {
            let first = e * s[1] + (part ?? 0) * out
            target = UpdateTarget(tensor: t, rows: .range(first..<first + out), viewColumns: s[2])
        }
        return .success([UpdatePlacement(module: m, target: target)])
    }

    /// A q/k/v (or gate/up) module on a base that fuses them (Phi-3 `qkv_proj` and `gate_up_proj`,
    /// Qwen2-VL's vision `attn.qkv`): its rows of the fused weight. q, k, v are equal thirds when
    /// the module is a third; otherwise the config's heads give q = heads·head_dim and k = v =
    /// kv_heads·head_dim. nil when the name is none of these.
    func fusedDensePlacement(_ m: LoRAModule, format: AdapterFormat) -> Result<[UpdatePlacement], PlacementProblem>? {
        guard let dot = m.baseName.lastIndex(of: ".") else { return nil }
        let parent = String(m.baseName[..<dot]), leaf = String(m.baseName[m.baseName.index(after: dot)...])
        let fusedNames: [String], part: Int
        switch leaf {
        case "q_proj": (fusedNames, part) = (["qkv_proj", "qkv"], 0)
        case "k_proj": (fusedNames, part) = (["qkv_proj", "qkv"], 1)
        case "v_proj": (fusedNames, part) = (["qkv_proj", "qkv"], 2)
        case "gate_proj": (fusedNames, part) = (["gate_up_proj"], 0)
        case "up_proj": (fusedNames, part) = (["gate_up_proj"], 1)
        default: return nil
        }
        guard let t = fusedNames.lazy.compactMap({ self.weightName(forModule: parent + "." + $0, format: format) }).first else { return nil }
        let s = base.tensor(t)?.entry.shape ?? []
        let out = m.outFeatures
        guard s.count == 2, m.kind == .linear, s[1] == m.inFeatures else {
            return .failure(PlacementProblem(text: "the update is [\(out), \(m.inFeatures)] (\(m.kind.rawValue)) but the fused \(t) has shape \(s)"))
        }
        var sizes: [Int]
        if fusedNames[0] == "gate_up_proj" {
            sizes = [s[0] / 2, s[0] / 2]
        } else if out * 3 == s[0] {
            sizes = [out, out, out]
        } else if let c = base.config, let h = c.attentionHeads, let kv = c.keyValueHeads, let d = c.headDim {
            sizes = [h * d, kv * d, kv * d]
        } else {
            sizes = []
        }
        guard !sizes.isEmpty, sizes.reduce(0, +) == s[0], sizes[part] == out else {
            return .failure(PlacementProblem(text: "\(leaf)'s update has \(out) rows, which is not its part of the fused \(t) (\(s[0]) rows\(sizes.isEmpty ? ", and config.json gives no attention heads" : ": \(sizes.map(String.init).joined(separator: " + "))"))"))
        }
        let first = sizes[..<part].reduce(0, +)
        return .success([UpdatePlacement(module: m, target: UpdateTarget(tensor: t, rows: .range(first..<first + out)))])
    }
}
