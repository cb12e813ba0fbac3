/// Which rows of a tensor's 2-D view an update lands on.
///
/// The 2-D view is `rows × columns` of the tensor's row-major elements (`TensorEdit.columns`): a
/// row range is a fused tensor's slice (q, k or v of a `qkv` weight) or one expert of a 3-D
/// expert tensor seen as [E·out, in].
public enum RowPlacement: Hashable, Sendable {
    case all
    case range(Range<Int>)

    /// The rows covered in a view of `rows` rows.
    func rows(of rows: Int) -> Range<Int> {
        switch self {
        case .all: 0..<rows
        case .range(let r): r
        }
    }
}

/// One module's low-rank contribution to a base tensor: factor · B·M·A on the placed rows.
public struct MergeTerm: Sendable {
    public let module: LoRAModule
    /// scale × adapter weight.
    public let factor: Double
    public var rows: RowPlacement = .all
    /// The placed rows hold the update transposed (`UpdateTarget.transposed`).
    public var transposed = false
    /// The view's columns the update's columns land on (nil: all).
    public var columns: StridedRange? = nil

    public init(module: LoRAModule, factor: Double, rows: RowPlacement = .all, transposed: Bool = false, columns: StridedRange? = nil) {
        self.module = module
        self.factor = factor
        self.rows = rows
        self.transposed = transposed
        self.columns = columns
    }

    /// Whether the view's rows index the update's inputs: a transposed layer (GPT-2 Conv1D,
    /// embeddings) or a transposed placement (experts stored [E, in, out]).
    var holdsTranspose: Bool { module.kind.isTransposed != transposed }
}

/// What a merge does to one base tensor, as explicit steps applied in order: replace the values
/// (`modules_to_save`), add every low-rank term on its rows (summed exactly, rounded once), rescale
/// rows to a DoRA magnitude; or, for a bias, add `lora_B.bias` terms.
public struct TensorEdit: Sendable {
    public let baseName: String
    public let base: TensorEntry
    /// The shard the tensor is in.
    public let file: Int
    /// A full tensor replacing the base values before any update.
    public var replacement: Replacement?
    /// Low-rank updates.
    public var terms: [MergeTerm] = []
    /// DoRA: the module whose magnitude rescales the rows (at most one per tensor, on all rows).
    public var dora: MergeTerm?
    /// `lora_B.bias` updates to this (bias) tensor: b += factor · bias.
    public var biasTerms: [(bias: TensorRef, factor: Double, module: String)] = []
    /// Columns of the 2-D view the terms act on; nil for the default, every dimension after the
    /// first (a convolution's [out, in·k·k]).
    public var viewColumns: Int? = nil
    /// This tensor holds the block scales of the quantized weight named here, written afresh
    /// when that weight is requantized.
    public var scalesOf: String? = nil
    /// A quantized weight written dequantized in this dtype (`--dtype`), nil: in its own encoding.
    public var outputDType: DType? = nil
    /// The name written, when it is not the base's (a dequantized MXFP4 `X_blocks` becomes `X`).
    public var outputName: String? = nil

    public init(baseName: String, base: TensorEntry, file: Int) {
        self.baseName = baseName
        self.base = base
        self.file = file
    }

    /// The shape written: the replacement's when there is one; a dequantized MXFP4 tensor's
    /// values transposed in their last two dimensions (the model's parameter layout).
    public var outputShape: [Int] {
        if let r = replacement { return r.tensor.shape }
        guard outputDType != nil else { return base.shape }
        let v = valueShape
        if case .mxfp4 = base.encoding { return Array(v.dropLast(2)) + [v[v.count - 1], v[v.count - 2]] }
        return v
    }

    /// The shape of the values the update is added to (MXFP4: the decoded blocks layout).
    public var valueShape: [Int] { replacement?.tensor.shape ?? base.encoding.valueShape(base.shape) }

    /// The name written.
    public var writtenName: String { outputName ?? baseName }

    /// Columns of the 2-D view.
    public var columns: Int {
        if let viewColumns { return viewColumns }
        let shape = valueShape
        return shape.count > 1 ? shape.dropFirst().reduce(1, *) : 1
    }

    /// Rows of the 2-D view.
    public var rows: Int {
        let c = columns
        let shape = valueShape
        return c == 0 ? (shape.first ?? 1) : shape.reduce(1, *) / c
    }

    public var isUnchanged: Bool {
        terms.isEmpty && replacement == nil && dora == nil && biasTerms.isEmpty && scalesOf == nil && outputDType == nil && outputName == nil
    }

    /// The module names that touch this tensor, for messages and reports.
    public var moduleNames: [String] {
        terms.map(\.module.name) + biasTerms.map(\.module) + (replacement.map { [$0.tensor.name] } ?? [])
    }

    /// The view's rows cut where the set of terms changes: each piece with the indices (into
    /// `terms`) of the terms on it, in order. Terms on all rows give one piece.
    var segments: [(rows: Range<Int>, terms: [Int])] {
        let n = rows
        var cuts: Set<Int> = [0, n]
        for t in terms {
            let r = t.rows.rows(of: n)
            cuts.insert(r.lowerBound)
            cuts.insert(r.upperBound)
        }
        let points = cuts.sorted()
        var out: [(rows: Range<Int>, terms: [Int])] = []
        for (lo, hi) in zip(points, points.dropFirst()) where lo < hi {
            let on = terms.indices.filter { terms[$0].rows.rows(of: n).contains(lo) }
            if let last = out.last, last.terms == on, last.rows.upperBound == lo {
                out[out.count - 1].rows = last.rows.lowerBound..<hi
            } else {
                out.append((lo..<hi, on))
            }
        }
        return out
    }
}
