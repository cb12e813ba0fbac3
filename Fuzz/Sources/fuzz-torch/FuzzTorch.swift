import AdapterKit
import FuzzSupport

/// The input is a `torch.save` checkpoint: zip, pickle, tensor extents, then every tensor read.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTorch(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    withInput(data, size) { bytes in
        let path = Scratch.write(bytes, as: "input.pt")
        guard let checkpoint = try? TorchCheckpoint(path: path) else { return }
        for t in checkpoint.entries {
            _ = try? checkpoint.withBytes(of: t.name) { raw in
                precondition(raw.count == t.byteCount)
            }
        }
    }
    return 0
}

@main
enum FuzzTorch {
    static func main() { runLibFuzzer(fuzzTorch) }
}
