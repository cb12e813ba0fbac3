/// What a llama.cpp adapter needs of its base (docs/formats.md §11): the GGUF architecture, the
/// attention heads for the q/k row permutation, and the shape of every weight by its GGUF name.
/// The base is a GGUF file or a Hugging Face model folder (or safetensors file).
struct GGUFBase {
    let path: String
    let architecture: String
    let heads: Int?
    let kvHeads: Int?
    /// [out, in] of each 2-D weight, by GGUF name (`blk.0.attn_q.weight`).
    let shapes: [String: [Int]]

    /// HF `model_type` → GGUF `general.architecture`, for the families whose names are mapped
    /// (convert_hf_to_gguf.py: `LlamaModel` covers llama, mistral and Mixtral; the Qwen MoE models
    /// have their own architectures, with the dense models' attention names).
    static let architectures: [String: String] = ["llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                                                  "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"]

    /// Whether convert_hf_to_gguf.py permutes q and k rows for rope (LlamaModel's `undo_permute`;
    /// Qwen2 and Qwen3 keep the HF order).
    var permutesQK: Bool { architecture == "llama" }

    /// A GGUF base already read.
    init(file f: GGUFFile) throws {
        path = f.path
        guard let arch = f.value("general.architecture")?.string else { throw InputError(f.path, "the GGUF base has no general.architecture") }
        architecture = arch
        heads = f.value("\(arch).attention.head_count")?.integer
        kvHeads = f.value("\(arch).attention.head_count_kv")?.integer ?? heads
        shapes = Dictionary(f.tensors.filter { $0.dims.count == 2 || $0.dims.count == 3 }.map { ($0.name, $0.shape) }, uniquingKeysWith: { a, _ in a })
    }

    init(path: String) throws {
        if GGUFFile.looksLikeGGUF(path) {
            self = try GGUFBase(file: try GGUFFile(path: path))
            return
        }
        self.path = path
        let c = try Checkpoint(path: path)
        guard let type = c.config?.modelType else { throw InputError(path, "the base has no config.json naming its model_type, so its llama.cpp architecture is unknown") }
        guard let arch = Self.architectures[type] else {
            throw InputError(path, "model_type \(quotedForMessage(type)): llama.cpp names are mapped for \(Self.architectures.keys.sorted().joined(separator: ", ")) only")
        }
        architecture = arch
        heads = c.config?.attentionHeads
        kvHeads = c.config?.keyValueHeads ?? heads
        var shapes: [String: [Int]] = [:]
        // Experts as convert_hf_to_gguf.py stacks them: per-expert 2-D weights (Mixtral's
        // `block_sparse_moe.experts.N.w1`, Qwen's `mlp.experts.N.gate_proj`) or fused 3-D
        // parameters (`mlp.experts.gate_up_proj` [E, 2·f, h] split into gate and up, `down_proj`).
        var experts: [String: (count: Int, shape: [Int])] = [:]
        for (entry, _) in c.tensors {
            let stem = entry.name.hasSuffix(".weight") ? String(entry.name.dropLast(".weight".count)) : entry.name
            if entry.shape.count == 2, entry.name.hasSuffix(".weight"), let g = Self.ggufName(forModule: stem) {
                shapes[g] = entry.shape
            } else if entry.shape.count == 2, entry.name.hasSuffix(".weight"), let (_, e, leaf) = NameMap.expertModule(stem),
                      let layer = Self.layerIndex(stem), let g = Self.expertTensor[leaf] {
                let name = "blk.\(layer).\(g).weight"
                experts[name] = (max(experts[name]?.count ?? 0, e + 1), entry.shape)
            } else if entry.shape.count == 3, let layer = Self.layerIndex(stem), stem.hasSuffix(".experts.gate_up_proj"), entry.shape[1] % 2 == 0 {
                for g in ["ffn_gate_exps", "ffn_up_exps"] { shapes["blk.\(layer).\(g).weight"] = [entry.shape[0], entry.shape[1] / 2, entry.shape[2]] }
            } else if entry.shape.count == 3, let layer = Self.layerIndex(stem), stem.hasSuffix(".experts.down_proj") {
                shapes["blk.\(layer).ffn_down_exps.weight"] = entry.shape
            }
        }
        for (name, e) in experts { shapes[name] = [e.count] + e.shape }
        self.shapes = shapes
    }

    /// `model.layers.N.self_attn.q_proj` → `blk.N.attn_q.weight` (gguf-py's tensor_mapping for
    /// the llama family); nil for a module llama.cpp has no tensor for here.
    static func ggufName(forModule name: String) -> String? {
        var n = Substring(name)
        for prefix in ["base_model.model.", "model."] where n.hasPrefix(prefix) { n = n.dropFirst(prefix.count) }
        if n == "embed_tokens" { return "token_embd.weight" }
        if n == "lm_head" { return "output.weight" }
        let parts = n.split(separator: ".")
        guard parts.count == 4, parts[0] == "layers", let layer = Int(parts[1]) else { return nil }
        let leaves: [String: String] = ["self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                                        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                                        "mlp.down_proj": "ffn_down"]
        guard let leaf = leaves["\(parts[2]).\(parts[3])"] else { return nil }
        return "blk.\(layer).\(leaf).weight"
    }

    /// llama.cpp's stacked expert tensor for a per-expert projection (Qwen and Mixtral names).
    static let expertTensor = ["gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                               "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"]

    /// N of the `layers.N` in a module name.
    static func layerIndex(_ name: String) -> Int? {
        let parts = name.split(separator: ".")
        guard let i = parts.firstIndex(of: "layers"), i + 1 < parts.count else { return nil }
        return Int(parts[i + 1])
    }

    /// llama.cpp's expert tensors for a PEFT `target_parameters` parameter with `outputs` rows per
    /// expert: gate_up_proj's first half of rows is `ffn_gate_exps`, the second `ffn_up_exps`;
    /// down_proj is `ffn_down_exps` whole (nil rows). nil for other parameters.
    static func expertLeaves(_ parameter: String, outputs: Int) -> [(leaf: String, part: String?, rows: Range<Int>?)]? {
        switch parameter {
        case "gate_up_proj": [("ffn_gate_exps", "gate", 0..<outputs / 2), ("ffn_up_exps", "up", outputs / 2..<outputs)]
        case "down_proj": [("ffn_down_exps", nil, nil)]
        default: nil
        }
    }

    /// The head count whose rope halves convert_hf_to_gguf.py interleaved in the rows of `name`
    /// (q: heads, k: KV heads; nil for tensors it leaves as they are).
    func permutationHeads(for name: String, rows: Int) -> Result<Int?, PlacementProblem> {
        guard permutesQK, name.hasSuffix("attn_q.weight") || name.hasSuffix("attn_k.weight") else { return .success(nil) }
        guard let n = name.hasSuffix("attn_q.weight") ? heads : kvHeads, n > 0, rows % (2 * n) == 0 else {
            return .failure(PlacementProblem(text: "\(name) is permuted for rope by heads, but the base gives no head count that divides \(rows) rows"))
        }
        return .success(n)
    }

    /// Where a module's update lands in a GGUF base: a 2-D weight by its name, or, for experts,
    /// expert rows of llama.cpp's 3-D `blk.N.ffn_{gate,up,down}_exps.weight` ([E, out, in] seen as
    /// [E·out, in]): PEFT `target_parameters` on `mlp.experts.gate_up_proj` (the first half of each
    /// expert's rows gate, the second up) and `down_proj`, or per-expert modules
    /// (`mlp.experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1`).
    static func placements(of m: LoRAModule, in file: GGUFFile) -> Result<[(name: String, module: LoRAModule, rows: Range<Int>?)], PlacementProblem> {
        func expertRows(_ name: String, _ e: Int) -> Range<Int>? {
            guard let t = file.tensor(name), t.shape.count == 3 else { return nil }
            return e * t.shape[1]..<(e + 1) * t.shape[1]
        }
        if let p = m.parameter {
            guard let layer = layerIndex(m.baseName), m.baseName.hasSuffix(".experts") else {
                return .failure(PlacementProblem(text: "target_parameters on \(m.baseName), which is not a layer's experts"))
            }
            guard let leaves = expertLeaves(p.name, outputs: m.outFeatures) else {
                return .failure(PlacementProblem(text: "\(p.name): llama.cpp expert tensors are known for gate_up_proj and down_proj"))
            }
            var placed: [(String, LoRAModule, Range<Int>?)] = []
            for (leaf, part, half) in leaves {
                let name = "blk.\(layer).\(leaf).weight"
                guard file.tensor(name) != nil else { return .failure(PlacementProblem(text: "the base has no \(name)")) }
                for e in 0..<p.experts {
                    guard let rows = expertRows(name, e) else { return .failure(PlacementProblem(text: "\(name) is not a 3-D expert tensor")) }
                    placed.append((name, m.expert(e, outputs: half, part: part), rows))
                }
            }
            return .success(placed)
        }
        if let (_, e, leafName) = NameMap.expertModule(m.baseName), let layer = layerIndex(m.baseName), let leaf = expertTensor[leafName] {
            let name = "blk.\(layer).\(leaf).weight"
            guard let rows = expertRows(name, e) else { return .failure(PlacementProblem(text: "the base has no 3-D \(name) for expert \(e)")) }
            return .success([(name, m, rows)])
        }
        if let name = ggufName(forModule: m.baseName) { return .success([(name, m, nil)]) }
        return .failure(PlacementProblem(text: "llama.cpp has no tensor for \(m.baseName) in the names mapped here (attention and MLP projections, experts, embed_tokens, lm_head)"))
    }

    /// The rows of an [out, ·] matrix in the order convert_hf_to_gguf.py writes q (`heads`) or k
    /// (`kvHeads`): per head, the two rope halves interleaved (reshape(n, 2, out/n/2) then swap).
    static func permutedRows(_ m: [Double], rows: Int, cols: Int, heads n: Int) -> [Double] {
        let half = rows / n / 2
        var out = [Double](repeating: 0, count: m.count)
        for h in 0..<n {
            for i in 0..<half {
                for j in 0..<2 {
                    let to = h * 2 * half + i * 2 + j, from = h * 2 * half + j * half + i
                    for c in 0..<cols { out[to * cols + c] = m[from * cols + c] }
                }
            }
        }
        return out
    }
}

extension AdapterWriter {
    /// A llama.cpp LoRA GGUF (llama-adapter.cpp): `general.type` adapter, `adapter.type` lora,
    /// `adapter.lora.alpha` (FLOAT32), and per module `<gguf name>.lora_a` (GGML [in, r]) and
    /// `.lora_b` ([r, out]). llama.cpp scales every module by alpha / r (r = lora_b's ne[0]), so
    /// each module's own scale (rsLoRA, rank and alpha patterns, kohya alphas) is folded into
    /// lora_b as the ratio to alpha / r, mixers into lora_a (A' = M·A), and q/k rows permuted as
    /// the base's converter permuted the weights; each factor rounded once.
    static func writeGGUF(_ w: WorkingAdapter, file: FileDescriptor, base: String, dtype: DType?, sync: Bool) throws -> [String] {
        let b = try GGUFBase(path: base)
        var problems: [String] = []
        var notes: [String] = []
        let alpha: Double
        if w.source.format == .peft, let a = w.source.config?["lora_alpha"]?.double { alpha = a } else { alpha = (w.modules.first.map { $0.scale * Double($0.rank) }) ?? 1 }
        var tensors: [GGUFLayout.Tensor] = []
        var data: [[UInt8]] = []
        var rescaled = 0, permuted = 0
        var stacked: [String: [(expert: Int, module: LoRAModule)]] = [:]
        /// One factor rounded once into the output dtype (F64 factors as F32: llama.cpp has no F64 matmul).
        func emit(_ name: String, _ values: [Double], dims: [Int], input: DType) throws {
            var t = try outputType(input, dtype, tensor: name)
            if t == .f64 { t = .f32 }
            guard let type: GGMLType = [.f32: .f32, .f16: .f16, .bf16: .bf16][t], let codec = RowCodec(.plain(t)) else {
                throw InputError(name, "cannot be written as \(t.rawValue) in GGUF")
            }
            tensors.append(GGUFLayout.Tensor(name: name, dims: dims, type: type))
            data.append(try codec.encode(values, tensor: name))
        }
        for m in w.modules {
            // Mixers are already folded into A (the conversion does it for every layout without one).
            precondition(m.heldMixer == nil, "to-gguf writes folded modules")
            // llama.cpp applies alpha / r: the module's own scale goes into B as the ratio.
            let ratio = m.scale / (alpha / Double(m.updateRank))
            guard ratio.isFinite else { problems.append("module \(m.name): scale \(m.scale) with alpha \(alpha) cannot be written for llama.cpp"); continue }
            if ratio != 1 { rescaled += 1 }
            if let p = m.parameter {
                // PEFT target_parameters on experts: one 3-D LoRA pair per llama.cpp expert tensor,
                // lora_a [E, r, in] and lora_b [E, out, r] (numpy order), which llama.cpp applies
                // expert by expert (build_lora_mm_id).
                guard let layer = GGUFBase.layerIndex(m.baseName), m.baseName.hasSuffix(".experts") else {
                    problems.append("module \(m.name): target_parameters on \(m.baseName), which is not a layer's experts")
                    continue
                }
                guard let leaves = GGUFBase.expertLeaves(p.name, outputs: m.outFeatures) else {
                    problems.append("module \(m.name): llama.cpp expert tensors are known for gate_up_proj and down_proj")
                    continue
                }
                let e = p.experts, r = m.updateRank, inputs = m.inFeatures
                let bm = m.heldB
                for (leaf, _, half) in leaves {
                    let g = "blk.\(layer).\(leaf).weight", rows = half ?? 0..<m.outFeatures
                    guard let shape = b.shapes[g] else { problems.append("module \(m.name): the base has no \(g) (expert modules need a GGUF base that has its expert tensors)"); continue }
                    guard shape == [e, rows.count, inputs] else {
                        problems.append("module \(m.name): \(e) experts of [\(rows.count), \(inputs)] but the base's \(g) is \(shape)")
                        continue
                    }
                    // B's expert e is its columns e, e + E, … (PEFT reshapes B to [out, r, E]).
                    var lb = [Double](repeating: 0, count: e * rows.count * r)
                    for x in 0..<e {
                        for (i, row) in rows.enumerated() {
                            for j in 0..<r { lb[(x * rows.count + i) * r + j] = bm[row * (r * e) + j * e + x] * ratio }
                        }
                    }
                    try emit(g + ".lora_a", m.heldA, dims: [inputs, r, e], input: m.aType)
                    try emit(g + ".lora_b", lb, dims: [r, rows.count, e], input: m.bType)
                }
                continue
            }
            if let (_, x, leaf) = NameMap.expertModule(m.baseName) {
                // Per-expert modules are stacked below into one 3-D pair per expert tensor.
                guard let layer = GGUFBase.layerIndex(m.baseName), let g = GGUFBase.expertTensor[leaf].map({ "blk.\(layer).\($0).weight" }) else {
                    problems.append("module \(m.name): llama.cpp has no expert tensor for \(leaf)")
                    continue
                }
                guard m.kind == .linear, m.magnitude == nil, m.bias == nil else {
                    problems.append("module \(m.name): \(m.magnitude != nil ? "DoRA" : m.bias != nil ? "lora_B.bias" : "a \(m.kind.rawValue) layer"), which llama.cpp adapters cannot hold")
                    continue
                }
                guard let shape = b.shapes[g], shape.count == 3 else {
                    problems.append("module \(m.name): the base has no 3-D \(g) for its experts")
                    continue
                }
                guard x < shape[0], [shape[1], shape[2]] == [m.outFeatures, m.inFeatures] else {
                    problems.append("module \(m.name): expert \(x) of [\(m.outFeatures), \(m.inFeatures)] but the base's \(g) is \(shape)")
                    continue
                }
                stacked[g, default: []].append((x, m))
                continue
            }
            guard let g = GGUFBase.ggufName(forModule: m.baseName) else {
                problems.append("module \(m.name): llama.cpp has no tensor for \(m.baseName) in the names mapped here (attention and MLP projections, embed_tokens, lm_head)")
                continue
            }
            guard m.kind == .linear else { problems.append("module \(m.name): a \(m.kind.rawValue) layer; llama.cpp LoRA adapts linear weights"); continue }
            if m.magnitude != nil { problems.append("module \(m.name): DoRA, which llama.cpp adapters cannot hold"); continue }
            if m.bias != nil { problems.append("module \(m.name): lora_B.bias, which llama.cpp adapters cannot hold"); continue }
            guard let shape = b.shapes[g] else { problems.append("module \(m.name): the base has no \(g)"); continue }
            guard shape == [m.outFeatures, m.inFeatures] else {
                problems.append("module \(m.name): the update is [\(m.outFeatures), \(m.inFeatures)] but the base's \(g) is \(shape)")
                continue
            }
            let r = m.rank, out = m.outFeatures
            var bm = ratio == 1 ? m.heldB : m.heldB.map { $0 * ratio }
            switch b.permutationHeads(for: g, rows: out) {
            case .failure(let problem):
                problems.append("module \(m.name): \(problem.text)")
                continue
            case .success(let n?):
                bm = GGUFBase.permutedRows(bm, rows: out, cols: r, heads: n)
                permuted += 1
            case .success(nil):
                break
            }
            try emit(g + ".lora_a", m.heldA, dims: [m.inFeatures, r], input: m.aType)
            try emit(g + ".lora_b", bm, dims: [r, out], input: m.bType)
        }
        // Each expert tensor's per-expert modules as one pair lora_a [E, r, in], lora_b [E, out, r]
        // (numpy order) at the largest rank among them: smaller ranks padded with zeros, experts
        // without a module all zeros (no update), each module's scale folded into its B as the
        // ratio to alpha / r of the stacked rank.
        for g in stacked.keys.sorted() {
            let modules = stacked[g]!, shape = b.shapes[g]!
            let e = shape[0], out = shape[1], inputs = shape[2]
            let r = modules.map(\.module.updateRank).max()!
            var la = [Double](repeating: 0, count: e * r * inputs), lb = [Double](repeating: 0, count: e * out * r)
            var seen = Set<Int>()
            for (x, m) in modules {
                guard seen.insert(x).inserted else { problems.append("module \(m.name): expert \(x) of \(g) is adapted twice"); continue }
                let ratio = m.scale / (alpha / Double(r)), k = m.updateRank
                guard ratio.isFinite else { problems.append("module \(m.name): scale \(m.scale) with alpha \(alpha) cannot be written for llama.cpp"); continue }
                if ratio != 1 { rescaled += 1 }
                let a = m.heldA, bm = m.heldB
                for i in 0..<k { for j in 0..<inputs { la[(x * r + i) * inputs + j] = a[i * inputs + j] } }
                for i in 0..<out { for j in 0..<k { lb[(x * out + i) * r + j] = bm[i * k + j] * ratio } }
            }
            let input = modules[0].module
            try emit(g + ".lora_a", la, dims: [inputs, r, e], input: input.aType)
            try emit(g + ".lora_b", lb, dims: [r, out, e], input: input.bType)
            notes.append("stacked \(plural(modules.count, "per-expert module")) into \(g).lora_a/lora_b (\(e) experts, rank \(r)\(modules.count < e ? "; experts without a module get a zero update" : ""))")
        }
        if !w.replacements.isEmpty { problems.append("modules_to_save (\(w.replacements.map(\.tensor.name).prefix(3).joined(separator: ", "))) cannot be held by a llama.cpp adapter") }
        // Two modules on one llama.cpp tensor (a target_parameters module and per-expert modules of
        // the same experts, say) would write it twice.
        var names = Set<String>()
        for t in tensors where !names.insert(t.name).inserted { problems.append("two modules of the adapter both adapt \(t.name.dropLast(".lora_a".count))") }
        guard problems.isEmpty else { throw ProblemList(subject: "to-gguf", problems: problems) }
        let metadata: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string(b.architecture)), ("general.type", .string("adapter")),
            ("adapter.type", .string("lora")), ("adapter.lora.alpha", .f32(Float(alpha))),
        ]
        let layout = try GGUFLayout(metadata: metadata, tensors: tensors)
        try layout.write(to: file) { data[$0] }
        if sync { try file.sync() }
        if rescaled > 0 { notes.append("folded each module's own scale into lora_b in \(plural(rescaled, "module")) (llama.cpp applies alpha / r = \(formatNumber(alpha)) / r to every module)") }
        if permuted > 0 { notes.append("permuted the rows of \(permuted) q/k lora_b as convert_hf_to_gguf.py permutes \(b.architecture)'s q and k weights") }
        return notes
    }
}
