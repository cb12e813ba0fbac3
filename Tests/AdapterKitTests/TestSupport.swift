import Foundation
import Testing
@testable import AdapterKit
@_exported import AdapterTestSupport

/// A safetensors file from a header text and data bytes: the 8-byte length, the header, the data.
func safetensorsBytes(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
    let h = Array(header.utf8)
    let n = declaredLength ?? UInt64(h.count)
    var out: [UInt8] = (0..<8).map { UInt8(truncatingIfNeeded: n >> (8 * UInt64($0))) }
    out += h
    out += data
    return out
}


/// Writes tensors with the library's writer (reference layout) and returns the path.
@discardableResult
func writeSafetensors(_ path: String, _ tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])],
                      metadata: [(key: String, value: String)]? = ["format": "pt"].map { ($0.key, $0.value) }) throws -> String {
    let byName = Dictionary(tensors.map { ($0.name, $0.bytes) }, uniquingKeysWith: { first, _ in first })
    try SafetensorsWriter.write(into: try FileDescriptor.createExclusive(path), path: path,
                                tensors: tensors.map { TensorSpec(name: $0.name, dtype: $0.dtype, shape: $0.shape) },
                                metadata: metadata, sync: false) { t, writer in
        try byName[t.name]!.withUnsafeBytes { try writer.append($0) }
    }
    return path
}

func floatBytes(_ values: [Float]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }
func doubleBytes(_ values: [Double]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }

/// Kept for the tests that say which library they need.
let pythonSafetensorsAvailable = pythonReferenceAvailable
