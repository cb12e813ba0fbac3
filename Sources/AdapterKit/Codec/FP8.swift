import CMergeKernel

/// FP8 codes and their block scales, encoded the way the checkpoints that use them are written.
///
/// E4M3 is the "FN" variant (OCP FP8, `torch.float8_e4m3fn`): bias 7, no infinities, S.1111.111
/// NaN, largest finite ±448. UE8M0 (`torch.float8_e8m0fnu`, safetensors F8_E8M0) is an exponent
/// alone: 2^(b − 127), 0xFF NaN.
enum FP8 {
    static let e4m3Max: Float = 448

    /// The E4M3 codes of `values[i] / scale`, rounded to nearest even and saturating at ±448
    /// (NaN → 0x7F), by the C kernel the merge itself uses (`adapter_fp8_e4m3_encode`).
    static func e4m3(_ values: [Float], scale: Float = 1) -> [UInt8] {
        var codes = [UInt8](repeating: 0, count: values.count)
        let zeros = [Float](repeating: 0, count: values.count)
        var sums = [Double](repeating: 0, count: 4)
        values.withUnsafeBufferPointer { v in
            zeros.withUnsafeBufferPointer { z in
                codes.withUnsafeMutableBufferPointer { c in
                    adapter_fp8_e4m3_encode(z.baseAddress, v.baseAddress, c.baseAddress, values.count, scale, &sums)
                }
            }
        }
        return codes
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
    /// the scale dtype (F32, BF16, F16: nearest, by the element conversions every writer uses;
    /// UE8M0: the power of two at or above, so no code saturates). compressed-tensors keeps BF16
    /// scales, so the largest codes of a block may then saturate at ±448, as its own quantizer's
    /// do. A block of zeros keeps `old` (its codes are zeros whatever the scale).
    func fresh(amax: Double, old: Float) -> Float {
        guard amax > 0, amax.isFinite else { return old }
        var s = amax / Double(FP8.e4m3Max)
        if dtype == .f8E8M0 { return FP8.e8m0(FP8.e8m0Ceiling(s)) }
        var stored: UInt32 = 0, value: Float = 0
        withUnsafeMutableBytes(of: &stored) { raw in
            ElementConversion.fromDouble(dtype, &s, raw.baseAddress!, count: 1)
            ElementConversion.toFloat(dtype, raw.baseAddress!, &value, count: 1)
        }
        return value
    }

    /// The stored bytes of `values` (each already one of the dtype's values: the conversion is exact).
    func encoded() -> [UInt8] {
        if dtype == .f8E8M0 { return values.map { FP8.e8m0Ceiling(Double($0)) } }
        guard !values.isEmpty else { return [] }
        var out = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        values.withUnsafeBufferPointer { v in
            out.withUnsafeMutableBytes { ElementConversion.fromFloat(dtype, v.baseAddress!, $0.baseAddress!, count: values.count) }
        }
        return out
    }
}
