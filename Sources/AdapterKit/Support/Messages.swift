/// Text for one-line messages and reports: quoting names from files, numbers, byte counts,
/// plurals, lists cut short, and the byte-wise order every sorted output uses.

/// A name from a file, quoted for a one-line message: control characters escaped, long names cut.
func quotedForMessage(_ s: String) -> String {
    var out = "\""
    var count = 0
    for scalar in s.unicodeScalars {
        count += 1
        if count > 200 {
            out += "..."
            break
        }
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        default:
            let v = scalar.value
            if v < 0x20 || v == 0x7f || (0x80..<0xa0).contains(v) || v == 0x2028 || v == 0x2029 {
                out += "\\u{" + String(v, radix: 16) + "}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    return out + "\""
}

/// Eight lowercase hex digits: "00c0ffee".
func hexDigits(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 8 - s.count) + s
}

/// "0x00c0ffee", for checksums in messages.
func hex(_ v: UInt32) -> String { "0x" + hexDigits(v) }

/// A number for messages: integers without a fraction, others with up to 6 significant digits.
func formatNumber(_ v: Double) -> String {
    if v.isFinite, v.rounded() == v, abs(v) < 1e15 { return String(Int64(v)) }
    var s = String(v)
    if s.count > 10, let d = Double(s) { s = String(Float(d)) }
    return s
}

/// A number with about four significant digits, for diagnostics.
public func formatSig(_ v: Double) -> String {
    guard v.isFinite else { return String(v) }
    if v == 0 { return "0" }
    let magnitude = abs(v)
    if magnitude >= 1000 || magnitude < 0.001 {
        var e = 0
        var m = magnitude
        while m >= 10 { m /= 10; e += 1 }
        while m < 1 { m *= 10; e -= 1 }
        return (v < 0 ? "-" : "") + formatFixed(m, 3) + "e" + String(e)
    }
    let digits = magnitude >= 100 ? 1 : magnitude >= 10 ? 2 : magnitude >= 1 ? 3 : 4
    return formatFixed(v, digits)
}

/// Bytes in binary units: "13.50 GiB (14495514624)", or without the exact count "13.50 GiB".
public func formatBytes(_ n: Int, exact: Bool = true) -> String {
    let units: [(Double, String)] = [(0x1p40, "TiB"), (0x1p30, "GiB"), (0x1p20, "MiB"), (0x1p10, "KiB")]
    for (scale, unit) in units where Double(n) >= scale {
        return formatFixed(Double(n) / scale, 2) + " " + unit + (exact ? " (\(n))" : "")
    }
    return "\(n) B"
}

/// A fixed-point rendering without Foundation's locale-dependent formatting.
public func formatFixed(_ v: Double, _ digits: Int) -> String {
    guard v.isFinite else { return String(v) }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (abs(v) * scale).rounded()
    let whole = Int(scaled / scale)
    var frac = String(Int(scaled - Double(whole) * scale))
    while frac.count < digits { frac = "0" + frac }
    let sign = v < 0 && scaled != 0 ? "-" : ""
    return digits == 0 ? sign + String(whole) : sign + String(whole) + "." + frac
}

/// "1 module", "3 modules".
public func plural(_ n: Int, _ noun: String, _ nouns: String? = nil) -> String {
    "\(n) \(n == 1 ? noun : nouns ?? noun + "s")"
}

/// Up to `limit` items joined with ", ", then "…" when there are more.
func listed(_ items: [String], limit: Int = 3) -> String {
    items.prefix(limit).joined(separator: ", ") + (items.count > limit ? ", …" : "")
}

/// "2 unknown keys (a, b)": keys of an adapter that are not LoRA factors, named in every message
/// that mentions them.
func unknownKeysPhrase(_ keys: [String]) -> String {
    "\(plural(keys.count, "unknown key")) (\(listed(keys)))" + (unreadKindsNote(keys).map { "; " + $0 } ?? "")
}

/// Names the LyCORIS module kinds among keys no layout understood, so that a refusal says what
/// the file is instead of only that its keys are unknown: OFT is not read; LoHa, LoKr, DoRA and
/// full diffs are, under kohya's names only (which is how LyCORIS saves them).
func unreadKindsNote(_ keys: [String]) -> String? {
    func has(_ suffixes: [String]) -> Bool { keys.contains { key in suffixes.contains { key.hasSuffix($0) } } }
    var notes: [String] = []
    if has([".oft_blocks", ".oft_diag", ".oft_R"]) { notes.append("these are LyCORIS OFT modules, which adapter does not read yet") }
    let read: [(name: String, suffixes: [String])] = [
        ("LoHa", LyCORISRole.allCases.filter(\.isLoHa).map { "." + $0.rawValue }),
        ("LoKr", LyCORISRole.allCases.filter(\.isLoKr).map { "." + $0.rawValue }),
        ("DoRA (dora_scale)", [".dora_scale"]),
        ("full-weight diff", [".diff", ".diff_b"]),
    ]
    let found = read.filter { has($0.suffixes) }.map(\.name)
    if !found.isEmpty {
        notes.append("LyCORIS \(found.joined(separator: ", ")) keys are read under kohya's module names (lora_unet_…, lora_te…, lycoris_…), which these are not")
    }
    return notes.isEmpty ? nil : notes.joined(separator: "; ")
}

extension StringProtocol {
    /// Byte-wise UTF-8 order (what Rust's and Python's sorted() give for str): the order every
    /// sorted name list, JSON object and tensor layout this tool writes uses.
    func precedesInBytes<T: StringProtocol>(_ other: T) -> Bool {
        utf8.lexicographicallyPrecedes(other.utf8)
    }
}

/// The most common value (ties: the first seen).
func mostCommon<T: Hashable>(_ values: [T]) -> T? {
    var counts: [T: Int] = [:]
    var order: [T] = []
    for v in values {
        if counts[v] == nil { order.append(v) }
        counts[v, default: 0] += 1
    }
    return order.max { counts[$0]! < counts[$1]! || (counts[$0]! == counts[$1]! && order.firstIndex(of: $0)! > order.firstIndex(of: $1)!) }
}

/// The distinct values in first-seen order.
func firstSeen<T: Hashable>(_ values: some Sequence<T>) -> [T] {
    var seen = Set<T>()
    return values.filter { seen.insert($0).inserted }
}

/// The tool's version: `adapter --version`, and recorded in split-merge manifests and digests.
public enum AdapterVersion {
    public static let string = "0.1.0"
}
