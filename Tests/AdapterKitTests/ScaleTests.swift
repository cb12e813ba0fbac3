import Foundation
import Testing
@testable import AdapterKit

// Small hostile or merely large inputs whose cost used to grow quadratically: each test checks the
// result at a size where the old code took minutes in a debug build; the time limits only stop a hang.

/// A PEFT folder of `names` modules with 1 × 1 factors (r = 1, alpha 1) and `config` merged into its config.
func tinyPEFTAdapter(_ dir: TempDir, _ folder: String, modules names: [String], config extra: String = "") throws -> String {
    let one = Float(0.5).bitPattern
    let bytes = withUnsafeBytes(of: one.littleEndian) { Array($0) }
    var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
    for n in names {
        tensors.append(("base_model.model.\(n).lora_A.weight", .f32, [1, 1], bytes))
        tensors.append(("base_model.model.\(n).lora_B.weight", .f32, [1, 1], bytes))
    }
    let path = dir.file(folder)
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    try writeSafetensors(path + "/adapter_model.safetensors", tensors)
    _ = dir.write(folder + "/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1"# + extra + "}")
    return path
}

/// A base model of 1 × 1 F32 tensors with these names.
func tinyBase(_ dir: TempDir, _ name: String, tensors names: [String]) throws -> String {
    let zero: [UInt8] = [0, 0, 0, 0]
    return try writeSafetensors(dir.file(name), names.map { ($0, DType.f32, [1, 1], zero) })
}

@Suite("Base names are indexed once")
struct BaseNameIndexTests {
    @Test("another top-level name matches the one base tensor with the same rest of the path, and only one")
    func otherTopLevelName() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try tinyBase(dir, "base.safetensors", tensors: [
            "llama.layers.0.q.weight", "model.layers.1.q.weight", "other.layers.1.q.weight", "deep.er.layers.2.q.weight",
            ".layers.3.q.weight", "layers.4.q.weight", "x.layers.5.q.bias",
        ])
        let resolver = BaseNameResolver(try Checkpoint(path: base))
        let adapter = try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: [
            "model.layers.0.q", "model.layers.1.q", "model.layers.2.q", "model.layers.3.q", "m.layers.4.q", "model.layers.5.q",
        ]))
        let found = Dictionary(uniqueKeysWithValues: adapter.modules.map { ($0.baseName, resolver.weightName(for: $0, format: .peft)) })
        #expect(found["model.layers.0.q"] == "llama.layers.0.q.weight")  // the rest of the path after the first component
        #expect(found["model.layers.1.q"] == "model.layers.1.q.weight")  // found directly (the fallback would see two)
        #expect(found["model.layers.2.q"] == .some(nil))                 // deep.er.layers.2: the first component is "deep" only
        #expect(found["model.layers.3.q"] == ".layers.3.q.weight")       // an empty first component
        #expect(found["m.layers.4.q"] == .some(nil))                     // layers.4.q.weight has no component before "layers"
        #expect(found["model.layers.5.q"] == .some(nil))                 // a bias is not a weight
    }

    @Test("the other-top-level-name fallback refuses two candidates", .timeLimit(.minutes(1)))
    func ambiguous() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try tinyBase(dir, "base.safetensors", tensors: ["a.layers.0.q.weight", "b.layers.0.q.weight"])
        let resolver = BaseNameResolver(try Checkpoint(path: base))
        let adapter = try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: ["c.layers.0.q"]))
        #expect(resolver.weightName(for: adapter.modules[0], format: .peft) == nil)
    }

    @Test("20,000 unmatched modules against a 20,000-tensor base are all listed as problems", .timeLimit(.minutes(1)))
    func manyUnmatched() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let n = 20_000
        let base = try tinyBase(dir, "base.safetensors", tensors: (0..<n).map { "model.layers.\($0).mlp.proj.weight" })
        let adapter = try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: (0..<n).map { "foo.layers.\($0).attn.x" }))
        let error = #expect(throws: ProblemList.self) {
            try MergePlan(base: try Checkpoint(path: base), inputs: [MergeInput(adapter: adapter)])
        }
        #expect(error?.problems.count == n)
        #expect(error?.problems.first?.contains("no base tensor foo.layers.0.attn.x.weight") == true)
    }
}

@Suite("Large headers are read once")
struct LargeHeaderTests {
    @Test("inspect's three looks at a model file (adapter or not, then the checkpoint) share one opened file")
    func modelOpenedOnce() throws {
        let files = TensorFiles()
        let model = fixture("models/tiny-gpt2.safetensors")
        #expect(!Adapter.looksLikeAdapter(model, files: files))
        let checkpoint = try Checkpoint(path: model, files: files)
        #expect(checkpoint.files[0] === (try files.open(model)))
        let folder = fixture("models/tiny-llama")
        #expect(!Adapter.looksLikeAdapter(folder, files: files))
        let sharded = try Checkpoint(path: folder, files: files)
        for (store, name) in zip(sharded.files, sharded.fileNames) {
            #expect(store === (try files.open(joinPath(folder, name))))
        }
    }

    @Test("an adapter's file is opened once for the adapter and for its tensor table")
    func adapterOpenedOnce() throws {
        let files = TensorFiles()
        let path = fixture("adapters/peft-lora")
        #expect(Adapter.looksLikeAdapter(path, files: files))
        let adapter = try Adapter(path: path, files: files)
        let checkpoint = try Checkpoint(path: adapter.store.path, files: files)
        #expect(checkpoint.files[0] === adapter.store)
    }

    @Test("a header of 300,000 tensors is read with every tensor, in order", .timeLimit(.minutes(1)))
    func manyTensors() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let n = 300_000
        var header = "{\"__metadata__\":{\"format\":\"pt\"}"
        header.reserveCapacity(n * 80)
        for i in 0..<n {
            header += ",\"model.layers.\(i / 512).experts.\(i % 512).w\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[\(2 * i),\(2 * i + 2)]}"
        }
        header += "}"
        let path = dir.write("big.safetensors", safetensorsBytes(header: header, data: [UInt8](repeating: 0, count: 2 * n)))
        let file = try SafetensorsFile(path: path)
        #expect(file.tensorInfos.count == n)
        #expect(file.tensorInfos.last?.name == "model.layers.585.experts.479.w")
        #expect(file.info("model.layers.1.experts.0.w")?.dataOffsets == 1024..<1026)
        #expect(file.metadataPairs.map(\.key) == ["format"])
    }
}
