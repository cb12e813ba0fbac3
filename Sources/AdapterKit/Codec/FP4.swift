import CMergeKernel

/// MXFP4 (OCP Microscaling): blocks of 32 E2M1 values (two codes per byte, the low nibble the even
/// element) sharing one E8M0 exponent byte, value = E2M1[code] · 2^(byte − 127), by the C kernels
/// the merge uses.
enum MXFP4 {
    /// The values of `blocks` (16 bytes per block) under `scales` (one byte per block); nil when
    /// an exponent byte is 0xFF (NaN).
    static func decode(blocks: [UInt8], scales: [UInt8]) -> [Float]? {
        precondition(blocks.count == scales.count * 16, "16 bytes per exponent")
        var values = [Float](repeating: 0, count: scales.count * 32)
        let ok = values.withUnsafeMutableBufferPointer { v in
            adapter_mxfp4_decode(blocks, scales, scales.count, v.baseAddress, v.baseAddress)
        }
        return ok == 1 ? values : nil
    }

    /// The blocks and exponents of `values` (a multiple of 32) by the merge's requantization rule;
    /// `old` exponents are kept for blocks of zeros (127 when not given).
    static func encode(_ values: [Float], old: [UInt8]? = nil) -> (blocks: [UInt8], scales: [UInt8]) {
        precondition(values.count % 32 == 0, "whole blocks")
        let n = values.count / 32
        var blocks = [UInt8](repeating: 0, count: n * 16)
        var scales = old ?? [UInt8](repeating: 127, count: n)
        var sums = [Double](repeating: 0, count: 4)
        let base = [Float](repeating: 0, count: values.count)
        adapter_mxfp4_encode(base, values, &blocks, &scales, n, &sums)
        return (blocks, scales)
    }
}

/// NVFP4 (compressed-tensors `nvfp4-pack-quantized`): groups of 16 E2M1 values (8 bytes, the low
/// nibble the even element) sharing one E4M3 scale, and a global scale: value =
/// bf16(E2M1[code] · (scale / global)), by the C kernel the merge uses.
enum NVFP4 {
    /// The values of `packed` (8 bytes per group) under `scales` (E4M3 bytes, one per group) and
    /// `global`; nil when a scale is NaN.
    static func decode(packed: [UInt8], scales: [UInt8], global: Float) -> [Float]? {
        precondition(packed.count == scales.count * 8, "8 bytes per scale")
        var values = [Float](repeating: 0, count: scales.count * 16)
        let ok = values.withUnsafeMutableBufferPointer { v in
            adapter_nvfp4_decode(packed, scales, scales.count, global, v.baseAddress, v.baseAddress)
        }
        return ok == 1 ? values : nil
    }
}
