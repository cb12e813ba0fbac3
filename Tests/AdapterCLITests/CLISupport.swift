import Foundation
import Testing
@_exported import AdapterTestSupport

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

typealias CLIResult = ProcessResult

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
    try runProcess(executable, arguments, environment: environment)
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
