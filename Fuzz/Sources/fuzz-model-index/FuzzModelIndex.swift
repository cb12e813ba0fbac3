import AdapterKit
import FuzzSupport

/// The input is `model.safetensors.index.json` in a folder holding the two tiny-llama shards:
/// the index parser, the shard-name checks and the index-against-shards validation run on it.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzModelIndex(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        Scratch.install(fixture: "models/tiny-llama/" + shard, as: shard, in: "model")
    }
    withInput(data, size) { bytes in
        _ = Scratch.write(bytes, as: "model.safetensors.index.json", in: "model")
        if let checkpoint = try? Checkpoint(path: Scratch.folder + "/model") {
            precondition(checkpoint.tensors.count == checkpoint.files.reduce(0) { $0 + $1.entries.count })
        }
    }
    return 0
}

@main
enum FuzzModelIndex {
    static func main() { runLibFuzzer(fuzzModelIndex) }
}
