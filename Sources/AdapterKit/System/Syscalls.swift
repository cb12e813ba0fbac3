// Every libc call of the library goes through this file; the rest of the code sees Swift values.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// An operating-system failure, with the path and the operation that failed.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let operation: String
    public let code: Int32

    /// The failure without the path: "open failed: No such file or directory".
    public var reason: String { "\(operation) failed: \(String(cString: strerror(code)))" }

    public var description: String { "\(path): \(reason)" }
}

@inline(__always) func currentErrno() -> Int32 { errno }

/// An open file descriptor, closed when the value is dropped.
public final class FileDescriptor: @unchecked Sendable {
    public let rawValue: Int32
    public let path: String

    init(rawValue: Int32, path: String) {
        self.rawValue = rawValue
        self.path = path
    }

    deinit { _ = Glibc.close(rawValue) }

    /// Opens an existing file for reading.
    public static func openForReading(_ path: String) throws -> FileDescriptor {
        let fd = retryingEINTR { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw SystemError(path: path, operation: "open", code: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Creates a new file that must not exist yet (O_EXCL), readable by everyone as a model file is.
    public static func createExclusive(_ path: String) throws -> FileDescriptor {
        let fd = retryingEINTR { Glibc.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644) }
        guard fd >= 0 else { throw SystemError(path: path, operation: "create", code: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Opens whatever is at `path` (a file or a folder) only to lock it: never follows a final
    /// symbolic link, and never blocks on a FIFO.
    public static func openForLocking(_ path: String) throws -> FileDescriptor {
        let fd = retryingEINTR { Glibc.open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC) }
        guard fd >= 0 else { throw SystemError(path: path, operation: "open", code: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Takes an exclusive flock without waiting; false when another open file holds one (or the
    /// file system has no flock). Released when the last descriptor of this open file is closed.
    public func tryLock() -> Bool {
        retryingEINTR { flock(rawValue, LOCK_EX | LOCK_NB) } == 0
    }

    /// File size and type from fstat.
    public func status() throws -> (size: Int, isRegular: Bool) {
        var st = stat()
        guard fstat(rawValue, &st) == 0 else { throw SystemError(path: path, operation: "stat", code: errno) }
        return (Int(st.st_size), (st.st_mode & S_IFMT) == S_IFREG)
    }

    /// Reads exactly `count` bytes at `offset`, or fewer only at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(path: path, operation: "read", code: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads `count` bytes at `offset` into a new array; fewer at end of file.
    public func readBytes(count: Int, at offset: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = try bytes.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        if n < count { bytes.removeLast(count - n) }
        return bytes
    }

    /// Writes every byte, looping over short writes and EINTR.
    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.write(rawValue, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(path: path, operation: "write", code: errno)
            }
            done += n
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try writeAll($0) }
    }

    /// Copies `count` bytes from `source` at `offset` to the end of this file, in the kernel where it can.
    public func copy(from source: FileDescriptor, offset: Int, count: Int) throws {
        var inOffset = off_t(offset)
        var remaining = count
        while remaining > 0 {
            let n = sendfile(rawValue, source.rawValue, &inOffset, min(remaining, 1 << 30))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP {
                    try copyByReading(from: source, offset: Int(inOffset), count: remaining)
                    return
                }
                throw SystemError(path: path, operation: "copy", code: errno)
            }
            if n == 0 { throw SystemError(path: source.path, operation: "read (file shrank)", code: EIO) }
            remaining -= n
        }
    }

    private func copyByReading(from source: FileDescriptor, offset: Int, count: Int) throws {
        let chunk = 8 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: min(chunk, max(count, 1)), alignment: 64)
        defer { buffer.deallocate() }
        var done = 0
        while done < count {
            let want = min(buffer.count, count - done)
            let got = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: offset + done)
            if got < want { throw SystemError(path: source.path, operation: "read (file shrank)", code: EIO) }
            try writeAll(UnsafeRawBufferPointer(rebasing: buffer[0..<want]))
            done += want
        }
    }

    /// Flushes the file's data to the device, so a rename never exposes an empty file after a crash.
    public func sync() throws {
        guard fsync(rawValue) == 0 else { throw SystemError(path: path, operation: "fsync", code: errno) }
    }
}

@inline(__always) private func retryingEINTR(_ body: () -> Int32) -> Int32 {
    while true {
        let r = body()
        if r < 0 && errno == EINTR { continue }
        return r
    }
}

/// A read-only memory map of a whole file. Pages are touched only when read.
public final class MappedFile: @unchecked Sendable {
    public let base: UnsafeRawPointer?
    public let count: Int
    public let path: String

    public init(_ fd: FileDescriptor, count: Int) throws {
        self.count = count
        self.path = fd.path
        if count == 0 {
            base = nil
            return
        }
        let p = mmap(nil, count, PROT_READ, MAP_SHARED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError(path: fd.path, operation: "mmap", code: errno) }
        base = UnsafeRawPointer(p)
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), count) }
    }

    /// The bytes in `range`; the caller has validated the range against `count`.
    public func bytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)
    }

    /// Hints that `range` will be read soon, in order.
    public func willNeed(_ range: Range<Int>) {
        advise(range, MADV_WILLNEED)
    }

    /// Drops the pages of `range` from this process, so streaming over a model keeps memory flat.
    public func release(_ range: Range<Int>) {
        advise(range, MADV_DONTNEED)
    }

    private func advise(_ range: Range<Int>, _ advice: Int32) {
        guard let base, !range.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = range.lowerBound / page * page
        let end = min(count, range.upperBound)
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, advice)
    }
}

/// Small file-system queries and moves used by the checkpoint and output code.
public enum FileSystem {
    public enum Kind: Sendable { case missing, file, directory, other }

    /// What is at `path`, following symbolic links.
    public static func kind(_ path: String) -> Kind {
        var st = stat()
        guard stat(path, &st) == 0 else { return .missing }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .file
        case S_IFDIR: return .directory
        default: return .other
        }
    }

    /// What is at `path` itself, a symbolic link not followed.
    public enum EntryKind: Sendable, Equatable { case missing, file, directory, symbolicLink, other }

    public static func entryKind(_ path: String) -> EntryKind {
        var st = stat()
        guard lstat(path, &st) == 0 else { return .missing }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .file
        case S_IFDIR: return .directory
        case S_IFLNK: return .symbolicLink
        default: return .other
        }
    }

    /// Bytes held by a file or a folder tree (symbolic links not followed).
    public static func treeSize(_ path: String) -> Int {
        var st = stat()
        guard lstat(path, &st) == 0 else { return 0 }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { return Int(st.st_size) }
        return ((try? contents(ofDirectory: path)) ?? []).reduce(0) { $0 + treeSize(path + "/" + $1) }
    }

    /// Whether anything, even a dangling symbolic link, is at `path`.
    public static func exists(noFollow path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    /// The canonical absolute path (symbolic links resolved), or nil when it does not exist.
    public static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// The entries of a directory, sorted by name, without `.` and `..`.
    public static func contents(ofDirectory path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw SystemError(path: path, operation: "open directory", code: errno) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
    }

    public static func makeDirectory(_ path: String) throws {
        guard mkdir(path, 0o755) == 0 else { throw SystemError(path: path, operation: "mkdir", code: errno) }
    }

    /// Renames `from` to `to`; both are in one folder, so the rename is atomic.
    public static func rename(_ from: String, to: String) throws {
        guard Glibc.rename(from, to) == 0 else { throw SystemError(path: to, operation: "rename", code: errno) }
    }

    /// The result of a rename that may not be available on every kernel and file system.
    public enum RenameOutcome: Sendable, Equatable {
        case done
        /// This kernel, C library or file system does not offer it (ENOSYS, EINVAL, EOPNOTSUPP).
        case unsupported
        /// Failed with this errno.
        case failed(Int32)
    }

    /// `renameat2(2)` flags, from linux/fs.h.
    static let renameNoReplace: UInt32 = 1
    static let renameExchange: UInt32 = 2

    private typealias Renameat2 = @convention(c) (Int32, UnsafePointer<CChar>?, Int32, UnsafePointer<CChar>?, UInt32) -> Int32

    /// glibc's renameat2 (2.28 and later), found at run time: Swift's Glibc module does not declare it.
    private static let renameat2Function: Renameat2? = {
        guard TestHook.environment["ADAPTER_TEST_RENAMEAT2"] != "unsupported",
              let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, "renameat2") else { return nil }
        return unsafeBitCast(symbol, to: Renameat2.self)
    }()

    private static func renameat2(_ from: String, _ to: String, flags: UInt32) -> RenameOutcome {
        guard let function = renameat2Function else { return .unsupported }
        while true {
            if function(AT_FDCWD, from, AT_FDCWD, to, flags) == 0 { return .done }
            switch errno {
            case EINTR: continue
            case ENOSYS, EINVAL, EOPNOTSUPP: return .unsupported
            case let e: return .failed(e)
            }
        }
    }

    /// Atomically swaps two paths (`renameat2(RENAME_EXCHANGE)`): both exist before and after.
    public static func exchange(_ a: String, _ b: String) -> RenameOutcome {
        renameat2(a, b, flags: renameExchange)
    }

    /// Renames `from` to `to` only if nothing is at `to`, atomically (`renameat2(RENAME_NOREPLACE)`).
    public static func renameNoReplace(_ from: String, to: String) -> RenameOutcome {
        renameat2(from, to, flags: renameNoReplace)
    }

    /// rename(2): replaces a file or symbolic link at `to`, or an empty folder when `from` is a folder.
    public static func renameReplacing(_ from: String, to: String) -> RenameOutcome {
        Glibc.rename(from, to) == 0 ? .done : .failed(errno)
    }

    /// link(2): a second name for a file; fails with EEXIST when anything is at `to`.
    public static func hardLink(_ from: String, to: String) -> RenameOutcome {
        if Glibc.link(from, to) == 0 { return .done }
        switch errno {
        case EPERM, EOPNOTSUPP, ENOSYS, EXDEV, EMLINK: return .unsupported
        case let e: return .failed(e)
        }
    }

    /// Removes one name of a file (not a folder).
    public static func unlinkFile(_ path: String) {
        _ = Glibc.unlink(path)
    }

    /// Whether no process has this pid any more (kill(pid, 0) fails with ESRCH). A pid that
    /// exists, even one this user may not signal, counts as alive.
    public static func processIsGone(_ pid: Int32) -> Bool {
        guard pid > 0 else { return false }
        return kill(pid, 0) != 0 && errno == ESRCH
    }

    /// Removes a file or a whole folder tree; missing paths are fine. Never follows symbolic links.
    public static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in (try? contents(ofDirectory: path)) ?? [] { removeTree(path + "/" + name) }
            rmdir(path)
        } else {
            unlink(path)
        }
    }

    /// Syncs a folder so that renames inside it are durable.
    public static func syncDirectory(_ path: String) {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        Glibc.close(fd)
    }

    public static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) != 0 }

    public static var processID: Int32 { getpid() }

    /// Ends the process at once, without exit handlers (from a signal-handling thread, while the
    /// main thread may still be running).
    public static func exitImmediately(_ status: Int32) -> Never {
        _exit(status)
    }

    /// Sets `signal` to be ignored (a dispatch source then receives it); returns whether it was
    /// already ignored when the process started, as `nohup` or a shell's background job leaves it.
    static func ignoreSignal(_ signal: Int32) -> Bool {
        let previous = Glibc.signal(signal, SIG_IGN)
        func bits(_ h: __sighandler_t?) -> Int { h.map { unsafeBitCast($0, to: Int.self) } ?? 0 }
        return bits(previous) == bits(SIG_IGN)
    }

    /// Sleeps the calling thread (test hooks only).
    static func sleep(milliseconds: Int) {
        _ = usleep(useconds_t(milliseconds) * 1000)
    }
}

/// Joins path components with `/` without touching the file system.
public func joinPath(_ base: String, _ name: String) -> String {
    if base.isEmpty { return name }
    return base.hasSuffix("/") ? base + name : base + "/" + name
}

/// The folder part of a path (`.` when there is none).
public func parentPath(_ path: String) -> String {
    var p = path
    while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
    guard let slash = p.lastIndex(of: "/") else { return "." }
    if slash == p.startIndex { return "/" }
    return String(p[..<slash])
}

/// The last component of a path.
public func lastPathComponent(_ path: String) -> String {
    var p = path
    while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
    guard let slash = p.lastIndex(of: "/") else { return p }
    return String(p[p.index(after: slash)...])
}
