import Foundation
import Testing

/// Every output byte of the commands in `Tests/Golden/commands.txt` (merges, conversions, resizes
/// and PyTorch exports of the fixtures) against SHA-256 sums recorded before the core was
/// redesigned: a refactor that changes one byte of one output fails here.
///
/// `ADAPTER_GOLDEN_RECORD=1 swift test --filter GoldenOutput` rewrites `outputs.txt`; do that only
/// when an output is meant to change, and say why in the commit.
@Suite struct GoldenOutputTests {
    struct Command {
        let name: String
        let arguments: [String]
    }

    static let folder = packageRoot + "/Tests/Golden"

    static func commands(output: String) throws -> [Command] {
        let text = try String(contentsOfFile: folder + "/commands.txt", encoding: .utf8)
        return text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.isEmpty }.map { line in
            let parts = line.split(separator: "\t", maxSplits: 1).map(String.init)
            let arguments = parts[1].split(separator: " ").map {
                $0.replacingOccurrences(of: "{F}", with: packageRoot + "/Fixtures")
                    .replacingOccurrences(of: "{OUT}", with: output + "/" + parts[0])
            }
            return Command(name: parts[0], arguments: arguments)
        }
    }

    static func sha256(_ paths: [String]) throws -> [String] {
        let r = try runCapturing("/usr/bin/env", ["sha256sum", "--"] + paths)
        precondition(r.status == 0, "sha256sum failed: \(r.stderr)")
        return r.stdout.split(separator: "\n").map { String($0.prefix(64)) }
    }

    /// "name<TAB>what<TAB>sha256" for every file the command wrote (relative to OUT) and its stdout.
    static func lines(for command: Command, in dir: String, stdout: String) throws -> [String] {
        let fm = FileManager.default
        var files: [(String, String)] = []
        for entry in try fm.contentsOfDirectory(atPath: dir).sorted() where entry == command.name || entry.hasPrefix(command.name + ".") {
            let full = dir + "/" + entry
            var isFolder: ObjCBool = false
            _ = fm.fileExists(atPath: full, isDirectory: &isFolder)
            if isFolder.boolValue {
                for name in try fm.contentsOfDirectory(atPath: full).sorted() { files.append((entry + "/" + name, full + "/" + name)) }
            } else {
                files.append((entry, full))
            }
        }
        let stdoutFile = dir + "/.stdout-" + command.name
        try Data(stdout.utf8).write(to: URL(fileURLWithPath: stdoutFile))
        defer { try? fm.removeItem(atPath: stdoutFile) }
        let sums = try sha256(files.map(\.1) + [stdoutFile])
        return zip(files.map(\.0) + ["(stdout)"], sums).map { "\(command.name)\t\($0)\t\($1)" }
    }

    @Test func everyOutputByteIsAsRecorded() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var got: [String] = []
        for command in try Self.commands(output: dir.path) {
            let r = try adapter(command.arguments)
            #expect(r.status == 0, "\(command.name): \(r.stderr)")
            got += try Self.lines(for: command, in: dir.path, stdout: r.stdout)
        }
        let manifest = Self.folder + "/outputs.txt"
        if ProcessInfo.processInfo.environment["ADAPTER_GOLDEN_RECORD"] == "1" {
            try Data((got.joined(separator: "\n") + "\n").utf8).write(to: URL(fileURLWithPath: manifest))
            return
        }
        let expected = try String(contentsOfFile: manifest, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(got.count > 100, "only \(got.count) outputs: the command list did not run")
        let missing = Set(expected).subtracting(got).sorted(), extra = Set(got).subtracting(expected).sorted()
        #expect(missing.isEmpty && extra.isEmpty, "outputs differ from the recording:\nexpected, not produced:\n\(missing.joined(separator: "\n"))\nproduced, not expected:\n\(extra.joined(separator: "\n"))")
    }
}
