import AdapterKit
import FuzzSupport

/// The input is a zip archive: the end records, central directory, local headers, then every
/// member inflated and CRC-checked.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzZip(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    withInput(data, size) { bytes in
        let path = Scratch.write(bytes, as: "input.zip")
        guard let archive = try? ZipArchive(path: path) else { return }
        for entry in archive.entries {
            _ = try? archive.withContents(of: entry) { $0.count }
        }
    }
    return 0
}

@main
enum FuzzZip {
    static func main() { runLibFuzzer(fuzzZip) }
}
