import Foundation
import Testing

// What both test targets need: where the package and its fixtures are, temporary folders, running
// a program, and whether the Python reference is installed.

/// The package root, found from this file's location.
public let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url.path }
    }
    fatalError("Package.swift not found above \(#filePath)")
}()

public func fixture(_ relative: String) -> String { packageRoot + "/Fixtures/" + relative }

/// A fresh folder under the system temporary folder, removed by `remove()`.
public struct TempDir: Sendable {
    public let path: String

    public init() {
        path = NSTemporaryDirectory() + "adapter-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    /// Writes `bytes` at `name` (creating its folders) and returns the path.
    @discardableResult
    public func write(_ name: String, _ bytes: [UInt8]) -> String {
        let p = file(name)
        try! FileManager.default.createDirectory(atPath: URL(fileURLWithPath: p).deletingLastPathComponent().path, withIntermediateDirectories: true)
        precondition(FileManager.default.createFile(atPath: p, contents: Data(bytes)))
        return p
    }

    @discardableResult
    public func write(_ name: String, text: String) -> String { write(name, Array(text.utf8)) }

    public func remove() { try? FileManager.default.removeItem(atPath: path) }
}

public func readBytes(_ path: String) -> [UInt8] {
    [UInt8](FileManager.default.contents(atPath: path) ?? Data())
}

/// A finished program: its status and everything it printed.
public struct ProcessResult: Sendable {
    public let status: Int32
    public let stdout: String
    public let stderr: String

    public init(status: Int32, stdout: String, stderr: String) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// Runs a program with no standard input, to completion, and captures its output.
public func runProcess(_ executable: String, _ arguments: [String], environment: [String: String]? = nil) throws -> ProcessResult {
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
    return ProcessResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
}

/// Whether `python3 -c "import safetensors, numpy"` works: some tests make their inputs or check
/// their outputs with the reference library, and skip (saying so) without it.
public let pythonReferenceAvailable: Bool = {
    (try? runProcess("/usr/bin/env", ["python3", "-c", "import safetensors, numpy"]).status) == 0
}()

/// Shown when a test that needs the Python reference is skipped.
public let pythonReferenceMissing: Comment = "skipped: needs python3 with numpy and safetensors (pip install numpy safetensors)"
