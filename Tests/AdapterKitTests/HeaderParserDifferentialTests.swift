import Foundation
import Testing
@testable import AdapterKit

// The safetensors header is read in one pass without a JSON tree, and JSON strings without a
// scalar-by-scalar copy. Both must refuse exactly what the old readers refused, with the same rule,
// detail and byte offset: the old readers are kept here, verbatim, as references.

/// The JSON parser as it was before the single-pass header reader (commit 020d688), kept as the
/// reference the faster one must agree with, error for error.
///
/// Strict where Foundation is lax: duplicate keys are an error (Foundation keeps one silently),
/// whitespace is space, tab, LF and CR only, no byte-order mark, no trailing commas, no leading
/// zeros, no lone surrogates, and nesting is bounded so a hostile file cannot exhaust the stack.
struct ReferenceJSONParser {
    /// Why a text is not the JSON we accept, with the byte offset where it went wrong.
    struct Failure: Error, Equatable, Sendable, CustomStringConvertible {
        let message: String
        let offset: Int
        var description: String { "\(message) at byte \(offset)" }
    }

    static let maximumDepth = 128

    private let bytes: UnsafeRawBufferPointer
    private var position = 0
    private var depth = 0
    private let allowDuplicateKeys: Bool

    private init(_ bytes: UnsafeRawBufferPointer, allowDuplicateKeys: Bool) {
        self.bytes = bytes
        self.allowDuplicateKeys = allowDuplicateKeys
    }

    /// Parses one complete JSON text; only whitespace may follow the value.
    ///
    /// With `allowDuplicateKeys` every member is kept, so the caller can name the duplicate
    /// in its own terms; by default a duplicate key is an error.
    static func parse(_ bytes: UnsafeRawBufferPointer, allowDuplicateKeys: Bool = false) throws(Failure) -> JSONValue {
        var parser = ReferenceJSONParser(bytes, allowDuplicateKeys: allowDuplicateKeys)
        parser.skipWhitespace()
        let value = try parser.parseValue()
        parser.skipWhitespace()
        guard parser.position == bytes.count else { throw parser.failure("trailing characters after the JSON value") }
        return value
    }

    static func parse(_ bytes: [UInt8]) throws(Failure) -> JSONValue {
        let result: Result<JSONValue, Failure> = bytes.withUnsafeBytes { raw in
            do throws(Failure) { return .success(try parse(raw)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    static func parse(_ text: String) throws(Failure) -> JSONValue {
        try parse(Array(text.utf8))
    }

    private func failure(_ message: String) -> Failure {
        Failure(message: message, offset: position)
    }

    private var current: UInt8? {
        position < bytes.count ? bytes[position] : nil
    }

    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func expect(_ literal: StaticString, _ value: JSONValue) throws(Failure) -> JSONValue {
        let count = literal.utf8CodeUnitCount
        guard position + count <= bytes.count else { throw failure("invalid literal") }
        for i in 0..<count where bytes[position + i] != literal.utf8Start[i] {
            throw failure("invalid literal")
        }
        position += count
        return value
    }

    private mutating func parseValue() throws(Failure) -> JSONValue {
        guard let c = current else { throw failure("unexpected end of JSON") }
        switch c {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try expect("true", .bool(true))
        case UInt8(ascii: "f"): return try expect("false", .bool(false))
        case UInt8(ascii: "n"): return try expect("null", .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
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
            guard seen.insert(key).inserted || allowDuplicateKeys else {
                throw Failure(message: "duplicate key \"\(key)\"", offset: keyOffset)
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

    private mutating func parseNumber() throws(Failure) -> JSONValue {
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
        let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        return .number(text)
    }

    @discardableResult
    private mutating func skipDigits() -> Int {
        let start = position
        while let c = current, c >= 0x30 && c <= 0x39 { position += 1 }
        return position - start
    }

    private mutating func parseString() throws(Failure) -> String {
        position += 1
        var scalars = String.UnicodeScalarView()
        var runStart = position
        // Copies the run of plain bytes; the header as a whole was checked to be UTF-8 already,
        // but a string must be valid on its own too, so it is validated here as well.
        func flush(_ end: Int) throws(Failure) {
            guard end > runStart else { return }
            guard let s = String(validating: UnsafeRawBufferPointer(rebasing: bytes[runStart..<end]), as: UTF8.self) else {
                throw Failure(message: "string is not valid UTF-8", offset: runStart)
            }
            scalars.append(contentsOf: s.unicodeScalars)
        }
        while true {
            guard let c = current else { throw failure("unterminated string") }
            switch c {
            case UInt8(ascii: "\""):
                try flush(position)
                position += 1
                return String(scalars)
            case UInt8(ascii: "\\"):
                try flush(position)
                position += 1
                guard let e = current else { throw failure("unterminated string") }
                position += 1
                switch e {
                case UInt8(ascii: "\""): scalars.append("\"")
                case UInt8(ascii: "\\"): scalars.append("\\")
                case UInt8(ascii: "/"): scalars.append("/")
                case UInt8(ascii: "b"): scalars.append("\u{08}")
                case UInt8(ascii: "f"): scalars.append("\u{0C}")
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "u"): scalars.append(try parseUnicodeEscape())
                default: throw failure("invalid escape")
                }
                runStart = position
            case 0x00..<0x20:
                throw failure("control character in string")
            default:
                position += 1
            }
        }
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

/// The header reader as it was (a JSON tree first, then the rules), for the same comparison.
enum ReferenceHeader {
    static func parse(file: String, fileSize: Int, header bytes: [UInt8]) throws -> SafetensorsHeader {
        try bytes.withUnsafeBytes { raw in
            guard String(validating: raw, as: UTF8.self) != nil else {
                throw SafetensorsError(file: file, rule: .invalidHeaderUTF8, detail: "")
            }
            return try parseJSON(raw, file: file, fileSize: fileSize, headerLength: bytes.count)
        }
    }

        static func parseJSON(_ raw: UnsafeRawBufferPointer, file: String, fileSize: Int, headerLength n: Int) throws -> SafetensorsHeader {
            func fail(_ rule: SafetensorsError.Rule, _ detail: String, tensor: String? = nil) -> SafetensorsError {
                SafetensorsError(file: file, tensor: tensor, rule: rule, detail: detail)
            }
            let root: JSONValue
            do {
                root = try ReferenceJSONParser.parse(raw, allowDuplicateKeys: true)
            } catch {
                throw fail(.invalidJSON, error.description)
            }
            guard case .object(let object) = root else { throw fail(.invalidHeader, "the header is not a JSON object") }

            var tensors: [TensorInfo] = []
            var index: [String: Int] = [:]
            var metadata: [(key: String, value: String)] = []
            var hasMetadata = false
            var sawMetadataKey = false
            tensors.reserveCapacity(object.members.count)

            for (key, value) in object.members {
                if key == "__metadata__" {
                    guard !sawMetadataKey else { throw fail(.invalidJSON, "duplicate field \"__metadata__\"") }
                    sawMetadataKey = true
                    switch value {
                    case .null: break
                    case .object(let m):
                        hasMetadata = true
                        var seen = Set<String>()
                        for (mk, mv) in m.members {
                            guard seen.insert(mk).inserted else { throw fail(.duplicateMetadataKey, "\"\(mk)\"") }
                            guard let s = mv.stringValue else {
                                throw fail(.invalidJSON, "metadata value of \"\(mk)\" is not a string")
                            }
                            metadata.append((mk, s))
                        }
                    default:
                        throw fail(.invalidJSON, "__metadata__ is not an object of strings")
                    }
                    continue
                }
                guard index[key] == nil else { throw fail(.duplicateTensor, "\"\(key)\" appears twice", tensor: key) }
                guard case .object(let entry) = value else { throw fail(.invalidJSON, "entry is not an object", tensor: key) }
                var dtypeValue: JSONValue?, shapeValue: JSONValue?, offsetsValue: JSONValue?
                var fieldsSeen = Set<String>()
                for (fk, fv) in entry.members {
                    guard fieldsSeen.insert(fk).inserted else { throw fail(.invalidJSON, "duplicate field \"\(fk)\"", tensor: key) }
                    switch fk {
                    case "dtype": dtypeValue = fv
                    case "shape": shapeValue = fv
                    case "data_offsets": offsetsValue = fv
                    default: break  // unknown fields are ignored, as the reference does
                    }
                }
                guard let dtypeValue else { throw fail(.invalidJSON, "missing field \"dtype\"", tensor: key) }
                guard let shapeValue else { throw fail(.invalidJSON, "missing field \"shape\"", tensor: key) }
                guard let offsetsValue else { throw fail(.invalidJSON, "missing field \"data_offsets\"", tensor: key) }
                guard let dtypeName = dtypeValue.stringValue else { throw fail(.invalidJSON, "dtype is not a string", tensor: key) }
                guard let dtype = DType(rawValue: dtypeName) else { throw fail(.unknownDType, "\"\(dtypeName)\"", tensor: key) }
                guard let shapeItems = shapeValue.arrayValue else { throw fail(.invalidJSON, "shape is not an array", tensor: key) }
                var shape: [Int] = []
                shape.reserveCapacity(shapeItems.count)
                for item in shapeItems {
                    guard let u = item.uint64 else { throw fail(.invalidJSON, "shape holds a value that is not an unsigned 64-bit integer", tensor: key) }
                    guard let d = Int(exactly: u) else { throw fail(.overflow, "dimension \(u) is too large", tensor: key) }
                    shape.append(d)
                }
                guard let offsetItems = offsetsValue.arrayValue, offsetItems.count == 2 else {
                    throw fail(.invalidJSON, "data_offsets is not an array of two integers", tensor: key)
                }
                guard let b = offsetItems[0].uint64, let e = offsetItems[1].uint64 else {
                    throw fail(.invalidJSON, "data_offsets holds a value that is not an unsigned 64-bit integer", tensor: key)
                }
                guard let begin = Int(exactly: b), let end = Int(exactly: e) else {
                    throw fail(.overflow, "data offsets [\(b), \(e)] are too large", tensor: key)
                }
                if end < begin { throw fail(.invalidOffset, "data_offsets [\(begin), \(end)] end before they begin", tensor: key) }
                index[key] = tensors.count
                tensors.append(TensorInfo(name: key, dtype: dtype, shape: shape, dataOffsets: begin..<end))
            }

            // Rule 6: contiguous offsets in (begin, end) order, sizes that match the shapes.
            let order = tensors.indices.sorted {
                (tensors[$0].dataOffsets.lowerBound, tensors[$0].dataOffsets.upperBound)
                    < (tensors[$1].dataOffsets.lowerBound, tensors[$1].dataOffsets.upperBound)
            }
            var expected = 0
            for i in order {
                let t = tensors[i]
                guard t.dataOffsets.lowerBound == expected else {
                    throw fail(.invalidOffset, "data starts at \(t.dataOffsets.lowerBound), expected \(expected) (tensors must be contiguous)", tensor: t.name)
                }
                var elements = 1
                for d in t.shape {
                    let (p, o) = elements.multipliedReportingOverflow(by: d)
                    guard !o else { throw fail(.overflow, "shape \(t.shape) has too many elements", tensor: t.name) }
                    elements = p
                }
                let (bits, o) = elements.multipliedReportingOverflow(by: t.dtype.bits)
                guard !o else { throw fail(.overflow, "shape \(t.shape) is too large in bytes", tensor: t.name) }
                guard bits % 8 == 0 else {
                    throw fail(.misaligned, "\(elements) elements of \(t.dtype.rawValue) do not fill whole bytes", tensor: t.name)
                }
                guard t.dataOffsets.count == bits / 8 else {
                    throw fail(.invalidTensorInfo, "\(t.dtype.rawValue) \(t.shape) needs \(bits / 8) bytes but data_offsets span \(t.dataOffsets.count)", tensor: t.name)
                }
                expected = t.dataOffsets.upperBound
            }
            // Rule 7: the data buffer ends exactly at the end of the file.
            let (total, o1) = expected.addingReportingOverflow(8 + n)
            guard !o1, total == fileSize else {
                throw fail(.incompleteBuffer, "tensors end at byte \(expected) of the data buffer but the buffer has \(fileSize - 8 - n) bytes")
            }
            return SafetensorsHeader(tensors: tensors, metadata: metadata, hasMetadata: hasMetadata, headerLength: n, index: index)
        }
}

/// What reading a header gave: the tensors and metadata, or the error's text.
private func outcome(_ read: () throws -> SafetensorsHeader) -> String {
    do {
        let h = try read()
        return "ok \(h.tensors.map { "\($0.name)|\($0.dtype.rawValue)|\($0.shape)|\($0.dataOffsets)" }) \(h.metadata.map { "\($0.key)=\($0.value)" }) \(h.hasMetadata)"
    } catch {
        return "error \(error)"
    }
}

private func jsonOutcome(_ read: () throws -> JSONValue) -> String {
    do { return "ok \(JSONWriter.compact(try read()))" } catch { return "error \(error)" }
}

/// Every one-byte replacement (from bytes that matter to JSON and UTF-8), deletion and truncation of `text`.
private func mutations(of text: [UInt8]) -> [[UInt8]] {
    let bytes: [UInt8] = Array(#"" \{}[],:0919-.eEnu/"#.utf8) + [0x00, 0x1f, 0x41, 0x7f, 0x80, 0xc3, 0xe0, 0xed, 0xf4, 0xff]
    var out: [[UInt8]] = []
    for i in text.indices {
        for b in bytes where b != text[i] {
            var m = text
            m[i] = b
            out.append(m)
        }
        var d = text
        d.remove(at: i)
        out.append(d)
        out.append(Array(text[0..<i]))
    }
    return out
}

@Suite("The one-pass header reader agrees with the tree-based one, error for error")
struct HeaderParserDifferentialTests {
    static let headers: [String] = [
        #"{"__metadata__":{"format":"pt","k\u00e9":"v\n"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b\u00e9":{"dtype":"BF16","shape":[],"data_offsets":[16,18]}}"#,
        #"{"x":{"data_offsets":[2,2],"extra":[1,{"k":null,"t":true}],"shape":[0],"dtype":"I8"},"y":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"dtype2":false}}"#,
        #" { "a" : { "dtype" : "F16" , "shape" : [ 1 , 1 ] , "data_offsets" : [ 0 , 2 ] } , "__metadata__" : null }  "#,
        #"{"d\"q":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]},"e":{"dtype":"F4","shape":[2],"data_offsets":[1,2]},"f":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[2,5]}}"#,
        #"{"__metadata__":{},"a":{"dtype":"F32","shape":[1e2],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[-1],"data_offsets":[4,8]}}"#,
        #"{"t":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]},"u":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,18446744073709551616]}}"#,
        #"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#,
    ]

    @Test("every mutation of a few headers gives the same tensors or the same refusal", arguments: headers.indices)
    func mutated(_ which: Int) {
        let text = Array(Self.headers[which].utf8)
        for m in [text] + mutations(of: text) {
            for dataBytes in [0, 5, 18] {
                let size = 8 + m.count + dataBytes
                let prefix = (0..<8).map { UInt8(truncatingIfNeeded: UInt64(m.count) >> (8 * UInt64($0))) }
                let new = outcome { try SafetensorsHeader.parse(file: "f", fileSize: size, prefix: prefix) { _ in m } }
                let old = outcome { try ReferenceHeader.parse(file: "f", fileSize: size, header: m) }
                #expect(new == old, "\(String(decoding: m, as: UTF8.self))")
                if new != old { return }
            }
        }
    }

    @Test("every mutation of a config-like text parses to the same value or fails at the same byte")
    func jsonMutated() {
        let texts = [
            #"{"r": 8, "lora_alpha": 16.5e-1, "target_modules": ["q", "v\u00e9\ud83d\ude00"], "x": {"y": [true, false, null, -0, 1E+2]}, "s": "a\/b\\c\"\b\f\n\r\t"}"#,
            #"[{"a":1,"a":2}, "é", [], {}, [[[]]]]"#,
        ]
        for t in texts {
            let text = Array(t.utf8)
            for m in [text] + mutations(of: text) {
                for duplicates in [false, true] {
                    let new = jsonOutcome { try m.withUnsafeBytes { try JSONParser.parse($0, allowDuplicateKeys: duplicates) } }
                    let old = jsonOutcome { try m.withUnsafeBytes { try ReferenceJSONParser.parse($0, allowDuplicateKeys: duplicates) } }
                    #expect(new == old, "\(String(decoding: m, as: UTF8.self))")
                    if new != old { return }
                }
                // validate fails exactly where parse with duplicates allowed fails.
                let validated: String
                do { _ = try m.withUnsafeBytes { try JSONParser.validate($0) }; validated = "ok" } catch { validated = "error \(error)" }
                let parsed = jsonOutcome { try m.withUnsafeBytes { try JSONParser.parse($0, allowDuplicateKeys: true) } }
                #expect(validated == (parsed.hasPrefix("ok") ? "ok" : parsed))
            }
        }
    }

    @Test("the UTF-8 check accepts and refuses exactly what String(validating:) does")
    func utf8() {
        var g = SystemRandomNumberGenerator()
        let interesting: [UInt8] = [0x00, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xed, 0xee, 0xef, 0xf0, 0xf4, 0xf5, 0xff]
        for _ in 0..<200_000 {
            let n = Int.random(in: 0...12, using: &g)
            let bytes = (0..<n).map { _ in Bool.random(using: &g) ? interesting.randomElement(using: &g)! : UInt8.random(in: 0...255, using: &g) }
            let mine = bytes.withUnsafeBytes { isValidUTF8($0) }
            let stdlib = bytes.withUnsafeBytes { String(validating: $0, as: UTF8.self) != nil }
            #expect(mine == stdlib, "\(bytes)")
            if mine != stdlib { return }
        }
    }
}
