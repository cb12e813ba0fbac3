import CMergeKernel
import Dispatch
import Foundation

/// Values of GGML tensor data and back, for the types with a codec here: F32, F16, BF16 (one
/// rounding to nearest even), the 32-value block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
/// K-quants Q2_K … Q6_K, both ways by ports of ggml's reference quantizers
/// (`Sources/CMergeKernel/ggml_blocks.c`), on every core in whole-block pieces.
enum GGMLCodec {
    static let blockTypes: Set<GGMLType> = [.q4_0, .q4_1, .q5_0, .q5_1, .q8_0]
    static let kQuants: Set<GGMLType> = [.q2_K, .q3_K, .q4_K, .q5_K, .q6_K]

    /// Whether values can be read from and written in this type.
    static func hasCodec(_ type: GGMLType) -> Bool { type == .f32 || type == .f16 || type == .bf16 || isQuantized(type) }

    /// Whether a type rounds onto a coarse grid (its merges report what they kept).
    static func isQuantized(_ type: GGMLType) -> Bool { blockTypes.contains(type) || kQuants.contains(type) }

    /// The Float32 values of `bytes` holding `count` values of `type`; nil without a codec or
    /// when the bytes are not `count` values of the type.
    static func decode(_ type: GGMLType, _ bytes: [UInt8], count: Int) -> [Float]? {
        guard hasCodec(type), count % type.blockSize == 0, bytes.count == count / type.blockSize * type.typeSize else { return nil }
        var out = [Float](repeating: 0, count: count)
        let ok = bytes.withUnsafeBytes { source in
            out.withUnsafeMutableBufferPointer { target in
                let src = UncheckedRaw(UnsafeMutableRawBufferPointer(mutating: source)), dst = UncheckedMutable(target)
                return inChunks(count: count, type: type) { values, blockBytes in
                    adapter_ggml_decode(Int32(type.rawValue), src.at(blockBytes.lowerBound), dst.base.baseAddress! + values.lowerBound, values.count)
                }
            }
        }
        return ok ? out : nil
    }

    /// `values` encoded as `type`; nil without a codec or for a partial block.
    static func encode(_ type: GGMLType, _ values: [Float]) -> [UInt8]? {
        let count = values.count
        guard hasCodec(type), count % type.blockSize == 0 else { return nil }
        var out = [UInt8](repeating: 0, count: count / type.blockSize * type.typeSize)
        let ok = values.withUnsafeBufferPointer { source in
            out.withUnsafeMutableBytes { target in
                let src = UncheckedMutable(UnsafeMutableBufferPointer(mutating: source)), dst = UncheckedRaw(target)
                return inChunks(count: count, type: type) { values, blockBytes in
                    adapter_ggml_encode(Int32(type.rawValue), src.base.baseAddress! + values.lowerBound, dst.at(blockBytes.lowerBound), values.count)
                }
            }
        }
        return ok ? out : nil
    }

    /// Runs `body` on whole-block pieces of `count` values on every core (values, and the bytes
    /// they take), each piece its own input and output; true when every piece succeeded.
    static func inChunks(count: Int, type: GGMLType, _ body: @Sendable (Range<Int>, Range<Int>) -> Int32) -> Bool {
        let blocks = count / type.blockSize
        let chunks = max(1, min(ProcessInfo.processInfo.activeProcessorCount * 4, blocks / 64))
        let failed = Locked(false)
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            let b0 = blocks * c / chunks, b1 = blocks * (c + 1) / chunks
            guard b1 > b0 else { return }
            if body(b0 * type.blockSize..<b1 * type.blockSize, b0 * type.typeSize..<b1 * type.typeSize) != 1 { failed.set(true) }
        }
        return !failed.value
    }
}
