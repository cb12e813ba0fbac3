import Foundation
import Testing

let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url.path }
    }
    fatalError("Package.swift not found")
}()

func fixture(_ relative: String) -> String { packageRoot + "/Fixtures/" + relative }

/// The built `adapter` executable, beside the test bundle.
let adapterBinary: String = {
    var dir = Bundle.main.bundleURL
    for _ in 0..<3 {
        let candidate = dir.appendingPathComponent("adapter").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir.deleteLastPathComponent()
    }
    return packageRoot + "/.build/debug/adapter"
}()

struct CLIResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs `adapter` with arguments, no standard input, and captures everything.
func adapter(_ arguments: String...) throws -> CLIResult {
    try adapter(arguments)
}

func adapter(_ arguments: [String], environment: [String: String] = [:]) throws -> CLIResult {
    try runCapturing(adapterBinary, arguments,
                     environment: environment.isEmpty ? nil : ProcessInfo.processInfo.environment.merging(environment) { $1 })
}

/// Runs a program with no standard input and captures its output and status.
func runCapturing(_ executable: String, _ arguments: [String], environment: [String: String]? = nil) throws -> CLIResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return CLIResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
}

struct TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "adapter-cli-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    func write(_ name: String, _ bytes: [UInt8]) -> String {
        let p = file(name)
        precondition(FileManager.default.createFile(atPath: p, contents: Data(bytes)))
        return p
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

func parseJSONObject(_ text: String) -> [String: Any]? {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
}

/// Checks the one-line error contract: status 1, nothing on stdout, one line on stderr.
func expectOneLineError(_ r: CLIResult, containing text: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(r.status == 1, "status \(r.status)", sourceLocation: sourceLocation)
    #expect(r.stdout.isEmpty, sourceLocation: sourceLocation)
    let lines = r.stderr.split(separator: "\n")
    #expect(lines.count == 1, "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stderr.contains(text), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(!r.stderr.contains("Fatal error"), sourceLocation: sourceLocation)
}

/// Whether `python3 -c "import safetensors, numpy"` works: some tests make their inputs or check
/// their outputs with the reference library, and skip (saying so) without it.
let pythonReferenceAvailable: Bool = {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", "import safetensors, numpy"]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    p.standardInput = FileHandle.nullDevice
    guard (try? p.run()) != nil else { return false }
    p.waitUntilExit()
    return p.terminationStatus == 0
}()

/// Shown when a test that needs the Python reference is skipped.
let pythonReferenceMissing: Comment = "skipped: needs python3 with numpy and safetensors (pip install numpy safetensors)"

/// Every file under `path` (or the file itself): relative name → bytes, link target for links.
func snapshot(_ path: String) -> [String: Data] {
    let fm = FileManager.default
    var out: [String: Data] = [:]
    func visit(_ full: String, _ relative: String) {
        guard let attributes = try? fm.attributesOfItem(atPath: full), let type = attributes[.type] as? FileAttributeType else { return }
        switch type {
        case .typeSymbolicLink:
            out[relative] = Data(("-> " + ((try? fm.destinationOfSymbolicLink(atPath: full)) ?? "?")).utf8)
        case .typeDirectory:
            out[relative + "/"] = Data()
            for name in ((try? fm.contentsOfDirectory(atPath: full)) ?? []).sorted() { visit(full + "/" + name, relative + "/" + name) }
        default:
            out[relative] = fm.contents(atPath: full) ?? Data()
        }
    }
    visit(path, ".")
    return out
}
