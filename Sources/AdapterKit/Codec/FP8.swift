/// FP8 codes and their block scales, encoded the way the checkpoints that use them are written.
///
/// E4M3 is the "FN" variant (OCP FP8, `torch.float8_e4m3fn`): bias 7, no infinities, S.1111.111
/// NaN, largest finite ±448. UE8M0 (`torch.float8_e8m0fnu`, safetensors F8_E8M0) is an exponent
/// alone: 2^(b − 127), 0xFF NaN.
enum FP8 {
    static let e4m3Max: Float = 448

    /// The E4M3 code nearest `x` (ties to even), saturating at ±448 (infinities too); NaN → 0x7F.
    @inline(__always)
    static func e4m3(_ x: Double) -> UInt8 {
        if x.isNaN { return 0x7F }
        let sign: UInt8 = x.sign == .minus ? 0x80 : 0
        let a = abs(x)
        if a >= 448 { return sign | 0x7E }
        if a < 0x1p-6 {
            // Subnormals step by 2⁻⁹; q = 8 is the smallest normal, whose code is 8 too.
            return sign | UInt8((a * 0x1p9).rounded(.toNearestOrEven))
        }
        var e = Int(a.exponent)
        var q = Int(((a / Double(sign: .plus, exponent: e, significand: 1) - 1) * 8).rounded(.toNearestOrEven))
        if q == 8 { e += 1; q = 0 }
        // a < 448 keeps (e, q) at or below (8, 6): the NaN pattern (8, 7) is never made.
        return sign | UInt8((e + 7) << 3) | UInt8(q)
    }

    /// The same rounding from Float32, with integer operations on the bits (the merge's inner
    /// loop): |x| ≥ 448 saturates, below 2⁻⁶ the subnormal step 2⁻⁹, otherwise the mantissa is
    /// rounded to three bits, ties to even, a carry moving into the exponent.
    @inline(__always)
    static func e4m3(_ x: Float) -> UInt8 {
        let bits = x.bitPattern
        let sign = UInt8(truncatingIfNeeded: (bits >> 24) & 0x80)
        let a = bits & 0x7FFF_FFFF
        if a >= 0x43E0_0000 { return a > 0x7F80_0000 ? 0x7F : sign | 0x7E }  // 448 = 0x43E00000
        if a < 0x3C80_0000 {  // 2⁻⁶
            return sign | UInt8((Float(bitPattern: a) * 512).rounded(.toNearestOrEven))
        }
        let r = a &+ 0x7FFFF &+ ((a >> 20) & 1)
        return sign | UInt8(truncatingIfNeeded: (((r >> 23) &- 120) << 3) | ((r >> 20) & 7))
    }

    /// 2^(b − 127); NaN for 0xFF.
    static func e8m0(_ b: UInt8) -> Float {
        b == 0xFF ? .nan : Float(sign: .plus, exponent: Int(b) - 127, significand: 1)
    }

    /// The smallest power of two at or above `s` > 0, as a UE8M0 byte (clamped to 2⁻¹²⁷ … 2¹²⁷):
    /// the scale that never makes a code saturate (what DeepSeek's UE8M0 checkpoints use).
    static func e8m0Ceiling(_ s: Double) -> UInt8 {
        guard s > 0, s.isFinite else { return 127 }
        var e = Int(s.exponent)
        if s > Double(sign: .plus, exponent: e, significand: 1) { e += 1 }
        return UInt8(max(0, min(254, e + 127)))
    }
}

/// The block scales of one block-scaled FP8 weight, decoded, and how to make fresh ones.
struct FP8BlockScales {
    /// The scale tensor's dtype: F32 or F8_E8M0.
    let dtype: DType
    /// [experts ×] block rows × block columns, decoded.
    var values: [Float]

    /// The scale that holds a block whose largest magnitude is `amax`: amax / 448 rounded once into
    /// the scale dtype (F32: nearest; UE8M0: the power of two at or above, so no code saturates).
    /// A block of zeros keeps `old` (its codes are zeros whatever the scale).
    func fresh(amax: Double, old: Float) -> Float {
        guard amax > 0, amax.isFinite else { return old }
        let s = amax / Double(FP8.e4m3Max)
        switch dtype {
        case .f8E8M0: return FP8.e8m0(FP8.e8m0Ceiling(s))
        // compressed-tensors keeps scales in the model's dtype: rounded once into it (codes of
        // the block's largest values may then saturate at ±448, as its own quantizer's do).
        case .bf16: return ElementConversion.bf16ToFloat(ElementConversion.doubleToBF16(s))
        case .f16: return ElementConversion.f16ToFloat(ElementConversion.floatToF16(Float(s)))
        default: return Float(s)
        }
    }

    /// The stored bytes of `values`.
    func encoded() -> [UInt8] {
        switch dtype {
        case .f8E8M0:
            return values.map { FP8.e8m0Ceiling(Double($0)) }
        case .bf16, .f16:
            // Every value is already one of the dtype's: the conversion is exact.
            var out = [UInt8](repeating: 0, count: values.count * 2)
            out.withUnsafeMutableBytes { raw in
                for (i, v) in values.enumerated() {
                    let bits = dtype == .bf16 ? ElementConversion.floatToBF16(v) : ElementConversion.floatToF16(v)
                    raw.storeBytes(of: bits.littleEndian, toByteOffset: i * 2, as: UInt16.self)
                }
            }
            return out
        default:
            var out = [UInt8](repeating: 0, count: values.count * 4)
            out.withUnsafeMutableBytes { raw in
                for (i, v) in values.enumerated() { raw.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: i * 4, as: UInt32.self) }
            }
            return out
        }
    }
}
