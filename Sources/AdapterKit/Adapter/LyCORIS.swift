import Foundation

/// LyCORIS modules (KohakuBlueleaf/LyCORIS) read as exact low-rank factors.
///
/// Every LyCORIS update this tool reads is a product of low-rank pieces, so each is rewritten as
/// B'·A' with factors computed from the stored ones when the merge uses them; the merge, the
/// quantized paths, the converters and `inspect` then see an ordinary module. The identities:
/// - a Hadamard product of two rank-r products is the Khatri–Rao product of their factors:
///   (U₁V₁) ⊙ (U₂V₂) = (U₁ ⊙ᵣ U₂)(V₁ ⊙꜀ V₂), rank r₁·r₂ (LoHa);
/// - a Kronecker product of two products is the product of the Kronecker products:
///   kron(U₁V₁, U₂V₂) = kron(U₁, U₂)·kron(V₁, V₂), rank k₁·k₂ (LoKr);
/// - a Tucker core rebuilt with its two factors is itself rank r: the output factor, then the core
///   contracted with the input factor;
/// - a full diff D is D·I or I·D, whichever is the smaller rank.
/// The rules (names, shapes, scales) are in docs/formats.md §5, with the LyCORIS sources they are from.

/// Values computed from other tensors when used.
struct ComputedTensor: Sendable {
    let sources: [TensorRef]
    let compute: @Sendable ([[Double]]) -> [Double]
}

/// The kind of module an adapter stored.
public enum ModuleAlgorithm: Sendable, Hashable {
    case lora
    /// LyCORIS LoHa of dimension `dim` (the rank of each Hadamard factor); `tucker`: a conv with cores.
    case loha(dim: Int, tucker: Bool)
    /// LyCORIS LoKr: kron(w1, w2), each stored whole or as two factors.
    case lokr(w1Factored: Bool, w2Factored: Bool, tucker: Bool)
    /// A whole-weight difference (LyCORIS `diff`).
    case full

    /// How `inspect` names it.
    public var name: String {
        switch self {
        case .lora: "LoRA"
        case .loha(_, let t): t ? "LoHa (Tucker)" : "LoHa"
        case .lokr(_, _, let t): t ? "LoKr (Tucker)" : "LoKr"
        case .full: "full diff"
        }
    }

    public var isLyCORIS: Bool { self != .lora }
}

/// Small matrix products for the factors, row-major Float64.
enum FactorAlgebra {
    /// Rows p·r₂ + q: x[p, j]·y[q, j]; x (r₁ × n), y (r₂ × n).
    static func rowKhatriRao(_ x: [Double], _ y: [Double], r1: Int, r2: Int, n: Int) -> [Double] {
        var out = [Double](repeating: 0, count: r1 * r2 * n)
        for p in 0..<r1 {
            for q in 0..<r2 {
                let o = (p * r2 + q) * n
                for j in 0..<n { out[o + j] = x[p * n + j] * y[q * n + j] }
            }
        }
        return out
    }

    /// Columns p·r₂ + q: x[i, p]·y[i, q]; x (m × r₁), y (m × r₂).
    static func columnKhatriRao(_ x: [Double], _ y: [Double], m: Int, r1: Int, r2: Int) -> [Double] {
        var out = [Double](repeating: 0, count: m * r1 * r2)
        for i in 0..<m {
            for p in 0..<r1 {
                let xp = x[i * r1 + p]
                for q in 0..<r2 { out[(i * r1 + p) * r2 + q] = xp * y[i * r2 + q] }
            }
        }
        return out
    }

    /// kron(x, y): x (a × b), y (c × d) → (a·c × b·d), element (i₁·c + i₂, j₁·d + j₂) = x[i₁, j₁]·y[i₂, j₂].
    static func kron(_ x: [Double], rows a: Int, cols b: Int, _ y: [Double], rows c: Int, cols d: Int) -> [Double] {
        var out = [Double](repeating: 0, count: a * c * b * d)
        let width = b * d
        for i1 in 0..<a {
            for i2 in 0..<c {
                let o = (i1 * c + i2) * width
                for j1 in 0..<b {
                    let v = x[i1 * b + j1]
                    for j2 in 0..<d { out[o + j1 * d + j2] = v * y[i2 * d + j2] }
                }
            }
        }
        return out
    }
}

/// A matrix as U·V, the form every LyCORIS piece is turned into before it is combined.
struct FactorPair {
    /// U (rows × rank).
    let u: TensorRef
    /// V (rank × cols).
    let v: TensorRef
    /// The matrix itself when the pair is I·w or w·I (read directly instead of multiplied out).
    var whole: TensorRef? = nil
    var rows: Int { u.shape[0] }
    var rank: Int { v.shape[0] }
    var cols: Int { v.shape.dropFirst().reduce(1, *) }
}

extension FactorPair {
    /// A whole matrix w (rows × cols, later dimensions flattened into the columns): I·w or w·I,
    /// whichever has the smaller rank.
    static func whole(_ w: TensorRef, dtype: DType) -> FactorPair {
        let rows = w.shape.first ?? 1, cols = w.shape.dropFirst().reduce(1, *)
        if rows <= cols {
            return FactorPair(u: TensorRef(name: w.name + "[I]", computedFrom: [], shape: [rows, rows], dtype: dtype) { _ in identityMatrix(rows) },
                              v: TensorRef(name: w.name, computedFrom: [w], shape: [rows, cols], dtype: dtype) { $0[0] }, whole: w)
        }
        return FactorPair(u: TensorRef(name: w.name, computedFrom: [w], shape: [rows, cols], dtype: dtype) { $0[0] },
                          v: TensorRef(name: w.name + "[I]", computedFrom: [], shape: [cols, cols], dtype: dtype) { _ in identityMatrix(cols) }, whole: w)
    }

    /// Hadamard product: (U₁V₁) ⊙ (U₂V₂).
    static func hadamard(_ x: FactorPair, _ y: FactorPair, dtype: DType) -> FactorPair {
        let m = x.rows, n = x.cols, r1 = x.rank, r2 = y.rank
        let u = TensorRef(name: "\(x.u.name) ⊙ \(y.u.name)", computedFrom: [x.u, y.u], shape: [m, r1 * r2], dtype: dtype) {
            FactorAlgebra.columnKhatriRao($0[0], $0[1], m: m, r1: r1, r2: r2)
        }
        let v = TensorRef(name: "\(x.v.name) ⊙ \(y.v.name)", computedFrom: [x.v, y.v], shape: [r1 * r2, n], dtype: dtype) {
            FactorAlgebra.rowKhatriRao($0[0], $0[1], r1: r1, r2: r2, n: n)
        }
        return FactorPair(u: u, v: v)
    }

    /// Kronecker product: kron(U₁V₁, U₂V₂).
    static func kronecker(_ x: FactorPair, _ y: FactorPair, dtype: DType) -> FactorPair {
        let (a, k1, b) = (x.rows, x.rank, x.cols), (c, k2, d) = (y.rows, y.rank, y.cols)
        let u = TensorRef(name: "kron(\(x.u.name), \(y.u.name))", computedFrom: [x.u, y.u], shape: [a * c, k1 * k2], dtype: dtype) {
            FactorAlgebra.kron($0[0], rows: a, cols: k1, $0[1], rows: c, cols: k2)
        }
        let v = TensorRef(name: "kron(\(x.v.name), \(y.v.name))", computedFrom: [x.v, y.v], shape: [k1 * k2, b * d], dtype: dtype) {
            FactorAlgebra.kron($0[0], rows: k1, cols: b, $0[1], rows: k2, cols: d)
        }
        return FactorPair(u: u, v: v)
    }
}

/// The tensors of a LyCORIS module, by their key suffix.
enum LyCORISRole: String, Sendable, CaseIterable {
    case hadaW1A = "hada_w1_a", hadaW1B = "hada_w1_b", hadaW2A = "hada_w2_a", hadaW2B = "hada_w2_b", hadaT1 = "hada_t1", hadaT2 = "hada_t2"
    case lokrW1 = "lokr_w1", lokrW1A = "lokr_w1_a", lokrW1B = "lokr_w1_b", lokrW2 = "lokr_w2", lokrW2A = "lokr_w2_a", lokrW2B = "lokr_w2_b", lokrT2 = "lokr_t2"
    case diff, diffB = "diff_b"
    case doraScale = "dora_scale"

    var isLoHa: Bool { rawValue.hasPrefix("hada_") }
    var isLoKr: Bool { rawValue.hasPrefix("lokr_") }
}

/// Builds a LyCORIS module from its stored tensors.
enum LyCORISModules {
    typealias Tensors = [AdapterLoader.Role: TensorRef]

    /// Whether a stored module holds LyCORIS factors: not only a `dora_scale` or a `diff_b` (a
    /// bias difference, as ComfyUI saves beside each LoRA pair) beside LoRA factors.
    static func holdsFactors(_ tensors: Tensors) -> Bool {
        let loraFactors = tensors[.a] != nil || tensors[.b] != nil
        return tensors.keys.contains { key in
            guard case .lycoris(let r) = key else { return false }
            return !(loraFactors && (r == .doraScale || r == .diffB))
        }
    }

    /// LyCORIS's DoRA rule for a `dora_scale` on a module of `outputs` rows.
    static func doraRule(_ d: TensorRef, outputs: Int) -> Result<DoRARule, AdapterLoader.Problem> {
        // (out, 1, …): per output; (1, in, …): per input channel.
        let s = d.shape
        guard s.count >= 2, s.dropFirst(2).allSatisfy({ $0 == 1 }), s[0] == 1 || s[1] == 1 else {
            return .failure(.init(text: "dora_scale has shape \(s), expected (out, 1[, 1, 1]) or (1, in[, 1, 1])"))
        }
        let onOutput = s[1] == 1 && (s[0] != 1 || outputs == 1)
        if onOutput && s[0] != outputs { return .failure(.init(text: "dora_scale has \(s[0]) outputs for \(outputs)")) }
        let epsilon: Double = switch d.dtype {
        case .f16: 0x1p-10
        case .bf16: 0x1p-7
        case .f64: 0x1p-52
        default: 0x1p-23
        }
        return .success(.lycoris(onOutput: onOutput, epsilon: epsilon))
    }

    /// The module, or the one line that says why it cannot be read.
    static func build(name: String, baseName: String, component: String?, tensors: Tensors) -> Result<LoRAModule, AdapterLoader.Problem> {
        func fail(_ text: String) -> Result<LoRAModule, AdapterLoader.Problem> { .failure(.init(text: "module \(name): \(text)")) }
        func t(_ r: LyCORISRole) -> TensorRef? { tensors[.lycoris(r)] }
        let roles = Set(tensors.keys.compactMap { if case .lycoris(let r) = $0 { r } else { nil } })
        let loha = roles.contains { $0.isLoHa }, lokr = roles.contains { $0.isLoKr }
        let full = roles.contains(.diff) || roles.contains(.diffB)
        let kinds = [loha, lokr, full].filter { $0 }.count
        if kinds == 0 { return fail("has a \(roles.map(\.rawValue).sorted().joined(separator: ", ")) but no factors (LoRA, LoHa, LoKr or diff)") }
        guard kinds == 1 else {
            return fail("holds tensors of more than one LyCORIS kind (\(roles.map(\.rawValue).sorted().joined(separator: ", ")))")
        }
        // Every dimension positive and sane, so that no product of them overflows (a file of
        // zero-element tensors with huge dimensions is not a module).
        for (role, ref) in tensors where role != .alpha {
            guard !ref.shape.isEmpty, ref.shape.allSatisfy({ $0 > 0 && $0 < 1 << 24 }), ref.entry.elementCount < 1 << 36 else {
                return fail("tensor \(ref.name) has shape \(ref.shape)")
            }
        }
        if t(.lokrW1) != nil && (t(.lokrW1A) != nil || t(.lokrW1B) != nil) { return fail("has both lokr_w1 and lokr_w1_a/lokr_w1_b; one of the two forms") }
        if t(.lokrW2) != nil && (t(.lokrW2A) != nil || t(.lokrW2B) != nil || t(.lokrT2) != nil) {
            return fail("has both lokr_w2 and lokr_w2_a/lokr_w2_b/lokr_t2; one of the two forms")
        }
        if t(.lokrT2) != nil && (t(.lokrW2A) == nil || t(.lokrW2B) == nil) { return fail("has lokr_t2 without lokr_w2_a and lokr_w2_b") }
        if let b = t(.diffB), b.shape.count != 1 { return fail("diff_b has shape \(b.shape), expected (out,)") }
        if let other = tensors.keys.first(where: { if case .lycoris = $0 { false } else { $0 != .alpha } }) {
            return fail("mixes LyCORIS tensors with LoRA ones (\(other))")
        }
        for (_, ref) in tensors where !ref.entry.dtype.isReadableAsFloat {
            return fail("tensor \(ref.name) has dtype \(ref.entry.dtype.rawValue), not a float type")
        }
        // The dtype conversions write the factors in: the module's first stored factor's.
        let dtype = [LyCORISRole.hadaW1A, .lokrW1, .lokrW1A, .lokrW2, .lokrW2A, .diff].lazy.compactMap { t($0)?.dtype }.first ?? .f32
        var alpha: Double?
        if let a = tensors[.alpha] {
            guard a.entry.elementCount == 1, let v = try? a.doubles().first, v.isFinite else { return fail("alpha is not one finite number") }
            alpha = v
        }
        let built: Built
        if loha {
            built = buildLoHa(t, alpha: alpha, dtype: dtype).mapError { .init(text: "module \(name): \($0.text)") }
        } else if lokr {
            built = buildLoKr(t, alpha: alpha, dtype: dtype).mapError { .init(text: "module \(name): \($0.text)") }
        } else {
            guard let d = t(.diff) else { return fail("has diff_b but no diff; a bias-only full module is not read") }
            built = .success((FactorPair.whole(d, dtype: dtype), d.shape, .full, 1, nil, .stored(d)))
        }
        let (pair, shape, algorithm, scale, usedAlpha, form): (FactorPair, [Int], ModuleAlgorithm, Double, Double?, DenseUpdate.Form)
        switch built {
        case .failure(let p): return .failure(p)
        case .success(let v): (pair, shape, algorithm, scale, usedAlpha, form) = v
        }
        // The factors as merged: rank r₁·r₂ (LoHa) or k₁·k₂ (LoKr) must stay a matrix one can hold.
        guard pair.rank <= 1 << 16, pair.rank.multipliedReportingOverflow(by: pair.rows + pair.cols).partialValue < 1 << 36 else {
            return fail("its update as exact factors has rank \(pair.rank) on [\(pair.rows), \(pair.cols)], more than adapter holds")
        }
        let kind: LayerKind = shape.count == 4 ? (shape[2] == 1 && shape[3] == 1 ? .conv1x1 : .convKxK) : .linear
        // A as (rank, in, k, k) for a convolution, so every writer sees a LoCon-shaped factor.
        let a = shape.count == 4
            ? TensorRef(name: pair.v.name, computedFrom: [pair.v], shape: [pair.rank] + shape.dropFirst(), dtype: dtype) { $0[0] }
            : pair.v
        let b = shape.count == 4
            ? TensorRef(name: pair.u.name, computedFrom: [pair.u], shape: [pair.rows, pair.rank, 1, 1], dtype: dtype) { $0[0] }
            : pair.u
        var m = LoRAModule(name: name, baseName: baseName, component: component, kind: kind, a: a, mixer: nil, b: b, orientation: .peft,
                           scale: scale, alpha: usedAlpha, magnitude: nil, bias: t(.diffB))
        m.algorithm = algorithm
        m.dense = DenseRows(update: DenseUpdate(form, rows: pair.rows, cols: pair.cols), rows: 0..<pair.rows)
        if shape.count != 2 && shape.count != 4 { m.declaredShape = shape }
        m.flattened = shape.count == 2 && algorithm != .full
        if let d = t(.doraScale) {
            switch doraRule(d, outputs: pair.rows) {
            case .success(let rule): (m.magnitude, m.doraRule) = (d, rule)
            case .failure(let p): return fail(p.text)
            }
        }
        if let bias = t(.diffB), bias.entry.elementCount != pair.rows {
            return fail("diff_b has \(bias.entry.elementCount) elements for \(pair.rows) outputs")
        }
        return .success(m)
    }

    typealias Built = Result<(FactorPair, [Int], ModuleAlgorithm, Double, Double?, DenseUpdate.Form), AdapterLoader.Problem>

    private static func problem(_ text: String) -> Built { .failure(.init(text: text)) }

    /// LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b), or with Tucker cores each side rebuilt from t, a, b.
    private static func buildLoHa(_ t: (LyCORISRole) -> TensorRef?, alpha: Double?, dtype: DType) -> Built {
        guard let w1a = t(.hadaW1A), let w1b = t(.hadaW1B), let w2a = t(.hadaW2A), let w2b = t(.hadaW2B) else {
            let missing = [LyCORISRole.hadaW1A, .hadaW1B, .hadaW2A, .hadaW2B].filter { t($0) == nil }.map(\.rawValue)
            return problem("LoHa lacks \(missing.joined(separator: ", "))")
        }
        let tucker = t(.hadaT1) != nil || t(.hadaT2) != nil
        let p1: FactorPair, p2: FactorPair, shape: [Int]
        if tucker {
            guard let t1 = t(.hadaT1), let t2 = t(.hadaT2) else { return problem("LoHa has one Tucker core of two (hada_t1, hada_t2)") }
            switch (tuckerPair(t1, a: w1a, b: w1b, dtype: dtype), tuckerPair(t2, a: w2a, b: w2b, dtype: dtype)) {
            case (.success(let x), .success(let y)):
                guard x.0.rows == y.0.rows, x.0.cols == y.0.cols, x.1 == y.1 else { return problem("LoHa's two Tucker halves have shapes \(x.1) and \(y.1)") }
                (p1, p2, shape) = (x.0, y.0, x.1)
            case (.failure(let e), _), (_, .failure(let e)): return problem(e.text)
            }
        } else {
            for (u, v) in [(w1a, w1b), (w2a, w2b)] where u.shape.count != 2 || v.shape.count < 2 || u.shape[1] != v.shape[0] {
                return problem("LoHa factors \(u.name) \(u.shape) and \(v.name) \(v.shape) do not multiply")
            }
            p1 = FactorPair(u: w1a, v: flat(w1b, dtype: dtype))
            p2 = FactorPair(u: w2a, v: flat(w2b, dtype: dtype))
            guard p1.rows == p2.rows, p1.cols == p2.cols else {
                return problem("LoHa's halves are [\(p1.rows), \(p1.cols)] and [\(p2.rows), \(p2.cols)]")
            }
            shape = w1b.shape.count == 4 ? [p1.rows] + w1b.shape.dropFirst() : [p1.rows, p1.cols]
        }
        let dim = w1b.shape[0]
        guard p1.rank * p2.rank <= 1 << 16 else { return problem("LoHa dims \(p1.rank) and \(p2.rank) give an update of rank \(p1.rank * p2.rank), more than adapter holds") }
        let (scale, used) = scaleRule(alpha: alpha, dim: dim)
        return .success((FactorPair.hadamard(p1, p2, dtype: dtype), shape, .loha(dim: dim, tucker: tucker), scale, used, .hadamard(p1, p2)))
    }

    /// LoKr: ΔW = kron(w1, w2); w1 whole or w1_a·w1_b, w2 whole, w2_a·w2_b, or a Tucker core.
    private static func buildLoKr(_ t: (LyCORISRole) -> TensorRef?, alpha: Double?, dtype: DType) -> Built {
        let w1: FactorPair, w2: FactorPair, w2Shape: [Int]
        var dim: Int?
        if let whole = t(.lokrW1) {
            guard whole.shape.count == 2 else { return problem("lokr_w1 has shape \(whole.shape), expected a matrix") }
            w1 = FactorPair.whole(whole, dtype: dtype)
        } else if let a = t(.lokrW1A), let b = t(.lokrW1B) {
            guard a.shape.count == 2, b.shape.count == 2, a.shape[1] == b.shape[0] else {
                return problem("lokr_w1_a \(a.shape) and lokr_w1_b \(b.shape) do not multiply")
            }
            w1 = FactorPair(u: a, v: b)
            dim = b.shape[0]
        } else {
            return problem("LoKr lacks lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        }
        if let whole = t(.lokrW2) {
            guard whole.shape.count == 2 || whole.shape.count == 4 else { return problem("lokr_w2 has shape \(whole.shape)") }
            w2 = FactorPair.whole(whole, dtype: dtype)
            w2Shape = whole.shape
        } else if let a = t(.lokrW2A), let b = t(.lokrW2B) {
            if let core = t(.lokrT2) {
                switch tuckerPair(core, a: a, b: b, dtype: dtype) {
                case .success(let (p, s)): (w2, w2Shape) = (p, s)
                case .failure(let e): return problem(e.text)
                }
            } else {
                guard a.shape.count == 2, b.shape.count >= 2, a.shape[1] == b.shape[0] else {
                    return problem("lokr_w2_a \(a.shape) and lokr_w2_b \(b.shape) do not multiply")
                }
                w2 = FactorPair(u: a, v: flat(b, dtype: dtype))
                w2Shape = [a.shape[0]] + b.shape.dropFirst()
            }
            dim = b.shape[0]
        } else {
            return problem("LoKr lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        }
        guard w1.rank * w2.rank <= 1 << 16, (w1.rows * w2.rows) * (w1.cols * w2.cols) < 1 << 40 else {
            return problem("LoKr halves [\(w1.rows), \(w1.cols)] and [\(w2.rows), \(w2.cols)] give an update larger than adapter holds")
        }
        let shape = [w1.rows * w2Shape[0], w1.cols * w2Shape[1]] + w2Shape.dropFirst(2)
        let factored = (w1: t(.lokrW1) == nil, w2: t(.lokrW2) == nil)
        // Both halves whole: LyCORIS ignores alpha (scale 1).
        let (scale, used) = dim.map { scaleRule(alpha: alpha, dim: $0) } ?? (1, nil)
        return .success((FactorPair.kronecker(w1, w2, dtype: dtype), shape, .lokr(w1Factored: factored.w1, w2Factored: factored.w2, tucker: t(.lokrT2) != nil), scale, used,
                         .kronecker(w1, w2)))
    }

    /// scale = alpha / dim; no alpha (or 0) is alpha = dim.
    private static func scaleRule(alpha: Double?, dim: Int) -> (Double, Double?) {
        guard let alpha, alpha != 0 else { return (1, Double(dim)) }
        return (alpha / Double(dim), alpha)
    }

    /// A tensor with its later dimensions flattened into columns.
    private static func flat(_ x: TensorRef, dtype: DType) -> TensorRef {
        x.shape.count == 2 ? x : TensorRef(name: x.name, computedFrom: [x], shape: [x.shape[0], x.shape.dropFirst().reduce(1, *)], dtype: dtype) { $0[0] }
    }

    /// A Tucker-rebuilt weight einsum("i j ..., j r, i p -> p r ...", core, b, a): core (r₁, r₂, k…),
    /// a (r₁, out), b (r₂, in) → (out, in, k…) as U = aᵀ (out × r₁) and V (r₁ × in·k…) with
    /// V[i, (c, s)] = Σⱼ core[i, j, s]·b[j, c]. Also returns the rebuilt shape.
    private static func tuckerPair(_ core: TensorRef, a: TensorRef, b: TensorRef, dtype: DType) -> Result<(FactorPair, [Int]), AdapterLoader.Problem> {
        let c = core.shape
        guard c.count >= 3, a.shape.count == 2, b.shape.count == 2, a.shape[0] == c[0], b.shape[0] == c[1] else {
            return .failure(.init(text: "Tucker core \(core.name) \(c) does not fit \(a.name) \(a.shape) and \(b.name) \(b.shape)"))
        }
        let r1 = c[0], r2 = c[1], out = a.shape[1], inputs = b.shape[1], k = c.dropFirst(2).reduce(1, *)
        let u = TensorRef(name: a.name + "ᵀ", computedFrom: [a], shape: [out, r1], dtype: dtype) { transpose($0[0], rows: r1, cols: out) }
        let v = TensorRef(name: "\(core.name)×\(b.name)", computedFrom: [core, b], shape: [r1, inputs * k], dtype: dtype) { x in
            let (t, w) = (x[0], x[1])
            var v = [Double](repeating: 0, count: r1 * inputs * k)
            for i in 0..<r1 {
                for j in 0..<r2 {
                    for col in 0..<inputs {
                        let bj = w[j * inputs + col]
                        if bj == 0 { continue }
                        for s in 0..<k { v[(i * inputs + col) * k + s] += t[(i * r2 + j) * k + s] * bj }
                    }
                }
            }
            return v
        }
        return .success((FactorPair(u: u, v: v), [out, inputs] + c.dropFirst(2)))
    }
}

/// A LyCORIS update computed row by row, for the merge's dense path: a Kronecker row is one
/// product per element and a Hadamard row r₁ + r₂, where the exact factors cost their rank (r₁·r₂,
/// k₁·k₂, or full) per element. The small pieces (each side's factors, or w1 and w2 whole) are
/// formed once and kept until `release`.
final class DenseUpdate: @unchecked Sendable {
    enum Form {
        case hadamard(FactorPair, FactorPair)
        case kronecker(FactorPair, FactorPair)
        case stored(TensorRef)
    }

    let form: Form
    /// Rows × columns of the update (columns: inputs, kernels flattened).
    let rows: Int
    let cols: Int
    private let lock = NSLock()
    private var pieces: [[Double]]? = nil

    init(_ form: Form, rows: Int, cols: Int) {
        self.form = form
        self.rows = rows
        self.cols = cols
    }

    /// Multiply-adds per element of a row.
    var costPerElement: Int {
        switch form {
        case .hadamard(let x, let y): x.rank + y.rank
        case .kronecker, .stored: 1
        }
    }

    /// Adds `factor` · rows `range` of ΔW into `destination` (row-major [range.count × cols]).
    /// Safe to call from several threads on disjoint rows.
    func add(_ range: Range<Int>, times factor: Double, into destination: UnsafeMutablePointer<Double>) throws {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows)
        let cols = self.cols
        switch form {
        case .stored(let d):
            let v = try d.slice(rows: StridedRange(range), columns: .all(cols), name: d.name).doubles()
            v.withUnsafeBufferPointer { src in
                let s = src.baseAddress!
                for i in 0..<(range.count * cols) { destination[i] += factor * s[i] }
            }
        case .hadamard(let x, let y):
            let p = try formed()
            let (r1, r2) = (x.rank, y.rank)
            let left = UnsafeMutablePointer<Double>.allocate(capacity: max(1, cols)), right = UnsafeMutablePointer<Double>.allocate(capacity: max(1, cols))
            defer { left.deallocate(); right.deallocate() }
            p[0].withUnsafeBufferPointer { u1 in p[1].withUnsafeBufferPointer { v1 in p[2].withUnsafeBufferPointer { u2 in p[3].withUnsafeBufferPointer { v2 in
                for (o, i) in range.enumerated() {
                    left.initialize(repeating: 0, count: cols)
                    right.initialize(repeating: 0, count: cols)
                    for t in 0..<r1 {
                        let a = u1[i * r1 + t], row = v1.baseAddress! + t * cols
                        if a != 0 { for j in 0..<cols { left[j] += a * row[j] } }
                    }
                    for t in 0..<r2 {
                        let a = u2[i * r2 + t], row = v2.baseAddress! + t * cols
                        if a != 0 { for j in 0..<cols { right[j] += a * row[j] } }
                    }
                    let dst = destination + o * cols
                    for j in 0..<cols { dst[j] += factor * left[j] * right[j] }
                }
            } } } }
        case .kronecker(let x, let y):
            let p = try formed()
            let (b, c, dk) = (x.cols, y.rows, y.cols)
            p[0].withUnsafeBufferPointer { w1 in p[1].withUnsafeBufferPointer { w2 in
                for (o, i) in range.enumerated() {
                    let (i1, i2) = (i / c, i % c)
                    let second = w2.baseAddress! + i2 * dk
                    for j1 in 0..<b {
                        let v = factor * w1[i1 * b + j1]
                        let dst = destination + o * cols + j1 * dk
                        for j2 in 0..<dk { dst[j2] += v * second[j2] }
                    }
                }
            } }
        }
    }

    /// The small pieces, formed on first use: U₁, V₁, U₂, V₂ (Hadamard) or w1, w2 whole (Kronecker).
    private func formed() throws -> [[Double]] {
        lock.lock()
        defer { lock.unlock() }
        if let pieces { return pieces }
        let made: [[Double]]
        switch form {
        case .hadamard(let x, let y):
            made = [try x.u.doubles(), try x.v.doubles(), try y.u.doubles(), try y.v.doubles()]
        case .kronecker(let x, let y):
            func formed(_ p: FactorPair) throws -> [Double] {
                try p.whole?.doubles() ?? matmul(try p.u.doubles(), try p.v.doubles(), rows: p.rows, inner: p.rank, cols: p.cols)
            }
            made = [try formed(x), try formed(y)]
        case .stored:
            made = []
        }
        for v in made.joined() where !v.isFinite { throw NonFiniteFactors() }
        pieces = made
        return made
    }

    /// Drops the formed pieces and the stored tensors' pages.
    func release() {
        lock.lock()
        pieces = nil
        lock.unlock()
        switch form {
        case .hadamard(let x, let y), .kronecker(let x, let y): for t in [x.u, x.v, y.u, y.v] { t.release() }
        case .stored(let d): d.release()
        }
    }
}

/// A factor of a dense update holds NaN or infinity (the merge names the module and tensor).
struct NonFiniteFactors: Error {}

/// Rows of a `DenseUpdate` a module stands for (all of them, or the half of a swapped tensor).
struct DenseRows: Sendable {
    let update: DenseUpdate
    let rows: Range<Int>

    func add(_ range: Range<Int>, times factor: Double, into destination: UnsafeMutablePointer<Double>) throws {
        try update.add((rows.lowerBound + range.lowerBound)..<(rows.lowerBound + range.upperBound), times: factor, into: destination)
    }

    func rows(_ sub: Range<Int>) -> DenseRows {
        DenseRows(update: update, rows: (rows.lowerBound + sub.lowerBound)..<(rows.lowerBound + sub.upperBound))
    }
}
