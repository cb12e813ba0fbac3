/// How many singular values `resize` keeps per module.
public enum ResizeTarget: Sendable {
    /// At most K (fewer when a module's rank or dimensions are smaller).
    case rank(Int)
    /// The fewest that keep at least this fraction of Σσ² (0 < F ≤ 1).
    case energy(Double)
}

/// How `resize` writes the truncated SVD U·diag(σ)·Vᵀ of B·M·A.
public enum ResizeForm: String, Sendable, CaseIterable {
    /// A = diag(√σ)·Vᵀ, B = U·diag(√σ): plain LoRA, the two factors equally scaled.
    case lora
    /// A = Vᵀ and B = U orthonormal, M = diag(σ).
    case moslora
}

/// The thin SVD of one module's B·M·A: U (out × k), σ (k, descending), V (in × k).
struct ModuleSVD {
    let u: [Double]
    let s: [Double]
    let v: [Double]
    var count: Int { s.count }

    /// Computed without the out × in product: B = Q_B·R_B and (M·A)ᵀ = Q_A·R_A give
    /// B·M·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and only the r × r core needs an SVD.
    init(_ m: LoRAModule) {
        let r = m.rank, out = m.outFeatures, n = m.inFeatures
        let ma = m.heldMixedA
        guard out >= r && n >= r else {
            // A factor narrower than the rank (rare: tiny layers): the product is at most r wide, so form it.
            let dense = matmul(m.heldB, ma, rows: out, inner: r, cols: n)
            let full = LinearAlgebra.svd(dense, rows: out, cols: n)
            (u, s, v) = (full.u, full.s, full.v)
            return
        }
        let qb = LinearAlgebra.qr(m.heldB, rows: out, cols: r)
        let qa = LinearAlgebra.qr(transpose(ma, rows: r, cols: n), rows: n, cols: r)
        let core = matmul(qb.r, transpose(qa.r, rows: r, cols: r), rows: r, inner: r, cols: r)
        let c = LinearAlgebra.svd(core, rows: r, cols: r)
        u = matmul(qb.q, c.u, rows: out, inner: r, cols: r)
        v = matmul(qa.q, c.v, rows: n, inner: r, cols: r)
        s = c.s
    }

    /// How many values to keep for a target (at least one).
    func keep(_ target: ResizeTarget) -> Int {
        switch target {
        case .rank(let k):
            return max(1, min(k, count))
        case .energy(let f):
            let total = s.reduce(0) { $0 + $1 * $1 }
            guard total > 0 else { return 1 }
            var acc = 0.0
            for (i, x) in s.enumerated() {
                acc += x * x
                if acc >= f * total * (1 - 1e-12) { return i + 1 }
            }
            return count
        }
    }

    func energy(keeping k: Int) -> Double {
        let total = s.reduce(0) { $0 + $1 * $1 }
        guard total > 0 else { return 1 }
        return s.prefix(k).reduce(0) { $0 + $1 * $1 } / total
    }
}

extension AdapterConversion {
    /// `resize`: each module becomes the best rank-k approximation of its B·M·A (exact SVD of the
    /// factors), written as plain LoRA or as MoSLoRA with the singular values in a diagonal mixer.
    ///
    /// Every module keeps its scale: the new alpha is scale·k (PEFT: rank_pattern / alpha_pattern,
    /// or scale·√k under use_rslora; kohya: the alpha tensor); σ is not folded into the scale.
    /// The output layout is the input's for PEFT, kohya and mlx inputs, PEFT for the others.
    /// `convert to-lora`: every module (LyCORIS LoHa, LoKr and full diffs among them) as plain LoRA
    /// factors by the exact SVD of its update, truncated to `target`; written in `layout` (the
    /// input's by default: kohya for LyCORIS files).
    public static func toLoRA(input: String, output: String, target: ResizeTarget, layout: TargetLayout? = nil,
                              options: ConvertOptions = ConvertOptions()) throws -> ConvertSummary {
        try resize(input: input, output: output, target: target, form: .lora, layout: layout, options: options)
    }

    public static func resize(input: String, output: String, target: ResizeTarget, form: ResizeForm = .lora, layout chosen: TargetLayout? = nil,
                              options: ConvertOptions = ConvertOptions()) throws -> ConvertSummary {
        switch target {
        case .rank(let k) where k < 1:
            throw InputError.conversion(input, "the rank must be at least 1")
        case .energy(let f) where !(f > 0 && f <= 1):
            throw InputError.conversion(input, "the energy to keep must be in (0, 1]")
        default: break
        }
        let format = try AdapterLoader.locate(input).format
        let layout: TargetLayout = chosen ?? (format == .kohya ? .kohya : format == .mlx ? .mlx : .peft)
        if layout == .mlx && form == .moslora {
            throw InputError.conversion(input, "mlx-lm cannot hold a mixer, so --form moslora cannot be written; use --form lora or convert to-peft first")
        }
        var summary = ConvertSummary()
        if chosen == nil && ![.peft, .kohya, .mlx].contains(format) {
            summary.notes.append("\(format.rawValue) adapters are written back as PEFT")
        }
        return try convert(input: input, output: output, layout: layout, style: .loraAB, options: options, summary: &summary) { w, summary in
            var dora = 0
            w.resized = true
            for i in w.modules.indices {
                let m = w.modules[i]
                let svd = ModuleSVD(m)
                let k = svd.keep(target)
                let (a, b, mixer) = TruncatedSVD(u: svd.u, s: svd.s, v: svd.v, rows: m.outFeatures, cols: m.inFeatures).prefix(k).factors(form)
                var new = m
                new.heldA = a
                new.heldB = b
                new.heldMixer = mixer
                if m.magnitude != nil { dora += 1 }
                w.modules[i] = new
                summary.energies.append(.init(module: (m.component.map { $0 + ":" } ?? "") + m.baseName, rankBefore: m.rank, rankAfter: k,
                                              energyKept: svd.energy(keeping: k), singularValues: svd.s))
            }
            if dora > 0 {
                summary.notes.append("\(dora) DoRA module\(dora == 1 ? " keeps its" : "s keep their") magnitude vector; the row norms it divides by follow the truncated update")
            }
        }
    }
}
