import AdapterKit
import FuzzSupport

/// The input is a whole safetensors file: the header parser and every validation rule of
/// formats.md §1 run on it; an accepted header must describe a buffer inside the file.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSafetensorsHeader(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    withInput(data, size) { bytes in
        let prefix = Array(bytes.prefix(8))
        guard let header = try? SafetensorsHeader.parse(file: "fuzz", fileSize: bytes.count, prefix: prefix, readHeader: { n in
            Array(bytes[8..<(8 + n)])
        }) else { return }
        for t in header.tensors {
            precondition(t.dataOffsets.lowerBound >= 0 && header.dataStart + t.dataOffsets.upperBound <= bytes.count,
                         "accepted tensor \(t.name) lies outside the file")
            precondition(header.tensor(named: t.name) == t)
        }
    }
    return 0
}

@main
enum FuzzSafetensorsHeader {
    static func main() { runLibFuzzer(fuzzSafetensorsHeader) }
}
