import Foundation
import Testing
@testable import AdapterKit

/// The package root, found from this file's location.
let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url.path }
    }
    fatalError("Package.swift not found above \(#filePath)")
}()

func fixture(_ relative: String) -> String { packageRoot + "/Fixtures/" + relative }

/// A fresh folder under the system temporary folder, removed by `remove()`.
struct TempDir {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "adapter-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func file(_ name: String) -> String { path + "/" + name }

    func write(_ name: String, _ bytes: [UInt8]) -> String {
        let p = file(name)
        try! FileManager.default.createDirectory(atPath: parentPath(p), withIntermediateDirectories: true)
        precondition(FileManager.default.createFile(atPath: p, contents: Data(bytes)))
        return p
    }

    func write(_ name: String, text: String) -> String { write(name, Array(text.utf8)) }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A safetensors file from a header text and data bytes: the 8-byte length, the header, the data.
func safetensorsBytes(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
    let h = Array(header.utf8)
    let n = declaredLength ?? UInt64(h.count)
    var out: [UInt8] = (0..<8).map { UInt8(truncatingIfNeeded: n >> (8 * UInt64($0))) }
    out += h
    out += data
    return out
}

func readBytes(_ path: String) -> [UInt8] {
    [UInt8](FileManager.default.contents(atPath: path) ?? Data())
}

/// Writes tensors with the library's writer (reference layout) and returns the path.
@discardableResult
func writeSafetensors(_ path: String, _ tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])],
                      metadata: [(key: String, value: String)]? = ["format": "pt"].map { ($0.key, $0.value) }) throws -> String {
    let byName = Dictionary(tensors.map { ($0.name, $0.bytes) }, uniquingKeysWith: { first, _ in first })
    try SafetensorsWriter.write(into: try FileDescriptor.createExclusive(path), path: path,
                                tensors: tensors.map { TensorSpec(name: $0.name, dtype: $0.dtype, shape: $0.shape) },
                                metadata: metadata, sync: false) { t, writer in
        try byName[t.name]!.withUnsafeBytes { try writer.append($0) }
    }
    return path
}

func floatBytes(_ values: [Float]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }
func doubleBytes(_ values: [Double]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }

/// Whether `python3 -c "import safetensors, numpy"` works on this machine.
let pythonSafetensorsAvailable: Bool = {
    (try? runProcess("/usr/bin/env", ["python3", "-c", "import safetensors, numpy"]).status) == 0
}()

/// Shown when a test that needs the Python reference is skipped.
let pythonReferenceMissing: Comment = "skipped: needs python3 with numpy and safetensors (pip install numpy safetensors)"

struct ProcessResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs a program to completion and captures its output.
func runProcess(_ executable: String, _ arguments: [String], environment: [String: String]? = nil) throws -> ProcessResult {
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
