import Testing
@testable import AdapterKit

/// Independent round-to-nearest-even of a Double into bf16, by exact rational comparison.
private func referenceBF16(_ x: Double) -> UInt16 {
    if x.isNaN { return 0x7FC0 }
    // Candidates: the two bf16 values around x, found by truncating the float32 pattern.
    let f = Float(x)  // the nearest float; the neighbours in bf16 bracket it
    var lo = UInt16(truncatingIfNeeded: f.bitPattern >> 16)
    var loValue = Double(Float(bitPattern: UInt32(lo) << 16))
    if abs(loValue) > abs(x) { lo -= 1; loValue = Double(Float(bitPattern: UInt32(lo) << 16)) }
    let hi = lo + 1
    let hiValue = Double(Float(bitPattern: UInt32(hi) << 16))
    let dLo = abs(x - loValue), dHi = abs(hiValue - x)
    if dLo < dHi { return lo }
    if dHi < dLo { return hi }
    return lo & 1 == 0 ? lo : hi
}

@Suite("element conversion")
struct ConversionTests {
    @Test("every F16 value converts to Float32 exactly as Swift's Float16 does")
    func f16ToFloatExhaustive() {
        var src = [UInt16](0...UInt16.max)
        var dst = [Float](repeating: 0, count: src.count)
        src.withUnsafeMutableBytes { s in
            dst.withUnsafeMutableBufferPointer { d in
                ElementConversion.toFloat(.f16, UnsafeRawPointer(s.baseAddress!), d.baseAddress!, count: 65536)
            }
        }
        for i in 0...65535 {
            let expected = Float(Float16(bitPattern: UInt16(i)))
            if expected.isNaN { #expect(dst[i].isNaN) } else { #expect(dst[i].bitPattern == expected.bitPattern, "\(i)") }
            let scalar = ElementConversion.f16ToFloat(UInt16(i))
            #expect(scalar.bitPattern == dst[i].bitPattern || (scalar.isNaN && dst[i].isNaN))
        }
    }

    @Test("Float32 → F16 rounds to nearest even like Float16(_:), vector and scalar paths")
    func floatToF16() {
        var values: [Float] = [0, -0, 1, -1, 65504, 65519.996, 65520, 1e9, -1e9, .infinity, -.infinity, .nan,
                               0x1p-24, 0x1p-25, 0x1.8p-25, 0x1p-26, 0x1.002p-14, 0x1.001p0, 0x1.003p0, 0x1.0018p0]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200_000 { values.append(Float(bitPattern: rng.next() as UInt32)) }
        var out = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBytes { d in ElementConversion.fromFloat(.f16, s.baseAddress!, d.baseAddress!, count: values.count) }
        }
        for (v, h) in zip(values, out) {
            let expected = Float16(v)
            if v.isNaN {
                #expect(Float16(bitPattern: h).isNaN)
            } else {
                #expect(h == expected.bitPattern, "\(v)")
            }
            let scalar = ElementConversion.floatToF16(v)
            #expect(scalar == h || (v.isNaN && Float16(bitPattern: scalar).isNaN))
        }
    }

    @Test("Float32 → BF16 rounds to nearest even, NaN stays NaN, overflow becomes infinity")
    func floatToBF16() {
        var values: [Float] = [1, -1, 0, -0, Float(bitPattern: 0x3F80_8000), Float(bitPattern: 0x3F81_8000),
                               Float(bitPattern: 0x3F80_8001), .greatestFiniteMagnitude, -.greatestFiniteMagnitude, .infinity,
                               Float(bitPattern: 0x7F80_0001), Float(bitPattern: 0xFFC0_0000), .leastNonzeroMagnitude]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200_000 { values.append(Float(bitPattern: rng.next() as UInt32)) }
        var out = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBytes { d in ElementConversion.fromFloat(.bf16, s.baseAddress!, d.baseAddress!, count: values.count) }
        }
        for (v, h) in zip(values, out) {
            let back = Float(bitPattern: UInt32(h) << 16)
            if v.isNaN {
                #expect(back.isNaN, "NaN \(v.bitPattern) became \(h)")
            } else if abs(Double(v)) >= Double(Float(bitPattern: 0x7F7F_8000)) {
                #expect(back.isInfinite && back.sign == v.sign)
            } else {
                #expect(h == referenceBF16(Double(v)), "\(v)")
            }
            #expect(ElementConversion.floatToBF16(v) == h)
        }
        #expect(ElementConversion.floatToBF16(Float(bitPattern: 0x3F80_8000)) == 0x3F80)  // tie to even (down)
        #expect(ElementConversion.floatToBF16(Float(bitPattern: 0x3F81_8000)) == 0x3F82)  // tie to even (up)
    }

    @Test("Float64 → BF16 rounds once (no double rounding through Float32)")
    func doubleToBF16() {
        // 1 + 2^-8 + 2^-30: Float32 rounding would give the exact tie 1 + 2^-8, which rounds to even (1.0);
        // rounded once, it is above the tie and must go up.
        let x = 1 + 0x1p-8 + 0x1p-30
        var out: UInt16 = 0
        withUnsafeMutableBytes(of: &out) { d in [x].withUnsafeBufferPointer { ElementConversion.fromDouble(.bf16, $0.baseAddress!, d.baseAddress!, count: 1) } }
        #expect(out == referenceBF16(x))
        #expect(out == 0x3F81)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<100_000 {
            let d = Double(bitPattern: (rng.next() as UInt64) & 0x3FFF_FFFF_FFFF_FFFF | 0x3000_0000_0000_0000)
            #expect(ElementConversion.doubleToBF16(d) == referenceBF16(d), "\(d)")
        }
    }

    @Test("the vectorised Float64 → BF16 loop (fromDouble) equals the scalar definition on every kind of value")
    func doubleToBF16Vector() {
        var values: [Double] = [0, -0.0, 1, -1, 1 + 0x1p-8, 1 + 0x1p-8 + 0x1p-30, 1 + 0x1p-8 - 0x1p-40, 0x1p-130, -0x1p-149, 0x1p-160, -0x1p-160,
                                Double(Float.greatestFiniteMagnitude), 0x1p128, -0x1p200, .infinity, -.infinity, .nan, -.nan,
                                Double(Float.leastNormalMagnitude), Double(Float.leastNonzeroMagnitude) * 1.5, 3.3895313892515355e38]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200_000 { values.append(Double(bitPattern: rng.next() as UInt64)) }
        var out = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { v in out.withUnsafeMutableBytes { ElementConversion.fromDouble(.bf16, v.baseAddress!, $0.baseAddress!, count: v.count) } }
        for (i, d) in values.enumerated() {
            #expect(out[i] == ElementConversion.doubleToBF16(d), "\(d): \(out[i]) against \(ElementConversion.doubleToBF16(d))")
        }
    }

    @Test("the vectorised widening to Float64 (toDouble) equals the scalar definitions on all 65,536 BF16 and F16 patterns")
    func toDoubleVector() {
        let patterns = (0...UInt16.max).map { $0 }
        for (dtype, scalar) in [(DType.bf16, ElementConversion.bf16ToFloat), (.f16, ElementConversion.f16ToFloat)] {
            var out = [Double](repeating: 0, count: patterns.count)
            patterns.withUnsafeBytes { p in out.withUnsafeMutableBufferPointer { ElementConversion.toDouble(dtype, p.baseAddress! + 0, $0.baseAddress!, count: patterns.count) } }
            for (i, h) in patterns.enumerated() {
                let want = Double(scalar(h))
                #expect(out[i] == want || (out[i].isNaN && want.isNaN && out[i].sign == want.sign), "\(dtype.rawValue) \(h): \(out[i]) against \(want)")
            }
        }
    }

    @Test("BF16 → Float32 is a shift; unaligned sources are read correctly")
    func bf16Unaligned() {
        let bytes: [UInt8] = [0xAA] + (0..<20).flatMap { i -> [UInt8] in
            let v = ElementConversion.floatToBF16(Float(i) - 3.5)
            return [UInt8(v & 0xFF), UInt8(v >> 8)]
        }
        var out = [Float](repeating: 0, count: 20)
        bytes.withUnsafeBytes { s in out.withUnsafeMutableBufferPointer { ElementConversion.toFloat(.bf16, s.baseAddress! + 1, $0.baseAddress!, count: 20) } }
        #expect(out == (0..<20).map { Float($0) - 3.5 })
    }
}
