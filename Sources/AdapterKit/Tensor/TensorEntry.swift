/// How a tensor's values are stored: what a codec needs to turn its bytes into numbers and back.
///
/// A closed set: a new encoding (FP8 with block scales, MXFP4, a GGML block type) is a new case, and
/// the compiler then lists every place that must learn it (the codec, byte sizes, inspect, the
/// merge's preflight).
public enum TensorEncoding: Hashable, Sendable {
    /// One element of the type per value, little-endian, row-major.
    case plain(DType)
    /// FP8 codes (`dtype`, one byte each) whose value is code × the Float32 scale of its block:
    /// `scale` names the scale tensor ([⌈rows/block[0]⌉, ⌈cols/block[1]⌉], edge blocks partial),
    /// which may sit in another shard (DeepSeek-V3, Qwen3-FP8: `X.weight` + `X.weight_scale_inv`).
    case blockScaledFP8(DType, scale: String, block: [Int])
    /// MXFP4 (OCP Microscaling, gpt-oss experts): `X_blocks` U8 [..., rows, G, 16], two E2M1 codes
    /// per byte (the low nibble the even element), and `scale` (`X_scales`, U8 [..., rows, G]) one
    /// E8M0 exponent per 32 values: value = E2M1[code] · 2^(scale − 127). The values are
    /// [..., rows, 32·G] (`valueShape`); the model's parameter is their transpose.
    case mxfp4(scale: String)
    /// NVFP4 (compressed-tensors `nvfp4-pack-quantized`): `X.weight_packed` U8 [rows, K/2], two
    /// E2M1 codes per byte (the low nibble the even element), `scale` (`X.weight_scale`, F8_E4M3
    /// [rows, K/16]) one per 16 values and `global` (`X.weight_global_scale`, F32 [1]): value =
    /// bf16(E2M1[code] · (scale / global)), compressed-tensors' decompression.
    case nvfp4(scale: String, global: String)

    /// The element type the container records for the stored bytes.
    public var storedDType: DType {
        switch self {
        case .plain(let d), .blockScaledFP8(let d, _, _): d
        case .mxfp4, .nvfp4: .u8
        }
    }

    /// The tensors that hold this encoding's scales, the one rewritten with the codes first (none
    /// for plain tensors).
    public var scaleTensors: [String] {
        switch self {
        case .plain: []
        case .blockScaledFP8(_, let s, _), .mxfp4(let s): [s]
        case .nvfp4(let s, let g): [s, g]
        }
    }

    /// The shape of the values a stored shape holds: MXFP4's [..., rows, G, 16] bytes are
    /// [..., rows, 32·G] values; every other encoding stores one element per value.
    public func valueShape(_ stored: [Int]) -> [Int] {
        switch self {
        case .plain, .blockScaledFP8: stored
        case .mxfp4: Array(stored.dropLast(2)) + [stored.count >= 2 ? stored[stored.count - 2] * 32 : 0]
        case .nvfp4: Array(stored.dropLast()) + [(stored.last ?? 0) * 2]
        }
    }

    /// The bytes `elements` values take, nil when that is not a whole number of bytes or overflows.
    public func byteCount(elements: Int) -> Int? {
        switch self {
        case .plain(let d), .blockScaledFP8(let d, _, _):
            let (bits, overflow) = elements.multipliedReportingOverflow(by: d.bits)
            return overflow || bits % 8 != 0 ? nil : bits / 8
        case .mxfp4, .nvfp4:
            return elements
        }
    }

    /// The bytes one row of `columns` values takes (rows are whole byte strings for every encoding
    /// a merge writes).
    public func rowBytes(columns: Int) -> Int { byteCount(elements: columns) ?? 0 }

    /// Whether a merge can decode and re-encode these values (a codec exists).
    public var isMergeable: Bool {
        switch self {
        case .plain(let d): d.isMergeable
        case .blockScaledFP8, .mxfp4, .nvfp4: false  // merged by the quantized-base paths, not a row codec
        }
    }

    /// The name users see: the dtype for plain tensors, with the scales for scaled ones.
    public var name: String {
        switch self {
        case .plain(let d): d.rawValue
        case .blockScaledFP8(let d, let scale, let block): "\(d.rawValue) with \(block.map(String.init).joined(separator: "×")) block scales (\(scale))"
        case .mxfp4(let scale): "MXFP4 (E2M1 codes, an E8M0 exponent per 32 values in \(scale))"
        case .nvfp4(let scale, _): "NVFP4 (E2M1 codes, an E4M3 scale per 16 values in \(scale), a global scale)"
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
    /// Number of stored elements (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }
    /// Number of values: the stored elements, or for MXFP4 two per byte.
    public var valueCount: Int { encoding.valueShape(shape).reduce(1, *) }
}
