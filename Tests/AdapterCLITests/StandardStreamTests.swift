import Foundation
import Testing

/// Runs `adapter` through /bin/sh so that the shell can close or redirect its standard streams.
private func shell(_ script: String) throws -> CLIResult {
    try runCapturing("/bin/sh", ["-c", script], environment: ["ADAPTER": adapterBinary, "FIX": packageRoot + "/Fixtures"])
}

@Suite("standard output and error that are full or closed (the built binary)")
struct StandardStreamTests {
    @Test("a full or closed standard output is exit 1 with one line, for every command that prints", arguments: [
        "inspect $FIX/adapters/peft-lora", "inspect --json $FIX/models/tiny-llama", "inspect --help",
    ])
    func stdoutFails(command: String) throws {
        for redirect in [">/dev/full", ">&-"] {
            let r = try shell("exec \"$ADAPTER\" \(command) \(redirect)")
            #expect(r.status == 1, "\(command) \(redirect): status \(r.status)")
            #expect(r.stderr.contains("cannot write to standard output"), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1)
        }
    }

    @Test("resize and merge --report to a full stdout: exit 1, and the message says the output was written")
    func reportToFull() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try shell("exec \"$ADAPTER\" resize --quiet --rank 2 $FIX/adapters/peft-lora \(dir.file("r")) >/dev/full")
        #expect(r.status == 1 && r.stderr.contains("the output itself was written completely"), "\(r.stderr)")
        #expect(FileManager.default.fileExists(atPath: dir.file("r/adapter_config.json")))
    }

    @Test("a full or closed standard error never turns a successful merge into a crash", arguments: ["2>/dev/full", "2>&-"])
    func stderrFails(redirect: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("m")
        let r = try shell("exec \"$ADAPTER\" merge $FIX/models/tiny-llama $FIX/adapters/moslora-original \(out) \(redirect)")
        #expect(r.status == 0, "status \(r.status)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: out).count == 7)
        // With descriptor 2 closed, no file the merge opened may have received the summary line.
        for f in try FileManager.default.contentsOfDirectory(atPath: out) {
            let bytes = try Data(contentsOf: URL(fileURLWithPath: out + "/" + f))
            #expect(!String(decoding: bytes, as: UTF8.self).contains("merged 10 modules"), "\(f)")
        }
        // A failing command with a broken stderr still fails, without a signal.
        let bad = try shell("exec \"$ADAPTER\" inspect \(dir.file("missing")) \(redirect)")
        #expect(bad.status == 1)
    }
}
