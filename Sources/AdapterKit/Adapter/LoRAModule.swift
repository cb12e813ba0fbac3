/// The layout an adapter was written in.
public enum AdapterFormat: String, Sendable, CaseIterable {
    case peft, kohya, diffusers, mlx, paddle, mytransformers
}

/// The kind of layer a LoRA module adapts, which decides how B·M·A lands on the base weight.
public enum LayerKind: String, Sendable {
    /// `nn.Linear`: W (out, in) += Δ.
    case linear
    /// GPT-2 `Conv1D`, W stored (in, out): W += Δᵀ.
    case linearFanInFanOut = "linear_fan_in_fan_out"
    /// `nn.Embedding`: W (num_embeddings, dim) += (B·A)ᵀ.
    case embedding
    /// 1×1 convolution: W (out, in, 1, 1).
    case conv1x1
    /// k×k convolution: A (r, in, k, k), B (out, r, 1, 1), Δ reshaped to (out, in, k, k).
    case convKxK = "conv"

    /// Whether the base weight holds the transpose of B·M·A.
    public var isTransposed: Bool { self == .linearFanInFanOut || self == .embedding }
}

/// A tensor of an adapter: stored in a container and read only when used, or held in memory as
/// Float64 values (what a conversion computes). Merges and conversions see the same type, so a
/// module is one model whether its factors are on disk or were just made.
public struct TensorRef: Sendable {
    enum Storage: Sendable {
        case stored(any TensorContainer)
        case held([Double])
    }

    let storage: Storage
    public let entry: TensorEntry
    public var name: String { entry.name }
    public var shape: [Int] { entry.shape }
    /// The stored dtype (for held values: the dtype they are to be written in).
    public var dtype: DType { entry.dtype }

    /// A stored tensor.
    public init(store: any TensorContainer, entry: TensorEntry) {
        storage = .stored(store)
        self.entry = entry
    }

    /// Values held in memory, row-major in `shape`, to be written as `dtype`.
    init(name: String, held values: [Double], shape: [Int], dtype: DType) {
        precondition(values.count == shape.reduce(1, *), "held values must fill the shape")
        storage = .held(values)
        entry = TensorEntry(name: name, shape: shape, encoding: .plain(dtype), byteCount: TensorEncoding.plain(dtype).byteCount(elements: values.count) ?? 0)
    }

    /// The container a stored tensor comes from (nil for held values).
    public var store: (any TensorContainer)? {
        if case .stored(let s) = storage { return s }
        return nil
    }

    /// The file the tensor is from, for messages ("<computed>" for held values).
    public var path: String { store?.path ?? "<computed>" }

    /// The values of a held tensor (conversions hold every factor; a stored one traps).
    var held: [Double] {
        guard case .held(let v) = storage else { preconditionFailure("\(name) is stored, not held") }
        return v
    }

    /// The same tensor with new values and shape, keeping its name and dtype.
    func holding(_ values: [Double], shape: [Int]) -> TensorRef {
        TensorRef(name: name, held: values, shape: shape, dtype: dtype)
    }

    public func floats() throws -> [Float] {
        switch storage {
        case .stored(let s): try s.floats(entry.name)
        case .held(let v): v.map { Float($0) }
        }
    }

    public func doubles() throws -> [Double] {
        switch storage {
        case .stored(let s): try s.doubles(entry.name)
        case .held(let v): v
        }
    }

    /// Lets go of a stored tensor's pages after use.
    func release() {
        if case .stored(let s) = storage { s.release(entry.name) }
    }
}

/// How the stored factors relate to PEFT's orientation.
public enum FactorOrientation: Sendable {
    /// A (r, in[, k, k]), M (r, r), B (out, r[, 1, 1]).
    case peft
    /// Everything transposed: A (in, r), M (r, r) transposed, B (r, out) (mlx-lm, PaddleNLP).
    case transposed
}

extension FactorOrientation {
    /// The one place stored factors turn into PEFT orientation: A (r × in), M (r × r), B (out × r).
    func toPEFT(a: [Double], m: [Double]?, b: [Double], rank r: Int, inFeatures: Int, outFeatures: Int) -> (a: [Double], m: [Double]?, b: [Double]) {
        switch self {
        case .peft:
            return (a, m, b)
        case .transposed:
            return (transpose(a, rows: inFeatures, cols: r), m.map { transpose($0, rows: r, cols: r) }, transpose(b, rows: r, cols: outFeatures))
        }
    }

    /// And back: PEFT-orientation A (r × in) and B (out × r) in this orientation, with the rank
    /// padded to `paddedRank` by zero rows and columns (exact: they add nothing).
    func fromPEFT(a: [Double], b: [Double], rank r: Int, inFeatures n: Int, outFeatures out: Int, paddedRank: Int) -> (a: [Double], b: [Double]) {
        precondition(paddedRank >= r)
        switch self {
        case .peft:
            var pa = [Double](repeating: 0, count: paddedRank * n), pb = [Double](repeating: 0, count: out * paddedRank)
            for i in 0..<r { for j in 0..<n { pa[i * n + j] = a[i * n + j] } }
            for i in 0..<out { for j in 0..<r { pb[i * paddedRank + j] = b[i * r + j] } }
            return (pa, pb)
        case .transposed:
            var pa = [Double](repeating: 0, count: n * paddedRank), pb = [Double](repeating: 0, count: paddedRank * out)
            for i in 0..<r { for j in 0..<n { pa[j * paddedRank + i] = a[i * n + j] } }
            for i in 0..<out { for j in 0..<r { pb[j * out + i] = b[i * r + j] } }
            return (pa, pb)
        }
    }
}

/// One adapted layer, normalised: Δ = scale · B·M·A in PEFT orientation.
public struct LoRAModule: Sendable {
    /// The module path as stored, without the `lora_*` suffix.
    public let name: String
    /// The module path in base-model terms (prefixes such as `base_model.model.` removed).
    public var baseName: String
    /// Which part of a multi-model adapter this belongs to (`unet`, `text_encoder`, …), nil for one model.
    public let component: String?
    public var kind: LayerKind
    public var a: TensorRef
    public var mixer: TensorRef?
    public var b: TensorRef
    public var orientation: FactorOrientation
    public var scale: Double
    /// The alpha the scale came from (config, pattern, alpha tensor or metadata; r where alpha is
    /// assumed to equal r); nil where the layout stores a scale itself (mlx-lm).
    public var alpha: Double? = nil
    /// DoRA magnitude vector (out,).
    public var magnitude: TensorRef?
    /// `lora_B.bias` (out,), added as scale · bias to the base bias.
    public var bias: TensorRef?

    public var hasMixer: Bool { mixer != nil }

    /// Rank r: rows of A in PEFT orientation.
    public var rank: Int { orientation == .peft ? a.shape.first ?? 0 : a.shape.last ?? 0 }

    /// Input features as A sees them (in·k·k for convolutions).
    public var inFeatures: Int {
        switch orientation {
        case .peft: a.shape.dropFirst().reduce(1, *)
        case .transposed: a.shape.dropLast().reduce(1, *)
        }
    }

    /// Output features: rows of B in PEFT orientation.
    public var outFeatures: Int { orientation == .peft ? b.shape.first ?? 0 : b.shape.last ?? 0 }

    /// The shape the base weight must have for this module.
    public var expectedBaseShape: [Int] {
        switch kind {
        case .linear: [outFeatures, inFeatures]
        case .linearFanInFanOut, .embedding: [inFeatures, outFeatures]
        case .conv1x1: [outFeatures, inFeatures, 1, 1]
        case .convKxK: [outFeatures] + Array(a.shape.dropFirst())
        }
    }

    /// The factors in PEFT orientation as row-major Float64 matrices: A (r × in), M (r × r) or nil, B (out × r).
    public func factors() throws -> (a: [Double], m: [Double]?, b: [Double]) {
        let r = rank
        return orientation.toPEFT(a: try a.doubles(), m: try mixer?.doubles(), b: try b.doubles(), rank: r, inFeatures: inFeatures, outFeatures: outFeatures)
    }

    /// The mixed factor M·A (r × in) in Float64; A itself without a mixer.
    public func mixedA() throws -> (ma: [Double], b: [Double]) {
        let f = try factors()
        guard let m = f.m else { return (f.a, f.b) }
        return (matmul(m, f.a, rows: rank, inner: rank, cols: inFeatures), f.b)
    }
}

/// A full tensor that replaces a base tensor (`modules_to_save`).
public struct Replacement: Sendable {
    public let tensor: TensorRef
    /// The base tensor it replaces.
    public let baseName: String
}
