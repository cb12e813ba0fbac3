import Foundation
import Testing
@testable import AdapterKit

/// A sharded folder: a.weight, b.weight in shard 1; c.weight in shard 2 (F32, 2 elements each).
private func makeShardedFolder(_ dir: TempDir, index: String? = nil, extraInShard2: Bool = false) throws -> String {
    let folder = dir.file("model")
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    try writeSafetensors(folder + "/model-00001-of-00002.safetensors", [
        (name: "a.weight", dtype: .f32, shape: [2], bytes: floatBytes([1, 2])),
        (name: "b.weight", dtype: .f32, shape: [2], bytes: floatBytes([3, 4])),
    ])
    var second: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = [(name: "c.weight", dtype: .f32, shape: [2], bytes: floatBytes([5, 6]))]
    if extraInShard2 { second.append((name: "a.weight", dtype: .f32, shape: [2], bytes: floatBytes([1, 2]))) }
    try writeSafetensors(folder + "/model-00002-of-00002.safetensors", second)
    let defaultIndex = """
    {"metadata": {"total_size": 24}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
     "b.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors"}}
    """
    _ = dir.write("model/model.safetensors.index.json", text: index ?? defaultIndex)
    _ = dir.write("model/config.json", text: "{}")
    return folder
}

private func refusal(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch { return String(describing: error) }
}

@Suite("model folders and the shard index")
struct CheckpointTests {
    @Test("inputFiles lists every file a merge reads: shards, the index, the files copied; the weights and the config beside them")
    func inputFiles() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try makeShardedFolder(dir)
        #expect(try Checkpoint(path: folder).inputFiles == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                                            "model.safetensors.index.json", "config.json"].map { folder + "/" + $0 })
        let file = folder + "/model-00001-of-00002.safetensors"
        #expect(try Checkpoint(path: file).inputFiles == [file])
        let peft = fixture("adapters/peft-lora")
        #expect(try Adapter(path: peft + "/adapter_model.safetensors").inputFiles == [peft + "/adapter_model.safetensors", peft + "/adapter_config.json"])
        let kohya = fixture("adapters/kohya-unet.safetensors")
        #expect(try Adapter(path: kohya).inputFiles == [kohya])
    }

    @Test("a valid sharded folder opens with every tensor in its shard")
    func valid() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let c = try Checkpoint(path: try makeShardedFolder(dir))
        #expect(c.fileNames == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        #expect(c.tensorNames == ["a.weight", "b.weight", "c.weight"])
        #expect(c.tensor("c.weight")?.file == 1)
        #expect(c.byteCount == 24)
        #expect(c.parameterCount == 6)
        #expect(c.otherEntries == ["config.json"])
        #expect(try c.files[1].floats("c.weight") == [5, 6])
    }

    @Test("a single file and a folder with model.safetensors both open")
    func single() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        let p = try writeSafetensors(dir.file("m/model.safetensors"), [(name: "x", dtype: .f32, shape: [1], bytes: floatBytes([1]))])
        #expect(try Checkpoint(path: p).isFolder == false)
        let c = try Checkpoint(path: dir.file("m"))
        #expect(c.isFolder && c.fileNames == ["model.safetensors"] && c.indexFileName == nil)
    }

    @Test("the index is checked against the shards", arguments: [
        // tensor listed in the wrong shard
        (#"{"metadata":{"total_size":24},"weight_map":{"a.weight":"model-00002-of-00002.safetensors","b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#, "index names"),
        // tensor listed but held by no shard
        (#"{"metadata":{"total_size":24},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors","d.weight":"model-00002-of-00002.safetensors"}}"#, "does not hold it"),
        // tensor in a shard but not listed
        (#"{"metadata":{"total_size":16},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#, "does not list"),
        // total_size wrong
        (#"{"metadata":{"total_size":25},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#, "total_size is 25"),
        // shard names escaping the folder
        (#"{"weight_map":{"a.weight":"../model-00001-of-00002.safetensors"}}"#, "leaves the model folder"),
        (#"{"weight_map":{"a.weight":"/etc/passwd"}}"#, "leaves the model folder"),
        // missing shard
        (#"{"weight_map":{"a.weight":"model-00003-of-00003.safetensors"}}"#, "is missing"),
        // not an index
        (#"{"metadata":{}}"#, "no \"weight_map\""),
        (#"{"weight_map":{"a.weight":"x","a.weight":"y"}}"#, "duplicate key"),
    ])
    func indexMismatch(index: String, message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try makeShardedFolder(dir, index: index)
        let text = refusal { _ = try Checkpoint(path: folder) }
        #expect(text?.contains(message) == true, "\(text ?? "accepted")")
        #expect(text?.contains("\n") == false)
    }

    @Test("a tensor in two shards is refused")
    func twoShards() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try makeShardedFolder(dir, extraInShard2: true)
        let text = refusal { _ = try Checkpoint(path: folder) }
        #expect(text?.contains("a.weight") == true)
    }

    @Test("a shard that is a symbolic link out of the folder is refused")
    func symlinkEscape() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try makeShardedFolder(dir)
        try FileManager.default.moveItem(atPath: folder + "/model-00002-of-00002.safetensors", toPath: dir.file("outside.safetensors"))
        try FileManager.default.createSymbolicLink(atPath: folder + "/model-00002-of-00002.safetensors", withDestinationPath: dir.file("outside.safetensors"))
        let text = refusal { _ = try Checkpoint(path: folder) }
        #expect(text?.contains("resolves outside") == true, "\(text ?? "accepted")")
    }

    @Test("missing paths and empty folders are clear errors")
    func missing() {
        let dir = TempDir()
        defer { dir.remove() }
        #expect(refusal { _ = try Checkpoint(path: dir.file("nope")) }?.hasSuffix("no such file or folder") == true)
        #expect(refusal { _ = try Checkpoint(path: dir.path) }?.contains("no .safetensors file") == true)
    }

    @Test("the inspect report counts parameters, bytes and dtypes")
    func report() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = CheckpointReport(try Checkpoint(path: try makeShardedFolder(dir)))
        let json = r.json()
        #expect(json["tensor_count"]?.int == 3)
        #expect(json["parameter_count"]?.int == 6)
        #expect(json["byte_count"]?.int == 24)
        #expect(json["adapter"]?.isNull == true)
        #expect(json["files"]?.arrayValue?.count == 2)
        #expect(json["tensors"]?.arrayValue?.first?["file"]?.stringValue == "model-00001-of-00002.safetensors")
        #expect(json["metadata"]?["format"]?.stringValue == "pt")
    }
}
