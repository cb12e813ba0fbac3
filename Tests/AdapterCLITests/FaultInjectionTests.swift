import AdapterKit
import Foundation
import Testing

// Faults a user's disk, folder or shell can cause while `adapter merge` runs: damaged shard sets,
// hostile index paths, OUT paths that lead back into the inputs, a full or read-only disk, and
// signals mid-merge. In every case OUT must not appear half-written and no input may change.

// MARK: - Helpers

private func entries(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

/// A copy of a fixture file or folder inside `dir`.
private func copy(_ fixtureName: String, to dir: TempDir, as name: String? = nil) throws -> String {
    let target = dir.file(name ?? lastComponent(fixtureName))
    try FileManager.default.copyItem(atPath: fixture(fixtureName), toPath: target)
    return target
}

private func lastComponent(_ path: String) -> String { String(path.split(separator: "/").last ?? "") }

/// Reads a sharded index, lets `change` edit its weight map, writes it back (sorted, like transformers).
private func editIndex(_ folder: String, _ change: (inout [String: Any]) -> Void) throws {
    let path = folder + "/model.safetensors.index.json"
    var root = try #require(parseJSONObject(String(decoding: try Data(contentsOf: URL(fileURLWithPath: path)), as: UTF8.self)))
    var map = try #require(root["weight_map"] as? [String: Any])
    change(&map)
    root["weight_map"] = map
    let data = try JSONSerialization.data(withJSONObject: root, options: [.prettyPrinted, .sortedKeys])
    try data.write(to: URL(fileURLWithPath: path))
}

/// Rewrites a safetensors file with the library's writer; `change` may replace a tensor's shape and
/// bytes (return nil to keep it). Used to plant NaN, infinity and wrong shapes in adapter copies.
private func rewrite(_ path: String, _ change: (String, DType, [Int], [UInt8]) -> (shape: [Int], bytes: [UInt8])?) throws {
    let file = try SafetensorsFile(path: path)
    var tensors: [String: (DType, [Int], [UInt8])] = [:]
    for t in file.entries {
        let bytes = try file.withBytes(of: t.name) { Array($0) }
        let replaced = change(t.name, t.dtype, t.shape, bytes)
        tensors[t.name] = (t.dtype, replaced?.shape ?? t.shape, replaced?.bytes ?? bytes)
    }
    let metadata = file.metadataPairs
    let temporary = path + ".rewrite"
    let layout = try SafetensorsLayout(tensors: tensors.map { TensorSpec(name: $0.key, dtype: $0.value.0, shape: $0.value.1) },
                                       metadata: metadata.isEmpty ? nil : metadata)
    let writer = try SafetensorsWriter(layout: layout, output: try FileDescriptor.createExclusive(temporary))
    for t in layout.tensors { try tensors[t.name]!.2.withUnsafeBytes { try writer.append($0) } }
    try writer.finish()
    try FileManager.default.removeItem(atPath: path)
    try FileManager.default.moveItem(atPath: temporary, toPath: path)
}

private func floats(_ bytes: [UInt8]) -> [Float] {
    bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
}

private func bytes(_ values: [Float]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }

/// Runs a command as root, quietly; its exit status.
@discardableResult
private func system(_ arguments: String...) -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = arguments
    p.standardInput = FileHandle.nullDevice
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    do { try p.run() } catch { return -1 }
    p.waitUntilExit()
    return p.terminationStatus
}

/// Mounts a tmpfs of `size` at a fresh folder in `dir` (read-only with `readOnly`), runs `body` with
/// it, unmounts. Returns false, having run nothing, when mounting is not possible here.
private func withTmpfs(size: String, readOnly: Bool = false, in dir: TempDir, _ body: (String) throws -> Void) throws -> Bool {
    let mountPoint = dir.file("mnt")
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    guard system("mount", "-t", "tmpfs", "-o", "size=\(size),mode=0755", "tmpfs", mountPoint) == 0 else { return false }
    defer { system("umount", mountPoint) }
    if readOnly { guard system("mount", "-o", "remount,ro", mountPoint) == 0 else { return false } }
    try body(mountPoint)
    return true
}

/// The one-line-error contract, plus: OUT is absent and the inputs are byte-identical.
private func expectRefusedCleanly(_ r: CLIResult, containing text: String, out: String, inputs: [String: [String: Data]],
                                  sourceLocation: SourceLocation = #_sourceLocation) {
    expectOneLineError(r, containing: text, sourceLocation: sourceLocation)
    #expect(!FileManager.default.fileExists(atPath: out), "OUT \(out) exists", sourceLocation: sourceLocation)
    for (path, before) in inputs {
        #expect(snapshot(path) == before, "input \(path) changed", sourceLocation: sourceLocation)
    }
}

private let tinyLlama = "models/tiny-llama"
private let tinyLlamaF32 = "models/tiny-llama-f32.safetensors"

// MARK: - Damaged shard sets

@Suite("fault injection: damaged inputs, hostile paths, full disks and signals")
struct FaultInjectionTests {
    @Test("a shard truncated after the index was written is refused; nothing is written")
    func truncatedShard() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        let shard = model + "/model-00002-of-00002.safetensors"
        let handle = try #require(FileHandle(forUpdatingAtPath: shard))
        try handle.truncate(atOffset: try handle.seekToEnd() - 100)
        try handle.close()
        let before = snapshot(model)
        let out = dir.file("out")
        let r = try adapter("merge", model, fixture("adapters/peft-lora"), out)
        expectRefusedCleanly(r, containing: "model-00002-of-00002.safetensors", out: out, inputs: [model: before])
        #expect(r.stderr.contains("incomplete buffer"), "\(r.stderr)")
        expectOneLineError(try adapter("inspect", model), containing: "incomplete buffer")
        #expect(entries(dir.path) == ["tiny-llama"])
    }

    @Test("a shard the index names but the folder lacks is refused")
    func missingShard() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        try FileManager.default.removeItem(atPath: model + "/model-00001-of-00002.safetensors")
        let before = snapshot(model)
        let out = dir.file("out")
        let r = try adapter("merge", model, fixture("adapters/peft-lora"), out)
        expectRefusedCleanly(r, containing: "shard \"model-00001-of-00002.safetensors\" is missing", out: out, inputs: [model: before])
        #expect(entries(dir.path) == ["tiny-llama"])
    }

    @Test("an index naming a tensor its shard lacks is refused")
    func indexNamesAbsentTensor() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        try editIndex(model) { $0["model.layers.9.self_attn.q_proj.weight"] = "model-00001-of-00002.safetensors" }
        let before = snapshot(model)
        let out = dir.file("out")
        let r = try adapter("merge", model, fixture("adapters/peft-lora"), out)
        expectRefusedCleanly(r, containing: "\"model.layers.9.self_attn.q_proj.weight\" is listed in model-00001-of-00002.safetensors, which does not hold it",
                             out: out, inputs: [model: before])
    }

    @Test("a tensor held by two shards is refused, whichever shard the index names")
    func tensorInTwoShards() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        // A third shard holding the same tensors as the first; the index moves one tensor to it.
        try FileManager.default.copyItem(atPath: model + "/model-00001-of-00002.safetensors", toPath: model + "/model-00003-of-00003.safetensors")
        try editIndex(model) { $0["model.embed_tokens.weight"] = "model-00003-of-00003.safetensors" }
        let before = snapshot(model)
        let out = dir.file("out")
        let r = try adapter("merge", model, fixture("adapters/peft-lora"), out)
        expectRefusedCleanly(r, containing: "model.safetensors.index.json", out: out, inputs: [model: before])
        #expect(r.stderr.contains("model.embed_tokens.weight") || r.stderr.contains("does not list"), "\(r.stderr)")
    }

    @Test("weight-map paths that leave the model folder are refused before anything is opened", arguments: [
        "../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "../tiny-llama/model-00001-of-00002.safetensors",
        "model-00001-of-00002.safetensors\u{0}.txt", "", "link.safetensors",
    ])
    func escapingShardPaths(_ shardName: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        // A valid shard outside the folder, so that only the escape itself can be the reason for refusal.
        try FileManager.default.copyItem(atPath: model + "/model-00001-of-00002.safetensors", toPath: dir.file("outside.safetensors"))
        try FileManager.default.createSymbolicLink(atPath: model + "/link.safetensors", withDestinationPath: dir.file("outside.safetensors"))
        try editIndex(model) { map in
            for (k, v) in map where (v as? String) == "model-00001-of-00002.safetensors" { map[k] = shardName }
        }
        let before = snapshot(dir.path)
        let out = dir.file("out")
        let r = try adapter("merge", model, fixture("adapters/peft-lora"), out)
        expectRefusedCleanly(r, containing: "model.safetensors.index.json", out: out, inputs: [dir.path: before])
        #expect(r.stderr.contains("leaves the model folder") || r.stderr.contains("resolves outside the model folder"), "\(shardName): \(r.stderr)")
        expectOneLineError(try adapter("inspect", model), containing: "the model folder")
    }

    // MARK: - OUT leading back into the inputs

    @Test("OUT as a symbolic link into the inputs never writes through the link")
    func symlinkedOutput() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try copy(tinyLlama, to: dir)
        let ada = try copy("adapters/peft-lora", to: dir)
        let inputs = [model: snapshot(model), ada: snapshot(ada)]
        let fm = FileManager.default

        // A link to the base folder, to the adapter folder, to a base shard.
        for (name, target) in [("to-base", model), ("to-adapter", ada), ("to-shard", model + "/model-00001-of-00002.safetensors")] {
            let link = dir.file(name)
            try fm.createSymbolicLink(atPath: link, withDestinationPath: target)
            let r = try adapter("merge", "--force", model, ada, link)
            expectOneLineError(r, containing: name == "to-shard" ? "is inside the input" : "is the input")
            #expect(try fm.destinationOfSymbolicLink(atPath: link) == target)
        }
        // OUT inside a linked folder that is the base.
        let linkedFolder = dir.file("linked-folder")
        try fm.createSymbolicLink(atPath: linkedFolder, withDestinationPath: model)
        expectOneLineError(try adapter("merge", model, ada, linkedFolder + "/merged"), containing: "inside the input")
        // A dangling link into the base folder: refused without --force; with --force the link itself is
        // replaced and nothing is created inside the base.
        let dangling = dir.file("dangling")
        try fm.createSymbolicLink(atPath: dangling, withDestinationPath: model + "/merged")
        expectOneLineError(try adapter("merge", model, ada, dangling), containing: "already exists")
        let forced = try adapter("merge", "--force", "--quiet", model, ada, dangling)
        if forced.status == 0 {
            #expect((try? fm.destinationOfSymbolicLink(atPath: dangling)) == nil, "OUT is still a link")
            #expect(entries(dangling) == entries(model))
        } else {
            expectOneLineError(forced, containing: "input")
        }
        for (path, before) in inputs { #expect(snapshot(path) == before, "input \(path) changed") }
        #expect(!entries(dir.path).contains { $0.contains(".adapter-tmp-") })
        #expect(!entries(model).contains { $0.contains("merged") || $0.contains(".adapter-tmp-") })
    }

    // MARK: - The disk

    @Test("a full output disk (ENOSPC on a small tmpfs): one line, nothing at OUT, no temporaries",
          .enabled(if: getuid() == 0, "skipped: mounting a small tmpfs needs root"))
    func diskFull() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let inputs = [fixture(tinyLlama): snapshot(fixture(tinyLlama)), fixture(tinyLlamaF32): snapshot(fixture(tinyLlamaF32))]
        let mounted = try withTmpfs(size: "8k", in: dir) { mnt in
            for (base, name) in [(fixture(tinyLlamaF32), "out.safetensors"), (fixture(tinyLlama), "out")] {
                let out = mnt + "/" + name
                let r = try adapter("merge", base, fixture("adapters/peft-lora"), out)
                expectRefusedCleanly(r, containing: "No space left on device", out: out, inputs: inputs)
                #expect(entries(mnt) == [], "left behind: \(entries(mnt))")
            }
            let c = try adapter("convert", "to-safetensors", fixture("pytorch/dtypes.pt"), mnt + "/c.safetensors")
            #expect(c.status == 0 || (c.status == 1 && c.stderr.split(separator: "\n").count == 1), "\(c.stderr)")
            if c.status == 1 { #expect(entries(mnt) == []) }
        }
        if !mounted { print("skipped: could not mount a tmpfs here (no CAP_SYS_ADMIN?)") }
    }

    @Test("a read-only output folder: one line, nothing written",
          .enabled(if: getuid() == 0, "skipped: mounting a read-only tmpfs needs root (permissions do not stop root)"))
    func readOnlyOutput() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let inputs = [fixture(tinyLlama): snapshot(fixture(tinyLlama))]
        let mounted = try withTmpfs(size: "1m", readOnly: true, in: dir) { mnt in
            for args in [["merge", fixture(tinyLlama), fixture("adapters/peft-lora"), mnt + "/out"],
                         ["merge", fixture(tinyLlamaF32), fixture("adapters/peft-lora"), mnt + "/out"],
                         ["convert", "to-peft", fixture("adapters/mlx"), mnt + "/out"]] {
                let r = try adapter(args)
                expectRefusedCleanly(r, containing: "Read-only file system", out: mnt + "/out", inputs: inputs)
            }
            #expect(entries(mnt) == [])
        }
        if !mounted { print("skipped: could not mount a read-only tmpfs here (no CAP_SYS_ADMIN?)") }
    }

    // MARK: - Signals mid-merge

    /// Starts a merge slowed by the test hook, waits until its temporary exists and a few tensors
    /// are written, sends `signal`, and returns how it ended.
    private func interruptedMerge(_ signal: Int32, base: String, adapterPath: String, out: String) throws -> (status: Int32, reason: Process.TerminationReason, stderr: String, sawTemporary: Bool) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: adapterBinary)
        p.arguments = ["merge", "--no-sync", base, adapterPath, out]
        var environment = ProcessInfo.processInfo.environment
        environment["ADAPTER_TEST_DELAY_PER_TENSOR_MS"] = "150"
        p.environment = environment
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let folder = (out as NSString).deletingLastPathComponent
        let prefix = "." + (out as NSString).lastPathComponent + ".adapter-tmp-"
        var sawTemporary = false
        for _ in 0..<1000 where p.isRunning {
            if entries(folder).contains(where: { $0.hasPrefix(prefix) }) { sawTemporary = true; break }
            usleep(10_000)
        }
        usleep(400_000)  // a few tensors into the merge
        #expect(p.isRunning, "the merge ended before the signal; raise the delay")
        kill(p.processIdentifier, signal)
        p.waitUntilExit()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        return (p.terminationStatus, p.terminationReason, String(decoding: e, as: UTF8.self), sawTemporary)
    }

    @Test("SIGINT, SIGTERM and SIGHUP mid-merge: status 128+N, one line, nothing at OUT, no temporaries, inputs unchanged",
          arguments: [SIGINT, SIGTERM, SIGHUP])
    func interrupted(_ signal: Int32) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture(tinyLlama), ada = fixture("adapters/moslora-original")
        let inputs = [base: snapshot(base), ada: snapshot(ada)]
        for out in [dir.file("merged"), dir.file("merged.safetensors")] {
            let b = out.hasSuffix(".safetensors") ? fixture(tinyLlamaF32) : base
            let r = try interruptedMerge(signal, base: b, adapterPath: ada, out: out)
            #expect(r.sawTemporary, "no temporary appeared: the hook did not slow the merge")
            #expect(r.reason == .exit && r.status == 128 + signal, "status \(r.status) reason \(r.reason)")
            #expect(r.stderr == "adapter: interrupted; nothing was written\n", "\(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: out))
            #expect(entries(dir.path) == [], "left behind: \(entries(dir.path))")
        }
        for (path, before) in inputs { #expect(snapshot(path) == before, "input \(path) changed") }
    }

    @Test("an input truncated while the merge reads it (adapter, or an F64 base): one line, status 1, no temporary, never SIGBUS",
          arguments: ["adapter", "base"])
    func inputShrinks(_ which: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ada = try copy("adapters/moslora-original", to: dir)
        let base = dir.file("base.safetensors")
        try FileManager.default.copyItem(atPath: fixture("models/tiny-llama-f64.safetensors"), toPath: base)
        let victim = which == "adapter" ? ada + "/adapter_model.safetensors" : base
        let out = dir.file("merged.safetensors")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: adapterBinary)
        p.arguments = ["merge", "--no-sync", base, ada, out]
        var environment = ProcessInfo.processInfo.environment
        environment["ADAPTER_TEST_DELAY_PER_TENSOR_MS"] = "100"
        p.environment = environment
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        try p.run()
        for _ in 0..<1000 where p.isRunning {
            if entries(dir.path).contains(where: { $0.hasPrefix(".merged.safetensors.adapter-tmp-") }) { break }
            usleep(5_000)
        }
        usleep(150_000)
        #expect(p.isRunning, "the merge ended before the input was truncated; raise the delay")
        // What an in-place rewrite does first: the file shrinks under the reader.
        #expect(truncate(victim, 100) == 0)
        p.waitUntilExit()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(p.terminationReason == .exit && p.terminationStatus == 1, "status \(p.terminationStatus) reason \(p.terminationReason): \(stderr)")
        #expect(stderr.split(separator: "\n").count == 1, "\(stderr)")
        #expect(stderr.contains("changed while being read") || stderr.contains("file shrank"), "\(stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(!entries(dir.path).contains { $0.contains("adapter-tmp") }, "left behind: \(entries(dir.path))")
    }

    /// SIGKILL cannot be caught: the temporary `.NAME.adapter-tmp-*` may stay behind, but OUT never
    /// appears and the inputs are untouched.
    @Test("SIGKILL mid-merge: nothing at OUT, inputs unchanged (a .NAME.adapter-tmp-* may remain)")
    func killed() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture(tinyLlama), ada = fixture("adapters/moslora-original")
        let inputs = [base: snapshot(base), ada: snapshot(ada)]
        let out = dir.file("merged")
        let r = try interruptedMerge(SIGKILL, base: base, adapterPath: ada, out: out)
        #expect(r.reason == .uncaughtSignal && r.status == SIGKILL)
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(entries(dir.path).allSatisfy { $0.hasPrefix(".merged.adapter-tmp-") }, "\(entries(dir.path))")
        for (path, before) in inputs { #expect(snapshot(path) == before, "input \(path) changed") }
        // The next run is not disturbed by the leftover temporary.
        let again = try adapter("merge", "--quiet", base, ada, out)
        #expect(again.status == 0, "\(again.stderr)")
    }

    // MARK: - Adapters whose numbers or shapes are wrong

    @Test("infinity or NaN in B, in the mixer, or an update that overflows F16 stops the merge; nothing is written",
          arguments: [
            ("lora_B", Float.infinity, "models/tiny-llama", "NaN or infinite factors"),
            ("lora_AB", Float.nan, "models/tiny-llama", "NaN or infinite factors"),
            ("lora_A", -Float.infinity, "models/tiny-llama-f32.safetensors", "NaN or infinite factors"),
            ("lora_B", 1e30, "models/tiny-llama-f16.safetensors", "overflow"),
          ])
    func nonFinite(_ role: String, _ value: Float, _ baseName: String, _ message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ada = try copy("adapters/moslora-original", to: dir)
        let module = "base_model.model.model.layers.1.self_attn.v_proj."
        try rewrite(ada + "/adapter_model.safetensors") { name, _, shape, raw in
            guard name == module + role + ".weight" else { return nil }
            var v = floats(raw)
            if value.isFinite { v = v.map { _ in value } } else { v[v.count / 2] = value }
            return (shape, bytes(v))
        }
        let before = snapshot(ada)
        let out = dir.file("out")
        let r = try adapter("merge", fixture(baseName), ada, out)
        expectRefusedCleanly(r, containing: "model.layers.1.self_attn.v_proj", out: out, inputs: [ada: before])
        #expect(r.stderr.contains(message), "\(r.stderr)")
        #expect(r.stderr.contains("nothing was written"))
        #expect(entries(dir.path) == ["moslora-original"])
    }

    @Test("shapes that disagree with the base or between A, M and B are refused with the module named",
          arguments: [
            ("lora_A", [4, 17], "shape"),         // A's inputs do not match the base's columns
            ("lora_B", [17, 4], "shape"),         // B's outputs do not match the base's rows
            ("lora_AB", [3, 3], "mixer"),         // M smaller than the rank of A and B
            ("lora_AB", [4, 3], "mixer"),         // M not square
            ("lora_A", [3, 16], "rank"),          // A of rank 3, M and B of rank 4
          ])
    func shapeDisagreements(_ role: String, _ shape: [Int], _ message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ada = try copy("adapters/moslora-original", to: dir)
        let key = "base_model.model.model.layers.0.self_attn.q_proj." + role + ".weight"
        try rewrite(ada + "/adapter_model.safetensors") { name, _, _, _ in
            name == key ? (shape, bytes([Float](repeating: 0.01, count: shape.reduce(1, *)))) : nil
        }
        let before = snapshot(ada)
        let out = dir.file("out.safetensors")
        let r = try adapter("merge", fixture(tinyLlamaF32), ada, out)
        expectRefusedCleanly(r, containing: "model.layers.0.self_attn.q_proj", out: out, inputs: [ada: before])
        #expect(r.stderr.lowercased().contains(message), "\(r.stderr)")
        #expect(entries(dir.path) == ["moslora-original"])
    }
}
