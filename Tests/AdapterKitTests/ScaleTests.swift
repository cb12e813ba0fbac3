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
        let resolver = NameMap(base: try Checkpoint(path: base))
        let adapter = try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: [
            "model.layers.0.q", "model.layers.1.q", "model.layers.2.q", "model.layers.3.q", "m.layers.4.q", "model.layers.5.q",
        ]))
        let found = Dictionary(uniqueKeysWithValues: adapter.modules.map { ($0.baseName, resolver.target(for: $0, format: .peft)?.tensor) })
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
        let resolver = NameMap(base: try Checkpoint(path: base))
        let adapter = try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: ["c.layers.0.q"]))
        #expect(resolver.target(for: adapter.modules[0], format: .peft) == nil)
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
        #expect(file.entries.count == n)
        #expect(file.entries.last?.name == "model.layers.585.experts.479.w")
        #expect(file.info("model.layers.1.experts.0.w")?.dataOffsets == 1024..<1026)
        #expect(file.metadataPairs.map(\.key) == ["format"])
    }
}

@Suite("rank_pattern / alpha_pattern with many keys")
struct PatternIndexTests {
    /// What trying the keys one by one in order gives (the rule as it was): the first that matches.
    private func reference(_ keys: [String], _ name: String) -> Int? {
        keys.indices.first { PatternRule(key: keys[$0], value: 0).matches(name) }
    }

    @Test("the index gives the first key PatternRule gives, and all of them, for random keys and names")
    func agreesWithRule() throws {
        var g = SeededGenerator(seed: 12)
        // Characters that matter: dots, regex syntax, newlines (one of them two scalars), a prepended
        // and a combining character, non-ASCII letters and a NUL.
        let alphabet: [String] = ["a", "b", "a", "b", ".", ".", "_", "1", "\n", "\r\n", "\r", "é", "e\u{301}", "\u{301}", "\u{0600}",
                                  "*", "(", ")", "|", "?", "[a]", "\\.", " ", "\u{0}", "\u{85}", "\u{2028}", "x"]
        func word(_ maxLength: Int) -> String {
            let n = Int(g.next() % UInt64(maxLength + 1))
            return (0..<n).map { _ in alphabet[Int(g.next() % UInt64(alphabet.count))] }.joined()
        }
        for round in 0..<300 {
            var keys: [String] = []
            for _ in 0..<Int(g.next() % 12) {
                let k = word(6)
                if !keys.contains(k) { keys.append(k) }
            }
            let index = PatternIndex(field: "rank_pattern", keys: keys)
            for _ in 0..<40 {
                // Names often end with a key, to make matches likely.
                var name = word(8)
                if !keys.isEmpty, g.next() % 2 == 0 { let k = keys[Int(g.next() % UInt64(keys.count))]; name += (g.next() % 2 == 0 ? "." : "") + k }
                let expected = reference(keys, name)
                #expect(try index.firstMatch(name) == expected, "round \(round): keys \(keys.debugDescription), name \(name.debugDescription)")
                let all = keys.indices.filter { PatternRule(key: keys[$0], value: 0).matches(name) }
                #expect(try index.allMatches(name) == all, "round \(round): keys \(keys.debugDescription), name \(name.debugDescription)")
            }
        }
    }

    @Test("module names against module-name keys: the first in config order wins, dots match one character")
    func firstWins() throws {
        let keys = ["layers.1.self_attn.q_proj", "q_proj", "self_attn.q_proj", "layers.1.mlp.up", "x"]
        let index = PatternIndex(field: "rank_pattern", keys: keys)
        #expect(try index.firstMatch("model.layers.1.self_attn.q_proj") == 0)
        #expect(try index.firstMatch("model.layers.2.self_attn.q_proj") == 1)
        #expect(try index.firstMatch("model.layersX1.mlp.up") == 3)   // "." in a key is a regex dot
        #expect(try index.firstMatch("model.layers.1.mlp.upx") == nil)
        #expect(try index.firstMatch("xq_proj") == nil)
        #expect(try index.allMatches("model.layers.1.self_attn.q_proj") == [0, 1, 2])
        // A key given twice (two lists joined) is found twice by allMatches, once (the first) by firstMatch.
        let joined = PatternIndex(field: "rank_pattern and alpha_pattern", keys: ["a.b", "q", "a.b", "q", "(x)"])
        #expect(try joined.allMatches("m.a.b") == [0, 2])
        #expect(try joined.allMatches("q") == [1, 3])
        #expect(try joined.firstMatch("m.q") == 1)
    }

    @Test("an adapter whose rank_pattern has 300,000 keys loads, with the first matching key's rank", .timeLimit(.minutes(1)))
    func manyKeys() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var pattern = (100..<300_098).map { "\"layers.\($0).mlp.up\": 2" }
        pattern += ["\"layers.7.attn.x\": 2", "\"attn.x\": 1"]
        let config = ", \"rank_pattern\": {" + pattern.joined(separator: ", ") + "}"
        let names = (0..<16).map { "model.layers.\($0).attn.x" }
        // Layer 7's first matching key gives rank 2, the others' rank 1, which their tensors have.
        let error = #expect(throws: ProblemList.self) { try Adapter(path: try tinyPEFTAdapter(dir, "a", modules: names, config: config)) }
        #expect(error?.problems == ["module base_model.model.model.layers.7.attn.x: the config gives rank 2 (rank_pattern) but its tensors have rank 1"])
        #expect(error?.description.count ?? .max < 1000)
    }
}

@Suite("Writing rank_pattern / alpha_pattern for many modules")
struct PatternWriterTests {
    @Test("to-peft of 20,000 modules, a third with their own alpha, writes a 6,667-key alpha_pattern", .timeLimit(.minutes(1)))
    func manyPatternKeys() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let n = 20_000
        let names = (0..<n).map { "model.layers.\($0).attn.x" }
        let pattern = stride(from: 0, to: n, by: 3).map { "\"layers.\($0).attn.x\": 2" }.joined(separator: ", ")
        let input = try tinyPEFTAdapter(dir, "in", modules: names, config: ", \"alpha_pattern\": {" + pattern + "}")
        let out = dir.file("out")
        var options = ConvertOptions()
        options.sync = false
        _ = try AdapterConversion.convertLayout(input: input, output: out, to: .peft, options: options)
        let config = try readJSONFile(out + "/adapter_config.json")
        let written = try #require(config["alpha_pattern"]?.objectValue)
        #expect(written.members.count == 6667)
        #expect(written.members.first?.key == "model.layers.0.attn.x" && written.members.first?.value.double == 2)
        #expect(config["lora_alpha"]?.double == 1)
        // Read back: every module keeps its scale.
        let back = try Adapter(path: out)
        let scales = Dictionary(uniqueKeysWithValues: back.modules.map { ($0.baseName, $0.scale) })
        #expect(scales["model.layers.0.attn.x"] == 2 && scales["model.layers.1.attn.x"] == 1 && scales["model.layers.19998.attn.x"] == 2 && scales["model.layers.19999.attn.x"] == 1)
    }

    @Test("a module whose name is another's dotted suffix cannot get its own alpha")
    func suffixCollision() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let input = try tinyPEFTAdapter(dir, "in", modules: ["model.x", "x", "model.y"], config: ", \"alpha_pattern\": {\"model.x\": 1, \"x\": 3, \"y\": 1}")
        var options = ConvertOptions()
        options.sync = false
        let error = #expect(throws: InputError.self) {
            try AdapterConversion.convertLayout(input: input, output: dir.file("out"), to: .peft, options: options)
        }
        #expect(error?.description.contains("module x cannot be given its own rank or alpha: PEFT's pattern rule would also apply it to model.x") == true, "\(String(describing: error))")
    }
}
