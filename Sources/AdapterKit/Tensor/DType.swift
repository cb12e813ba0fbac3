/// A safetensors element type, named exactly as in the format (case-sensitive).
public enum DType: String, CaseIterable, Sendable, Hashable, Comparable {
    // Declared in the reference writer's order: alignment descending, so `allCases` order is the
    // order in which the reference lays tensors out.
    case u64 = "U64", i64 = "I64", f64 = "F64", c64 = "C64"
    case f32 = "F32", u32 = "U32", i32 = "I32"
    case bf16 = "BF16", f16 = "F16", u16 = "U16", i16 = "I16"
    case f8E5M2FNUZ = "F8_E5M2FNUZ", f8E4M3FNUZ = "F8_E4M3FNUZ", f8E8M0 = "F8_E8M0"
    case f8E4M3 = "F8_E4M3", f8E5M2 = "F8_E5M2"
    case i8 = "I8", u8 = "U8"
    case f6E3M2 = "F6_E3M2", f6E2M3 = "F6_E2M3", f4 = "F4"
    case bool = "BOOL"

    /// Size of one element in bits.
    public var bits: Int {
        switch self {
        case .u64, .i64, .f64, .c64: 64
        case .f32, .u32, .i32: 32
        case .bf16, .f16, .u16, .i16: 16
        case .f8E5M2FNUZ, .f8E4M3FNUZ, .f8E8M0, .f8E4M3, .f8E5M2, .i8, .u8, .bool: 8
        case .f6E3M2, .f6E2M3: 6
        case .f4: 4
        }
    }

    /// Position in the reference writer's order (smaller is written first).
    public var writerRank: Int { Self.allCases.firstIndex(of: self)! }

    public static func < (a: DType, b: DType) -> Bool { a.writerRank < b.writerRank }

    /// Whether elements convert to and from Float32 for merging (floating types the tool computes in).
    public var isMergeable: Bool {
        switch self {
        case .f32, .f64, .f16, .bf16: true
        default: false
        }
    }

    /// Whether elements can be read as Float32 (adds the 8-bit float formats for reading only).
    public var isReadableAsFloat: Bool {
        isMergeable || self == .f8E4M3 || self == .f8E5M2
    }

    /// The size of one element in bytes, for byte-sized types.
    public var byteSize: Int { bits / 8 }
}
