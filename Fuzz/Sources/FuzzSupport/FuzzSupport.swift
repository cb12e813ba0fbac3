import CLibFuzzer
import Foundation

/// A private scratch folder per fuzzing process, for the parsers that take a path.
///
/// It lives on /dev/shm when there is one, so the file written per input never touches a disk.
public enum Scratch {
    public static let folder: String = {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let path = base + "/adapter-fuzz-\(getpid())"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        atexit { try? FileManager.default.removeItem(atPath: Scratch.folder) }
        return path
    }()

    /// Writes `bytes` to `name` inside the scratch folder (or `subfolder`) and returns the path.
    public static func write(_ bytes: UnsafeRawBufferPointer, as name: String, in subfolder: String? = nil) -> String {
        var dir = folder
        if let subfolder {
            dir += "/" + subfolder
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        let path = dir + "/" + name
        let data = bytes.count == 0 ? Data() : Data(bytes: bytes.baseAddress!, count: bytes.count)
        guard FileManager.default.createFile(atPath: path, contents: data) else { fatalError("cannot write \(path)") }
        return path
    }

    /// Copies a fixture (relative to Fixtures/) into a subfolder once, under `name`.
    public static func install(fixture: String, as name: String, in subfolder: String) {
        let dir = folder + "/" + subfolder
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let target = dir + "/" + name
        if FileManager.default.fileExists(atPath: target) { return }
        guard FileManager.default.createFile(atPath: target, contents: FileManager.default.contents(atPath: fixturesRoot + "/" + fixture)) else {
            fatalError("cannot install fixture \(fixture)")
        }
    }

    /// The repository's Fixtures folder: $ADAPTER_FIXTURES, or found from this source file.
    public static let fixturesRoot: String = {
        if let env = ProcessInfo.processInfo.environment["ADAPTER_FIXTURES"] { return env }
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<4 { url.deleteLastPathComponent() }
        return url.path + "/Fixtures"
    }()
}

/// Hands the fuzzer's input to `body` as a buffer (empty inputs have no base address).
public func withInput(_ data: UnsafePointer<UInt8>?, _ size: Int, _ body: (UnsafeRawBufferPointer) -> Void) {
    body(UnsafeRawBufferPointer(start: size == 0 ? nil : data, count: size))
}

/// A libFuzzer entry point: `LLVMFuzzerTestOneInput`'s signature.
public typealias FuzzTest = @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32

/// Hands the process to libFuzzer's driver with the target's test function; never returns.
public func runLibFuzzer(_ test: FuzzTest) -> Never {
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, test))
}
