import Foundation

/// How `combine` joins adapters (docs/formats.md §13).
public enum CombineMethod: String, Sendable, CaseIterable {
    /// Exact: factors side by side, rank Σ rᵢ.
    case cat
    /// The best rank-K approximation of the exact sum, from the factors.
    case svd
    /// TIES-Merging (Yadav et al. 2023) on each module's dense update, then rank K.
    case ties
    /// DARE (Yu et al. 2023): random drop and rescale, then the weighted sum, then rank K.
    case dareLinear = "dare-linear"
    /// DARE, then TIES' sign election and disjoint mean, then rank K.
    case dareTies = "dare-ties"
}

public struct CombineInput: Sendable {
    public let path: String
    public let weight: Double
    public init(path: String, weight: Double = 1) {
        self.path = path
        self.weight = weight
    }
}

public struct CombineOptions: Sendable {
    public var method: CombineMethod = .cat
    /// The rank of svd, ties and dare outputs.
    public var rank: Int?
    /// The fraction of each update ties and dare keep (0 < d ≤ 1).
    public var density = 0.5
    /// DARE's random drops: the same on every machine for a seed.
    public var seed: UInt64 = 0
    /// lora: mixers folded into the factors; moslora: cat keeps each input's mixer on a block
    /// diagonal, the SVD methods put σ in a diagonal mixer.
    public var form: ResizeForm?
    /// The output layout (PEFT unless asked).
    public var layout: TargetLayout = .peft
    /// A base model, for kohya and PaddleNLP inputs whose module names need it.
    public var base: String?
    public var dtype: DType?
    public var dropUnknown = false
    public var force = false
    public var sync = true

    public init() {}
}

public struct CombineSummary: Sendable {
    public struct Module: Sendable {
        public let name: String
        /// How many inputs adapt it.
        public let inputs: Int
        public let rank: Int
        /// For svd / ties / dare: Σ kept σ² / Σ σ² of the combined update (1 for cat).
        public let energyKept: Double
    }

    public var modules: [Module] = []
    public var notes: [String] = []
}

public enum Combination {
    /// One input's term of a module: its weight times its scale, and its held factors (PEFT orientation).
    struct Term {
        let factor: Double
        let module: LoRAModule
        /// The input's weight and position among the inputs (DARE's stream).
        let weight: Double
        let input: Int
    }

    /// `adapter combine A[:w] B[:w] … -o OUT`.
    public static func combine(_ inputs: [CombineInput], output: String, options: CombineOptions = CombineOptions()) throws -> CombineSummary {
        guard !inputs.isEmpty else { throw InputError(output, "combine needs at least one adapter") }
        if options.method != .cat {
            guard let k = options.rank, k >= 1 else { throw InputError(output, "--method \(options.method.rawValue) needs --rank K (K ≥ 1)") }
        }
        if [.ties, .dareLinear, .dareTies].contains(options.method), !(options.density > 0 && options.density <= 1) {
            throw InputError(output, "--density must be in (0, 1]")
        }
        for i in inputs where !i.weight.isFinite { throw InputError(i.path, "the weight \(i.weight) is not a finite number") }
        var summary = CombineSummary()
        var problems: [String] = []
        var order: [String] = []
        var terms: [String: [Term]] = [:]
        var replacements: [Replacement] = []
        var replaced: [String: String] = [:]
        var listed: [String] = []
        var adapters: [Adapter] = []
        var convert = ConvertOptions()
        convert.dropUnknown = options.dropUnknown
        for input in inputs { adapters.append(try Adapter(path: input.path)) }
        try OutputRules.check(output, kind: options.layout.isFile ? .file : .folder,
                              inputs: inputs.map(\.path) + adapters.flatMap(\.inputFiles) + (options.base.map { [$0] } ?? []), force: options.force)
        for (position, input) in inputs.enumerated() {
            let a = adapters[position]
            var w = try WorkingAdapter(a, options: convert)
            try w.mapKohyaNames(base: options.base)
            try w.mapPaddleNames(base: options.base)
            summary.notes += w.notes.map { "\(input.path): \($0)" }
            for m in w.modules {
                if m.magnitude != nil { problems.append("\(input.path): module \(m.name) is DoRA, whose update is not linear in its factors: it cannot be combined"); continue }
                if m.parameter != nil {
                    problems.append("\(input.path): module \(m.name) adapts experts through target_parameters; make it per-expert modules first (adapter convert to-peft --experts per-expert --base MODEL)")
                    continue
                }
                let key = (m.component.map { $0 + ":" } ?? "") + m.baseName
                if terms[key] == nil { order.append(key) }
                terms[key, default: []].append(Term(factor: input.weight * m.scale, module: m, weight: input.weight, input: position))
            }
            let saves = a.config?["modules_to_save"]?.arrayValue?.compactMap(\.stringValue) ?? []
            for r in w.replacements {
                // modules_to_save lists what an input's config listed; other whole tensors (an embedding
                // PEFT saved beside its LoRA) are written without being listed, as PEFT saved them.
                let leaf = String(r.baseName.split(separator: ".").dropLast().last ?? Substring(r.baseName))
                if saves.contains(leaf) && !listed.contains(leaf) { listed.append(leaf) }
                if let other = replaced[r.baseName] {
                    problems.append("\(r.baseName) is replaced whole (modules_to_save) by both \(other) and \(input.path): which one wins is not defined")
                } else {
                    replaced[r.baseName] = input.path
                    replacements.append(r)
                }
            }
        }
        // One module, one shape and kind in every input.
        for key in order {
            let ts = terms[key]!, first = ts[0].module
            for t in ts.dropFirst() where t.module.kind != first.kind || t.module.outFeatures != first.outFeatures || t.module.inFeatures != first.inFeatures
                || t.module.inShape != first.inShape {
                problems.append("module \(key): [\(t.module.outFeatures), \(t.module.inFeatures)] \(t.module.kind.rawValue) in one input but [\(first.outFeatures), \(first.inFeatures)] \(first.kind.rawValue) in another: not the same model")
                break
            }
        }
        guard problems.isEmpty else { throw ProblemList(subject: "combine", problems: problems) }
        guard !order.isEmpty || !replacements.isEmpty else { throw InputError(inputs[0].path, "the adapters hold no module to combine") }

        var modules: [LoRAModule] = []
        for key in order {
            let ts = terms[key]!
            switch options.method {
            case .cat:
                modules.append(concatenated(ts, keepMixers: options.form != .lora))
                summary.modules.append(.init(name: key, inputs: ts.count, rank: modules.last!.rank, energyKept: 1))
            case .svd:
                let cat = concatenated(ts, keepMixers: false)
                let svd = ModuleSVD(cat)
                let k = svd.keep(.rank(options.rank!))
                modules.append(truncated(cat, svd: svd, rank: k, form: options.form ?? .lora))
                summary.modules.append(.init(name: key, inputs: ts.count, rank: k, energyKept: svd.energy(keeping: k)))
            case .ties, .dareLinear, .dareTies:
                let first = ts[0].module
                let out = first.outFeatures, n = first.inFeatures
                // Each input's own update sᵢ·Bᵢ·Mᵢ·Aᵢ; its weight wᵢ is TIES'/DARE's.
                let updates = ts.map { t in matmul(t.module.heldB, t.module.heldMixedA, rows: out, inner: t.module.rank, cols: n).map { $0 * t.module.scale } }
                let combined = TaskArithmetic.combine(updates, weights: ts.map(\.weight), streams: ts.map(\.input), method: options.method,
                                                      density: options.density, seed: options.seed ^ Extraction.fnv1a(key), count: out * n)
                let full = LinearAlgebra.svd(combined, rows: out, cols: n)
                let svd = TruncatedSVD(u: full.u, s: full.s, v: full.v, rows: out, cols: n)
                var cat = first
                cat.bias = summedBias(ts)
                let total = svd.s.reduce(0) { $0 + $1 * $1 }
                let k = max(1, min(options.rank!, svd.count))
                modules.append(module(from: svd.prefix(k), like: cat, form: options.form ?? .lora))
                summary.modules.append(.init(name: key, inputs: ts.count, rank: k, energyKept: total > 0 ? svd.s.prefix(k).reduce(0) { $0 + $1 * $1 } / total : 1))
            }
        }
        let many = summary.modules.filter { $0.inputs > 1 }.count
        summary.notes.append("\(plural(order.count, "module")): \(many) in more than one input, \(order.count - many) in one")
        if !replacements.isEmpty { summary.notes.append("kept \(plural(replacements.count, "tensor")) replaced whole (modules_to_save)") }
        let placeholder = Adapter(path: output, format: .peft, store: adapters[0].store, configPath: nil, config: nil, modules: [], replacements: [],
                                  unknownKeys: [], warnings: [])
        var config = AdapterWriter.freshPEFTConfig(WorkingAdapter(source: placeholder, modules: modules, replacements: []))
        config["modules_to_save"] = listed.isEmpty ? .null : .array(listed.map { .string($0) })
        if let p = adapters.lazy.compactMap({ $0.config?["base_model_name_or_path"]?.stringValue }).first { config["base_model_name_or_path"] = .string(p) }
        if let t = adapters.lazy.compactMap({ $0.config?["task_type"]?.stringValue }).first { config["task_type"] = .string(t) }
        let source = Adapter(path: output, format: .peft, store: adapters[0].store, configPath: nil, config: config, modules: [], replacements: [],
                             unknownKeys: [], warnings: [])
        var write = ConvertOptions()
        write.force = options.force
        write.sync = options.sync
        write.dtype = options.dtype
        write.base = options.base
        let style: MixerKeyStyle = .loraAB
        if options.layout == .mlx, modules.contains(where: { $0.mixer != nil }) {
            throw InputError(output, "mlx-lm adapters hold no mixer: combine MoSLoRA inputs into mlx with --form lora")
        }
        summary.notes += try AdapterConversion.write(WorkingAdapter(source: source, modules: modules, replacements: replacements), layout: options.layout,
                                                     style: style, output: output, options: write)
        return summary
    }

    /// Σ wᵢ·sᵢ·Bᵢ·Mᵢ·Aᵢ exactly, at rank Σ rᵢ: B = [w₁s₁B₁ | w₂s₂B₂ | …], A = [A₁; A₂; …] and, when an
    /// input has a mixer and mixers are kept, M = diag(M₁, M₂, …) (the identity for inputs without);
    /// otherwise each mixer folded into its A. Scale 1; lora_B biases summed the same way.
    static func concatenated(_ ts: [Term], keepMixers: Bool) -> LoRAModule {
        let first = ts[0].module
        let out = first.outFeatures, n = first.inFeatures
        let total = ts.reduce(0) { $0 + $1.module.rank }
        let mixers = keepMixers && ts.contains { $0.module.mixer != nil }
        var a = [Double](repeating: 0, count: total * n), b = [Double](repeating: 0, count: out * total)
        var m = mixers ? [Double](repeating: 0, count: total * total) : []
        var offset = 0
        for t in ts {
            let r = t.module.rank
            let ai = mixers ? t.module.heldA : t.module.heldMixedA, bi = t.module.heldB
            for i in 0..<r { for j in 0..<n { a[(offset + i) * n + j] = ai[i * n + j] } }
            for i in 0..<out { for j in 0..<r { b[i * total + offset + j] = t.factor * bi[i * r + j] } }
            if mixers {
                let mi = t.module.heldMixer
                for i in 0..<r { for j in 0..<r { m[(offset + i) * total + offset + j] = mi?[i * r + j] ?? (i == j ? 1 : 0) } }
            }
            offset += r
        }
        var result = rebuilt(first, a: a, b: b, mixer: mixers ? m : nil, rank: total)
        result.bias = summedBias(ts)
        return result
    }

    /// `m` with new factors (PEFT orientation, rank `k`, scale 1, alpha = k), named for PEFT and
    /// shaped like m's (conv factors keep their 4-D shapes).
    static func rebuilt(_ m: LoRAModule, a: [Double], b: [Double], mixer: [Double]?, rank k: Int) -> LoRAModule {
        var result = m
        let out = m.outFeatures
        result.name = "base_model.model." + m.baseName
        result.orientation = .peft
        result.scale = 1
        result.alpha = Double(k)
        result.a = TensorRef(name: result.name + ".lora_A.weight", held: a, shape: [k] + m.inShape, dtype: m.aType)
        result.b = TensorRef(name: result.name + ".lora_B.weight", held: b, shape: m.b.shape.count == 4 ? [out, k, 1, 1] : [out, k], dtype: m.bType)
        result.mixer = mixer.map { TensorRef(name: result.name + ".lora_AB.weight", held: $0, shape: [k, k], dtype: m.mixerType ?? m.aType) }
        return result
    }

    /// Σ wᵢ·sᵢ·biasᵢ of the inputs' lora_B biases (nil when none has one).
    static func summedBias(_ ts: [Term]) -> TensorRef? {
        guard let with = ts.first(where: { $0.module.bias != nil })?.module.bias else { return nil }
        let out = ts[0].module.outFeatures
        var sum = [Double](repeating: 0, count: out)
        for t in ts { if let b = t.module.bias?.held { for i in 0..<out { sum[i] += t.factor * b[i] } } }
        return TensorRef(name: with.name, held: sum, shape: [out], dtype: with.dtype)
    }

    /// A module's truncated SVD written like resize writes it.
    static func truncated(_ m: LoRAModule, svd: ModuleSVD, rank k: Int, form: ResizeForm) -> LoRAModule {
        let s = TruncatedSVD(u: svd.u, s: svd.s, v: svd.v, rows: m.outFeatures, cols: m.inFeatures)
        return module(from: s.prefix(k), like: m, form: form)
    }

    /// The module U·Σ·Vᵀ in the form asked for, named and shaped like `m`, scale 1.
    static func module(from svd: TruncatedSVD, like m: LoRAModule, form: ResizeForm) -> LoRAModule {
        let (a, b, mixer) = svd.factors(form)
        return rebuilt(m, a: a, b: b, mixer: mixer, rank: svd.count)
    }
}

/// TIES-Merging and DARE on dense task vectors (each module's update ΔWᵢ = sᵢ·Bᵢ·Mᵢ·Aᵢ):
///
/// - trim (TIES): keep the ⌊d·n⌋ entries of largest magnitude of each ΔWᵢ (ties broken by the lower
///   index), zero the rest;
/// - drop (DARE): keep each entry with probability d, independently (SplitMix64 uniforms in
///   row-major order, one stream per input: `seed + i` for the i-th input), and divide the survivors by d;
/// - weight: τᵢ = wᵢ·(trimmed or dropped ΔWᵢ);
/// - elect (TIES, dare-ties): the sign of Σᵢ τᵢ per entry;
/// - merge: dare-linear sums Σᵢ τᵢ; ties takes the disjoint mean Σᵢ τᵢ·[sign τᵢ = γ] / Σᵢ wᵢ·[sign τᵢ = γ]
///   (the paper's mean of the agreeing entries when every weight is 1; 0 where none agrees);
///   dare-ties the disjoint sum Σᵢ τᵢ·[sign τᵢ = γ] (DARE's rescaling already keeps the scale).
enum TaskArithmetic {
    /// `streams[i]`: the position of update i's adapter among all the inputs (its DARE stream is
    /// `seed + streams[i]`, so a module missing from one input does not shift the others' draws).
    static func combine(_ updates: [[Double]], weights: [Double], streams: [Int]? = nil, method: CombineMethod, density d: Double, seed: UInt64,
                        count n: Int) -> [Double] {
        var taus: [[Double]] = []
        for (i, u) in updates.enumerated() {
            var t = u
            switch method {
            case .ties:
                let keep = Int((d * Double(n)).rounded(.down))
                if keep < n {
                    let order = (0..<n).sorted { abs(u[$0]) > abs(u[$1]) || (abs(u[$0]) == abs(u[$1]) && $0 < $1) }
                    for j in order[keep...] { t[j] = 0 }
                }
            case .dareLinear, .dareTies:
                var rng = SeededGenerator(seed: seed &+ UInt64(streams?[i] ?? i))
                for j in 0..<n { t[j] = rng.unit() < d ? u[j] / d : 0 }
            case .cat, .svd:
                preconditionFailure("not a task-arithmetic method")
            }
            taus.append(t.map { $0 * weights[i] })
        }
        var out = [Double](repeating: 0, count: n)
        for j in 0..<n {
            if method == .dareLinear {
                out[j] = taus.reduce(0) { $0 + $1[j] }
                continue
            }
            let total = taus.reduce(0) { $0 + $1[j] }
            guard total != 0 else { continue }
            let positive = total > 0
            var sum = 0.0, weight = 0.0
            for (i, t) in taus.enumerated() where t[j] != 0 && (t[j] > 0) == positive {
                sum += t[j]
                weight += weights[i]
            }
            out[j] = method == .ties ? (weight != 0 ? sum / weight : 0) : sum
        }
        return out
    }
}
