import Foundation

/// How `lora-to-moslora` initialises the mixer it inserts.
public enum MixerInit: String, Sendable, CaseIterable {
    /// M = I: A and B are written unchanged (bit for bit in the same dtype).
    case identity
    /// M = Q, a seeded random orthogonal matrix (QR of a Gaussian matrix); A' = QᵀA.
    case orthogonal
    /// M Kaiming-uniform with a = √5 as `nn.Linear(r, r)` initialises it (bound 1/√r); A' = M⁻¹A.
    case kaiming
}

/// Which factor `moslora-to-lora` folds the mixer into.
public enum FoldSide: String, Sendable, CaseIterable {
    /// A' = M·A.
    case a
    /// B' = B·M.
    case b
}

/// A small deterministic generator (SplitMix64) so that seeded mixers are the same on every machine
/// and every Swift version (the standard library's generators promise neither).
struct SeededGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    mutating func unit() -> Double { Double(next() >> 11) * 0x1p-53 }

    /// Standard normal by Box–Muller (one value per call; the pair's second half is dropped for simplicity).
    mutating func gaussian() -> Double {
        let u1 = 1 - unit()  // (0, 1]: log stays finite
        let u2 = unit()
        return (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2)
    }

    /// The generator for one module: the seed mixed with an FNV-1a hash of the module name, so a
    /// module's mixer does not depend on which other modules the adapter has or their order.
    static func forModule(_ name: String, seed: UInt64) -> SeededGenerator {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in name.utf8 {
            h ^= UInt64(byte)
            h = h &* 0x0000_0100_0000_01B3
        }
        var g = SeededGenerator(seed: seed ^ h)
        _ = g.next()
        return g
    }
}

/// Seeded mixers.
enum MixerFactory {
    /// A random orthogonal r×r matrix: Q of the QR of a Gaussian matrix (R's diagonal is positive,
    /// which makes Q Haar-distributed).
    static func orthogonal(rank r: Int, generator g: inout SeededGenerator) -> [Double] {
        let x = (0..<(r * r)).map { _ in g.gaussian() }
        return LinearAlgebra.qr(x, rows: r, cols: r).q
    }

    /// `nn.Linear(r, r).weight` under `kaiming_uniform_(a=√5)`: uniform in ±1/√r.
    static func kaiming(rank r: Int, generator g: inout SeededGenerator) -> [Double] {
        let bound = 1 / Double(r).squareRoot()
        return (0..<(r * r)).map { _ in (2 * g.unit() - 1) * bound }
    }
}

/// Exact conversions between LoRA, MoSLoRA and layouts: each keeps scale·B·M·A of every module.
public enum AdapterConversion {
    /// The default refusal threshold for inverting a Kaiming mixer: σmin/σmax below 1e-4 (condition
    /// number above 10⁴). A' = M⁻¹A rounded into the output dtype gives B·M·A' an error up to
    /// κ · (the dtype's rounding), so a badly conditioned mixer would silently change the update.
    public static let defaultMinimumConditionRatio = 1e-4

    /// `convert lora-to-moslora`: inserts an r×r mixer in every module without one and writes a PEFT folder.
    ///
    /// Modules that already have a mixer keep it unchanged (noted). Embedding modules get no mixer:
    /// MoSLoRA mixes linear and convolution layers only (noted).
    public static func loraToMoSLoRA(input: String, output: String, mixer: MixerInit = .identity, seed: UInt64 = 0,
                                     keyStyle: MixerKeyStyle = .loraAB, minimumConditionRatio: Double = defaultMinimumConditionRatio,
                                     options: ConvertOptions = ConvertOptions()) throws -> ConvertSummary {
        var summary = ConvertSummary()
        return try convert(input: input, output: output, layout: .peft, style: keyStyle, options: options, summary: &summary) { w, summary in
            var kept = 0, embeddings = 0, estimated = 0
            for i in w.modules.indices {
                var m = w.modules[i]
                if m.heldMixer != nil { kept += 1; continue }
                if m.kind == .embedding { embeddings += 1; continue }
                let r = m.rank
                var g = SeededGenerator.forModule(m.baseName, seed: seed)
                switch mixer {
                case .identity:
                    m.heldMixer = identityMatrix(r)
                case .orthogonal:
                    let q = MixerFactory.orthogonal(rank: r, generator: &g)
                    m.heldA = matmul(transpose(q, rows: r, cols: r), m.heldA, rows: r, inner: r, cols: m.inFeatures)
                    m.heldMixer = q
                case .kaiming:
                    // One LU factorisation gives both A' = M⁻¹A and, above the exact limit, the estimate of σ_min.
                    let k = MixerFactory.kaiming(rank: r, generator: &g)
                    let lu = LUFactorization(k, n: r)
                    let diagnostics = MixerDiagnostics(mixer: k, rank: r, lu: lu)
                    let ratio = diagnostics.conditionRatio
                    if diagnostics.isEstimated { estimated += 1 }
                    summary.worstConditionRatio = min(summary.worstConditionRatio ?? .infinity, ratio)
                    guard ratio >= minimumConditionRatio, !lu.isSingular else {
                        throw InputError.conversion(input, "module \(m.name): the Kaiming mixer drawn with seed \(seed) is badly conditioned (σmin/σmax \(formatNumber(ratio))\(diagnostics.isEstimated ? ", estimated" : "") < \(formatNumber(minimumConditionRatio))), so A' = M⁻¹A would lose the update; use --mixer orthogonal or identity, another --seed, or a lower --min-condition-ratio")
                    }
                    m.heldA = lu.solve(m.heldA, columns: m.inFeatures)
                    m.heldMixer = k
                }
                w.modules[i] = m
            }
            if kept > 0 { summary.notes.append("\(kept) module\(kept == 1 ? " already has" : "s already have") a mixer, kept as it is") }
            if embeddings > 0 { summary.notes.append("\(embeddings) embedding module\(embeddings == 1 ? "" : "s") left without a mixer (MoSLoRA mixes linear and convolution layers)") }
            if mixer == .kaiming, let worst = summary.worstConditionRatio {
                let how = estimated == 0 ? "" : " (estimated for \(estimated) mixer\(estimated == 1 ? "" : "s") of rank above \(LinearAlgebra.exactDiagnosticsRankLimit))"
                summary.notes.append("worst Kaiming mixer σmin/σmax \(formatNumber(worst))\(how): the update keeps about the output dtype's precision divided by this")
            }
        }
    }

    /// `convert moslora-to-lora`: folds every mixer into A (A' = M·A) or B (B' = B·M) and writes a plain PEFT LoRA folder.
    public static func mosLoRAToLoRA(input: String, output: String, foldInto side: FoldSide = .a,
                                     options: ConvertOptions = ConvertOptions()) throws -> ConvertSummary {
        var summary = ConvertSummary()
        return try convert(input: input, output: output, layout: .peft, style: .loraAB, options: options, summary: &summary) { w, summary in
            var folded = 0
            for i in w.modules.indices {
                guard let mixer = w.modules[i].heldMixer else { continue }
                let r = w.modules[i].rank
                switch side {
                case .a: w.modules[i].heldA = matmul(mixer, w.modules[i].heldA, rows: r, inner: r, cols: w.modules[i].inFeatures)
                case .b: w.modules[i].heldB = matmul(w.modules[i].heldB, mixer, rows: w.modules[i].outFeatures, inner: r, cols: r)
                }
                w.modules[i].heldMixer = nil
                folded += 1
            }
            if folded == 0 { summary.notes.append("no module has a mixer; the factors are written unchanged") }
        }
    }

    /// `convert to-peft` / `to-kohya` / `to-mlx`: the same modules in another layout.
    ///
    /// Mixers are folded into A (A' = M·A) by default, so that the runtimes of that layout load
    /// the adapter as written: stock PEFT ignores `lora_AB` (and refuses `peft_type` MOSLORA),
    /// ComfyUI, Forge and diffusers skip kohya `lora_mixer` keys, and mlx-lm has no mixer.
    /// `keepMixer` keeps the MoSLoRA layout (PEFT `lora_AB` or `lora_mixer` as the input had it,
    /// kohya `lora_mixer`) for the MoSLoRA code; mlx-lm always gets the folded form.
    public static func convertLayout(input: String, output: String, to layout: TargetLayout, keepMixer: Bool = false,
                                     options: ConvertOptions = ConvertOptions()) throws -> ConvertSummary {
        var summary = ConvertSummary()
        if keepMixer && (layout == .mlx || layout == .gguf) {
            let runtime = layout == .mlx ? "mlx-lm" : "llama.cpp"
            throw InputError.conversion(input, "\(runtime) has no mixer, so --keep-mixer cannot be honoured; the mixer is always folded into A for \(layout == .mlx ? "mlx" : "GGUF")")
        }
        var style = MixerKeyStyle.loraAB
        return try convert(input: input, output: output, layout: layout, style: { style }, options: options, expertParameters: layout == .peft || layout == .gguf,
                           summary: &summary) { w, summary in
            if keepMixer {
                if w.source.format == .peft, w.source.modules.contains(where: { $0.mixer?.name.hasSuffix(".lora_mixer.weight") == true }) {
                    style = .loraMixer
                }
                return
            }
            guard layout != .mlx else { return }  // the mlx writer folds and says so
            var folded = 0
            for i in w.modules.indices {
                guard let mixer = w.modules[i].heldMixer else { continue }
                let m = w.modules[i]
                if let p = m.parameter {
                    // One mixer per expert, in row blocks: A_e' = M_e·A_e.
                    let r = m.updateRank, n = m.inFeatures, a = m.heldA
                    var folded = [Double](repeating: 0, count: a.count)
                    for e in 0..<p.experts {
                        let block = matmul(Array(mixer[e * r * r..<(e + 1) * r * r]), Array(a[e * r * n..<(e + 1) * r * n]), rows: r, inner: r, cols: n)
                        folded.replaceSubrange(e * r * n..<(e + 1) * r * n, with: block)
                    }
                    w.modules[i].heldA = folded
                } else {
                    let r = m.rank
                    w.modules[i].heldA = matmul(mixer, m.heldA, rows: r, inner: r, cols: m.inFeatures)
                }
                w.modules[i].heldMixer = nil
                folded += 1
            }
            if folded > 0 {
                let who = [TargetLayout.peft: "stock PEFT", .gguf: "llama.cpp", .diffusers: "diffusers"][layout] ?? "kohya-style loaders"
                summary.notes.append("folded the mixer into A (A' = M·A, rounded once into A's dtype) in \(folded) module\(folded == 1 ? "" : "s"), so \(who) apply the whole update" + (layout == .gguf ? "" : "; --keep-mixer keeps the MoSLoRA layout instead"))
            }
        }
    }

    // MARK: - The shared route

    /// Reads IN, checks OUT, transforms the modules in memory, and writes OUT atomically.
    static func convert(input: String, output: String, layout: TargetLayout, style: MixerKeyStyle, options: ConvertOptions,
                        summary: inout ConvertSummary, transform: (inout WorkingAdapter, inout ConvertSummary) throws -> Void) throws -> ConvertSummary {
        try convert(input: input, output: output, layout: layout, style: { style }, options: options, summary: &summary, transform: transform)
    }

    /// As above, with the mixer key style decided once the modules are transformed.
    static func convert(input: String, output: String, layout: TargetLayout, style: () -> MixerKeyStyle, options: ConvertOptions,
                        expertParameters: Bool = false,
                        summary: inout ConvertSummary, transform: (inout WorkingAdapter, inout ConvertSummary) throws -> Void) throws -> ConvertSummary {
        if let d = options.dtype, !d.isMergeable {
            throw InputError.conversion(output, "--dtype \(d.rawValue) is not one of F32, F16, BF16, F64")
        }
        let adapter = try Adapter(path: input)
        let baseFiles = try options.base.map { GGUFFile.looksLikeGGUF($0) || PipelineMergePlan.isPipeline($0) ? [$0] : [$0] + (try Checkpoint(path: $0).inputFiles) } ?? []
        try OutputRules.check(output, kind: layout.isFile ? .file : .folder, inputs: [input] + adapter.inputFiles + baseFiles,
                               force: options.force)
        var w = try WorkingAdapter(adapter, options: options)
        summary.notes += w.notes
        guard !w.modules.isEmpty || !w.replacements.isEmpty else { throw InputError.conversion(input, "no modules to convert") }
        // A diffusion base: kohya writes its family's dialect (original names for SDXL, Flux, SD3;
        // diffusers names for SD 1/2), diffusers its own names.
        if layout == .kohya || layout == .diffusers, let path = options.base, let (d, textNames) = try WorkingAdapter.diffusionBase(path) {
            let dialect: DiffusionDialect = layout == .kohya && [.sdxl, .fluxDev, .fluxSchnell, .sd3, .sd35].contains(d.family) ? .original : .diffusers
            summary.notes += try w.rewrite(into: dialect, layout: d, textNames: textNames)
        } else if layout == .diffusers {
            throw InputError.conversion(input, "to-diffusers needs --base (the model, a single file or a diffusers folder): module names and fused tensors come from it")
        } else if layout != .kohya {
            try w.requireSingleComponent(layout)
            try w.mapKohyaNames(base: options.base)
        }
        try w.mapPaddleNames(base: options.base)
        if let form = options.experts {
            guard layout == .peft else {
                throw InputError.conversion(input, "--experts is a to-peft option (PEFT holds both forms)")
            }
            try w.convertExperts(form, base: options.base)
        }
        if !expertParameters, let m = w.modules.first(where: { $0.parameter != nil }) {
            throw InputError.conversion(input, "module \(m.name) adapts \(m.parameter!.experts) experts of \(m.parameter!.name) through PEFT target_parameters, which this conversion does not rewrite; make it per-expert modules first: adapter convert to-peft --experts per-expert --base MODEL")
        }
        try transform(&w, &summary)
        let style = style()
        summary.notes += try write(w, layout: layout, style: style, output: output, options: options)
        summary.modules = w.modules.count
        summary.layout = layout
        summary.mixers = layout == .mlx ? 0 : w.modules.filter { $0.heldMixer != nil }.count
        summary.mixerStyle = style
        summary.experts = options.experts
        summary.notes.append(summary.loadedBy)
        return summary
    }

    /// Writes `w` under a temporary name beside OUT and renames it into place when complete.
    private static func input(_ w: WorkingAdapter) -> String { w.source.path }

    static func write(_ w: WorkingAdapter, layout: TargetLayout, style: MixerKeyStyle, output: String, options: ConvertOptions) throws -> [String] {
        let out = try TemporaryOutput(target: output, kind: layout.isFile ? .file : .folder)
        do {
            var notes = out.notes
            switch layout {
            case .peft: notes += try AdapterWriter.writePEFT(w, folder: out.temporaryPath, style: style, dtype: options.dtype, sync: options.sync)
            case .kohya: notes += try AdapterWriter.writeKohya(w, file: out.file!, dtype: options.dtype, sync: options.sync)
            case .diffusers: notes += try AdapterWriter.writeDiffusers(w, file: out.file!, dtype: options.dtype, sync: options.sync)
            case .mlx: notes += try AdapterWriter.writeMLX(w, folder: out.temporaryPath, dtype: options.dtype, base: options.base, sync: options.sync)
            case .gguf:
                guard let base = options.base else { throw InputError.conversion(input(w), "to-gguf needs --base (a GGUF file or the Hugging Face model): the architecture and tensor names come from it") }
                notes += try AdapterWriter.writeGGUF(w, file: out.file!, base: base, dtype: options.dtype, sync: options.sync)
            }
            if options.sync && !layout.isFile { FileSystem.syncDirectory(out.temporaryPath) }
            try out.commit(replacing: options.force)
            return notes
        } catch {
            out.discard()
            throw error
        }
    }
}
