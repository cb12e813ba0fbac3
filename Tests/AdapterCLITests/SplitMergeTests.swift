import AdapterKit
import Foundation
import Testing

// `merge --part I/N` and `merge --finish`: the parts stage shards beside OUT with checksummed
// manifests, the finish checks them and assembles OUT. In every success case OUT must be
// byte-identical to the one-process merge; in every failure, nothing may appear at OUT.

private let adapterFixture = "adapters/moslora-original"

/// tiny-llama re-sharded into `shards` files of unequal sizes (tensors dealt out in turn), with
/// an index as transformers writes it and the other files copied: a base with more shards than the
/// fixture's two, so that splits into 2, 3 and 7 parts differ.
private func shardedBase(_ dir: TempDir, shards: Int = 5) throws -> String {
    let source = fixture("models/tiny-llama")
    let folder = dir.file("base")
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
    for name in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let file = try SafetensorsFile(path: source + "/" + name)
        for t in file.entries { tensors.append((t.name, t.dtype, t.shape, try file.withBytes(of: t.name) { Array($0) })) }
    }
    tensors.sort { $0.name < $1.name }
    var map: [String: String] = [:]
    var total = 0
    for s in 0..<shards {
        let name = String(format: "model-%05d-of-%05d.safetensors", s + 1, shards)
        let mine = tensors.enumerated().filter { $0.offset % shards == s || ($0.offset < shards && s == 0) }.map(\.element)
        let unique = mine.filter { t in map[t.name] == nil }
        for t in unique { map[t.name] = name; total += t.bytes.count }
        let layout = try SafetensorsLayout(tensors: unique.map { TensorSpec(name: $0.name, dtype: $0.dtype, shape: $0.shape) }, metadata: [("format", "pt")])
        let writer = try SafetensorsWriter(layout: layout, output: try FileDescriptor.createExclusive(folder + "/" + name))
        let byName = Dictionary(uniqueKeysWithValues: unique.map { ($0.name, $0.bytes) })
        for t in layout.tensors { try byName[t.name]!.withUnsafeBytes { try writer.append($0) } }
        try writer.finish()
    }
    let index: [String: Any] = ["metadata": ["total_size": total], "weight_map": map]
    try JSONSerialization.data(withJSONObject: index, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: folder + "/model.safetensors.index.json"))
    for other in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        try FileManager.default.copyItem(atPath: source + "/" + other, toPath: folder + "/" + other)
    }
    return folder
}

private func staging(_ out: String) -> String {
    (out as NSString).deletingLastPathComponent + "/." + (out as NSString).lastPathComponent + ".parts"
}

private func entries(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

/// Runs every part (last first, as a scheduler may), then the finish; returns the finish's result.
@discardableResult
private func splitMerge(_ base: String, _ adapterPath: String, _ out: String, parts: Int, extra: [String] = []) throws -> CLIResult {
    for i in (1...parts).reversed() {
        let r = try adapter(["merge", base, adapterPath, out, "--part", "\(i)/\(parts)", "--no-sync"] + extra)
        #expect(r.status == 0, "part \(i)/\(parts): \(r.stderr)")
    }
    return try adapter(["merge", base, adapterPath, out, "--finish"] + extra)
}

/// What most tests start from: a scratch folder with the 5-shard base, the MoSLoRA adapter, OUT's
/// path, and (when asked) the one-process merge every success case must equal.
private struct Setup {
    let dir = TempDir()
    let ada = fixture(adapterFixture)
    let base: String
    let out: String

    init() throws {
        base = try shardedBase(dir)
        out = dir.file("out")
    }

    /// The one-process merge of the same inputs, at `whole`.
    func mergeWhole() throws -> String {
        let whole = dir.file("whole")
        #expect(try adapter("merge", base, ada, whole, "--quiet").status == 0)
        return whole
    }
}

@Suite("Split merges: --part and --finish")
struct SplitMergeTests {
    @Test("N = 1, 2, 3, 7 (more parts than shards): OUT is byte-identical to the one-process merge", arguments: [1, 2, 3, 7])
    func identical(parts: Int) throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (dir, base, ada, out) = (s.dir, s.base, s.ada, s.out)
        let whole = try s.mergeWhole()
        let r = try splitMerge(base, ada, out, parts: parts)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("finished \(out) from \(parts == 1 ? "1 part" : "\(parts) parts")"), "\(r.stderr)")
        #expect(snapshot(out) == snapshot(whole))
        #expect(!FileManager.default.fileExists(atPath: staging(out)), "the staging folder is removed")
        #expect(entries(dir.path) == ["base", "out", "whole"])
    }

    @Test("on a file system without hard links the finish copies the staged shards: the same bytes")
    func withoutHardLinks() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let whole = try s.mergeWhole()
        for i in 1...2 { #expect(try adapter("merge", s.base, s.ada, s.out, "--part", "\(i)/2", "--quiet").status == 0) }
        let r = try adapter(["merge", s.base, s.ada, s.out, "--finish"], environment: ["ADAPTER_TEST_LINKS": "unsupported"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(snapshot(s.out) == snapshot(whole))
        #expect(!FileManager.default.fileExists(atPath: staging(s.out)))
    }

    @Test("each shard is written by exactly one part, and the parts' bytes are balanced")
    func everyShardOnce() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try shardedBase(dir)
        let out = dir.file("out")
        var seen: [String] = []
        for i in 1...3 {
            #expect(try adapter("merge", base, fixture(adapterFixture), out, "--part", "\(i)/3", "--quiet").status == 0)
            seen += entries(staging(out) + "/part-\(i)-of-3")
        }
        #expect(seen.sorted() == entries(base).filter { $0.hasSuffix(".safetensors") })
        let manifest = try #require(parseJSONObject(String(decoding: try Data(contentsOf: URL(fileURLWithPath: staging(out) + "/part-1-of-3.json")), as: UTF8.self)))
        #expect(manifest["format"] as? String == "adapter-merge-part/1")
        #expect((manifest["plan_digest"] as? String)?.count == 64)
        let files = try #require(manifest["files"] as? [[String: Any]])
        for f in files {
            let path = staging(out) + "/part-1-of-3/" + (f["name"] as! String)
            #expect((try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) == f["bytes"] as? Int)
            // Hashed as it was written; read back here (SHA256 is checked on the FIPS vectors).
            #expect(f["sha256"] as? String == (try SHA256.file(path)).digest)
        }
    }

    @Test("a part run again finds its files complete and writes nothing")
    func rerun() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        #expect(try adapter("merge", base, ada, out, "--part", "2/3").status == 0)
        let shard = staging(out) + "/part-2-of-3/" + entries(staging(out) + "/part-2-of-3")[0]
        let before = try FileManager.default.attributesOfItem(atPath: shard)
        let again = try adapter("merge", base, ada, out, "--part", "2/3")
        #expect(again.status == 0)
        #expect(again.stderr.contains("already staged") && again.stderr.contains("nothing to do"), "\(again.stderr)")
        let after = try FileManager.default.attributesOfItem(atPath: shard)
        #expect(before[.systemFileNumber] as? Int == after[.systemFileNumber] as? Int)
        #expect(before[.modificationDate] as? Date == after[.modificationDate] as? Date)
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test("a part killed mid-way leaves only its temporary; run again, it is removed and the merge finishes")
    func killedPart() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (dir, base, ada, out) = (s.dir, s.base, s.ada, s.out)
        let whole = try s.mergeWhole()
        #expect(try adapter("merge", base, ada, out, "--part", "1/2", "--quiet").status == 0)
        let pause = dir.file("paused")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: adapterBinary)
        p.arguments = ["merge", base, ada, out, "--part", "2/2", "--quiet"]
        p.environment = ProcessInfo.processInfo.environment.merging(["ADAPTER_TEST_PAUSE_AT": "before-fsync", "ADAPTER_TEST_PAUSE_FILE": pause]) { $1 }
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        var waited = 0
        while !FileManager.default.fileExists(atPath: pause) && waited < 20_000 { usleep(5_000); waited += 5 }
        #expect(FileManager.default.fileExists(atPath: pause), "the part reached its pause")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        try? FileManager.default.removeItem(atPath: pause)
        let left = entries(staging(out))
        #expect(!left.contains("part-2-of-2.json") && !left.contains("part-2-of-2"), "\(left)")
        #expect(left.contains { $0.hasPrefix(".part-2-of-2.adapter-tmp-") }, "\(left)")
        #expect(!FileManager.default.fileExists(atPath: out))
        // Finishing now names the part that is missing.
        expectOneLineError(try adapter("merge", base, ada, out, "--finish"), containing: "part 2/2 is missing")
        let again = try adapter("merge", base, ada, out, "--part", "2/2")
        #expect(again.status == 0, "\(again.stderr)")
        #expect(again.stderr.contains("removed .part-2-of-2.adapter-tmp-"), "\(again.stderr)")
        #expect(!entries(staging(out)).contains { $0.contains(".adapter-tmp-") })
        #expect(try adapter("merge", base, ada, out, "--finish").status == 0)
        #expect(snapshot(out) == snapshot(whole))
    }

    @Test("a part removes only its own leftovers from the staging folder, never another part's")
    func ownLeftoversOnly() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        // Temporaries of processes that are gone: on a shared filesystem, one of another part may
        // belong to a live process on another machine, which this machine cannot see.
        let gone = Process()
        gone.executableURL = URL(fileURLWithPath: "/bin/true")
        try gone.run()
        gone.waitUntilExit()
        try FileManager.default.createDirectory(atPath: staging(out), withIntermediateDirectories: false)
        let mine = ".part-2-of-2.adapter-tmp-\(gone.processIdentifier)-1a2b3c4d"
        let theirs = [".part-1-of-2.adapter-tmp-\(gone.processIdentifier)-5e6f7a8b", ".part-1-of-2.json.adapter-tmp-\(gone.processIdentifier)-9c0d1e2f"]
        for name in [mine] + theirs { try FileManager.default.createDirectory(atPath: staging(out) + "/" + name, withIntermediateDirectories: false) }
        let r = try adapter("merge", base, ada, out, "--part", "2/2")
        #expect(r.status == 0, "\(r.stderr)")
        let left = entries(staging(out))
        #expect(!left.contains(mine))
        #expect(theirs.allSatisfy { left.contains($0) }, "\(left)")
    }

    @Test("a corrupted part file: finish refuses, naming it; the part run again rewrites it")
    func corruptedPart() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        let whole = try s.mergeWhole()
        for i in 1...3 { #expect(try adapter("merge", base, ada, out, "--part", "\(i)/3", "--quiet").status == 0) }
        let name = entries(staging(out) + "/part-3-of-3")[0]
        let shard = staging(out) + "/part-3-of-3/" + name
        var bytes = try Data(contentsOf: URL(fileURLWithPath: shard))
        bytes[bytes.count - 3] ^= 0x40  // same size, one bit of one value
        try bytes.write(to: URL(fileURLWithPath: shard))
        let r = try adapter("merge", base, ada, out, "--finish")
        expectOneLineError(r, containing: "part 3/3: \(shard) does not match its SHA-256")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(FileManager.default.fileExists(atPath: shard), "the staged parts are kept")
        let again = try adapter("merge", base, ada, out, "--part", "3/3")
        #expect(again.status == 0)
        #expect(again.stderr.contains("replaced part-3-of-3.json"), "\(again.stderr)")
        #expect(try adapter("merge", base, ada, out, "--finish").status == 0)
        #expect(snapshot(out) == snapshot(whole))
    }

    @Test("parts made from a different adapter or weight are refused, one line each; nothing at OUT")
    func differentMerge() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        #expect(try adapter("merge", base, ada, out, "--part", "1/3", "--quiet").status == 0)
        #expect(try adapter("merge", base, fixture("adapters/peft-lora"), out, "--part", "2/3", "--quiet").status == 0)
        #expect(try adapter("merge", base, ada, out, "--part", "3/3", "--weight", "0.5", "--quiet").status == 0)
        let r = try adapter("merge", base, ada, out, "--finish")
        #expect(r.status == 1)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 2, "\(r.stderr)")
        #expect(lines.allSatisfy { $0.hasPrefix("adapter: error: part ") && $0.contains("made from a different merge") })
        #expect(lines.contains { $0.contains("part 2/3") } && lines.contains { $0.contains("part 3/3") })
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test("finish with a part missing, or with nothing staged: one line each, nothing at OUT")
    func missingPart() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        expectOneLineError(try adapter("merge", base, ada, out, "--finish"), containing: "no parts are staged")
        #expect(try adapter("merge", base, ada, out, "--part", "1/7", "--quiet").status == 0)
        #expect(try adapter("merge", base, ada, out, "--part", "4/7", "--quiet").status == 0)
        let r = try adapter("merge", base, ada, out, "--finish")
        #expect(r.status == 1)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.map { String($0.prefix(30)) } == [2, 3, 5, 6, 7].map { String("adapter: error: part \($0)/7 is missing".prefix(30)) }, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test("quantized bases: FP8 requantized (a weight's scales may be in another part's shard) and --dtype bf16 (scales dropped, index and config rewritten)",
          arguments: [["models/tiny-fp8", "adapters/fp8-lora"], ["models/tiny-fp8", "adapters/fp8-lora", "--dtype", "bf16"],
                      ["models/tiny-gpt-oss-mxfp4", "adapters/mxfp4-lora"]])
    func quantized(_ inputs: [String]) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (base, ada, options) = (fixture(inputs[0]), fixture(inputs[1]), Array(inputs.dropFirst(2)))
        let whole = dir.file("whole")
        #expect(try adapter(["merge", base, ada, whole, "--quiet"] + options).status == 0)
        let out = dir.file("out")
        #expect(try splitMerge(base, ada, out, parts: 2, extra: options).status == 0)
        #expect(snapshot(out) == snapshot(whole))
    }

    @Test("an unreadable manifest is one line, naming it, not also a missing part")
    func unreadableManifest() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        #expect(try adapter("merge", s.base, s.ada, s.out, "--part", "1/2", "--quiet").status == 0)
        _ = FileManager.default.createFile(atPath: staging(s.out) + "/part-2-of-2.json", contents: Data("{bad".utf8))
        expectOneLineError(try adapter("merge", s.base, s.ada, s.out, "--finish"), containing: "part-2-of-2.json: not a part manifest")
        #expect(!FileManager.default.fileExists(atPath: s.out))
    }

    @Test("a one-file base splits too: one part holds the file, the others are empty")
    func fileBase() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture("models/tiny-llama-f32.safetensors")
        let ada = fixture("adapters/peft-lora")
        let whole = dir.file("whole.safetensors")
        #expect(try adapter("merge", base, ada, whole, "--quiet").status == 0)
        let out = dir.file("out.safetensors")
        #expect(try splitMerge(base, ada, out, parts: 2).status == 0)
        #expect(snapshot(out) == snapshot(whole))
        #expect(entries(dir.path) == ["out.safetensors", "whole.safetensors"])
    }

    @Test("--finish replaces an existing OUT only with --force, and the parts check OUT as a merge does")
    func outputRules() throws {
        let s = try Setup()
        defer { s.dir.remove() }
        let (base, ada, out) = (s.base, s.ada, s.out)
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: false)
        expectOneLineError(try adapter("merge", base, ada, out, "--part", "1/2"), containing: "already exists")
        #expect(!FileManager.default.fileExists(atPath: staging(out)))
        let r = try splitMerge(base, ada, out, parts: 2, extra: ["--force"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(entries(out).contains("model.safetensors.index.json"))
        expectOneLineError(try adapter("merge", base, ada, base + "/inner", "--part", "1/2"), containing: "inside the input")
    }

    @Test("usage: --part takes I/N with 1 ≤ I ≤ N, not with --finish, and not for a GGUF base")
    func usage() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ada = fixture(adapterFixture)
        for bad in ["0/3", "4/3", "3", "a/b", "1/0", "-1/2", "1/2/3", " 1/2"] {
            let r = try adapter("merge", fixture("models/tiny-llama"), ada, dir.file("out"), "--part", bad)
            #expect(r.status == 2, "--part \(bad): \(r.stderr)")
        }
        #expect(try adapter("merge", fixture("models/tiny-llama"), ada, dir.file("out"), "--part", "1/2", "--finish").status == 2)
        let gguf = try adapter("merge", fixture("gguf/tiny-llama.gguf"), fixture("adapters/peft-lora"), dir.file("o.gguf"), "--part", "1/2")
        #expect(gguf.status == 2, "\(gguf.stderr)")
        #expect(gguf.stderr.contains("a GGUF base is one file"), "\(gguf.stderr)")
        #expect(entries(dir.path).isEmpty)
    }
}
