/// Turns rows of a stored encoding into numbers and back: decode to Float32 or Float64, encode
/// with one round-to-nearest-even, and say whether every stored result is finite. Dispatched once
/// per call on a block of rows, never per element.
///
/// Saturation policy: none. A value beyond the encoding's range becomes infinity, and `encode`
/// reports it, so a merge that overflows its dtype is refused rather than clamped. The fused
/// kernel (`MergeKernel`) stays the fast path for plain F32/F16/BF16 with a low-rank update; this
/// codec serves everything else (replacements, biases, Float64 results, rows no update touches).
struct RowCodec: Sendable {
    let encoding: TensorEncoding

    /// The codec of an encoding, nil when a merge cannot decode and re-encode it.
    init?(_ encoding: TensorEncoding) {
        guard encoding.isMergeable else { return nil }
        self.encoding = encoding
    }

    private var dtype: DType {
        switch encoding {
        case .plain(let d): d
        case .blockScaledFP8, .mxfp4, .nvfp4: preconditionFailure("no codec is made for \(encoding.name)")
        }
    }

    /// Bytes of `elements` values.
    func byteCount(_ elements: Int) -> Int { encoding.byteCount(elements: elements) ?? 0 }

    func decode(_ source: UnsafeRawPointer, count: Int, into destination: UnsafeMutablePointer<Float>) {
        ElementConversion.toFloat(dtype, source, destination, count: count)
    }

    func decode(_ source: UnsafeRawPointer, count: Int, into destination: UnsafeMutablePointer<Double>) {
        ElementConversion.toDouble(dtype, source, destination, count: count)
    }

    /// Encodes `count` values; false when a stored result is not finite.
    func encode(_ values: UnsafePointer<Float>, count: Int, into destination: UnsafeMutableRawPointer) -> Bool {
        ElementConversion.fromFloat(dtype, values, destination, count: count)
        return isFinite(destination, count: count)
    }

    /// Encodes `count` values with one rounding from Float64; false when a stored result is not finite.
    func encode(_ values: UnsafePointer<Double>, count: Int, into destination: UnsafeMutableRawPointer) -> Bool {
        ElementConversion.fromDouble(dtype, values, destination, count: count)
        return isFinite(destination, count: count)
    }

    /// Whether every stored value is finite, checked in chunks (a replaced lm_head must not cost
    /// another copy of itself in Float64).
    func isFinite(_ stored: UnsafeRawPointer, count: Int) -> Bool {
        let chunk = 4096
        return withUnsafeTemporaryAllocation(of: Double.self, capacity: chunk) { tmp in
            var i = 0
            while i < count {
                let m = min(chunk, count - i)
                ElementConversion.toDouble(dtype, stored + byteCount(i), tmp.baseAddress!, count: m)
                if tmp[0..<m].contains(where: { !$0.isFinite }) { return false }
                i += m
            }
            return true
        }
    }
}

extension RowCodec {
    /// Encodes a whole tensor held in memory, refusing a non-finite result.
    func encode(_ values: [Float], tensor: String) throws -> [UInt8] {
        try encodeAll(values.count, tensor: tensor) { dst in values.withUnsafeBufferPointer { encode($0.baseAddress!, count: values.count, into: dst) } }
    }

    /// Encodes a whole tensor held in memory with one rounding from Float64, refusing a non-finite result.
    func encode(_ values: [Double], tensor: String) throws -> [UInt8] {
        try encodeAll(values.count, tensor: tensor) { dst in values.withUnsafeBufferPointer { encode($0.baseAddress!, count: values.count, into: dst) } }
    }

    private func encodeAll(_ count: Int, tensor: String, _ body: (UnsafeMutableRawPointer) -> Bool) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: max(1, byteCount(count)))
        let finite = count == 0 || bytes.withUnsafeMutableBytes { body($0.baseAddress!) }
        guard finite else {
            throw MergeError(tensor: tensor, problem: "the result holds NaN or infinity (or overflows \(encoding.name))")
        }
        return count == 0 ? [] : bytes
    }
}
