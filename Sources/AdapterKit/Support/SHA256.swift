import CHash

/// SHA-256 of a byte stream (the C implementation in `CHash`: the x86 SHA extensions where the CPU
/// has them, portable C otherwise).
public struct SHA256: Sendable {
    private var state = adapter_sha256()

    /// `accelerated`: nil picks the fastest block function; false forces the portable one (tests
    /// compare the two).
    public init(accelerated: Bool? = nil) {
        adapter_sha256_init(&state, accelerated.map { $0 ? 1 : 0 } ?? -1)
    }

    /// Whether this CPU runs the SHA extensions' block function.
    public static var hasExtensions: Bool { adapter_sha256_has_extensions() == 1 }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        adapter_sha256_update(&state, base, bytes.count)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public mutating func update(_ text: String) {
        update(Array(text.utf8))
    }

    /// The digest as 64 lowercase hex digits; the value must not be updated afterwards.
    public mutating func finish() -> String {
        var digest = [UInt8](repeating: 0, count: 32)
        digest.withUnsafeMutableBufferPointer { adapter_sha256_final(&state, $0.baseAddress!) }
        return digest.map { hexByte($0) }.joined()
    }

    public static func hex(of bytes: [UInt8]) -> String {
        var h = SHA256()
        h.update(bytes)
        return h.finish()
    }

    /// The size and SHA-256 of a file, read in 8 MiB blocks (into `buffer` when given: callers
    /// hashing many files reuse one, since glibc keeps freed blocks of this size in its heap).
    public static func file(_ path: String, buffer given: UnsafeMutableRawBufferPointer? = nil) throws -> (size: Int, digest: String) {
        let fd = try FileDescriptor.openForReading(path)
        let buffer = given ?? UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 64)
        defer { if given == nil { buffer.deallocate() } }
        var h = SHA256()
        var offset = 0
        while true {
            let n = try fd.read(into: buffer, at: offset)
            if n == 0 { break }
            h.update(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            offset += n
        }
        return (offset, h.finish())
    }
}

private func hexByte(_ b: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(b >> 4)], digits[Int(b & 15)]])
}
