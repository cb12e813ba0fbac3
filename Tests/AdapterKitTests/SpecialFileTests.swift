import Foundation
import Testing
@testable import AdapterKit
#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` on its own thread and waits at most `seconds`. If it has not returned by then, the
/// FIFO at `fifo` is opened for writing and closed, which ends a reader blocked on it, so a
/// regression fails this test instead of hanging the suite. Returns the error `body` threw, or
/// nil, and whether it had to be unblocked.
private func withFIFOGuard(_ fifo: String, seconds: Double = 3, _ body: @escaping @Sendable () throws -> Void) -> (error: String?, hung: Bool) {
    final class Box: @unchecked Sendable { var error: String?; let done = DispatchSemaphore(value: 0) }
    let box = Box()
    Thread.detachNewThread {
        do { try body() } catch { box.error = String(describing: error) }
        box.done.signal()
    }
    if box.done.wait(timeout: .now() + seconds) == .success { return (box.error, false) }
    // Unblock the reader: a writer that opens and closes gives it end of file.
    let fd = open(fifo, O_WRONLY | O_NONBLOCK)
    if fd >= 0 { close(fd) }
    _ = box.done.wait(timeout: .now() + 5)
    return (box.error, true)
}

@Suite("special files: FIFOs, sockets and devices are refused, never read")
struct SpecialFileTests {
    @Test("readJSONFile of a FIFO refuses it at once")
    func jsonFIFO() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fifo = dir.file("config.json")
        #expect(mkfifo(fifo, 0o644) == 0)
        let (error, hung) = withFIFOGuard(fifo) { _ = try readJSONFile(fifo) }
        #expect(!hung, "readJSONFile waited on a FIFO")
        #expect(error?.contains("FIFO") == true, "\(error ?? "no error")")
    }

    @Test("openTensorFile of a FIFO refuses it at once")
    func tensorFIFO() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fifo = dir.file("model.safetensors")
        #expect(mkfifo(fifo, 0o644) == 0)
        let (error, hung) = withFIFOGuard(fifo) { _ = try openTensorFile(fifo) }
        #expect(!hung, "openTensorFile waited on a FIFO")
        #expect(error?.contains("FIFO") == true, "\(error ?? "no error")")
    }

    @Test("a character device is refused by name of its kind", arguments: ["/dev/zero", "/dev/null"])
    func device(_ path: String) throws {
        for body in [{ _ = try readJSONFile(path) }, { _ = try openTensorFile(path) }] as [() throws -> Void] {
            do {
                try body()
                Issue.record("\(path) was accepted")
            } catch {
                #expect(String(describing: error).contains("device"), "\(error)")
            }
        }
    }
}
