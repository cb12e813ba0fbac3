// Every libc call of the library goes through this file; the rest of the code sees Swift values.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import CGuardedRead

/// An operating-system failure, with the path and the operation that failed.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let operation: String
    public let code: Int32
    /// Set instead of an errno text when the refusal is ours (a FIFO where a file was expected).
    let detail: String?

    public init(path: String, operation: String, code: Int32) {
        self.path = path
        self.operation = operation
        self.code = code
        self.detail = nil
    }

    /// `path` is not a regular file: a FIFO, socket, device or folder where a file must be read.
    init(path: String, notRegular type: FileType) {
        self.path = path
        self.operation = "open"
        self.code = EINVAL
        self.detail = "not a regular file but \(type.phrase)"
    }

    /// The failure without the path: "open failed: No such file or directory".
    public var reason: String { detail ?? "\(operation) failed: \(String(cString: strerror(code)))" }

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

    /// Opens an existing regular file for reading. Anything else is refused before a byte is read:
    /// the open is non-blocking (a FIFO without a writer would otherwise wait forever, and a
    /// device open has no side effect beyond that), and the file type is checked with fstat.
    public static func openForReading(_ path: String) throws -> FileDescriptor {
        try openForReading(RawPath(path), followingLink: true)
    }

    /// As `openForReading(_: String)`, for a path of any bytes; with `followingLink` false a
    /// symbolic link at `path` is refused (ELOOP) instead of followed.
    public static func openForReading(_ path: RawPath, followingLink: Bool) throws -> FileDescriptor {
        let flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | (followingLink ? 0 : O_NOFOLLOW)
        let fd = path.withCString { p in retryingEINTR { Glibc.open(p, flags) } }
        guard fd >= 0 else { throw SystemError(path: path.display, operation: "open", code: errno) }
        let descriptor = FileDescriptor(rawValue: fd, path: path.display)
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError(path: path.display, operation: "stat", code: errno) }
        let type = FileType(mode: st.st_mode)
        guard type == .regular else { throw SystemError(path: path.display, notRegular: type) }
        // Reads of a regular file never block; clear the flag so the descriptor behaves as usual.
        let current = fcntl(fd, F_GETFL)
        if current >= 0 { _ = fcntl(fd, F_SETFL, current & ~O_NONBLOCK) }
        return descriptor
    }

    /// Creates a new file that must not exist yet (O_EXCL), readable by everyone as a model file is.
    public static func createExclusive(_ path: String) throws -> FileDescriptor {
        try createExclusive(RawPath(path))
    }

    /// As `createExclusive(_: String)`, for a path of any bytes.
    public static func createExclusive(_ path: RawPath) throws -> FileDescriptor {
        let fd = path.withCString { p in retryingEINTR { Glibc.open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o644) } }
        guard fd >= 0 else { throw SystemError(path: path.display, operation: "create", code: errno) }
        return FileDescriptor(rawValue: fd, path: path.display)
    }

    /// Creates a new private scratch file (O_EXCL, mode 0600) open for reading and writing.
    public static func createScratch(_ path: String) throws -> FileDescriptor {
        let fd = RawPath(path).withCString { p in retryingEINTR { Glibc.open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600) } }
        guard fd >= 0 else { throw SystemError(path: path, operation: "create", code: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Copies the regular file at `source` to a new file at `target` (which must not exist), in
    /// the kernel where possible, fsyncing it with `sync`. The one file copier: a folder's other
    /// files (whose links are not followed: what was checked to be a regular file must still be
    /// one), an index kept as it was (a Hub cache's index is a link into its blobs).
    static func copyFile(_ source: RawPath, to target: RawPath, followingLink: Bool, sync: Bool) throws {
        let input = try openForReading(source, followingLink: followingLink)
        let output = try createExclusive(target)
        try output.copy(from: input, offset: 0, count: try input.status().size)
        if sync { try output.sync() }
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

    /// Copies through this process's memory, each block shown to `observe` (a checksum) before it
    /// is written; also the fallback of `copy` where the kernel cannot copy.
    func copyByReading(from source: FileDescriptor, offset: Int, count: Int,
                       observe: ((UnsafeRawBufferPointer) -> Void)? = nil) throws {
        let chunk = 8 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: min(chunk, max(count, 1)), alignment: 64)
        defer { buffer.deallocate() }
        var done = 0
        while done < count {
            let want = min(buffer.count, count - done)
            let got = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: offset + done)
            if got < want { throw SystemError(path: source.path, operation: "read (file shrank)", code: EIO) }
            let block = UnsafeRawBufferPointer(rebasing: buffer[0..<want])
            observe?(block)
            try writeAll(block)
            done += want
        }
    }

    /// Hints that `range` will be read soon (posix_fadvise WILLNEED); never touches the data.
    public func adviseWillNeed(_ range: Range<Int>) {
        guard !range.isEmpty else { return }
        _ = posix_fadvise(rawValue, off_t(range.lowerBound), off_t(range.count), POSIX_FADV_WILLNEED)
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

/// A read-only memory map of a whole file. Pages are touched only when read, and only through
/// guarded copies (`copy`) or scoped views: the mapping's address never leaves this type.
final class MappedFile: @unchecked Sendable {
    private let base: UnsafeRawPointer?
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
    func bytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)
    }

    /// Copies `range` into `destination`; false when the file shrank under the map (the read
    /// raised SIGBUS, which the copy turns into this result). Use for every read of mapped data.
    public func copy(_ range: Range<Int>, to destination: UnsafeMutableRawPointer) -> Bool {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        guard let base, !range.isEmpty else { return true }
        return adapter_guarded_copy(destination, base + range.lowerBound, range.count) == 0
    }

    /// Whether a fault inside `copy` is recovered (false only in ThreadSanitizer test builds).
    public static var guardedCopyRecovers: Bool { adapter_guarded_copy_recovers() == 1 }

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

/// A path or file name as the kernel sees it: bytes other than NUL, not necessarily UTF-8 (a Swift
/// String would replace invalid bytes, so a file named so could not be opened or copied exactly).
public struct RawPath: Hashable, Comparable, Sendable {
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }
    public init(_ string: String) { bytes = Array(string.utf8) }

    /// `self/name`.
    public func appending(_ name: RawPath) -> RawPath {
        if bytes.isEmpty { return name }
        return RawPath(bytes: bytes.last == 0x2F ? bytes + name.bytes : bytes + [0x2F] + name.bytes)
    }

    /// The path as a String when its bytes are valid UTF-8; nil otherwise.
    public var string: String? { String(validating: bytes, as: UTF8.self) }

    /// For messages: valid UTF-8 as it is, every other byte as `\xNN`.
    public var display: String {
        if let string { return string }
        var out = ""
        var rest = bytes[...]
        while !rest.isEmpty {
            // The longest valid prefix, then one byte escaped.
            var end = rest.endIndex
            while end > rest.startIndex, String(validating: rest[rest.startIndex..<end], as: UTF8.self) == nil { end -= 1 }
            if end > rest.startIndex {
                out += String(validating: rest[rest.startIndex..<end], as: UTF8.self)!
                rest = rest[end...]
            } else {
                out += "\\x" + String(rest.first!, radix: 16, uppercase: true).leftPadded(to: 2)
                rest = rest.dropFirst()
            }
        }
        return out
    }

    public static func < (a: RawPath, b: RawPath) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }

    func withCString<R>(_ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        try (bytes + [0]).withUnsafeBufferPointer { buffer in
            try buffer.withMemoryRebound(to: CChar.self) { try body($0.baseAddress!) }
        }
    }
}

private extension String {
    func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// Which file an object is: its device and inode.
public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}

/// The type of a file-system object, as stat reports it.
public enum FileType: Sendable, Equatable {
    case regular, directory, symbolicLink, fifo, socket, characterDevice, blockDevice, unknown

    init(mode: mode_t) {
        switch mode & S_IFMT {
        case S_IFREG: self = .regular
        case S_IFDIR: self = .directory
        case S_IFLNK: self = .symbolicLink
        case S_IFIFO: self = .fifo
        case S_IFSOCK: self = .socket
        case S_IFCHR: self = .characterDevice
        case S_IFBLK: self = .blockDevice
        default: self = .unknown
        }
    }

    /// "a FIFO (named pipe)", for messages.
    public var phrase: String {
        switch self {
        case .regular: "a regular file"
        case .directory: "a folder"
        case .symbolicLink: "a symbolic link"
        case .fifo: "a FIFO (named pipe)"
        case .socket: "a socket"
        case .characterDevice: "a character device"
        case .blockDevice: "a block device"
        case .unknown: "a special file"
        }
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

    /// The type of what is at `path` (following symbolic links unless `following` is false), or
    /// nil when nothing is there.
    public static func type(_ path: String, following: Bool = true) -> FileType? {
        var st = stat()
        guard (following ? stat(path, &st) : lstat(path, &st)) == 0 else { return nil }
        return FileType(mode: st.st_mode)
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

    /// The entries of a directory whose names are valid UTF-8, sorted by name, without `.` and
    /// `..`. Names that are not UTF-8 are left out here (a String cannot hold them exactly); code
    /// that must see every entry — copying a folder, removing one — uses `entries(ofDirectory:)`.
    public static func contents(ofDirectory path: String) throws -> [String] {
        try entries(ofDirectory: RawPath(path), followingLink: true).compactMap(\.string)
    }

    /// Every entry of a directory as the kernel names it, sorted bytewise, without `.` and `..`.
    /// With `followingLink` false a symbolic link at `path` is refused (ELOOP) rather than listed.
    public static func entries(ofDirectory path: RawPath, followingLink: Bool) throws -> [RawPath] {
        let flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK | (followingLink ? 0 : O_NOFOLLOW)
        let fd = path.withCString { p in retryingEINTR { Glibc.open(p, flags) } }
        guard fd >= 0 else { throw SystemError(path: path.display, operation: "open directory", code: errno) }
        guard let dir = fdopendir(fd) else {
            let code = errno
            Glibc.close(fd)
            throw SystemError(path: path.display, operation: "open directory", code: code)
        }
        defer { closedir(dir) }
        var names: [RawPath] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
            if name != [0x2E] && name != [0x2E, 0x2E] { names.append(RawPath(bytes: name)) }
        }
        return names.sorted()
    }

    /// The type of what is at `path` (following a final symbolic link unless `following` is false).
    public static func type(_ path: RawPath, following: Bool) -> FileType? {
        var st = stat()
        let r = path.withCString { following ? stat($0, &st) : lstat($0, &st) }
        return r == 0 ? FileType(mode: st.st_mode) : nil
    }

    /// Device and inode of what is at `path`, not following a final link: the identity of a folder,
    /// so that a walk can tell a folder it has seen (a bind mount of a parent) from a new one.
    public static func identity(_ path: RawPath) -> FileIdentity? {
        var st = stat()
        guard path.withCString({ lstat($0, &st) }) == 0 else { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// The canonical absolute path of `path`, or nil when it (or what a link leads to) does not exist.
    public static func realPath(_ path: RawPath) -> RawPath? {
        guard let p = path.withCString({ realpath($0, nil) }) else { return nil }
        defer { free(p) }
        return RawPath(bytes: Array(UnsafeRawBufferPointer(start: p, count: strlen(p))))
    }

    public static func makeDirectory(_ path: RawPath) throws {
        guard path.withCString({ mkdir($0, 0o755) }) == 0 else { throw SystemError(path: path.display, operation: "mkdir", code: errno) }
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
        guard !TestHook.renameat2Unsupported,
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
        if TestHook.linksUnsupported { return .unsupported }
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
        removeTree(RawPath(path))
    }

    /// As `removeTree(_: String)`, for names of any bytes (a copied file whose name is not UTF-8).
    public static func removeTree(_ path: RawPath) {
        var st = stat()
        guard path.withCString({ lstat($0, &st) }) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in (try? entries(ofDirectory: path, followingLink: false)) ?? [] { removeTree(path.appending(name)) }
            _ = path.withCString { rmdir($0) }
        } else {
            _ = path.withCString { unlink($0) }
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

// MARK: - Standard streams

/// Standard output and error written with `write(2)`, every error seen.
///
/// A closed descriptor 0, 1 or 2 is reopened on /dev/null before anything else is opened, so that
/// no output file can get descriptor 2 and receive messages. Writing to standard output reports
/// every failure (a full disk, a closed pipe, a stdout that was closed): the caller turns it into
/// exit status 1. Writing to standard error never fails the program: a message that cannot be
/// shown is dropped, and a successful command stays successful.
public enum StandardStreams {
    private final class State: @unchecked Sendable {
        let lock = NSLock()
        var outputWasClosed = false
    }
    private static let state = State()

    /// Call first thing: reopens closed standard descriptors on /dev/null and ignores SIGPIPE
    /// (a closed pipe is then a write error, not a silent death).
    public static func prepare() {
        signal(SIGPIPE, SIG_IGN)
        for fd: Int32 in [0, 1, 2] where fcntl(fd, F_GETFD) == -1 && errno == EBADF {
            let null = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY)
            if null >= 0 && null != fd {
                _ = dup2(null, fd)
                _ = close(null)
            }
            if fd == 1 {
                state.lock.lock()
                state.outputWasClosed = true
                state.lock.unlock()
            }
        }
    }

    /// Writes all of `text` to standard output, or throws the write's error.
    public static func writeOutput(_ text: String) throws {
        state.lock.lock()
        let closed = state.outputWasClosed
        state.lock.unlock()
        if closed { throw SystemError(path: "standard output", operation: "write", code: EBADF) }
        try writeAll(1, Array(text.utf8), name: "standard output")
    }

    /// Writes `text` to standard error if it can; never fails.
    public static func writeError(_ text: String) {
        try? writeAll(2, Array(text.utf8), name: "standard error")
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], name: String) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(path: name, operation: "write", code: errno)
            }
            done += n
        }
    }
}
