/// Whether `bytes` are well-formed UTF-8 (no overlong forms, surrogates or values past U+10FFFF),
/// without building a String: runs of ASCII are checked eight bytes at a time.
func isValidUTF8(_ bytes: UnsafeRawBufferPointer) -> Bool {
    guard let base = bytes.baseAddress else { return true }
    let n = bytes.count
    var i = 0
    while i < n {
        // Eight ASCII bytes at once.
        while i + 8 <= n, base.loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 == 0 { i += 8 }
        guard i < n else { break }
        let b0 = base.load(fromByteOffset: i, as: UInt8.self)
        if b0 < 0x80 {
            i += 1
            continue
        }
        @inline(__always) func continuation(_ k: Int) -> UInt8? {
            guard i + k < n else { return nil }
            let b = base.load(fromByteOffset: i + k, as: UInt8.self)
            return b & 0xC0 == 0x80 ? b : nil
        }
        switch b0 {
        case 0xC2...0xDF:
            guard continuation(1) != nil else { return false }
            i += 2
        case 0xE0...0xEF:
            guard let b1 = continuation(1), continuation(2) != nil else { return false }
            if b0 == 0xE0 && b1 < 0xA0 { return false }  // overlong
            if b0 == 0xED && b1 > 0x9F { return false }  // UTF-16 surrogates
            i += 3
        case 0xF0...0xF4:
            guard let b1 = continuation(1), continuation(2) != nil, continuation(3) != nil else { return false }
            if b0 == 0xF0 && b1 < 0x90 { return false }  // overlong
            if b0 == 0xF4 && b1 > 0x8F { return false }  // past U+10FFFF
            i += 4
        default:
            return false  // a continuation byte first, C0/C1 (overlong) or F5…FF
        }
    }
    return true
}
