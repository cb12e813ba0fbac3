/// How a Mixture-of-Experts adapter's expert updates are written by `convert to-peft --experts`.
public enum ExpertForm: String, Sendable, CaseIterable {
    /// One 2-D module per expert and projection (`…experts.3.gate_proj`, Mixtral `…experts.3.w1`),
    /// named as the base stores its experts: what vLLM and SGLang load.
    case perExpert = "per-expert"
    /// PEFT `target_parameters` (ParamWrapper) modules on the fused 3-D parameters, as transformers
    /// 5 holds them in memory: what PEFT 0.17+ trains and loads.
    case fused
}

extension WorkingAdapter {
    /// Rewrites the expert modules in `form` against the base they are for; exact: every expert's
    /// scale·B·M·A is the same after (the factors are copied, interleaved or padded with zeros,
    /// never multiplied, except for a scale that differs between modules fused together, which is
    /// folded into B and said so).
    mutating func convertExperts(_ form: ExpertForm, base path: String?) throws {
        guard let path else {
            throw InputError.conversion(source.path, "--experts needs --base MODEL: the expert count and the names experts are stored under come from the model")
        }
        let base = try Checkpoint(path: path)
        let names = NameMap(base: base)
        switch form {
        case .perExpert: try expand(names, base: path)
        case .fused: try fuse(names, base: base, path: path)
        }
        expertsConverted = true
    }

    /// target_parameters modules → one module per expert (and gate / up half) on the base's per-expert tensors.
    private mutating func expand(_ names: NameMap, base: String) throws {
        var out: [LoRAModule] = []
        var expanded = 0
        for m in modules {
            guard let p = m.parameter else { out.append(m); continue }
            let placements: [UpdatePlacement]
            switch names.parameterPlacements(m, p, format: .peft) {
            case .success(let found): placements = found
            case .failure(let problem): throw InputError.conversion(source.path, "module \(m.name): \(problem.text)")
            }
            for placed in placements {
                guard placed.target.rows == .all, placed.target.tensor.hasSuffix(".weight") else {
                    throw InputError.conversion(source.path, "\(base) keeps these experts fused (\(placed.target.tensor)): it has no per-expert tensors to name the modules after; keep the target_parameters form")
                }
                var e = placed.module
                e.baseName = String(placed.target.tensor.dropLast(".weight".count))
                e.name = "base_model.model." + e.baseName
                // Held copies of the expert's slices, so the writers and transforms see plain modules.
                e.a = e.a.holding(try e.a.doubles(), shape: e.a.shape)
                e.b = e.b.holding(try e.b.doubles(), shape: e.b.shape)
                e.mixer = try e.mixer.map { $0.holding(try $0.doubles(), shape: $0.shape) }
                out.append(e)
            }
            expanded += 1
        }
        guard expanded > 0 else { throw InputError.conversion(source.path, "--experts per-expert: the adapter has no target_parameters modules") }
        notes.append("wrote \(plural(expanded, "target_parameters module")) as \(plural(out.count - (modules.count - expanded), "per-expert module")), named as \(base) stores its experts")
        modules = out
    }

    /// Per-expert modules → target_parameters modules on the fused parameters (Qwen2/3-MoE,
    /// Mixtral, DeepSeek and other families whose experts transformers fuses as [E, out, in]).
    private mutating func fuse(_ names: NameMap, base: Checkpoint, path: String) throws {
        if let f = names.family, f.parameterWrapperTransposed || f.expertsTransposed {
            throw InputError.conversion(source.path, "\(f.name) stores its experts as [E, in, out]; --experts fused is written only for families whose fused experts are [E, out, in] (Qwen2/3-MoE, Mixtral, DeepSeek)")
        }
        // Group: (experts path in memory, parameter) → expert → part → module.
        struct Group {
            /// The experts' path in memory (`…mlp.experts`) and on disk (`…block_sparse_moe.experts`).
            var path: String
            var disk: String
            var parameter: String
            var parts: [Int: [Int: LoRAModule]] = [:]
        }
        var groups: [String: Group] = [:]
        var order: [String] = []
        var rest: [LoRAModule] = []
        for m in modules {
            guard m.parameter == nil, let (disk, e, leaf) = NameMap.expertModule(m.baseName),
                  let (parameter, part) = NameMap.fusedParameter(ofExpertProjection: leaf) else {
                rest.append(m)
                continue
            }
            guard m.kind == .linear, m.magnitude == nil, m.bias == nil else {
                throw InputError.conversion(source.path, "module \(m.name): a \(m.magnitude != nil ? "DoRA" : m.bias != nil ? "lora_B.bias" : m.kind.rawValue) module cannot be fused into target_parameters (PEFT's ParamWrapper has none)")
            }
            let memory = String((names.family?.memoryName(disk + ".") ?? disk + ".").dropLast())
            let key = memory + "." + parameter
            if groups[key] == nil { groups[key] = Group(path: memory, disk: disk, parameter: parameter); order.append(key) }
            if groups[key]!.parts[e]?[part ?? 0] != nil {
                throw InputError.conversion(source.path, "modules \(groups[key]!.parts[e]![part ?? 0]!.name) and \(m.name) are the same expert projection")
            }
            groups[key]!.parts[e, default: [:]][part ?? 0] = m
        }
        guard !order.isEmpty else { throw InputError.conversion(source.path, "--experts fused: the adapter has no per-expert modules (…experts.N.gate_proj / w1)") }
        var fused: [String: LoRAModule] = [:]
        for key in order {
            let g = groups[key]!
            // The experts the base holds for this layer, from its tensors (bounded by the base):
            // per expert, or the first dimension of the fused parameter.
            var experts = names.expertCount(g.disk, names: NameMap.expertParts[g.parameter]![0].names, format: .peft)
            if experts == 0, let t = names.tensorName(forModule: g.path + "." + g.parameter, suffix: "", format: .peft),
               let shape = base.tensor(t)?.entry.shape, shape.count == 3 {
                experts = shape[0]
            }
            guard experts > 0 else {
                throw InputError.conversion(path, "\(g.path): the model has neither per-expert tensors (\(g.disk).0.…) nor a fused \(g.path).\(g.parameter)")
            }
            if let e = g.parts.keys.first(where: { $0 >= experts }) {
                throw InputError.conversion(source.path, "\(g.path): expert \(e) but the base has \(experts) experts per layer")
            }
            fused[key] = try fuseGroup(path: g.path, parameter: g.parameter, parts: g.parts, experts: experts)
        }
        // Two parameters on one module nest: the first in class order (gate_up_proj) innermost.
        var written: [LoRAModule] = []
        for key in order {
            var m = fused[key]!
            let nested = m.parameter!.name == "gate_up_proj" && fused[m.baseName + ".down_proj"] != nil
            m.name = "base_model.model." + m.baseName + (nested ? ".base_layer" : "")
            written.append(m)
        }
        let count = groups.values.reduce(0) { $0 + $1.parts.values.reduce(0) { $0 + $1.count } }
        let experts = Set(written.map { $0.parameter!.experts }).sorted().map(String.init).joined(separator: "/")
        notes.append("fused \(plural(count, "per-expert module")) into \(plural(written.count, "target_parameters module")) of \(experts) experts (experts the adapter does not adapt get zero factors)")
        modules = rest + written
    }

    /// One target_parameters module from per-expert modules: expert e's A in rows e·R..<(e+1)·R,
    /// its B in columns j·E + e; gate and up side by side in a rank R = r_gate + r_up (gate's B in
    /// the first half of the outputs); ranks padded with zeros to the largest.
    private func fuseGroup(path: String, parameter: String, parts: [Int: [Int: LoRAModule]], experts: Int) throws -> LoRAModule {
        let all = parts.values.flatMap(\.values)
        let partCount = parameter == "gate_up_proj" ? 2 : 1
        let inputs = all[0].inFeatures, outputs = all[0].outFeatures
        for m in all where m.inFeatures != inputs || m.outFeatures != outputs {
            throw InputError.conversion(source.path, "module \(m.name) is [\(m.outFeatures), \(m.inFeatures)] but \(all[0].name) is [\(outputs), \(inputs)]: experts of one parameter share a shape")
        }
        // Rank per part: the largest of any expert's.
        var partRank = [Int](repeating: 0, count: partCount)
        for (_, ps) in parts { for (k, m) in ps { partRank[k] = max(partRank[k], m.rank) } }
        for k in 0..<partCount where partRank[k] == 0 { partRank[k] = 1 }  // a part no expert adapts: rank 1 of zeros
        let rank = partRank.reduce(0, +)
        // One scale for the fused module: modules of different scales would need B rescaled.
        let scale = all[0].scale
        guard all.allSatisfy({ $0.scale == scale }) else {
            throw InputError.conversion(source.path, "the per-expert modules of \(path).\(parameter) have different scales; fused, they would share one and B would have to be rescaled (not exact): convert each scale separately")
        }
        let out = outputs * partCount
        var a = [Double](repeating: 0, count: experts * rank * inputs)
        var b = [Double](repeating: 0, count: out * experts * rank)
        let withMixer = all.contains { $0.mixer != nil }
        var mixer = [Double](repeating: 0, count: withMixer ? experts * rank * rank : 0)
        for e in 0..<experts {
            var offset = 0
            for k in 0..<partCount {
                let m = parts[e]?[k]
                if let m {
                    let r = m.rank, ma = m.heldA, mb = m.heldB
                    for t in 0..<r { for j in 0..<inputs { a[(e * rank + offset + t) * inputs + j] = ma[t * inputs + j] } }
                    for i in 0..<outputs {
                        for t in 0..<r { b[(k * outputs + i) * experts * rank + (offset + t) * experts + e] = mb[i * r + t] }
                    }
                }
                // The part's mixer block: the module's own (zero-padded), else the identity.
                if withMixer {
                    if let m, let mm = m.heldMixer {
                        let r = m.rank
                        for s in 0..<r { for t in 0..<r { mixer[(e * rank + offset + s) * rank + offset + t] = mm[s * r + t] } }
                    } else {
                        for t in 0..<partRank[k] { mixer[(e * rank + offset + t) * rank + offset + t] = 1 }
                    }
                }
                offset += partRank[k]
            }
        }
        let template = all[0]
        var m = template
        m.baseName = path
        m.a = template.a.holding(a, shape: [experts * rank, inputs])
        m.b = template.b.holding(b, shape: [out, experts * rank])
        m.mixer = withMixer ? TensorRef(name: path + ".mixer", held: mixer, shape: [experts * rank, rank], dtype: template.a.dtype) : nil
        m.parameter = ExpertParameter(name: parameter, experts: experts)
        m.scale = scale
        m.alpha = nil
        return m
    }
}

extension ModelFamily {
    /// A name on disk as transformers holds it in memory (the first rename whose disk side matches).
    func memoryName(_ disk: String) -> String {
        for r in renames {
            if r.anchored {
                if disk.hasPrefix(r.to) { return r.from + disk.dropFirst(r.to.count) }
            } else if let range = disk.range(of: r.to) {
                return disk.replacingCharacters(in: range, with: r.from)
            }
        }
        return disk
    }
}
