import Foundation

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
        /// Rows and columns of another tensor's 2-D view (first dimension × the rest), read from it
        /// when used: one expert's factors inside a PEFT `target_parameters` module.
        indirect case slice(of: TensorRef, rows: StridedRange, columns: StridedRange)
        /// Expert e's columns j·E + e of a `target_parameters` B, from a split shared by all experts.
        case expertColumns(ExpertColumnSplit, expert: Int)
        /// Values computed from other tensors when used: the exact low-rank factors of a LyCORIS
        /// module (Khatri–Rao and Kronecker products of its stored factors).
        case computed(ComputedTensor)
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

    /// The container a stored tensor (or the tensor a slice is of) comes from (nil for held values).
    public var store: (any TensorContainer)? {
        switch storage {
        case .stored(let s): s
        case .held: nil
        case .slice(let parent, _, _): parent.store
        case .expertColumns(let split, _): split.parent.store
        case .computed(let c): c.sources.first?.store
        }
    }

    /// A tensor of `shape` whose values `compute` makes from the values of `sources` when they
    /// are used; nothing is read before then, and the sources' pages are let go after.
    init(name: String, computedFrom sources: [TensorRef], shape: [Int], dtype: DType, _ compute: @escaping @Sendable ([[Double]]) -> [Double]) {
        let encoding = TensorEncoding.plain(dtype)
        storage = .computed(ComputedTensor(sources: sources, compute: compute))
        entry = TensorEntry(name: name, shape: shape, encoding: encoding, byteCount: encoding.byteCount(elements: shape.reduce(1, *)) ?? 0)
    }

    /// Expert `e`'s columns of this B (shape [out, r]), read through `split` (made once per factor).
    func expertColumns(_ e: Int, of split: ExpertColumnSplit, name: String) -> TensorRef {
        split.register(e)
        let shape = [split.rows, split.rank]
        let encoding = TensorEncoding.plain(dtype)
        return TensorRef(storage: .expertColumns(split, expert: e),
                         entry: TensorEntry(name: name, shape: shape, encoding: encoding, byteCount: encoding.byteCount(elements: split.rows * split.rank) ?? 0))
    }

    /// Rows and columns of this tensor's 2-D view (first dimension × the rest) as a tensor of
    /// shape [rows.count, columns.count], named `name`; nothing is read until it is used. A slice
    /// of a slice is a slice of the original tensor.
    func slice(rows: StridedRange, columns: StridedRange, name: String) -> TensorRef {
        let (r0, c0) = (shape.first ?? 1, shape.dropFirst().reduce(1, *))
        precondition(rows.isWithin(r0) && columns.isWithin(c0), "a slice must lie inside its tensor")
        let storage: Storage
        if case .slice(let parent, let pr, let pc) = self.storage, parent.isStoredOrHeld {
            storage = .slice(of: parent, rows: pr.composed(with: rows), columns: pc.composed(with: columns))
        } else {
            storage = .slice(of: self, rows: rows, columns: columns)
        }
        let shape = [rows.count, columns.count]
        let encoding = TensorEncoding.plain(dtype)
        return TensorRef(storage: storage, entry: TensorEntry(name: name, shape: shape, encoding: encoding,
                                                             byteCount: encoding.byteCount(elements: rows.count * columns.count) ?? 0))
    }

    /// Whether the values are held in memory (not read from a container).
    var isHeld: Bool {
        if case .held = storage { return true }
        return false
    }

    private var isStoredOrHeld: Bool {
        switch storage {
        case .stored, .held: true
        case .slice, .expertColumns, .computed: false
        }
    }

    private init(storage: Storage, entry: TensorEntry) {
        self.storage = storage
        self.entry = entry
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
        case .slice, .expertColumns, .computed: try doubles().map { Float($0) }
        }
    }

    public func doubles() throws -> [Double] {
        switch storage {
        case .stored(let s): return try s.doubles(entry.name)
        case .held(let v): return v
        case .slice(let parent, let rows, let columns):
            return try parent.doubles(rows: rows, columns: columns)
        case .expertColumns(let split, let e):
            return try split.block(e)
        case .computed(let c):
            let values = c.compute(try c.sources.map { try $0.doubles() })
            precondition(values.count == entry.elementCount, "a computed tensor must fill its shape")
            return values
        }
    }

    /// The elements of a slice, read from this (stored or held) tensor: only the rows and columns
    /// asked for are decoded, so the experts of a large `target_parameters` factor are read once.
    private func doubles(rows: StridedRange, columns: StridedRange) throws -> [Double] {
        let width = shape.dropFirst().reduce(1, *)
        var out = [Double](repeating: 0, count: rows.count * columns.count)
        switch storage {
        case .held(let v):
            for i in 0..<rows.count {
                for j in 0..<columns.count { out[i * columns.count + j] = v[rows[i] * width + columns[j]] }
            }
        case .stored(let s):
            guard rows.count > 0, columns.count > 0 else { return out }
            let dtype = entry.dtype
            let size = dtype.byteSize
            // Only the bytes from the first row asked for to the last are read (one expert's
            // block of A rows is contiguous).
            let first = rows[0] * width, last = rows[rows.count - 1] * width + width
            try s.withBytes(of: entry.name, range: first * size..<last * size) { raw in
                guard let base = raw.baseAddress else { return }
                out.withUnsafeMutableBufferPointer { o in
                    for i in 0..<rows.count {
                        let row = rows[i] * width - first
                        if columns.step == 1 {
                            ElementConversion.toDouble(dtype, base + (row + columns.start) * size, o.baseAddress! + i * columns.count, count: columns.count)
                        } else {
                            for j in 0..<columns.count {
                                ElementConversion.toDouble(dtype, base + (row + columns[j]) * size, o.baseAddress! + i * columns.count + j, count: 1)
                            }
                        }
                    }
                }
            }
        case .slice, .expertColumns, .computed:
            // A slice of a computed view: the view's values, then the rows and columns.
            let v = try doubles()
            for i in 0..<rows.count {
                for j in 0..<columns.count { out[i * columns.count + j] = v[rows[i] * width + columns[j]] }
            }
        }
        return out
    }

    /// Lets go of a stored tensor's pages after use.
    func release() {
        switch storage {
        case .stored(let s): s.release(entry.name)
        case .held: break
        case .slice(let parent, _, _): parent.release()
        case .expertColumns: break  // the split drops each expert's block once it has been read
        case .computed(let c): for s in c.sources { s.release() }
        }
    }
}

/// The experts' column blocks of one `target_parameters` B [out, r·E] (column j·E + e is rank j of
/// expert e): strided in the file, so reading one expert means reading all of B. The first read
/// decodes B once and splits it into E blocks [out, r]; each block is dropped once every slice
/// made of it has been read, so memory goes down as the merge moves through the experts, and B
/// is decoded once per merge instead of once per expert.
final class ExpertColumnSplit: @unchecked Sendable {
    let parent: TensorRef
    let experts: Int
    let rows: Int
    let rank: Int
    private let lock = NSLock()
    private var blocks: [Int: [Double]] = [:]
    private var pending: [Int: Int] = [:]
    private var decoded = false

    init(_ parent: TensorRef, experts: Int) {
        self.parent = parent
        self.experts = experts
        rows = parent.shape.first ?? 0
        rank = (parent.shape.dropFirst().reduce(1, *)) / max(1, experts)
    }

    /// A slice of expert `e` was made: its block is kept until that many reads.
    func register(_ e: Int) {
        lock.lock()
        defer { lock.unlock() }
        pending[e, default: 0] += 1
    }

    /// Expert e's block, row-major [out, r].
    func block(_ e: Int) throws -> [Double] {
        lock.lock()
        defer { lock.unlock() }
        if blocks[e] == nil {
            let all = try parent.doubles()
            parent.release()
            // The first read splits every expert a slice was made for; a later miss (a block read
            // more often than registered) splits only the one asked for.
            let wanted = decoded ? [e] : (0..<experts).filter { $0 == e || (pending[$0] ?? 0) > 0 }
            decoded = true
            let width = rank * experts
            for x in wanted {
                var b = [Double](repeating: 0, count: rows * rank)
                for i in 0..<rows { for j in 0..<rank { b[i * rank + j] = all[i * width + j * experts + x] } }
                blocks[x] = b
            }
        }
        let b = blocks[e]!
        let left = (pending[e] ?? 1) - 1
        pending[e] = left
        if left <= 0 { blocks[e] = nil }
        return b
    }
}

/// `count` indices `start, start + step, …`: rows or columns of a slice.
public struct StridedRange: Sendable, Hashable {
    public let start: Int
    public let step: Int
    public let count: Int

    public init(start: Int, step: Int = 1, count: Int) {
        precondition(start >= 0 && step >= 1 && count >= 0)
        self.start = start
        self.step = step
        self.count = count
    }

    public init(_ range: Range<Int>) { self.init(start: range.lowerBound, count: range.count) }

    public static func all(_ n: Int) -> StridedRange { StridedRange(start: 0, count: n) }

    public subscript(i: Int) -> Int { start + i * step }

    /// Whether every index is below `n`.
    func isWithin(_ n: Int) -> Bool { count == 0 || self[count - 1] < n }

    /// The indices `self[inner[i]]`.
    func composed(with inner: StridedRange) -> StridedRange {
        StridedRange(start: self[inner.start], step: step * inner.step, count: inner.count)
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
    public var name: String
    /// The module path in base-model terms (prefixes such as `base_model.model.` removed).
    public var baseName: String
    /// Which part of a multi-model adapter this belongs to (`unet`, `text_encoder`, …), nil for one model.
    public var component: String?
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
    /// The factor of `bias` when it is not `scale`: 1 for a stored bias difference (`diff_b`).
    public var biasScale: Double? = nil
    /// PEFT `target_parameters` (its `ParamWrapper`): the module adapts one 3-D parameter of
    /// `experts` experts, with A [r·E, in] (expert e in rows e·r..<(e+1)·r), B [out, r·E] (column
    /// j·E + e is rank j of expert e) and a mixer, when there is one, [r·E, r] in row blocks like A.
    public var parameter: ExpertParameter? = nil
    /// For a stored `target_parameters` B: the split its experts' columns are read through.
    var split: ExpertColumnSplit? = nil
    /// What was stored: LoRA factors, or a LyCORIS module whose update `a`, `b` give exactly as
    /// low-rank factors computed from its own.
    public var algorithm: ModuleAlgorithm = .lora
    /// The base weight's shape where the factors' shapes do not give it (a full diff of a 1-D
    /// tensor, a LyCORIS convolution stored flattened).
    var declaredShape: [Int]? = nil
    /// A LyCORIS update stored as a matrix [out, in·k…] that may be a convolution's flattened
    /// kernel (LyCORIS keeps conv factors 2-D): the base weight's shape tells which (`withKernel`).
    var flattened = false
    /// The update row by row (LyCORIS modules): what the merge uses instead of `a`, `b` where
    /// their rank makes the factors dearer. It must stand for the same update as `a`, `b`.
    var dense: DenseRows? = nil
    /// How `magnitude` rescales the merged weight: PEFT's DoRA, or LyCORIS's `dora_scale`.
    public var doraRule: DoRARule = .peft

    /// This flattened module as the convolution whose weight has `shape` [out, in, k…]; nil when
    /// the shape's view is not [out, in·k…].
    func withKernel(_ shape: [Int]) -> LoRAModule? {
        guard flattened, shape.count >= 3, shape[0] == outFeatures, shape.dropFirst().reduce(1, *) == inFeatures else { return nil }
        var m = self
        let (a, b, r) = (self.a, self.b, rank)
        m.a = TensorRef(name: a.name, computedFrom: [a], shape: [r] + shape.dropFirst(), dtype: a.dtype) { $0[0] }
        m.b = TensorRef(name: b.name, computedFrom: [b], shape: [outFeatures, r] + Array(repeating: 1, count: shape.count - 2), dtype: b.dtype) { $0[0] }
        m.kind = shape.count == 4 && shape[2] == 1 && shape[3] == 1 ? .conv1x1 : .convKxK
        m.declaredShape = shape.count == 4 ? nil : shape
        m.flattened = false
        return m
    }

    public var hasMixer: Bool { mixer != nil }

    /// The name a report shows: the module path, and the parameter of a `target_parameters` module.
    public var targetName: String { parameter.map { baseName + "." + $0.name } ?? baseName }

    /// The layer kind, or "experts×E" for a `target_parameters` module.
    public var kindDescription: String {
        parameter.map { "experts×\($0.experts)" } ?? (algorithm.isLyCORIS ? algorithm.name + " " + kind.rawValue : kind.rawValue)
    }

    /// Rank of one update: r of each expert for a `target_parameters` module, else `rank`.
    public var updateRank: Int { parameter.map { rank / $0.experts } ?? rank }

    /// Expert `e`'s update of a `target_parameters` module as a module of its own, restricted to
    /// the output rows `outputs` (the gate or the up half of a fused gate_up update): slices of
    /// the stored factors, read only when used.
    func expert(_ e: Int, outputs: Range<Int>? = nil, part: String? = nil) -> LoRAModule {
        guard let p = parameter else { preconditionFailure("\(name) is not a target_parameters module") }
        precondition(orientation == .peft && e >= 0 && e < p.experts)
        let r = rank / p.experts
        let out = outputs ?? 0..<outFeatures
        let label = "\(name) (\(p.name)\(part.map { " " + $0 } ?? ""), expert \(e))"
        var m = self
        m.name = label
        m.a = a.slice(rows: StridedRange(start: e * r, count: r), columns: .all(inFeatures), name: a.name + "[expert \(e)]")
        let columns = split.map { b.expertColumns(e, of: $0, name: b.name + "[expert \(e)]") }
            ?? b.slice(rows: .all(outFeatures), columns: StridedRange(start: e, step: p.experts, count: r), name: b.name + "[expert \(e)]")
        m.b = outputs == nil ? columns : columns.slice(rows: StridedRange(out), columns: .all(r), name: b.name + "[expert \(e)]")
        m.mixer = mixer.map { $0.slice(rows: StridedRange(start: e * r, count: r), columns: .all(r), name: $0.name + "[expert \(e)]") }
        m.parameter = nil
        m.split = nil
        m.kind = .linear
        return m
    }

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
        if let declaredShape { return declaredShape }
        return switch kind {
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

/// How a DoRA magnitude rescales V = W + ΔW.
public enum DoRARule: Sendable, Hashable {
    /// PEFT: W' = m · V / ‖V‖ per output row.
    case peft
    /// LyCORIS `dora_scale` (`functional/general.py` `_weight_decompose`): V = W + s·ΔW, then
    /// k = m / (‖V‖ + ε) over every axis but the output (`onOutput`) or the input one, ε the
    /// machine epsilon of dora_scale's dtype; at adapter weight w, W' = V · (w·(k − 1) + 1).
    case lycoris(onOutput: Bool, epsilon: Double)

    /// A `dora_scale` per input channel (its length is the inputs', checked at the merge).
    var isPerInput: Bool {
        if case .lycoris(let onOutput, _) = self { return !onOutput }
        return false
    }
}

/// The 3-D expert parameter a PEFT `target_parameters` module adapts.
public struct ExpertParameter: Sendable, Hashable {
    /// The parameter's name on its module (`gate_up_proj`, `down_proj`).
    public let name: String
    /// E: experts the factors hold.
    public let experts: Int
}

/// A full tensor that replaces a base tensor (`modules_to_save`).
public struct Replacement: Sendable {
    public let tensor: TensorRef
    /// The base tensor it replaces.
    public let baseName: String
    /// The key it is written under when that is not the tensor's own name (a model's tensor kept
    /// whole in an adapter: `base_model.model.` + its name).
    var outputKey: String? = nil
}
