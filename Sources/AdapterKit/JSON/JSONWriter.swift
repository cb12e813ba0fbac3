/// Writes JSON the way the tools of the field do, so files compare byte for byte.
public enum JSONWriter {
    /// How strings are escaped.
    public enum Escaping: Sendable {
        /// serde_json (the safetensors reference): UTF-8 kept, control characters escaped.
        case rust
        /// Python's `json.dumps` default (`ensure_ascii=True`): everything beyond ASCII as `\uXXXX`.
        case python
    }

    /// Compact JSON, no spaces (serde_json's `to_string`).
    public static func compact(_ value: JSONValue, escaping: Escaping = .rust) -> String {
        var out = ""
        writeCompact(value, escaping, &out)
        return out
    }

    /// Python's `json.dumps(value, indent=indent)`: `": "` between key and value, `","` at line ends.
    public static func pretty(_ value: JSONValue, indent: Int = 2, escaping: Escaping = .python) -> String {
        var out = ""
        writePretty(value, indent, 0, escaping, &out)
        return out
    }

    private static func writeCompact(_ value: JSONValue, _ esc: Escaping, _ out: inout String) {
        switch value {
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                writeCompact(item, esc, &out)
            }
            out += "]"
        case .object(let object):
            out += "{"
            for (i, member) in object.members.enumerated() {
                if i > 0 { out += "," }
                writeString(member.key, esc, &out)
                out += ":"
                writeCompact(member.value, esc, &out)
            }
            out += "}"
        default:
            writeScalar(value, esc, &out)
        }
    }

    private static func writePretty(_ value: JSONValue, _ indent: Int, _ level: Int, _ esc: Escaping, _ out: inout String) {
        let inner = String(repeating: " ", count: indent * (level + 1))
        let outer = String(repeating: " ", count: indent * level)
        switch value {
        case .array(let items):
            if items.isEmpty { out += "[]"; return }
            out += "[\n"
            for (i, item) in items.enumerated() {
                out += inner
                writePretty(item, indent, level + 1, esc, &out)
                out += i + 1 < items.count ? ",\n" : "\n"
            }
            out += outer + "]"
        case .object(let object):
            if object.members.isEmpty { out += "{}"; return }
            out += "{\n"
            for (i, member) in object.members.enumerated() {
                out += inner
                writeString(member.key, esc, &out)
                out += ": "
                writePretty(member.value, indent, level + 1, esc, &out)
                out += i + 1 < object.members.count ? ",\n" : "\n"
            }
            out += outer + "}"
        default:
            writeScalar(value, esc, &out)
        }
    }

    private static func writeScalar(_ value: JSONValue, _ esc: Escaping, _ out: inout String) {
        switch value {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let text): out += text
        case .string(let s): writeString(s, esc, &out)
        case .array, .object: break
        }
    }

    private static let hex: [Character] = Array("0123456789abcdef")

    private static func writeString(_ s: String, _ esc: Escaping, _ out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                let v = scalar.value
                if v < 0x20 || (esc == .python && v == 0x7F) {
                    appendEscape(UInt16(v), &out)
                } else if esc == .python && v > 0x7F {
                    if v > 0xFFFF {
                        let u = v - 0x10000
                        appendEscape(UInt16(0xD800 + (u >> 10)), &out)
                        appendEscape(UInt16(0xDC00 + (u & 0x3FF)), &out)
                    } else {
                        appendEscape(UInt16(v), &out)
                    }
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    private static func appendEscape(_ v: UInt16, _ out: inout String) {
        out += "\\u"
        for shift in stride(from: 12, through: 0, by: -4) {
            out.append(hex[Int((v >> UInt16(shift)) & 0xF)])
        }
    }
}

extension JSONValue {
    /// A JSON number for an integer.
    public static func integer<T: BinaryInteger>(_ v: T) -> JSONValue { .number(String(v)) }

    /// A JSON number for a Float, written as Python would write it for the same float32 value
    /// widened to a double (`16.0`, `0.5`).
    public static func real(_ v: Double) -> JSONValue {
        if v.isFinite, v.rounded() == v, abs(v) < 1e16 { return .number(String(Int64(v)) + ".0") }
        return .number(String(v))
    }
}
