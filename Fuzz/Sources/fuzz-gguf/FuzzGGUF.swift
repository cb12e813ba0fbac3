import AdapterKit
import FuzzSupport

/// The input is a GGUF file: header, metadata, tensor infos (every check of the reader), then the
/// inspect report in both forms.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGGUF(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    withInput(data, size) { bytes in
        let path = Scratch.write(bytes, as: "input.gguf")
        guard let file = try? GGUFFile(path: path) else { return }
        let report = GGUFReport(file)
        _ = report.text(tensors: true)
        _ = report.json()
        for t in file.tensors.prefix(8) where t.byteCount <= 1 << 16 {
            _ = try? file.bytes(of: t)
        }
    }
    return 0
}

@main
enum FuzzGGUF {
    static func main() { runLibFuzzer(fuzzGGUF) }
}
