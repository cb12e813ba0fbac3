import AdapterKit
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// How OUT is written: the replace protocol under signals at every phase, what --force may
// replace, inputs reached through paths not on the command line, a file appearing at OUT while
// writing, long OUT names, and temporaries left behind by killed runs.

// MARK: - Helpers

private func listing(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

private func temporaries(_ dir: String) -> [String] {
    listing(dir).filter { $0.contains(".adapter-tmp-") }
}

/// How a run paused at a phase ended.
private struct PausedRun {
    let status: Int32
    let reason: Process.TerminationReason
    let stdout: String
    let stderr: String
    /// Whether the run reached the phase (and `act` ran there).
    let reached: Bool
}

/// Runs `adapter` with the test hook pausing it at `phase`. Once it waits there, `act` gets its pid
/// (to signal it, or to change the folder); with `untilExit` the run is given up to 5 s to end
/// on its own (a signal) before it is released, otherwise it is released at once.
private func runPaused(at phase: String, _ arguments: [String], environment extra: [String: String] = [:],
                       untilExit: Bool, act: (Int32) throws -> Void) throws -> PausedRun {
    let control = TempDir()
    defer { control.remove() }
    let marker = control.file("paused")
    let p = Process()
    p.executableURL = URL(fileURLWithPath: adapterBinary)
    p.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    environment["ADAPTER_TEST_PAUSE_AT"] = phase
    environment["ADAPTER_TEST_PAUSE_FILE"] = marker
    for (k, v) in extra { environment[k] = v }
    p.environment = environment
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    var reached = false
    for _ in 0..<4000 {
        if FileManager.default.fileExists(atPath: marker) { reached = true; break }
        if !p.isRunning { break }
        usleep(5000)
    }
    if reached {
        try act(p.processIdentifier)
        if untilExit { for _ in 0..<1000 where p.isRunning { usleep(5000) } }
        try? FileManager.default.removeItem(atPath: marker)
    }
    p.waitUntilExit()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    return PausedRun(status: p.terminationStatus, reason: p.terminationReason, stdout: String(decoding: o, as: UTF8.self),
                     stderr: String(decoding: e, as: UTF8.self), reached: reached)
}

private func quoted(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }

private let folderBase = fixture("models/tiny-llama")
private let fileBase = fixture("models/tiny-llama-f32.safetensors")
private let oldAdapter = fixture("adapters/peft-lora")
private let newAdapter = fixture("adapters/moslora-original")

/// An old OUT (the base merged with one adapter) and the new one a run is about to write (merged
/// with another), made once in `dir`.
private struct Outputs {
    let base: String
    let old: String
    let oldSnapshot: [String: Data]
    let newSnapshot: [String: Data]

    init(folder: Bool, in dir: TempDir) throws {
        base = folder ? folderBase : fileBase
        old = dir.file(folder ? "old" : "old.safetensors")
        let new = dir.file(folder ? "new" : "new.safetensors")
        let a = try adapter("merge", "--quiet", base, oldAdapter, old)
        let b = try adapter("merge", "--quiet", base, newAdapter, new)
        #expect(a.status == 0 && b.status == 0, "\(a.stderr) \(b.stderr)")
        oldSnapshot = snapshot(old)
        newSnapshot = snapshot(new)
        #expect(oldSnapshot != newSnapshot)
    }
}

private let fallback = ["ADAPTER_TEST_RENAMEAT2": "unsupported"]

@Suite("writing OUT: replace protocol, what --force replaces, inputs, races, long names, leftovers")
struct OutputSafetyTests {
    // MARK: - Item 1: a signal at every phase of a --force replace

    /// The phases a `--force` merge over an existing OUT passes, per output kind and file system.
    static func phasesPassed(folder: Bool, exchange: Bool) -> Set<String> {
        var phases: Set<String> = ["before-fsync", "after-fsync", "before-replace", "committed"]
        if exchange {
            phases.formUnion(["exchanged", "before-remove-old"])
        } else if folder {
            // Without RENAME_EXCHANGE a folder is moved aside first; a file is renamed over the old one.
            phases.formUnion(["moved-aside", "before-remove-old"])
        }
        return phases
    }

    @Test("SIGINT, SIGTERM or SIGHUP at any phase of a --force replace: OUT is the complete old or the complete new output, no temporary left",
          arguments: [(true, true), (true, false), (false, true), (false, false)])
    func signalAtEveryPhase(_ folder: Bool, _ exchange: Bool) throws {
        let refs = TempDir()
        defer { refs.remove() }
        let outputs = try Outputs(folder: folder, in: refs)
        let inputs = [outputs.base: snapshot(outputs.base), newAdapter: snapshot(newAdapter)]
        let passed = Self.phasesPassed(folder: folder, exchange: exchange)
        let beforeReplace: Set<String> = ["before-fsync", "after-fsync", "before-replace"]
        for phase in TestHook.phases {
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                let dir = TempDir()
                defer { dir.remove() }
                let name = folder ? "out" : "out.safetensors"
                let out = dir.file(name)
                try FileManager.default.copyItem(atPath: outputs.old, toPath: out)
                let r = try runPaused(at: phase, ["merge", "--force", "--quiet", outputs.base, newAdapter, out],
                                      environment: exchange ? [:] : fallback, untilExit: true) { pid in kill(pid, sig) }
                let label = "\(folder ? "folder" : "file"), \(exchange ? "exchange" : "fallback"), \(phase), signal \(sig)"
                #expect(r.reached == passed.contains(phase), "\(label): reached \(r.reached)")
                if !r.reached {
                    // A phase this route does not pass: the run completes untouched.
                    #expect(r.status == 0 && snapshot(out) == outputs.newSnapshot, "\(label): \(r.stderr)")
                    break
                }
                #expect(r.reason == .exit && r.status == 128 + sig, "\(label): status \(r.status) \(r.reason), \(r.stderr)")
                let now = snapshot(out)
                if beforeReplace.contains(phase) {
                    #expect(now == outputs.oldSnapshot, "\(label): OUT is not the complete old output: \(now.keys.sorted())")
                    #expect(r.stderr == "adapter: interrupted; nothing was written\n", "\(label): \(r.stderr)")
                } else {
                    #expect(now == outputs.newSnapshot, "\(label): OUT is not the complete new output: \(now.keys.sorted())")
                    #expect(r.stderr == "adapter: interrupted after the output was complete\n", "\(label): \(r.stderr)")
                }
                #expect(listing(dir.path) == [name], "\(label): left behind \(listing(dir.path))")
            }
        }
        for (path, before) in inputs { #expect(snapshot(path) == before, "input \(path) changed") }
    }

    @Test("SIGHUP ignored by the caller (nohup) stays ignored: the merge completes")
    func hangupIgnoredByCaller() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("out")
        let control = TempDir()
        defer { control.remove() }
        let marker = control.file("paused")
        let command = "trap '' HUP; ADAPTER_TEST_PAUSE_AT=after-fsync ADAPTER_TEST_PAUSE_FILE=\(quoted(marker)) exec \(quoted(adapterBinary)) merge --quiet \(quoted(folderBase)) \(quoted(newAdapter)) \(quoted(out))"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        p.standardInput = FileHandle.nullDevice
        try p.run()
        var reached = false
        for _ in 0..<4000 where p.isRunning {
            if FileManager.default.fileExists(atPath: marker) { reached = true; break }
            usleep(5000)
        }
        #expect(reached)
        kill(p.processIdentifier, SIGHUP)
        usleep(200_000)
        try? FileManager.default.removeItem(atPath: marker)
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 0, "status \(p.terminationStatus)")
        #expect(listing(out) == listing(folderBase))
        #expect(temporaries(dir.path).isEmpty)
    }

    // MARK: - Item 2: what --force may replace

    @Test("--force refuses to replace a folder this tool could not have written; nothing changes")
    func forceRefusesForeignFolders() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fm = FileManager.default
        func folder(_ name: String, _ files: [String], subfolders: [String] = []) throws -> String {
            let path = dir.file(name)
            try fm.createDirectory(atPath: path, withIntermediateDirectories: true)
            for s in subfolders {
                try fm.createDirectory(atPath: path + "/" + s, withIntermediateDirectories: true)
                _ = dir.write(name + "/" + s + "/secret", [1, 2, 3])
            }
            for f in files { _ = dir.write(name + "/" + f, Array(f.utf8)) }
            return path
        }
        let home = try folder("home", ["notes.txt"], subfolders: [".ssh", "projects"])
        let unknown = try folder("unknown", ["config.json", "data.csv"])
        let nested = try folder("nested", ["config.json"], subfolders: ["original"])
        let cases: [(args: [String], out: String, reason: String)] = [
            (["merge", "--force", folderBase, newAdapter, home], home, ".ssh"),
            (["merge", "--force", folderBase, newAdapter, unknown], unknown, "data.csv"),
            (["merge", "--force", folderBase, newAdapter, nested], nested, "original"),
            (["convert", "to-peft", "--force", oldAdapter, home], home, ".ssh"),
            (["convert", "to-mlx", "--force", oldAdapter, unknown], unknown, "data.csv"),
            (["resize", "--force", "--rank", "2", oldAdapter, home], home, ".ssh"),
            (["convert", "to-safetensors", "--force", fixture("pytorch/adapter_model.bin"), home], home, "folder"),
        ]
        for c in cases {
            let before = snapshot(dir.path)
            let r = try adapter(c.args)
            expectOneLineError(r, containing: "--force")
            #expect(r.stderr.contains(c.reason), "\(c.args): \(r.stderr)")
            #expect(snapshot(dir.path) == before, "\(c.args) changed the folder")
        }
    }

    @Test("--force refuses a file that is not safetensors, and a file where a folder goes or the reverse")
    func forceRefusesOtherKinds() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let text = dir.write("notes.safetensors", Array("my notes\n".utf8))
        let empty = dir.write("empty.safetensors", [])
        let outputs = try Outputs(folder: true, in: dir)
        let modelFile = dir.file("model.safetensors")
        #expect(try adapter("merge", "--quiet", fileBase, oldAdapter, modelFile).status == 0)
        let cases: [(args: [String], reason: String)] = [
            (["merge", "--force", fileBase, newAdapter, text], "a safetensors or GGUF file here, and this is neither"),
            (["merge", "--force", fileBase, newAdapter, empty], "a safetensors or GGUF file here, and this is neither"),
            (["convert", "to-kohya", "--force", oldAdapter, text], "a safetensors or GGUF file here, and this is neither"),
            (["merge", "--force", fileBase, newAdapter, outputs.old], "a folder"),
            (["merge", "--force", folderBase, newAdapter, modelFile], "a file"),
            (["convert", "to-peft", "--force", oldAdapter, modelFile], "a file"),
        ]
        for c in cases {
            let before = snapshot(dir.path)
            let r = try adapter(c.args)
            expectOneLineError(r, containing: "--force")
            #expect(r.stderr.contains(c.reason), "\(c.args): \(r.stderr)")
            #expect(snapshot(dir.path) == before, "\(c.args) changed the folder")
        }
    }

    @Test("--force replaces what this tool writes: model and adapter folders with their usual files, safetensors files")
    func forceReplacesModelFolders() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fm = FileManager.default
        let model = dir.file("model")
        try fm.copyItem(atPath: folderBase, toPath: model)
        for f in ["tokenizer.model", "vocab.txt", "merges.txt", "README.md", "special_tokens_map.json", ".gitattributes",
                  "pytorch_model.bin", "training_args.bin", "optimizer.pt", "LICENSE", "chat_template.jinja"] {
            _ = dir.write("model/" + f, Array(f.utf8))
        }
        let r = try adapter("merge", "--force", "--quiet", folderBase, newAdapter, model)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(listing(model) == listing(folderBase))
        // An adapter folder, an empty folder, a kohya file, a merged file.
        let ada = dir.file("ada")
        try fm.copyItem(atPath: oldAdapter, toPath: ada)
        #expect(try adapter("convert", "to-mlx", "--force", "--quiet", newAdapter, ada).status == 0)
        #expect(listing(ada) == ["adapter_config.json", "adapters.safetensors"])
        let empty = dir.file("empty")
        try fm.createDirectory(atPath: empty, withIntermediateDirectories: false)
        #expect(try adapter("convert", "to-peft", "--force", "--quiet", newAdapter, empty).status == 0)
        let kohya = dir.file("k.safetensors")
        #expect(try adapter("convert", "to-kohya", "--quiet", oldAdapter, kohya).status == 0)
        #expect(try adapter("convert", "to-kohya", "--force", "--quiet", newAdapter, kohya).status == 0)
        let merged = dir.file("m.safetensors")
        #expect(try adapter("merge", "--quiet", fileBase, oldAdapter, merged).status == 0)
        #expect(try adapter("merge", "--force", "--quiet", fileBase, newAdapter, merged).status == 0)
        #expect(temporaries(dir.path).isEmpty)
    }

    // MARK: - Item 3: files read through paths not on the command line

    @Test("OUT may not be a file the run reads but was not named: the config beside an adapter's weights")
    func configBesideWeightsIsAnInput() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fm = FileManager.default
        let peft = dir.file("peft")
        try fm.copyItem(atPath: newAdapter, toPath: peft)
        let mlx = dir.file("mlx")
        try fm.copyItem(atPath: fixture("adapters/mlx"), toPath: mlx)
        let second = dir.file("second")
        try fm.copyItem(atPath: oldAdapter, toPath: second)
        let weights = peft + "/adapter_model.safetensors", config = peft + "/adapter_config.json"
        let cases: [[String]] = [
            ["merge", "--force", fileBase, weights, config],
            ["merge", "--force", "--add", second + "/adapter_model.safetensors", fileBase, weights, second + "/adapter_config.json"],
            ["convert", "to-kohya", "--force", weights, config],
            ["convert", "to-peft", "--force", mlx + "/adapters.safetensors", mlx + "/adapter_config.json"],
            ["resize", "--force", "--rank", "2", mlx + "/adapters.safetensors", mlx + "/adapter_config.json"],
        ]
        for args in cases {
            let before = snapshot(dir.path)
            let r = try adapter(args)
            expectOneLineError(r, containing: "is the input")
            #expect(r.stderr.contains("adapter_config.json"), "\(args): \(r.stderr)")
            #expect(snapshot(dir.path) == before, "\(args) changed an input")
        }
    }

    // MARK: - Item 6: a file appearing at OUT while writing

    @Test("without --force, something that appears at OUT while the output is written is never replaced",
          arguments: [(true, true), (true, false), (false, true), (false, false)])
    func appearsWhileWriting(_ folder: Bool, _ exchange: Bool) throws {
        for intruderIsFolder in [false, true] {
            let dir = TempDir()
            defer { dir.remove() }
            let out = dir.file(folder ? "out" : "out.safetensors")
            let theirs = Data("someone else's file\n".utf8)
            let r = try runPaused(at: "before-replace", ["merge", "--quiet", folder ? folderBase : fileBase, newAdapter, out],
                                  environment: exchange ? [:] : fallback, untilExit: false) { _ in
                if intruderIsFolder {
                    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: false)
                    try theirs.write(to: URL(fileURLWithPath: out + "/theirs.txt"))
                } else {
                    try theirs.write(to: URL(fileURLWithPath: out))
                }
            }
            let label = "\(folder ? "folder" : "file") output, \(exchange ? "renameat2" : "fallback"), a \(intruderIsFolder ? "folder" : "file") appears"
            #expect(r.reached, "\(label)")
            #expect(r.status == 1, "\(label): status \(r.status)")
            #expect(r.stderr == "adapter: error: \(out): appeared while writing; nothing was replaced\n", "\(label): \(r.stderr)")
            if intruderIsFolder {
                #expect(listing(out) == ["theirs.txt"] && FileManager.default.contents(atPath: out + "/theirs.txt") == theirs, "\(label)")
            } else {
                #expect(FileManager.default.contents(atPath: out) == theirs, "\(label): OUT was replaced")
            }
            #expect(listing(dir.path) == [(out as NSString).lastPathComponent], "\(label): left behind \(listing(dir.path))")
        }
    }

    // MARK: - Item 17: long OUT names

    @Test("OUT names up to 255 bytes work: the temporary's name is kept within NAME_MAX")
    func longOutputNames() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fileName = String(repeating: "m", count: 255 - ".safetensors".utf8.count) + ".safetensors"
        let folderName = String(repeating: "é", count: 127) + "f"  // 255 bytes, two-byte characters
        #expect(fileName.utf8.count == 255 && folderName.utf8.count == 255)
        for (base, name) in [(fileBase, fileName), (folderBase, folderName)] {
            let out = dir.file(name)
            // The temporaries seen while writing fit too.
            var seen: [String] = []
            let r = try runPaused(at: "before-replace", ["merge", "--quiet", base, newAdapter, out], untilExit: false) { _ in
                seen = temporaries(dir.path)
            }
            #expect(r.status == 0, "\(name.prefix(8))…: \(r.stderr)")
            #expect(seen.count == 1 && seen.allSatisfy { $0.utf8.count <= 255 }, "\(seen)")
            let forced = try adapter("merge", "--force", "--quiet", base, oldAdapter, out)
            #expect(forced.status == 0, "\(forced.stderr)")
            let forcedFallback = try adapter(["merge", "--force", "--quiet", base, newAdapter, out], environment: fallback)
            #expect(forcedFallback.status == 0, "\(forcedFallback.stderr)")
        }
        #expect(listing(dir.path) == [fileName, folderName].sorted())
    }

    // MARK: - Item 18: temporaries of killed runs

    @Test("a SIGKILLed merge's temporary is removed by the next run writing into that folder, with a note")
    func killedRunsTemporaryIsRemoved() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("merged")
        let r = try runPaused(at: "after-fsync", ["merge", "--quiet", folderBase, newAdapter, out], untilExit: true) { pid in
            kill(pid, SIGKILL)
        }
        #expect(r.reason == .uncaughtSignal && r.status == SIGKILL)
        let left = temporaries(dir.path)
        #expect(left.count == 1, "\(listing(dir.path))")
        let next = try adapter("merge", folderBase, newAdapter, dir.file("other"))
        #expect(next.status == 0, "\(next.stderr)")
        let notes = next.stderr.split(separator: "\n").filter { $0.hasPrefix("adapter: note: removed") }
        #expect(notes.count == 1, "\(next.stderr)")
        #expect(notes.first.map { $0.contains(left.first ?? "?") && $0.contains("no longer running") } ?? false, "\(next.stderr)")
        #expect(listing(dir.path) == ["other"])
        // The same for the file writers (convert) after a killed file merge.
        let killedFile = try runPaused(at: "after-fsync", ["merge", "--quiet", fileBase, newAdapter, dir.file("m.safetensors")], untilExit: true) { pid in
            kill(pid, SIGKILL)
        }
        #expect(killedFile.reason == .uncaughtSignal && temporaries(dir.path).count == 1)
        let convert = try adapter("convert", "to-kohya", oldAdapter, dir.file("k.safetensors"))
        #expect(convert.status == 0 && convert.stderr.contains("adapter: note: removed"), "\(convert.stderr)")
        #expect(listing(dir.path) == ["k.safetensors", "other"])
    }

    @Test("a --force run killed between moving a folder OUT aside and renaming the new one in (no RENAME_EXCHANGE): the next run puts the old OUT back")
    func killedWhileMovedAside() throws {
        let refs = TempDir()
        defer { refs.remove() }
        let outputs = try Outputs(folder: true, in: refs)
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("out")
        try FileManager.default.copyItem(atPath: outputs.old, toPath: out)
        let r = try runPaused(at: "moved-aside", ["merge", "--force", "--quiet", folderBase, newAdapter, out], environment: fallback,
                              untilExit: true) { pid in kill(pid, SIGKILL) }
        #expect(r.reached && r.reason == .uncaughtSignal)
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(temporaries(dir.path).contains { $0.hasSuffix(".old") }, "\(listing(dir.path))")
        let next = try adapter("merge", fileBase, newAdapter, dir.file("other.safetensors"))
        #expect(next.status == 0, "\(next.stderr)")
        #expect(next.stderr.contains("adapter: note: removed") && next.stderr.contains("put back the previous output out"), "\(next.stderr)")
        #expect(snapshot(out) == outputs.oldSnapshot)
        #expect(listing(dir.path) == ["other.safetensors", "out"])
    }

    @Test("a temporary whose process is alive, or which a live process holds locked, is left alone")
    func liveTemporariesAreKept() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // A live process (its pid is in the name).
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleeper.arguments = ["60"]
        try sleeper.run()
        defer { kill(sleeper.processIdentifier, SIGKILL); sleeper.waitUntilExit() }
        let alive = ".model.safetensors.adapter-tmp-\(sleeper.processIdentifier)-1a2b3c4d"
        _ = dir.write(alive, [1, 2, 3])
        // A process that has exited, whose temporary a live process (this one) holds locked, as
        // when the pid is seen from another pid namespace.
        let gone = Process()
        gone.executableURL = URL(fileURLWithPath: "/bin/true")
        try gone.run()
        gone.waitUntilExit()
        let locked = ".merged.adapter-tmp-\(gone.processIdentifier)-5e6f7a8b"
        try FileManager.default.createDirectory(atPath: dir.file(locked), withIntermediateDirectories: false)
        _ = dir.write(locked + "/model.safetensors", [4, 5, 6])
        let fd = open(dir.file(locked), O_RDONLY | O_DIRECTORY)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(flock(fd, LOCK_EX | LOCK_NB) == 0)
        // And one that is neither: removed.
        let stale = ".old.adapter-tmp-\(gone.processIdentifier)-9c0d1e2f"
        _ = dir.write(stale, [7])
        let r = try adapter("merge", fileBase, newAdapter, dir.file("out.safetensors"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("adapter: note: removed \(stale)"), "\(r.stderr)")
        #expect(listing(dir.path) == [alive, locked, "out.safetensors"].sorted())
        #expect(listing(dir.file(locked)) == ["model.safetensors"])
    }
}
