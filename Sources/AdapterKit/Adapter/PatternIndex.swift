import Foundation

/// Matching a `rank_pattern` / `alpha_pattern` with many keys would cost too much: refused.
struct PatternCostError: Error, Sendable, CustomStringConvertible {
    let field: String
    let detail: String
    var description: String { "\(field): \(detail)" }
}

/// Every key of a `rank_pattern` / `alpha_pattern`, indexed so that finding the keys that apply to a
/// module costs about the module name's length, however many keys there are, with exactly the
/// answers of `PatternRule.matches` tried key by key (PEFT's rule: the first key, in the config's
/// order, that N matches as `(.*\.)?KEY$` wins).
///
/// Keys of printable ASCII whose only regular-expression character is `.` (module names, the common
/// case) go into a trie of their reversed bytes, each `.` a one-character wildcard. A module name is
/// read backwards through the trie once; a key found ending at position j applies when the name
/// starts there or has a `.` just before it (for a key with a `.`, as a regex, the part before must
/// also hold no character that `.` does not match). Other keys (real regular expressions, non-ASCII
/// names) are tried in order with the regex, only when they come before the best trie match; their
/// work and the trie's are bounded, and a config that would exceed the bound is refused.
final class PatternIndex: @unchecked Sendable {
    /// The config field, for messages.
    let field: String
    let keyCount: Int
    /// Keys tried one by one, in config order, with their position in it.
    private var slow: [(index: Int, rule: PatternRule<Int>)] = []

    // The trie: node 0 is the root; each node's edge from its parent is `pool[labelStart..<labelStart+labelLength]`.
    private var pool: [UInt8] = []
    private var labelStart: [Int32] = [0]
    private var labelLength: [Int32] = [0]
    /// The first key (config position) without `.` / with `.` whose reversed bytes end at this node, or -1.
    private var literalKey: [Int32] = [-1]
    private var dottedKey: [Int32] = [-1]
    /// Child of a node by the first byte of its edge: `node << 8 | byte`.
    private var children: [UInt64: Int32] = [:]
    /// Later copies of a key given more than once, by node.
    private var repeated: [Int32: [Int32]] = [:]

    /// In key labels, a `.` of a dotted key: matches one character.
    private static let wildcard: UInt8 = 0
    /// In names, a character that is not one ASCII scalar and that `.` matches, or does not.
    private static let otherMatched: UInt8 = 0x80
    private static let otherUnmatched: UInt8 = 0x81

    /// Trie steps and regex attempts allowed for all lookups of one config field together: a few hundred
    /// times what real configs need (a step per name character, a few regex keys per module).
    static let maximumSteps = 200_000_000
    static let maximumRegexAttempts = 2_000_000
    private let lock = NSLock()
    private var steps = 0
    private var regexAttempts = 0

    init(field: String, keys: [String]) {
        self.field = field
        keyCount = keys.count
        for (i, key) in keys.enumerated() {
            guard let (bytes, dotted) = Self.trieForm(key) else {
                slow.append((i, PatternRule(key: key, value: i)))
                continue
            }
            insert(bytes.reversed(), key: Int32(i), dotted: dotted)
        }
    }

    /// A key's bytes with `.` as the wildcard, and whether it had one; nil for keys matched by regex.
    private static func trieForm(_ key: String) -> ([UInt8], Bool)? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(key.utf8.count)
        var dotted = false
        for b in key.utf8 {
            switch b {
            case UInt8(ascii: "."):
                dotted = true
                bytes.append(wildcard)
            case UInt8(ascii: "\\"), UInt8(ascii: "^"), UInt8(ascii: "$"), UInt8(ascii: "|"), UInt8(ascii: "?"), UInt8(ascii: "*"),
                 UInt8(ascii: "+"), UInt8(ascii: "("), UInt8(ascii: ")"), UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "{"),
                 UInt8(ascii: "}"):
                return nil
            case 0x20...0x7E:
                bytes.append(b)
            default:
                return nil  // control characters and non-ASCII: the regex decides
            }
        }
        return (bytes, dotted)
    }

    private func insert(_ key: ReversedCollection<[UInt8]>, key index: Int32, dotted: Bool) {
        let symbols = Array(key)
        var node = 0
        var at = 0
        while at < symbols.count {
            let edge = UInt64(node) << 8 | UInt64(symbols[at])
            guard let c = children[edge] else {
                // A new leaf holding the rest of the key.
                let leaf = labelStart.count
                labelStart.append(Int32(pool.count))
                labelLength.append(Int32(symbols.count - at))
                literalKey.append(-1)
                dottedKey.append(-1)
                pool.append(contentsOf: symbols[at...])
                children[edge] = Int32(leaf)
                node = leaf
                at = symbols.count
                break
            }
            let child = Int(c)
            let start = Int(labelStart[child]), length = Int(labelLength[child])
            var common = 0
            while common < length, at + common < symbols.count, pool[start + common] == symbols[at + common] { common += 1 }
            if common < length {
                // Split the edge: a middle node takes the common part.
                let middle = labelStart.count
                labelStart.append(Int32(start))
                labelLength.append(Int32(common))
                literalKey.append(-1)
                dottedKey.append(-1)
                labelStart[child] = Int32(start + common)
                labelLength[child] = Int32(length - common)
                children[edge] = Int32(middle)
                children[UInt64(middle) << 8 | UInt64(pool[start + common])] = Int32(child)
                node = middle
            } else {
                node = child
            }
            at += common
        }
        // Keys come in increasing order, so the first one to end here is the one kept; a repeated key
        // (only callers joining two lists repeat one) is remembered for `allMatches`.
        if dotted {
            if dottedKey[node] < 0 { dottedKey[node] = index } else { repeated[Int32(node), default: []].append(index) }
        } else if literalKey[node] < 0 {
            literalKey[node] = index
        } else {
            repeated[Int32(node), default: []].append(index)
        }
    }

    // MARK: - Lookups

    /// The config position of the first key that applies to `name`, or nil.
    func firstMatch(_ name: String) throws -> Int? {
        var best = Int.max
        try trieMatches(name, repeats: false) { best = min(best, $0) }
        var attempts = 0
        defer { charge(regexAttempts: attempts) }
        for (i, rule) in slow {
            if i >= best { break }
            attempts += 1
            if rule.matches(name) { best = i; break }
        }
        try checkBudget()
        return best == .max ? nil : best
    }

    /// The config positions of every key that applies to `name`, ascending.
    func allMatches(_ name: String) throws -> [Int] {
        var found: [Int] = []
        try trieMatches(name, repeats: true) { found.append($0) }
        charge(regexAttempts: slow.count)
        for (i, rule) in slow where rule.matches(name) { found.append(i) }
        try checkBudget()
        return found.sorted()
    }

    private func charge(steps s: Int = 0, regexAttempts r: Int = 0) {
        lock.lock()
        steps += s
        regexAttempts += r
        lock.unlock()
    }

    private func checkBudget() throws {
        lock.lock()
        let (s, r) = (steps, regexAttempts)
        lock.unlock()
        if s > Self.maximumSteps {
            throw PatternCostError(field: field, detail: "its \(keyCount) keys cost more than \(Self.maximumSteps) steps to match against the modules (keys built to overlap); shorten the pattern")
        }
        if r > Self.maximumRegexAttempts {
            throw PatternCostError(field: field, detail: "its \(slow.count) regular-expression keys would be tried more than \(Self.maximumRegexAttempts) times against the modules; use plain module names as keys")
        }
    }

    /// Whether `.` (and so `.*`) matches each ASCII scalar, as the regex engine decides.
    private static let dotMatchesASCII: [Bool] = {
        let dot = try! Regex(".")
        return (0..<128).map { v in (try? dot.wholeMatch(in: String(Unicode.Scalar(UInt8(v))))) != nil }
    }()

    private static func dotMatches(_ symbol: UInt8) -> Bool {
        symbol < 0x80 ? dotMatchesASCII[Int(symbol)] : symbol == otherMatched
    }

    /// The name as trie symbols, one per character: an ASCII character is its byte, any other the
    /// class of characters `.` matches or not (no trie key holds one, a wildcard may match it).
    private static func symbols(_ name: String) -> [UInt8] {
        var plain = true
        for b in name.utf8 where b >= 0x80 || b == 0x0D || b == 0 { plain = false; break }
        if plain { return Array(name.utf8) }
        let dot = try! Regex(".")
        var out: [UInt8] = []
        var matched: [Character: Bool] = [:]
        for ch in name {
            let scalars = ch.unicodeScalars
            if scalars.count == 1, let v = scalars.first?.value, v < 0x80, v != 0 {
                out.append(UInt8(v))
                continue
            }
            let m: Bool
            if let known = matched[ch] { m = known } else {
                m = (try? dot.wholeMatch(in: String(ch))) != nil
                matched[ch] = m
            }
            out.append(m ? otherMatched : otherUnmatched)
        }
        return out
    }

    /// Calls `found` with every trie key that applies to `name`.
    private func trieMatches(_ name: String, repeats: Bool, _ found: (Int) -> Void) throws {
        guard labelStart.count > 1 || literalKey[0] >= 0 || dottedKey[0] >= 0 else { return }
        let s = Self.symbols(name)
        let n = s.count
        // A dotted key applying at position j needs s[0..<j-1] free of characters `.` does not match.
        let firstUnmatched = s.firstIndex { !Self.dotMatches($0) } ?? n
        var work = 0
        var stack: [(node: Int, depth: Int)] = [(0, 0)]
        while let (node, depth) = stack.popLast() {
            work += 1
            let j = n - depth
            let boundary = j == 0 || s[j - 1] == UInt8(ascii: ".")
            if boundary {
                let dottedApplies = j == 0 || firstUnmatched >= j - 1
                if literalKey[node] >= 0 { found(Int(literalKey[node])) }
                if dottedKey[node] >= 0, dottedApplies { found(Int(dottedKey[node])) }
                if repeats, let more = repeated[Int32(node)] {
                    // A node ends literal keys or dotted ones, never both (a dotted key holds a wildcard).
                    for k in more where dottedKey[node] < 0 || dottedApplies { found(Int(k)) }
                }
            }
            guard depth < n else { continue }
            let c = s[n - depth - 1]
            // Children whose edge starts with this character, or with a wildcard that matches it.
            for first in [c, Self.wildcard] {
                if first == Self.wildcard && !Self.dotMatches(c) { continue }
                if first == UInt8(ascii: ".") || first >= 0x80 { continue }  // no key byte is one of these
                guard let child = children[UInt64(node) << 8 | UInt64(first)].map(Int.init) else { continue }
                let start = Int(labelStart[child]), length = Int(labelLength[child])
                guard depth + length <= n else { continue }
                var k = 0
                while k < length {
                    let b = pool[start + k], x = s[n - depth - 1 - k]
                    if b != x && !(b == Self.wildcard && Self.dotMatches(x)) { break }
                    k += 1
                }
                work += k
                if k == length { stack.append((child, depth + length)) }
            }
        }
        charge(steps: work)
        try checkBudget()
    }
}
