import CZlib
import Foundation

/// Why a zip archive (a PyTorch checkpoint's container) was refused: one line with the file and member.
public struct ZipError: Error, Sendable, CustomStringConvertible {
    public let file: String
    public let member: String?
    public let problem: String

    public init(file: String, member: String? = nil, problem: String) {
        self.file = file
        self.member = member
        self.problem = problem
    }

    public var description: String {
        if let member { return "\(file): zip member \(quotedForMessage(member)): \(problem)" }
        return "\(file): zip archive: \(problem)"
    }
}

/// A read-only zip archive whose every header is checked against the file before any member is used.
///
/// Members are read from a memory map through guarded copies (a file that shrinks meanwhile is an
/// error, never a SIGBUS); deflated members are inflated into a buffer
/// no larger than their declared size, or only as far as a caller needs (`inflate(_:keeping:)`). Only what torch writes is supported: one disk, no encryption,
/// stored (0) or deflated (8) members, ZIP64 sizes and offsets.
public final class ZipArchive: @unchecked Sendable {
    /// How a member's bytes are kept.
    public enum Method: Sendable { case stored, deflated }

    /// One member, with sizes and offsets already validated against the file.
    public struct Entry: Sendable {
        public let name: String
        public let method: Method
        public let crc32: UInt32
        public let compressedSize: Int
        public let uncompressedSize: Int
        /// Where the member's (possibly compressed) bytes start in the file.
        public let dataOffset: Int
        /// Where the member's local header starts.
        public let localHeaderOffset: Int
        let index: Int
    }

    /// Refuses more members than this: torch writes a handful plus one per storage.
    public static let maxEntries = 1_000_000
    /// Deflate cannot expand data more than about 1032:1; a header claiming more lies.
    static let maxDeflateRatio = 1032

    public let path: String
    public let fileSize: Int
    /// Members in central-directory order.
    public let entries: [Entry]
    private let lookup: [String: Int]
    private let map: MappedFile
    /// Kept open to notice a file that changes size after it was opened.
    private let descriptor: FileDescriptor
    private let lock = NSLock()
    private var checked: Set<Int> = []
    private var inflated = 0

    /// Opens `path` and validates the end records, the central directory and every local header.
    public init(path: String) throws {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.openForReading(path) } catch let e as SystemError {
            throw ZipError(file: path, problem: e.reason)
        }
        let status = try fd.status()
        guard status.isRegular else { throw ZipError(file: path, problem: "not a regular file") }
        self.path = path
        self.fileSize = status.size
        self.map = try MappedFile(fd, count: status.size)
        self.descriptor = fd
        let reader = ZipReader(path: path, map: map)
        let parsed = try reader.parseEntries()
        self.entries = parsed
        var lookup: [String: Int] = [:]
        for e in parsed {
            guard lookup[e.name] == nil else { throw ZipError(file: path, member: e.name, problem: "the name appears twice in the central directory") }
            lookup[e.name] = e.index
        }
        self.lookup = lookup
    }

    /// The member named exactly `name`.
    public func entry(named name: String) -> Entry? {
        lookup[name].map { entries[$0] }
    }

    /// Calls `body` with the member's uncompressed bytes, CRC-32 checked, in a buffer valid during `body`.
    public func withContents<R>(of entry: Entry, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        do {
            return try contents(entry, body)
        } catch is ZipError where (try? descriptor.status().size) != fileSize {
            // A CRC or deflate error on a file whose size changed says nothing about the archive:
            // it is being rewritten.
            throw changedWhileReading(entry)
        }
    }

    private func contents<R>(_ entry: Entry, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        switch entry.method {
        case .stored:
            // Copied out of the map through a guarded read: a file truncated meanwhile is an error, not a SIGBUS.
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(entry.compressedSize, 1), alignment: 64)
            defer { buffer.deallocate() }
            guard map.copy(entry.dataOffset..<(entry.dataOffset + entry.compressedSize), to: buffer.baseAddress!) else { throw changedWhileReading(entry) }
            let raw = UnsafeRawBufferPointer(rebasing: buffer[0..<entry.compressedSize])
            if !isChecked(entry.index) {
                try verifyCRC(entry, raw)
                markChecked(entry.index)
            }
            return try body(raw)
        case .deflated:
            let buffer = try inflate(entry, keeping: [0..<entry.uncompressedSize])
            defer { buffer.deallocate() }
            return try body(UnsafeRawBufferPointer(buffer))
        }
    }

    /// The member's bytes as an array, refused when larger than `limit`.
    public func contents(of entry: Entry, limit: Int) throws -> [UInt8] {
        guard entry.uncompressedSize <= limit else {
            throw ZipError(file: path, member: entry.name, problem: "\(entry.uncompressedSize) bytes, more than the \(limit)-byte limit for this member")
        }
        return try withContents(of: entry) { Array($0) }
    }

    /// Drops the mapped pages of a stored member from memory after use.
    public func release(_ entry: Entry) {
        map.release(entry.dataOffset..<(entry.dataOffset + entry.compressedSize))
    }

    /// Bytes zlib has produced for deflated members so far, kept or not: what reading this archive cost.
    public var inflatedByteCount: Int {
        lock.lock(); defer { lock.unlock() }
        return inflated
    }

    /// Inflates a deflated member from its start up to the end of the last of `ranges` and no further,
    /// keeping only the bytes inside them (the others pass through a small scratch buffer): the result,
    /// which the caller deallocates, holds the ranges' bytes one after another. The ranges must be
    /// sorted, disjoint and inside the member; at least one byte is allocated.
    ///
    /// Ranges that reach the member's end inflate it all: the stream must then end exactly at the
    /// declared size and the CRC-32 must match. Otherwise inflating stops early, so the CRC-32 (of the
    /// whole member) cannot be checked; the deflate stream is still checked as far as it is read.
    func inflate(_ entry: Entry, keeping ranges: [Range<Int>]) throws -> UnsafeMutableRawBufferPointer {
        precondition(entry.method == .deflated)
        precondition(zip(ranges, ranges.dropFirst()).allSatisfy { $0.upperBound <= $1.lowerBound })
        precondition((ranges.first?.lowerBound ?? 0) >= 0 && (ranges.last?.upperBound ?? 0) <= entry.uncompressedSize)
        let total = ranges.reduce(0) { $0 + $1.count }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 64)
        do {
            try inflate(entry, from: entry.dataOffset..<(entry.dataOffset + entry.compressedSize), keeping: ranges, into: buffer)
        } catch {
            buffer.deallocate()
            if error is ZipError, (try? descriptor.status().size) != fileSize { throw changedWhileReading(entry) }
            throw error
        }
        return buffer
    }

    private func changedWhileReading(_ entry: Entry) -> ZipError {
        ZipError(file: path, member: entry.name, problem: "the file changed while being read (it had \(fileSize) bytes when opened, now \((try? descriptor.status().size).map(String.init) ?? "unreadable")); nothing was written")
    }

    private func isChecked(_ i: Int) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return checked.contains(i)
    }

    private func markChecked(_ i: Int) {
        lock.lock(); defer { lock.unlock() }
        checked.insert(i)
    }

    private func countInflated(_ n: Int) {
        lock.lock(); defer { lock.unlock() }
        inflated += n
    }

    private func crcMismatch(_ entry: Entry, _ crc: uLong) -> ZipError {
        ZipError(file: path, member: entry.name, problem: "CRC-32 mismatch: the header says \(hex(entry.crc32)), the data gives \(hex(UInt32(truncatingIfNeeded: crc))); the file is corrupt")
    }

    private static func crc32(_ crc: uLong, _ bytes: UnsafeRawBufferPointer) -> uLong {
        var crc = crc
        var done = 0
        while done < bytes.count {
            let n = min(bytes.count - done, 1 << 30)
            if let base = bytes.baseAddress {
                crc = CZlib.crc32(crc, (base + done).assumingMemoryBound(to: Bytef.self), uInt(n))
            }
            done += n
        }
        return crc
    }

    private func verifyCRC(_ entry: Entry, _ bytes: UnsafeRawBufferPointer) throws {
        let crc = Self.crc32(CZlib.crc32(0, nil, 0), bytes)
        guard UInt32(truncatingIfNeeded: crc) == entry.crc32 else { throw crcMismatch(entry, crc) }
    }

    /// Inflates raw deflate data up to the end of the last range, writing the bytes inside the ranges
    /// one after another into `out`. Up to the declared size, the stream must end exactly there (more
    /// or fewer bytes is an error) and its CRC-32 must match.
    private func inflate(_ entry: Entry, from input: Range<Int>, keeping ranges: [Range<Int>],
                         into out: UnsafeMutableRawBufferPointer) throws {
        var stream = z_stream()
        guard inflateInit2_(&stream, -MAX_WBITS, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw ZipError(file: path, member: entry.name, problem: "zlib could not start inflating")
        }
        defer { inflateEnd(&stream) }
        let end = ranges.last?.upperBound ?? 0
        let whole = end == entry.uncompressedSize
        var crc = CZlib.crc32(0, nil, 0)
        let scratchSize = 64 << 10
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: scratchSize, alignment: 64)
        defer { scratch.deallocate() }
        // The compressed bytes come out of the map in chunks, through guarded copies (a file truncated
        // meanwhile is an error, not a SIGBUS); a chunk is refilled only once zlib has used it all.
        let staging = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, min(input.count, 4 << 20)), alignment: 64)
        defer { staging.deallocate() }
        var copied = 0  // bytes of input copied out so far
        stream.avail_in = 0
        var produced = 0  // bytes of output so far, from the member's start
        defer { countInflated(produced) }
        var k = 0         // the range being filled or waited for
        var kept = 0      // bytes written to `out` so far
        var extra: UInt8 = 0
        while true {
            if stream.avail_in == 0 && copied < input.count {
                let n = min(input.count - copied, staging.count)
                guard map.copy((input.lowerBound + copied)..<(input.lowerBound + copied + n), to: staging.baseAddress!) else {
                    throw changedWhileReading(entry)
                }
                stream.next_in = staging.baseAddress!.assumingMemoryBound(to: Bytef.self)
                stream.avail_in = uInt(n)
                copied += n
            }
            while k < ranges.count && produced >= ranges[k].upperBound { k += 1 }
            // Where this call's output goes: `out` inside a range, the scratch buffer between them.
            let target: UnsafeMutableRawPointer?
            let room: Int
            let keeping: Bool
            if k < ranges.count && produced >= ranges[k].lowerBound {
                target = out.baseAddress.map { $0 + kept }
                room = min(ranges[k].upperBound - produced, 1 << 30)
                keeping = true
            } else if produced < end {
                target = scratch.baseAddress
                room = min((k < ranges.count ? ranges[k].lowerBound : end) - produced, scratchSize)
                keeping = false
            } else if !whole {
                return  // every byte the caller needs is there; the rest of the member is not read
            } else {
                target = nil
                room = 0
                keeping = false
            }
            let result: Int32
            if let target, room > 0 {
                stream.next_out = target.assumingMemoryBound(to: Bytef.self)
                stream.avail_out = uInt(room)
                result = CZlib.inflate(&stream, Z_NO_FLUSH)
                let n = room - Int(stream.avail_out)
                if whole, n > 0 { crc = Self.crc32(crc, UnsafeRawBufferPointer(start: target, count: n)) }
                produced += n
                if keeping { kept += n }
            } else {
                // The declared size is reached: one more byte of output means the header lied.
                result = withUnsafeMutablePointer(to: &extra) { p in
                    stream.next_out = p
                    stream.avail_out = 1
                    return CZlib.inflate(&stream, Z_NO_FLUSH)
                }
                if stream.avail_out == 0 {
                    throw ZipError(file: path, member: entry.name, problem: "inflates to more than the declared \(entry.uncompressedSize) bytes (a zip bomb or a lying header)")
                }
            }
            switch result {
            case Z_STREAM_END:
                guard produced == entry.uncompressedSize else {
                    throw ZipError(file: path, member: entry.name, problem: "inflates to \(produced) bytes, not the declared \(entry.uncompressedSize)")
                }
                guard UInt32(truncatingIfNeeded: crc) == entry.crc32 else { throw crcMismatch(entry, crc) }
                return
            case Z_OK:
                continue
            case Z_BUF_ERROR:
                if copied >= input.count && stream.avail_in == 0 {
                    throw ZipError(file: path, member: entry.name, problem: "the deflate stream ends early (truncated data)")
                }
                continue
            default:
                let message = stream.msg.map { String(cString: $0) } ?? "code \(result)"
                throw ZipError(file: path, member: entry.name, problem: "invalid deflate data: \(message)")
            }
        }
    }
}

// MARK: - Header parsing

/// Little-endian reads over the mapped file; every read is bounds-checked and returns nil when out of
/// range. Reads go through guarded copies: a file that shrinks while it is parsed reads as out of
/// range (a one-line "truncated" error), never a SIGBUS.
struct ZipReader {
    let path: String
    let map: MappedFile

    /// The bytes of `range`, or nil when out of the file or unreadable (the file shrank).
    func slice(_ range: Range<Int>) -> [UInt8]? {
        guard range.lowerBound >= 0, range.upperBound <= map.count else { return nil }
        var out = [UInt8](repeating: 0, count: range.count)
        let ok = out.withUnsafeMutableBytes { map.copy(range, to: $0.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 8)!) }
        return ok ? out : nil
    }

    private func little(_ at: Int, _ n: Int) -> UInt64? {
        guard at >= 0, at <= map.count - n else { return nil }
        var v: UInt64 = 0
        let ok = withUnsafeMutableBytes(of: &v) { map.copy(at..<(at + n), to: $0.baseAddress!) }
        return ok ? UInt64(littleEndian: v) : nil
    }

    func u16(_ at: Int) -> Int? { little(at, 2).map { Int($0) } }

    func u32(_ at: Int) -> Int? { little(at, 4).map { Int($0) } }

    /// A u64 that must fit in Int (no real file is 2^63 bytes).
    func u64(_ at: Int) -> Int? {
        guard let v = little(at, 8) else { return nil }
        return v > UInt64(Int.max) ? nil : Int(v)
    }

    func fail(_ problem: String, _ member: String? = nil) -> ZipError {
        ZipError(file: path, member: member, problem: problem)
    }

    func need(_ v: Int?, _ what: String, _ member: String? = nil) throws -> Int {
        guard let v else { throw fail("\(what) lies outside the file (truncated or corrupt archive)", member) }
        return v
    }

    /// Where the end-of-central-directory record starts: searched backwards over the largest comment.
    func findEnd() throws -> Int {
        let size = map.count
        guard size >= 22 else { throw fail("the file is too short (\(size) bytes) to be a zip archive") }
        let lowest = max(0, size - 22 - 0xFFFF)
        var at = size - 22
        while at >= lowest {
            if u32(at) == 0x0605_4b50, let commentLength = u16(at + 20), at + 22 + commentLength == size {
                return at
            }
            at -= 1
        }
        throw fail("no end-of-central-directory record (truncated, or not a zip file)")
    }

    func parseEntries() throws -> [ZipArchive.Entry] {
        let end = try findEnd()
        var count = try need(u16(end + 10), "the entry count")
        var cdSize = try need(u32(end + 12), "the central directory size")
        var cdOffset = try need(u32(end + 16), "the central directory offset")
        let disk = try need(u16(end + 4), "the disk number")
        let cdDisk = try need(u16(end + 6), "the disk number")
        var limitOfCD = end
        if count == 0xFFFF || cdSize == 0xFFFF_FFFF || cdOffset == 0xFFFF_FFFF || disk == 0xFFFF {
            // ZIP64: a locator just before the end record points at the ZIP64 end record.
            let locator = end - 20
            guard locator >= 0, u32(locator) == 0x0706_4b50 else {
                throw fail("the end record asks for ZIP64 but the ZIP64 locator is missing")
            }
            let z64 = try need(u64(locator + 8), "the ZIP64 end record offset")
            guard z64 <= locator - 56, u32(z64) == 0x0606_4b50 else {
                throw fail("the ZIP64 end record is missing or misplaced")
            }
            guard try need(u32(z64 + 16), "the ZIP64 disk number") == 0, try need(u32(z64 + 20), "the ZIP64 disk number") == 0 else {
                throw fail("multi-disk archives are not supported")
            }
            count = try need(u64(z64 + 32), "the ZIP64 entry count")
            cdSize = try need(u64(z64 + 40), "the ZIP64 central directory size")
            cdOffset = try need(u64(z64 + 48), "the ZIP64 central directory offset")
            limitOfCD = z64
        } else {
            guard disk == 0, cdDisk == 0 else { throw fail("multi-disk archives are not supported") }
        }
        guard let cdEnd = cdOffset.addingReportingOverflowChecked(cdSize), cdEnd <= limitOfCD else {
            throw fail("the central directory (offset \(cdOffset), \(cdSize) bytes) does not fit before the end record")
        }
        guard count <= ZipArchive.maxEntries else { throw fail("\(count) members, more than the \(ZipArchive.maxEntries) allowed") }
        guard count <= cdSize / 46 else { throw fail("\(count) members cannot fit in a \(cdSize)-byte central directory") }

        var entries: [ZipArchive.Entry] = []
        entries.reserveCapacity(count)
        var at = cdOffset
        for index in 0..<count {
            entries.append(try parseCentral(at: &at, index: index, cdEnd: cdEnd))
        }
        guard at == cdEnd else { throw fail("the central directory holds \(cdEnd - at) bytes after its last member") }
        // Members may not overlap each other or the central directory (overlap is the classic zip-bomb trick).
        var ranges = try entries.map { e -> (start: Int, end: Int, name: String) in
            guard let end = e.dataOffset.addingReportingOverflowChecked(e.compressedSize), end <= cdOffset else {
                throw fail("its data runs past the start of the central directory", e.name)
            }
            return (e.localHeaderOffset, end, e.name)
        }
        ranges.sort { $0.start < $1.start }
        for i in ranges.indices.dropFirst() where ranges[i].start < ranges[i - 1].end {
            throw fail("its data overlaps member \(quotedForMessage(ranges[i - 1].name))", ranges[i].name)
        }
        return entries
    }

    private func parseCentral(at: inout Int, index: Int, cdEnd: Int) throws -> ZipArchive.Entry {
        guard at <= cdEnd - 46, u32(at) == 0x0201_4b50 else { throw fail("central directory entry \(index) is missing or damaged") }
        let flags = try need(u16(at + 8), "a flag field")
        let methodCode = try need(u16(at + 10), "a method field")
        let crc = try need(u32(at + 16), "a CRC field")
        var compressed = try need(u32(at + 20), "a size field")
        var uncompressed = try need(u32(at + 24), "a size field")
        let nameLength = try need(u16(at + 28), "a name length")
        let extraLength = try need(u16(at + 30), "an extra length")
        let commentLength = try need(u16(at + 32), "a comment length")
        let diskStart = try need(u16(at + 34), "a disk field")
        var local = try need(u32(at + 42), "an offset field")
        let nameStart = at + 46
        let extraStart = nameStart + nameLength
        let next = extraStart + extraLength + commentLength
        guard next <= cdEnd else { throw fail("central directory entry \(index) runs past the directory") }
        guard let nameBytes = slice(nameStart..<extraStart) else {
            throw fail("central directory entry \(index) lies outside the file (truncated or corrupt archive)")
        }
        guard let name = String(validating: nameBytes, as: UTF8.self) else {
            throw fail("central directory entry \(index) has a name that is not UTF-8")
        }
        guard flags & 0x41 == 0 else { throw fail("encrypted members are not supported", name) }
        let method: ZipArchive.Method
        switch methodCode {
        case 0: method = .stored
        case 8: method = .deflated
        default: throw fail("compression method \(methodCode) is not supported (only stored and deflate)", name)
        }
        // ZIP64 extra field: present values replace the 32-bit ones that are all ones, in this order.
        var e = extraStart
        let extraEnd = extraStart + extraLength
        var diskNumber = diskStart
        while e + 4 <= extraEnd {
            let id = try need(u16(e), "an extra field", name)
            let size = try need(u16(e + 2), "an extra field", name)
            guard e + 4 + size <= extraEnd else { throw fail("an extra field runs past its entry", name) }
            if id == 0x0001 {
                var p = e + 4
                func take() throws -> Int {
                    guard p + 8 <= e + 4 + size else { throw fail("the ZIP64 extra field is too short", name) }
                    defer { p += 8 }
                    return try need(u64(p), "the ZIP64 extra field", name)
                }
                if uncompressed == 0xFFFF_FFFF { uncompressed = try take() }
                if compressed == 0xFFFF_FFFF { compressed = try take() }
                if local == 0xFFFF_FFFF { local = try take() }
                if diskNumber == 0xFFFF {
                    guard p + 4 <= e + 4 + size else { throw fail("the ZIP64 extra field is too short", name) }
                    diskNumber = try need(u32(p), "the ZIP64 extra field", name)
                }
            }
            e += 4 + size
        }
        guard diskNumber == 0 else { throw fail("multi-disk archives are not supported", name) }
        if method == .stored, compressed != uncompressed {
            throw fail("a stored member declares \(compressed) bytes stored but \(uncompressed) bytes of content", name)
        }
        if method == .deflated {
            let most = compressed.multipliedReportingOverflowChecked(ZipArchive.maxDeflateRatio)?.addingReportingOverflowChecked(1024) ?? Int.max
            guard uncompressed <= most else {
                throw fail("declares \(uncompressed) bytes from \(compressed) compressed bytes, more than deflate can produce (a zip bomb or a lying header)", name)
            }
        }
        let dataOffset = try parseLocal(at: local, name: name, nameBytes: nameBytes, method: methodCode,
                                        crc: crc, compressed: compressed, uncompressed: uncompressed)
        guard let end = dataOffset.addingReportingOverflowChecked(compressed), end <= map.count else {
            throw fail("its \(compressed) bytes at offset \(dataOffset) run past the end of the \(map.count)-byte file (truncated archive)", name)
        }
        at = next
        return ZipArchive.Entry(name: name, method: method, crc32: UInt32(truncatingIfNeeded: crc), compressedSize: compressed,
                                uncompressedSize: uncompressed, dataOffset: dataOffset, localHeaderOffset: local, index: index)
    }

    private func parseLocal(at local: Int, name: String, nameBytes: [UInt8], method: Int,
                            crc: Int, compressed: Int, uncompressed: Int) throws -> Int {
        guard local <= map.count - 30, u32(local) == 0x0403_4b50 else {
            throw fail("no local header at offset \(local) (truncated or corrupt archive)", name)
        }
        guard try need(u16(local + 8), "a local method", name) == method else {
            throw fail("the local header and the central directory disagree on the compression method", name)
        }
        let nameLength = try need(u16(local + 26), "a local name length", name)
        let extraLength = try need(u16(local + 28), "a local extra length", name)
        let start = local + 30 + nameLength + extraLength
        guard start <= map.count else { throw fail("its local header runs past the end of the file", name) }
        guard slice((local + 30)..<(local + 30 + nameLength)) == nameBytes else {
            throw fail("the local header names a different member", name)
        }
        guard let dataEnd = start.addingReportingOverflowChecked(compressed), dataEnd <= map.count else {
            throw fail("its \(compressed) bytes at offset \(start) run past the end of the \(map.count)-byte file (truncated archive)", name)
        }
        // The CRC and sizes are in the local header, or (flag bit 3, as torch writes) in a data descriptor
        // after the data; either way they must agree with the central directory. All-ones local sizes
        // defer to a ZIP64 extra field, which the central directory's values already cover.
        let agrees: Bool
        if try need(u16(local + 6), "a local flag field", name) & 0x08 == 0 {
            let localCompressed = u32(local + 18)
            let localUncompressed = u32(local + 22)
            agrees = u32(local + 14) == crc
                && (localCompressed == 0xFFFF_FFFF || localCompressed == compressed)
                && (localUncompressed == 0xFFFF_FFFF || localUncompressed == uncompressed)
        } else {
            agrees = descriptorAgrees(at: dataEnd, crc: crc, compressed: compressed, uncompressed: uncompressed)
                || (u32(dataEnd) == 0x0807_4b50 && descriptorAgrees(at: dataEnd + 4, crc: crc, compressed: compressed, uncompressed: uncompressed))
        }
        guard agrees else {
            throw fail("the local header or data descriptor disagrees with the central directory on the CRC or sizes", name)
        }
        return start
    }

    /// A data descriptor without its optional signature: CRC, then 32-bit or (ZIP64) 64-bit sizes.
    private func descriptorAgrees(at d: Int, crc: Int, compressed: Int, uncompressed: Int) -> Bool {
        guard u32(d) == crc else { return false }
        return (u32(d + 4) == compressed && u32(d + 8) == uncompressed)
            || (u64(d + 4) == compressed && u64(d + 12) == uncompressed)
    }
}

