import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Helpers for the tests of what a model folder may hold besides its tensors (issue 12, items 4,
// 5, 14, 16 and 17): copies of the tiny model, links, FIFOs, names that are not UTF-8, a Hugging
// Face cache layout, and a run of the binary that cannot hang the suite.

let mosloraAdapter = fixture("adapters/moslora-original")

/// A copy of the tiny sharded LLaMA in `dir/name`.
func tinyModelCopy(_ dir: TempDir, _ name: String = "model") throws -> String {
    let target = dir.file(name)
    try FileManager.default.copyItem(atPath: fixture("models/tiny-llama"), toPath: target)
    return target
}

func makeSymlink(_ path: String, to destination: String) throws {
    try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: destination)
}

func folderEntries(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

/// The type of what is at `path`, not following a link.
func fileTypeNoFollow(_ path: String) -> FileAttributeType? {
    (try? FileManager.default.attributesOfItem(atPath: path))?[.type] as? FileAttributeType
}

/// Every byte under `path`, concatenated (to check that a secret did not get in).
func allRegularBytes(_ path: String) -> Data {
    var out = Data()
    guard let walker = FileManager.default.enumerator(atPath: path) else { return out }
    while let name = walker.nextObject() as? String {
        let full = path + "/" + name
        if fileTypeNoFollow(full) == .typeRegular { out += FileManager.default.contents(atPath: full) ?? Data() }
    }
    return out
}

/// The stderr lines that are notes.
func noteLines(_ r: CLIResult) -> [Substring] {
    r.stderr.split(separator: "\n").filter { $0.hasPrefix("adapter: note:") }
}

/// Runs `adapter` with a deadline: a command that hangs is killed after `seconds` and reported as
/// timed out, so a regression fails the test instead of stalling the suite.
func adapterWithDeadline(_ seconds: Double = 5, _ arguments: String...) throws -> (CLIResult, timedOut: Bool) {
    let dir = TempDir()
    defer { dir.remove() }
    _ = FileManager.default.createFile(atPath: dir.file("out"), contents: nil)
    _ = FileManager.default.createFile(atPath: dir.file("err"), contents: nil)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: adapterBinary)
    p.arguments = arguments
    p.standardInput = FileHandle.nullDevice
    p.standardOutput = FileHandle(forWritingAtPath: dir.file("out"))
    p.standardError = FileHandle(forWritingAtPath: dir.file("err"))
    try p.run()
    let deadline = Date().addingTimeInterval(seconds)
    while p.isRunning && Date() < deadline { usleep(20_000) }
    let timedOut = p.isRunning
    if timedOut {
        kill(p.processIdentifier, SIGKILL)
    }
    p.waitUntilExit()
    let read = { (name: String) in String(decoding: FileManager.default.contents(atPath: dir.file(name)) ?? Data(), as: UTF8.self) }
    return (CLIResult(status: p.terminationStatus, stdout: read("out"), stderr: read("err")), timedOut)
}

/// Makes a FIFO at `path`, replacing what is there.
func makeFIFO(_ path: String) throws {
    try? FileManager.default.removeItem(atPath: path)
    guard mkfifo(path, 0o644) == 0 else { throw CocoaError(.fileWriteUnknown) }
}

/// A path as bytes, for names that are not UTF-8.
func cPath(_ bytes: [UInt8]) -> [CChar] { bytes.map { CChar(bitPattern: $0) } + [0] }

/// The entry names of a folder as the kernel stores them.
func rawEntryNames(_ dir: String) -> [[UInt8]] {
    guard let d = opendir(dir) else { return [] }
    defer { closedir(d) }
    var out: [[UInt8]] = []
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
        if name != [46] && name != [46, 46] { out.append(name) }
    }
    return out.sorted { $0.lexicographicallyPrecedes($1) }
}

/// A Hugging Face hub cache entry for the tiny LLaMA: `models--org--tiny/{blobs,refs,snapshots/abc123}`,
/// every snapshot file a relative link `../../blobs/<hash>`, as huggingface_hub lays them out.
func hubCache(_ dir: TempDir) throws -> (repo: String, snapshot: String) {
    let repo = dir.file("hub/models--org--tiny")
    let snapshot = repo + "/snapshots/abc123"
    let fm = FileManager.default
    try fm.createDirectory(atPath: repo + "/blobs", withIntermediateDirectories: true)
    try fm.createDirectory(atPath: repo + "/refs", withIntermediateDirectories: true)
    try fm.createDirectory(atPath: snapshot, withIntermediateDirectories: true)
    try Data("abc123".utf8).write(to: URL(fileURLWithPath: repo + "/refs/main"))
    for (i, name) in folderEntries(fixture("models/tiny-llama")).enumerated() {
        let blob = String(format: "%040x", 0xb10b_0000 + i)
        try fm.copyItem(atPath: fixture("models/tiny-llama/" + name), toPath: repo + "/blobs/" + blob)
        try makeSymlink(snapshot + "/" + name, to: "../../blobs/" + blob)
    }
    return (repo, snapshot)
}


func parentPathOf(_ path: String) -> String { (path as NSString).deletingLastPathComponent }
