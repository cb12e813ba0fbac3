import Foundation
import Testing

// The CLI's contract for failures a user causes: status 1 and exactly one line on stderr for bad
// input or a refused operation, status 2 for bad usage, never a crash, a backtrace or stdout output.

/// Text that only a crash or an uncaught error would print.
private let crashMarkers = ["Fatal error", "Stack dump", "backtrace", "Current stack trace", "Crash", "SIGILL", "SIGSEGV", "0x0000"]

private func expectNoCrash(_ r: CLIResult, _ label: String, sourceLocation: SourceLocation = #_sourceLocation) {
    for marker in crashMarkers {
        #expect(!r.stderr.contains(marker), "\(label): \(r.stderr)", sourceLocation: sourceLocation)
    }
    #expect(r.status != 0, "\(label) succeeded", sourceLocation: sourceLocation)
}

/// A folder of bad inputs, made once per test.
private struct BadInputs {
    let dir = TempDir()
    var missing: String { dir.file("no-such-file.safetensors") }
    var emptyFolder: String { dir.file("empty-folder") }
    let invalidHeader: String
    let truncatedHeader: String
    let emptyFile: String
    let notZipPt: String
    let modelAsAdapter: String
    let badAdapterConfig: String
    let badJSONIndex: String

    init() {
        try! FileManager.default.createDirectory(atPath: dir.file("empty-folder"), withIntermediateDirectories: true)
        // N says 8 bytes of JSON, which are not JSON.
        invalidHeader = dir.write("invalid-header.safetensors", [8, 0, 0, 0, 0, 0, 0, 0] + Array("{nope!!}".utf8))
        // N larger than the file.
        truncatedHeader = dir.write("truncated.safetensors", [0xFF, 0xFF, 0, 0, 0, 0, 0, 0] + Array("{}".utf8))
        emptyFile = dir.write("empty.safetensors", [])
        notZipPt = dir.write("garbage.pt", [0x50, 0x4B, 0x03, 0x04] + Array(repeating: 0x41, count: 40))
        modelAsAdapter = fixture("models/tiny-llama-f32.safetensors")
        // A PEFT folder whose config is not JSON.
        let ada = dir.file("bad-adapter")
        try! FileManager.default.copyItem(atPath: fixture("adapters/peft-lora"), toPath: ada)
        try! Data("{\"r\": 4,".utf8).write(to: URL(fileURLWithPath: ada + "/adapter_config.json"))
        badAdapterConfig = ada
        // A model folder whose index is not JSON.
        let model = dir.file("bad-index")
        try! FileManager.default.copyItem(atPath: fixture("models/tiny-llama"), toPath: model)
        try! Data("{\"weight_map\": [".utf8).write(to: URL(fileURLWithPath: model + "/model.safetensors.index.json"))
        badJSONIndex = model
    }
}

@Suite("exit statuses and one-line errors for every command")
struct ExitStatusTests {
    @Test("every user-caused failure: status 1, one line on stderr naming the problem, nothing on stdout")
    func invalidInput() throws {
        let bad = BadInputs()
        defer { bad.dir.remove() }
        let ada = fixture("adapters/peft-lora"), base = fixture("models/tiny-llama-f32.safetensors")
        let out = bad.dir.file("out"), outFile = bad.dir.file("out.safetensors")
        let cases: [(args: [String], expected: String)] = [
            // inspect
            (["inspect", bad.missing], "no such file or folder"),
            (["inspect", bad.emptyFolder], "empty-folder"),
            (["inspect", bad.invalidHeader], "invalid header JSON"),
            (["inspect", bad.truncatedHeader], "invalid header length"),
            (["inspect", bad.emptyFile], "header too small"),
            (["inspect", bad.notZipPt], "garbage.pt"),
            (["inspect", bad.badAdapterConfig], "invalid JSON"),
            (["inspect", bad.badJSONIndex], "invalid JSON"),
            (["inspect", "--json", bad.missing], "no such file or folder"),
            // merge: each argument in turn
            (["merge", bad.missing, ada, out], "no such file or folder"),
            (["merge", bad.emptyFolder, ada, out], "empty-folder"),
            (["merge", bad.invalidHeader, ada, outFile], "invalid header JSON"),
            (["merge", bad.truncatedHeader, ada, outFile], "invalid header length"),
            (["merge", bad.badJSONIndex, ada, out], "invalid JSON"),
            (["merge", base, bad.missing, outFile], "no such file or folder"),
            (["merge", base, bad.emptyFolder, outFile], "no adapter found"),
            (["merge", base, bad.invalidHeader, outFile], "invalid header JSON"),
            (["merge", base, bad.modelAsAdapter, outFile], "not an adapter"),
            (["merge", base, bad.badAdapterConfig, outFile], "invalid JSON"),
            (["merge", base, bad.notZipPt, outFile], "garbage.pt"),
            (["merge", base, ada, bad.emptyFolder], "already exists"),
            (["merge", base, ada, bad.dir.file("no/such/dir/out")], "does not exist"),
            (["merge", "--add", bad.missing, base, ada, outFile], "no such file or folder"),
            // convert: every subcommand on a missing file, a directory and a bad adapter
            (["convert", "to-peft", bad.missing, out], "no such file or folder"),
            (["convert", "to-mlx", bad.emptyFolder, out], "no adapter found"),
            (["convert", "to-kohya", bad.invalidHeader, outFile], "invalid header JSON"),
            (["convert", "lora-to-moslora", bad.modelAsAdapter, out], "not an adapter"),
            (["convert", "moslora-to-lora", bad.badAdapterConfig, out], "invalid JSON"),
            (["convert", "to-peft", ada, bad.emptyFolder], "already exists"),
            (["convert", "to-safetensors", bad.missing, outFile], "no such file"),
            (["convert", "to-safetensors", bad.notZipPt, outFile], "garbage.pt"),
            (["convert", "to-safetensors", bad.emptyFolder, outFile], "empty-folder"),
            // resize
            (["resize", "--rank", "2", bad.missing, out], "no such file or folder"),
            (["resize", "--rank", "2", bad.emptyFolder, out], "no adapter found"),
            (["resize", "--rank", "2", bad.invalidHeader, out], "invalid header JSON"),
            (["resize", "--rank", "2", bad.badAdapterConfig, out], "invalid JSON"),
        ]
        for c in cases {
            let r = try adapter(c.args)
            let label = c.args.joined(separator: " ")
            expectNoCrash(r, label)
            #expect(r.status == 1, "\(label): status \(r.status), \(r.stderr)")
            #expect(r.stdout.isEmpty, "\(label): stdout \(r.stdout)")
            #expect(r.stderr.split(separator: "\n", omittingEmptySubsequences: false).count == 2 && r.stderr.hasSuffix("\n"),
                    "\(label): not one line: \(r.stderr)")
            #expect(r.stderr.hasPrefix("adapter: error: "), "\(label): \(r.stderr)")
            #expect(r.stderr.contains(c.expected), "\(label): expected \"\(c.expected)\" in \(r.stderr)")
        }
        // Nothing was created by any of them.
        #expect(!FileManager.default.fileExists(atPath: out) && !FileManager.default.fileExists(atPath: outFile))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: bad.dir.path)) ?? []).allSatisfy { !$0.contains(".adapter-tmp-") })
    }

    @Test("bad usage: status 2, a message on stderr, nothing on stdout, no crash")
    func badUsage() throws {
        let ada = fixture("adapters/peft-lora"), base = fixture("models/tiny-llama-f32.safetensors")
        let cases: [[String]] = [
            [],  // no subcommand: the root has no run of its own
            ["frobnicate"],
            ["inspect"],
            ["inspect", "a", "b"],
            ["inspect", "--no-such-flag", ada],
            ["merge", "only-one"],
            ["merge", base, ada],
            ["merge", "--weight", "x", base, ada, "out"],
            ["merge", "--weight", "nan", base, ada, "out"],
            ["merge", "--threads", "0", base, ada, "out"],
            ["merge", "--threads", "-3", base, ada, "out"],
            ["convert"],
            ["convert", "to-nowhere", ada, "out"],
            ["convert", "to-peft", ada],
            ["convert", "to-peft", "--dtype", "F7", ada, "out"],
            ["convert", "lora-to-moslora", "--mixer", "bogus", ada, "out"],
            ["convert", "moslora-to-lora", "--fold-into", "c", ada, "out"],
            ["resize", ada, "out", "--form", "svd"],
            ["resize", "--rank", "two", ada, "out"],
        ]
        for args in cases {
            let r = try adapter(args)
            let label = "adapter " + args.joined(separator: " ")
            if (args.isEmpty || args == ["convert"]) && r.status == 0 {
                // A command group named without a subcommand prints its help, like `git`: acceptable.
                #expect(r.stdout.contains("USAGE"), "\(label): \(r.stdout)")
                continue
            }
            expectNoCrash(r, label)
            #expect(r.status == 2, "\(label): status \(r.status), \(r.stderr)")
            #expect(r.stdout.isEmpty, "\(label): stdout \(r.stdout)")
            #expect(!r.stderr.isEmpty, "\(label): nothing on stderr")
        }
    }
}
