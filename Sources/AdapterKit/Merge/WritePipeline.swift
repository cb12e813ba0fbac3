import Dispatch
import Foundation

/// Writes happen on one serial queue, in submission order, while the caller computes the next
/// blocks; a small pool of buffers bounds the memory in flight.
final class WritePipeline: @unchecked Sendable {
    let blockBytes: Int
    private let queue = DispatchQueue(label: "adapter.merge.write")
    private let available: DispatchSemaphore
    private let lock = NSLock()
    private var pool: [UnsafeMutableRawBufferPointer]
    private let all: [UnsafeMutableRawBufferPointer]
    private var failure: Error?

    init(buffers: Int, blockBytes: Int) {
        self.blockBytes = blockBytes
        all = (0..<buffers).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 64) }
        pool = all
        available = DispatchSemaphore(value: buffers)
    }

    deinit {
        queue.sync {}
        for b in all { b.deallocate() }
    }

    /// The first error a write met, if any.
    var error: Error? {
        lock.lock(); defer { lock.unlock() }
        return failure
    }

    private func record(_ e: Error) {
        lock.lock(); defer { lock.unlock() }
        if failure == nil { failure = e }
    }

    /// A buffer of at least `bytes`, waiting for one to come back from the writer when all are in flight.
    func acquire(bytes: Int) throws -> UnsafeMutableRawBufferPointer {
        if let e = error { throw e }
        if bytes > blockBytes {
            // A row larger than a block: a buffer of its own, freed after its write.
            return .allocate(byteCount: bytes, alignment: 64)
        }
        available.wait()
        lock.lock(); defer { lock.unlock() }
        return pool.removeLast()
    }

    /// Returns a buffer that was acquired but not submitted.
    func giveBack(_ buffer: UnsafeMutableRawBufferPointer) {
        recycle(buffer)
    }

    private func recycle(_ buffer: UnsafeMutableRawBufferPointer) {
        if buffer.count > blockBytes || !all.contains(where: { $0.baseAddress == buffer.baseAddress }) {
            buffer.deallocate()
            return
        }
        lock.lock()
        pool.append(buffer)
        lock.unlock()
        available.signal()
    }

    /// Writes `count` bytes of an acquired buffer with `writer`, then recycles the buffer.
    func write(_ buffer: UnsafeMutableRawBufferPointer, count: Int, with writer: any TensorFileWriter) {
        let job = Job(buffer: buffer, count: count, writer: writer)
        queue.async {
            defer { self.recycle(job.buffer) }
            guard self.error == nil else { return }
            do { try job.writer.append(UnsafeRawBufferPointer(rebasing: job.buffer[0..<job.count])) } catch { self.record(error) }
        }
    }

    /// Runs `work` on the writer queue after everything submitted before it.
    func submit(_ work: @escaping @Sendable () throws -> Void) {
        queue.async {
            guard self.error == nil else { return }
            do { try work() } catch { self.record(error) }
        }
    }

    /// Waits for every submitted write; throws the first failure.
    func drain() throws {
        queue.sync {}
        if let e = error { throw e }
    }

    private struct Job: @unchecked Sendable {
        let buffer: UnsafeMutableRawBufferPointer
        let count: Int
        let writer: any TensorFileWriter
    }
}

/// Lets a non-Sendable value cross into a writer-queue closure that is its only user from then on.
struct Handoff<T>: @unchecked Sendable {
    let value: T
}
