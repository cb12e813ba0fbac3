@testable import AdapterKit
import FuzzSupport

/// The input is `data.pkl` alone: the pickle interpreter, then the walk that names the tensors.
/// Needs AdapterKit built for testing (debug builds are), since the interpreter is internal.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPickle(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    withInput(data, size) { bytes in
        var machine = PickleMachine(Array(bytes))
        defer { machine.breakCycles() }
        guard let root = try? machine.run() else { return }
        _ = try? TorchCheckpoint.collectTensors(root, path: "fuzz", pickleBytes: bytes.count)
    }
    return 0
}

@main
enum FuzzPickle {
    static func main() { runLibFuzzer(fuzzPickle) }
}
