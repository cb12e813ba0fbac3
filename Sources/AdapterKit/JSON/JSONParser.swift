/// A strict RFC 8259 JSON parser over bytes.
///
/// Strict where Foundation is lax: duplicate keys are an error (Foundation keeps one silently),
/// whitespace is space, tab, LF and CR only, no byte-order mark, no trailing commas, no leading
/// zeros, no lone surrogates, and nesting is bounded so a hostile file cannot exhaust the stack.
public struct JSONParser {
    /// Why a text is not the JSON we accept, with the byte offset where it went wrong.
    public struct Failure: Error, Equatable, Sendable, CustomStringConvertible {
        public let message: String
        public let offset: Int
        public var description: String { "\(message) at byte \(offset)" }
    }

    public static let maximumDepth = 128

    let bytes: UnsafeRawBufferPointer
    /// Where the next byte is read.
    var position = 0
    private var depth = 0
    private let allowDuplicateKeys: Bool
    /// Members of the outermost object, counted by `validate`.
    private var topLevelMembers = 0

    init(_ bytes: UnsafeRawBufferPointer, allowDuplicateKeys: Bool, position: Int = 0) {
        self.bytes = bytes
        self.allowDuplicateKeys = allowDuplicateKeys
        self.position = position
    }

    /// Parses one complete JSON text; only whitespace may follow the value.
    ///
    /// With `allowDuplicateKeys` every member is kept, so the caller can name the duplicate
    /// in its own terms; by default a duplicate key is an error.
    public static func parse(_ bytes: UnsafeRawBufferPointer, allowDuplicateKeys: Bool = false) throws(Failure) -> JSONValue {
        var parser = JSONParser(bytes, allowDuplicateKeys: allowDuplicateKeys)
        parser.skipWhitespace()
        let value = try parser.parseValue()
        parser.skipWhitespace()
        guard parser.position == bytes.count else { throw parser.failure("trailing characters after the JSON value") }
        return value
    }

    public static func parse(_ bytes: [UInt8]) throws(Failure) -> JSONValue {
        let result: Result<JSONValue, Failure> = bytes.withUnsafeBytes { raw in
            do throws(Failure) { return .success(try parse(raw)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    public static func parse(_ text: String) throws(Failure) -> JSONValue {
        try parse(Array(text.utf8))
    }

    /// Checks that `bytes` are one complete JSON text, failing exactly where and how `parse` with
    /// `allowDuplicateKeys` would, but without building anything. Returns how many members the
    /// top-level value has when it is an object (0 otherwise), for callers that reserve space.
    @discardableResult
    public static func validate(_ bytes: UnsafeRawBufferPointer) throws(Failure) -> Int {
        var parser = JSONParser(bytes, allowDuplicateKeys: true)
        parser.skipWhitespace()
        try parser.validateValue()
        parser.skipWhitespace()
        guard parser.position == bytes.count else { throw parser.failure("trailing characters after the JSON value") }
        return parser.topLevelMembers
    }

    func failure(_ message: String) -> Failure {
        Failure(message: message, offset: position)
    }

    var current: UInt8? {
        position < bytes.count ? bytes[position] : nil
    }

    mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func expect(_ literal: StaticString) throws(Failure) {
        let count = literal.utf8CodeUnitCount
        guard position + count <= bytes.count else { throw failure("invalid literal") }
        for i in 0..<count where bytes[position + i] != literal.utf8Start[i] {
            throw failure("invalid literal")
        }
        position += count
    }

    mutating func parseValue() throws(Failure) -> JSONValue {
        guard let c = current else { throw failure("unexpected end of JSON") }
        switch c {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            let start = try scanNumber()
            return .number(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self))
        default: throw failure("unexpected character")
        }
    }

    /// `parseValue` without building the value.
    private mutating func validateValue() throws(Failure) {
        guard let c = current else { throw failure("unexpected end of JSON") }
        switch c {
        case UInt8(ascii: "{"), UInt8(ascii: "["): try validateContainer(c == UInt8(ascii: "{"))
        case UInt8(ascii: "\""): _ = try scanString(build: false)
        case UInt8(ascii: "t"): try expect("true")
        case UInt8(ascii: "f"): try expect("false")
        case UInt8(ascii: "n"): try expect("null")
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): _ = try scanNumber()
        default: throw failure("unexpected character")
        }
    }

    private mutating func enter() throws(Failure) {
        depth += 1
        if depth > Self.maximumDepth { throw failure("nesting deeper than \(Self.maximumDepth)") }
    }

    private mutating func parseObject() throws(Failure) -> JSONValue {
        try enter()
        defer { depth -= 1 }
        position += 1
        var members: [(key: String, value: JSONValue)] = []
        var seen = Set<String>()
        skipWhitespace()
        if current == UInt8(ascii: "}") {
            position += 1
            return .object(JSONObject(members))
        }
        while true {
            skipWhitespace()
            guard current == UInt8(ascii: "\"") else { throw failure("expected a string key") }
            let keyOffset = position
            let key = try parseString()
            if !allowDuplicateKeys {
                guard seen.insert(key).inserted else { throw Failure(message: "duplicate key \"\(key)\"", offset: keyOffset) }
            }
            skipWhitespace()
            guard current == UInt8(ascii: ":") else { throw failure("expected ':'") }
            position += 1
            skipWhitespace()
            members.append((key, try parseValue()))
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "}"):
                position += 1
                return .object(JSONObject(members))
            default: throw failure("expected ',' or '}'")
            }
        }
    }

    private mutating func parseArray() throws(Failure) -> JSONValue {
        try enter()
        defer { depth -= 1 }
        position += 1
        var elements: [JSONValue] = []
        skipWhitespace()
        if current == UInt8(ascii: "]") {
            position += 1
            return .array(elements)
        }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "]"):
                position += 1
                return .array(elements)
            default: throw failure("expected ',' or ']'")
            }
        }
    }

    /// `parseObject` (duplicates allowed) or `parseArray` without building anything.
    private mutating func validateContainer(_ isObject: Bool) throws(Failure) {
        try enter()
        defer { depth -= 1 }
        position += 1
        let close = isObject ? UInt8(ascii: "}") : UInt8(ascii: "]")
        skipWhitespace()
        if current == close {
            position += 1
            return
        }
        while true {
            skipWhitespace()
            if isObject {
                guard current == UInt8(ascii: "\"") else { throw failure("expected a string key") }
                _ = try scanString(build: false)
                skipWhitespace()
                guard current == UInt8(ascii: ":") else { throw failure("expected ':'") }
                position += 1
                skipWhitespace()
            }
            try validateValue()
            if isObject && depth == 1 { topLevelMembers += 1 }
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","): position += 1
            case close:
                position += 1
                return
            default: throw failure(isObject ? "expected ',' or '}'" : "expected ',' or ']'")
            }
        }
    }

    /// Checks a number and returns where it starts; `position` is left just after it.
    private mutating func scanNumber() throws(Failure) -> Int {
        let start = position
        if current == UInt8(ascii: "-") { position += 1 }
        guard let first = current, first >= 0x30 && first <= 0x39 else { throw failure("invalid number") }
        position += 1
        if first == 0x30, let c = current, c >= 0x30 && c <= 0x39 { throw failure("leading zero in number") }
        skipDigits()
        if current == UInt8(ascii: ".") {
            position += 1
            guard skipDigits() > 0 else { throw failure("invalid number") }
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            position += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { position += 1 }
            guard skipDigits() > 0 else { throw failure("invalid number") }
        }
        return start
    }

    @discardableResult
    private mutating func skipDigits() -> Int {
        let start = position
        while let c = current, c >= 0x30 && c <= 0x39 { position += 1 }
        return position - start
    }

    mutating func parseString() throws(Failure) -> String {
        try scanString(build: true) ?? ""
    }

    /// Reads a string from its opening quote: its value when `build`, nil otherwise. Each run of
    /// bytes between escapes must be valid UTF-8 on its own.
    private mutating func scanString(build: Bool) throws(Failure) -> String? {
        position += 1
        var runStart = position
        // The common case, no escape: one scan, one validation, one copy.
        while let c = current {
            if c == UInt8(ascii: "\"") {
                let run = UnsafeRawBufferPointer(rebasing: bytes[runStart..<position])
                guard isValidUTF8(run) else { throw Failure(message: "string is not valid UTF-8", offset: runStart) }
                position += 1
                return build ? String(decoding: run, as: UTF8.self) : nil
            }
            if c == UInt8(ascii: "\\") { break }
            if c < 0x20 { throw failure("control character in string") }
            position += 1
        }
        var out: [UInt8] = []
        func flush(_ end: Int) throws(Failure) {
            guard end > runStart else { return }
            let run = UnsafeRawBufferPointer(rebasing: bytes[runStart..<end])
            guard isValidUTF8(run) else { throw Failure(message: "string is not valid UTF-8", offset: runStart) }
            if build { out.append(contentsOf: run) }
        }
        while true {
            guard let c = current else { throw failure("unterminated string") }
            switch c {
            case UInt8(ascii: "\""):
                try flush(position)
                position += 1
                return build ? String(decoding: out, as: UTF8.self) : nil
            case UInt8(ascii: "\\"):
                try flush(position)
                position += 1
                guard let e = current else { throw failure("unterminated string") }
                position += 1
                let scalar: Unicode.Scalar
                switch e {
                case UInt8(ascii: "\""): scalar = "\""
                case UInt8(ascii: "\\"): scalar = "\\"
                case UInt8(ascii: "/"): scalar = "/"
                case UInt8(ascii: "b"): scalar = "\u{08}"
                case UInt8(ascii: "f"): scalar = "\u{0C}"
                case UInt8(ascii: "n"): scalar = "\n"
                case UInt8(ascii: "r"): scalar = "\r"
                case UInt8(ascii: "t"): scalar = "\t"
                case UInt8(ascii: "u"): scalar = try parseUnicodeEscape()
                default: throw failure("invalid escape")
                }
                if build { UTF8.encode(scalar) { out.append($0) } }
                runStart = position
            case 0x00..<0x20:
                throw failure("control character in string")
            default:
                position += 1
            }
        }
    }

    /// In a validated text, the bytes of the string at `position` when it holds no escape (and
    /// `position` just past it); nil, with `position` unchanged, when it does.
    mutating func rawString() -> UnsafeRawBufferPointer? {
        var i = position + 1
        while i < bytes.count {
            switch bytes[i] {
            case UInt8(ascii: "\""):
                defer { position = i + 1 }
                return UnsafeRawBufferPointer(rebasing: bytes[(position + 1)..<i])
            case UInt8(ascii: "\\"):
                return nil
            default:
                i += 1
            }
        }
        return nil
    }

    /// Moves past the value at `position` in a text already validated: no checks, nothing built.
    mutating func skipValue() {
        var nesting = 0
        repeat {
            guard position < bytes.count else { return }
            switch bytes[position] {
            case UInt8(ascii: "\""):
                position += 1
                while position < bytes.count, bytes[position] != UInt8(ascii: "\"") {
                    position += bytes[position] == UInt8(ascii: "\\") ? 2 : 1
                }
                position += 1
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                nesting += 1
                position += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                nesting -= 1
                position += 1
            case UInt8(ascii: ","), UInt8(ascii: ":"), 0x20, 0x09, 0x0A, 0x0D:
                position += 1
            default:
                // A number or a literal: up to the next delimiter.
                while position < bytes.count {
                    switch bytes[position] {
                    case UInt8(ascii: ","), UInt8(ascii: "}"), UInt8(ascii: "]"), UInt8(ascii: ":"), 0x20, 0x09, 0x0A, 0x0D: break
                    default: position += 1; continue
                    }
                    break
                }
            }
        } while nesting > 0
    }

    /// In a validated text, the value at `position` as an unsigned 64-bit integer when it is written as
    /// one (digits only) and fits, else nil; either way `position` moves past it (as `JSONValue.uint64`).
    mutating func uint64Value() -> UInt64? {
        let start = position
        skipValue()
        guard position > start else { return nil }
        return JSONValue.decimalUInt64(bytes[start..<position])
    }

    private mutating func parseHex4() throws(Failure) -> UInt32 {
        guard position + 4 <= bytes.count else { throw failure("invalid \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[position]
            let d: UInt32
            switch c {
            case 0x30...0x39: d = UInt32(c - 0x30)
            case 0x41...0x46: d = UInt32(c - 0x41 + 10)
            case 0x61...0x66: d = UInt32(c - 0x61 + 10)
            default: throw failure("invalid \\u escape")
            }
            v = v << 4 | d
            position += 1
        }
        return v
    }

    private mutating func parseUnicodeEscape() throws(Failure) -> Unicode.Scalar {
        let high = try parseHex4()
        if (0xDC00...0xDFFF).contains(high) { throw failure("lone trailing surrogate in \\u escape") }
        if (0xD800...0xDBFF).contains(high) {
            guard position + 2 <= bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u")
            else { throw failure("lone leading surrogate in \\u escape") }
            position += 2
            let low = try parseHex4()
            guard (0xDC00...0xDFFF).contains(low) else { throw failure("invalid surrogate pair in \\u escape") }
            return Unicode.Scalar(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))!
        }
        return Unicode.Scalar(high)!
    }
}
