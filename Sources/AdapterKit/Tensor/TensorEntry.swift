/// How a tensor's values are stored: what a codec needs to turn its bytes into numbers and back.
///
/// A closed set: a new encoding (FP8 with block scales, MXFP4, a GGML block type) is a new case, and
/// the compiler then lists every place that must learn it (the codec, byte sizes, inspect, the
/// merge's preflight).
public enum TensorEncoding: Hashable, Sendable {
    /// One element of the type per value, little-endian, row-major.
    case plain(DType)

    /// The element type the container records for the stored bytes.
    public var storedDType: DType {
        switch self {
        case .plain(let d): d
        }
    }

    /// The bytes `elements` values take, nil when that is not a whole number of bytes or overflows.
    public func byteCount(elements: Int) -> Int? {
        switch self {
        case .plain(let d):
            let (bits, overflow) = elements.multipliedReportingOverflow(by: d.bits)
            return overflow || bits % 8 != 0 ? nil : bits / 8
        }
    }

    /// The bytes one row of `columns` values takes (rows are whole byte strings for every encoding
    /// a merge writes).
    public func rowBytes(columns: Int) -> Int { byteCount(elements: columns) ?? 0 }

    /// Whether a merge can decode and re-encode these values (a codec exists).
    public var isMergeable: Bool {
        switch self {
        case .plain(let d): d.isMergeable
        }
    }

    /// The name users see: the dtype for plain tensors.
    public var name: String {
        switch self {
        case .plain(let d): d.rawValue
        }
    }
}

/// One tensor of a container as a merge sees it: its logical shape, how it is encoded and how many
/// bytes it takes. Where the bytes are is the container's business (`TensorContainer.region(of:)`).
public struct TensorEntry: Sendable, Hashable {
    public let name: String
    /// Row-major, outermost first.
    public let shape: [Int]
    public let encoding: TensorEncoding
    public let byteCount: Int

    public init(name: String, shape: [Int], encoding: TensorEncoding, byteCount: Int) {
        self.name = name
        self.shape = shape
        self.encoding = encoding
        self.byteCount = byteCount
    }

    /// The element type of the stored bytes.
    public var dtype: DType { encoding.storedDType }
    /// Number of elements (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }
}
