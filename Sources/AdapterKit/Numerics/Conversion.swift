import CMergeKernel
#if _endian(big)
#error("safetensors data is little endian; this code reads it in host order")
#endif

/// Element conversions between stored dtypes and Float32 / Float64.
///
/// Narrowing rounds to nearest, ties to even; NaN stays NaN (quiet); values beyond the target's
/// range become ±infinity, as IEEE 754 and PyTorch do. Vectorised with SIMD since a merge converts
/// every element of a model twice.
public enum ElementConversion {
    // MARK: - Scalar definitions (the reference the vector paths are tested against)

    @inline(__always) public static func bf16ToFloat(_ h: UInt16) -> Float {
        Float(bitPattern: UInt32(h) << 16)
    }

    @inline(__always) public static func floatToBF16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        if f.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let rounded = bits &+ 0x7FFF &+ ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    @inline(__always) public static func f16ToFloat(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = UInt32(h >> 10) & 0x1F
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0x1F { return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13)) }
        if exponent == 0 {
            // Subnormal or zero: mantissa · 2^-24, exact in Float32.
            let magnitude = Float(mantissa) * 0x1p-24
            return sign != 0 ? -magnitude : magnitude
        }
        return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
    }

    @inline(__always) public static func floatToF16(_ f: Float) -> UInt16 {
        var bits = f.bitPattern
        let sign = bits & 0x8000_0000
        bits ^= sign
        let out: UInt32
        if bits >= 0x4780_0000 {  // ≥ 65536: infinity, NaN, or overflow after rounding
            out = bits > 0x7F80_0000 ? 0x7E00 : 0x7C00
        } else if bits < 0x3880_0000 {  // below the smallest normal half (2^-14): subnormal or zero
            // Adding 0.5 aligns the half's subnormal bits at the bottom of the float's mantissa,
            // and the float addition rounds to nearest even.
            let sum = Float(bitPattern: bits) + Float(bitPattern: 0x3F00_0000)
            out = sum.bitPattern &- 0x3F00_0000
        } else {
            let odd = (bits >> 13) & 1
            bits = bits &+ 0xC800_0FFF &+ odd  // rebias exponent (−112 << 23) and round half to even
            out = bits >> 13
        }
        return UInt16(truncatingIfNeeded: out | (sign >> 16))
    }

    /// F8_E4M3 (the "FN" variant of the OCP spec: no infinities, S.1111.111 is NaN, bias 7).
    public static func f8E4M3ToFloat(_ b: UInt8) -> Float { f8E4M3Table[Int(b)] }

    /// F8_E5M2 has the layout of the top byte of an IEEE half.
    public static func f8E5M2ToFloat(_ b: UInt8) -> Float { f16ToFloat(UInt16(b) << 8) }

    static let f8E4M3Table: [Float] = (0..<256).map { i -> Float in
        let sign: Float = i & 0x80 != 0 ? -1 : 1
        let exponent = (i >> 3) & 0xF
        let mantissa = i & 7
        if exponent == 15 && mantissa == 7 { return .nan }
        if exponent == 0 { return sign * Float(mantissa) / 8 * 0x1p-6 }
        return sign * (1 + Float(mantissa) / 8) * Float(sign: .plus, exponent: exponent - 7, significand: 1)
    }

    // MARK: - Bulk conversion

    /// Converts `count` elements of `dtype` at `source` (any alignment) to Float32.
    static func toFloat(_ dtype: DType, _ source: UnsafeRawPointer, _ destination: UnsafeMutablePointer<Float>, count: Int) {
        switch dtype {
        case .f32:
            UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 4)
        case .bf16:
            var i = 0
            while i + 8 <= count {
                let h = source.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self)
                let w = SIMD8<UInt32>(truncatingIfNeeded: h) &<< 16
                UnsafeMutableRawPointer(destination + i).storeBytes(of: w, as: SIMD8<UInt32>.self)
                i += 8
            }
            while i < count {
                destination[i] = bf16ToFloat(source.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
                i += 1
            }
        case .f16:
            var i = 0
            while i + 8 <= count {
                let h = source.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self)
                UnsafeMutableRawPointer(destination + i).storeBytes(of: f16ToFloat8(h), as: SIMD8<Float>.self)
                i += 8
            }
            while i < count {
                destination[i] = f16ToFloat(source.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
                i += 1
            }
        case .f64:
            for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: i * 8, as: Double.self)) }
        case .f8E4M3:
            for i in 0..<count { destination[i] = f8E4M3Table[Int(source.load(fromByteOffset: i, as: UInt8.self))] }
        case .f8E5M2:
            for i in 0..<count { destination[i] = f8E5M2ToFloat(source.load(fromByteOffset: i, as: UInt8.self)) }
        default:
            preconditionFailure("toFloat called for \(dtype.rawValue); callers check isReadableAsFloat")
        }
    }

    /// Converts `count` Float32 values to `dtype` at `destination` (any alignment), rounding once.
    static func fromFloat(_ dtype: DType, _ source: UnsafePointer<Float>, _ destination: UnsafeMutableRawPointer, count: Int) {
        switch dtype {
        case .f32:
            destination.copyMemory(from: source, byteCount: count * 4)
        case .bf16:
            var i = 0
            while i + 8 <= count {
                let f = UnsafeRawPointer(source + i).loadUnaligned(as: SIMD8<Float>.self)
                destination.storeBytes(of: floatToBF16x8(f), toByteOffset: i * 2, as: SIMD8<UInt16>.self)
                i += 8
            }
            while i < count {
                destination.storeBytes(of: floatToBF16(source[i]), toByteOffset: i * 2, as: UInt16.self)
                i += 1
            }
        case .f16:
            var i = 0
            while i + 8 <= count {
                let f = UnsafeRawPointer(source + i).loadUnaligned(as: SIMD8<Float>.self)
                destination.storeBytes(of: floatToF16x8(f), toByteOffset: i * 2, as: SIMD8<UInt16>.self)
                i += 8
            }
            while i < count {
                destination.storeBytes(of: floatToF16(source[i]), toByteOffset: i * 2, as: UInt16.self)
                i += 1
            }
        case .f64:
            for i in 0..<count { destination.storeBytes(of: Double(source[i]), toByteOffset: i * 8, as: Double.self) }
        default:
            preconditionFailure("fromFloat called for \(dtype.rawValue); callers check isMergeable")
        }
    }

    /// Reads `count` elements of `dtype` as Float64 (exact for every readable float type).
    static func toDouble(_ dtype: DType, _ source: UnsafeRawPointer, _ destination: UnsafeMutablePointer<Double>, count: Int) {
        if dtype == .f64 {
            UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 8)
            return
        }
        // The C loop (AVX2 + F16C where the CPU has them) for the kernel's element types.
        let element: Int32? = switch dtype {
        case .f32: Int32(ADAPTER_F32.rawValue)
        case .bf16: Int32(ADAPTER_BF16.rawValue)
        case .f16: Int32(ADAPTER_F16.rawValue)
        default: nil
        }
        if let element {
            adapter_to_double(element, source, destination, count)
            return
        }
        let chunk = 4096
        withUnsafeTemporaryAllocation(of: Float.self, capacity: chunk) { tmp in
            var i = 0
            while i < count {
                let n = min(chunk, count - i)
                toFloat(dtype, source + i * dtype.byteSize, tmp.baseAddress!, count: n)
                for j in 0..<n { destination[i + j] = Double(tmp[j]) }
                i += n
            }
        }
    }

    /// Writes Float64 values as `dtype`, rounding once (no double rounding through Float32 for F64).
    static func fromDouble(_ dtype: DType, _ source: UnsafePointer<Double>, _ destination: UnsafeMutableRawPointer, count: Int) {
        switch dtype {
        case .f64:
            destination.copyMemory(from: source, byteCount: count * 8)
        case .f32:
            for i in 0..<count { destination.storeBytes(of: Float(source[i]), toByteOffset: i * 4, as: Float.self) }
        case .bf16:
            // The C loop (vectorised); doubleToBF16 is its scalar definition, tested against it.
            adapter_f64_to_bf16(source, destination.assumingMemoryBound(to: UInt16.self), count)
        case .f16:
            for i in 0..<count { destination.storeBytes(of: Float16(source[i]).bitPattern, toByteOffset: i * 2, as: UInt16.self) }
        default:
            preconditionFailure("fromDouble called for \(dtype.rawValue)")
        }
    }

    /// Float64 → BF16 in one rounding: round to nearest even at bit 16 of the Float32 layout,
    /// with a sticky bit for the part of the double that Float32 cannot hold.
    static func doubleToBF16(_ d: Double) -> UInt16 {
        if d.isNaN { return floatToBF16(.nan) | (d.sign == .minus ? 0x8000 : 0) }
        let f = Float(d)  // may round; fix ties that this first rounding created or broke
        if Double(f) == d || f.isInfinite { return floatToBF16(f) }
        // Truncate toward zero to Float32, then mark inexactness in the lowest bit (sticky).
        var bits = f.bitPattern
        if abs(Double(f)) > abs(d) { bits -= 1 }
        bits |= 1
        return floatToBF16(Float(bitPattern: bits))
    }

    // MARK: - SIMD kernels

    @inline(__always) static func f16ToFloat8(_ h: SIMD8<UInt16>) -> SIMD8<Float> {
        let w = SIMD8<UInt32>(truncatingIfNeeded: h)
        let sign = (w & 0x8000) &<< 16
        let exponent = w & 0x7C00
        let bodyBits = (w & 0x7FFF) &<< 13
        // Normal numbers: rebias the exponent by (127 − 15).
        var result = bodyBits &+ (112 &<< 23)
        // Infinity and NaN: exponent all ones.
        result.replace(with: bodyBits | 0x7F80_0000, where: exponent .== 0x7C00)
        // Subnormals and zero: value = mantissa · 2^-24.
        let sub = SIMD8<Float>(w & 0x3FF) * 0x1p-24
        result.replace(with: sub.bitPattern(), where: exponent .== 0)
        return SIMD8<Float>(bitPattern: result | sign)
    }

    @inline(__always) static func floatToBF16x8(_ f: SIMD8<Float>) -> SIMD8<UInt16> {
        let bits = f.bitPattern()
        let rounded = (bits &+ 0x7FFF &+ ((bits &>> 16) & 1)) &>> 16
        let nan = (bits &>> 16) | 0x0040
        let isNaN = (bits & 0x7FFF_FFFF) .> 0x7F80_0000
        return SIMD8<UInt16>(truncatingIfNeeded: rounded.replacing(with: nan, where: isNaN))
    }

    @inline(__always) static func floatToF16x8(_ f: SIMD8<Float>) -> SIMD8<UInt16> {
        let all = f.bitPattern()
        let sign = all & 0x8000_0000
        let bits = all ^ sign
        let odd = (bits &>> 13) & 1
        var out = (bits &+ 0xC800_0FFF &+ odd) &>> 13
        let sum = SIMD8<Float>(bitPattern: bits) + Float(bitPattern: 0x3F00_0000)
        out.replace(with: sum.bitPattern() &- 0x3F00_0000, where: bits .< 0x3880_0000)
        out.replace(with: 0x7C00, where: bits .>= 0x4780_0000)
        out.replace(with: 0x7E00, where: bits .> 0x7F80_0000)
        return SIMD8<UInt16>(truncatingIfNeeded: out | (sign &>> 16))
    }
}

extension SIMD8 where Scalar == Float {
    @inline(__always) init(bitPattern b: SIMD8<UInt32>) {
        self = unsafeBitCast(b, to: SIMD8<Float>.self)
    }

    @inline(__always) func bitPattern() -> SIMD8<UInt32> {
        unsafeBitCast(self, to: SIMD8<UInt32>.self)
    }
}
