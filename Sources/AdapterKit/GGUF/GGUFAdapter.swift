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

    init(path: String) throws {
        self.path = path
        if GGUFFile.looksLikeGGUF(path) {
            let f = try GGUFFile(path: path)
            guard let arch = f.value("general.architecture")?.string else { throw InputError(path, "the GGUF base has no general.architecture") }
            architecture = arch
            heads = f.value("\(arch).attention.head_count")?.integer
            kvHeads = f.value("\(arch).attention.head_count_kv")?.integer ?? heads
            shapes = Dictionary(f.tensors.filter { $0.dims.count == 2 || $0.dims.count == 3 }.map { ($0.name, $0.shape) }, uniquingKeysWith: { a, _ in a })
            return
        }
        let c = try Checkpoint(path: path)
        guard let type = c.config?.modelType else { throw InputError(path, "the base has no config.json naming its model_type, so its llama.cpp architecture is unknown") }
        guard let arch = Self.architectures[type] else {
            throw InputError(path, "model_type \(quotedForMessage(type)): llama.cpp names are mapped for \(Self.architectures.keys.sorted().joined(separator: ", ")) only")
        }
        architecture = arch
        heads = c.config?.attentionHeads
        kvHeads = c.config?.keyValueHeads ?? heads
        var shapes: [String: [Int]] = [:]
        for (entry, _) in c.tensors where entry.shape.count == 2 && entry.name.hasSuffix(".weight") {
            if let g = Self.ggufName(forModule: String(entry.name.dropLast(".weight".count))) { shapes[g] = entry.shape }
        }
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

    /// Whether a module name is one expert's (`…experts.3.gate_proj`).
    static func placementsNeedExperts(_ name: String) -> Bool {
        let parts = name.split(separator: ".")
        return parts.count >= 3 && parts[parts.count - 3] == "experts" && Int(parts[parts.count - 2]) != nil
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
        let parts = m.baseName.split(separator: ".").map(String.init)
        guard let i = parts.firstIndex(of: "layers"), i + 1 < parts.count, let layer = Int(parts[i + 1]) else {
            if let name = ggufName(forModule: m.baseName) { return .success([(name, m, nil)]) }
            return .failure(PlacementProblem(text: "llama.cpp has no tensor for \(m.baseName) in the names mapped here (attention and MLP projections, experts, embed_tokens, lm_head)"))
        }
        let rest = parts[(i + 2)...]
        let leaves = ["gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps", "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"]
        if let p = m.parameter {
            guard rest.last == "experts" else { return .failure(PlacementProblem(text: "target_parameters on \(m.baseName) is not an experts module")) }
            let out = m.outFeatures
            var placed: [(String, LoRAModule, Range<Int>?)] = []
            let names: [(String, Range<Int>?)] = p.name == "gate_up_proj" ? [("ffn_gate_exps", 0..<out / 2), ("ffn_up_exps", out / 2..<out)]
                : p.name == "down_proj" ? [("ffn_down_exps", nil)] : []
            guard !names.isEmpty else { return .failure(PlacementProblem(text: "\(p.name): llama.cpp expert tensors are known for gate_up_proj and down_proj")) }
            for (leaf, half) in names {
                let name = "blk.\(layer).\(leaf).weight"
                guard file.tensor(name) != nil else { return .failure(PlacementProblem(text: "the base has no \(name)")) }
                for e in 0..<p.experts {
                    guard let rows = expertRows(name, e) else { return .failure(PlacementProblem(text: "\(name) is not a 3-D expert tensor")) }
                    placed.append((name, m.expert(e, outputs: half, part: half == nil ? nil : String(leaf.dropFirst(4).dropLast(5))), rows))
                }
            }
            return .success(placed)
        }
        if rest.count == 4, rest[rest.startIndex + 1] == "experts", let e = Int(rest[rest.startIndex + 2]), let leaf = leaves[rest.last!] {
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
        var folded = 0, rescaled = 0, permuted = 0
        for m in w.modules {
            if let p = m.parameter {
                // PEFT target_parameters on experts: one 3-D LoRA pair per llama.cpp expert tensor,
                // lora_a [E, r, in] and lora_b [E, out, r] (numpy order), which llama.cpp applies
                // expert by expert (build_lora_mm_id).
                guard let layer = m.baseName.split(separator: ".").drop(while: { $0 != "layers" }).dropFirst().first.flatMap({ Int($0) }),
                      m.baseName.hasSuffix(".experts") else {
                    problems.append("module \(m.name): target_parameters on \(m.baseName), which is not a layer's experts")
                    continue
                }
                let e = p.experts, r = m.updateRank, out = m.outFeatures, inputs = m.inFeatures
                let leaves: [(String, Range<Int>)] = p.name == "gate_up_proj" ? [("ffn_gate_exps", 0..<out / 2), ("ffn_up_exps", out / 2..<out)]
                    : p.name == "down_proj" ? [("ffn_down_exps", 0..<out)] : []
                if leaves.isEmpty { problems.append("module \(m.name): llama.cpp expert tensors are known for gate_up_proj and down_proj"); continue }
                let a = m.heldA, bm = m.heldB
                let ratio = m.scale / (alpha / Double(r))
                if ratio != 1 { rescaled += 1 }
                for (leaf, rows) in leaves {
                    let g = "blk.\(layer).\(leaf).weight"
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
                    for (suffix, values, dims, input) in [(".lora_a", a, [inputs, r, e], m.aType), (".lora_b", lb, [r, rows.count, e], m.bType)] {
                        var t = try outputType(input, dtype, tensor: g + suffix)
                        if t == .f64 { t = .f32 }
                        guard let type: GGMLType = [.f32: .f32, .f16: .f16, .bf16: .bf16][t], let codec = RowCodec(.plain(t)) else {
                            throw InputError(g + suffix, "cannot be written as \(t.rawValue) in GGUF")
                        }
                        tensors.append(GGUFLayout.Tensor(name: g + suffix, dims: dims, type: type))
                        data.append(try codec.encode(values, tensor: g + suffix))
                    }
                }
                continue
            }
            if GGUFBase.placementsNeedExperts(m.baseName) {
                problems.append("module \(m.name): a per-expert module; llama.cpp holds expert LoRA as one 3-D pair per expert tensor, written here from PEFT target_parameters adapters only")
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
            let r = m.rank, out = m.outFeatures, inputs = m.inFeatures
            var a = m.heldA, bm = m.heldB
            if let mixer = m.heldMixer {
                a = matmul(mixer, a, rows: r, inner: r, cols: inputs)
                folded += 1
            }
            let ratio = m.scale / (alpha / Double(r))
            if ratio != 1 {
                guard ratio.isFinite else { problems.append("module \(m.name): scale \(m.scale) with alpha \(alpha) cannot be written for llama.cpp"); continue }
                bm = bm.map { $0 * ratio }
                rescaled += 1
            }
            if b.permutesQK, g.hasSuffix("attn_q.weight") || g.hasSuffix("attn_k.weight") {
                let n = g.hasSuffix("attn_q.weight") ? b.heads : b.kvHeads
                guard let n, n > 0, out % (2 * n) == 0 else {
                    problems.append("module \(m.name): \(g) is permuted for rope by heads, but the base gives no head count that divides \(out) rows")
                    continue
                }
                bm = GGUFBase.permutedRows(bm, rows: out, cols: r, heads: n)
                permuted += 1
            }
            for (suffix, values, dims, input) in [(".lora_a", a, [inputs, r], m.aType), (".lora_b", bm, [r, out], m.bType)] {
                var t = try outputType(input, dtype, tensor: g + suffix)
                if t == .f64 { t = .f32 }
                guard let type: GGMLType = [.f32: .f32, .f16: .f16, .bf16: .bf16][t] else { throw InputError(g + suffix, "cannot be written as \(t.rawValue) in GGUF") }
                guard let codec = RowCodec(.plain(t)) else { preconditionFailure("float dtypes have codecs") }
                tensors.append(GGUFLayout.Tensor(name: g + suffix, dims: dims, type: type))
                data.append(try codec.encode(values, tensor: g + suffix))
            }
        }
        if !w.replacements.isEmpty { problems.append("modules_to_save (\(w.replacements.map(\.tensor.name).prefix(3).joined(separator: ", "))) cannot be held by a llama.cpp adapter") }
        guard problems.isEmpty else { throw ProblemList(subject: "to-gguf", problems: problems) }
        let metadata: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string(b.architecture)), ("general.type", .string("adapter")),
            ("adapter.type", .string("lora")), ("adapter.lora.alpha", .f32(Float(alpha))),
        ]
        let layout = try GGUFLayout(metadata: metadata, tensors: tensors)
        try layout.write(to: file) { data[$0] }
        if sync { try file.sync() }
        if folded > 0 { notes.append("folded the mixer into lora_a (A' = M·A) in \(plural(folded, "module")): llama.cpp has no mixer") }
        if rescaled > 0 { notes.append("folded each module's own scale into lora_b in \(plural(rescaled, "module")) (llama.cpp applies alpha / r = \(formatNumber(alpha)) / r to every module)") }
        if permuted > 0 { notes.append("permuted the rows of \(permuted) q/k lora_b as convert_hf_to_gguf.py permutes \(b.architecture)'s q and k weights") }
        return notes
    }
}
