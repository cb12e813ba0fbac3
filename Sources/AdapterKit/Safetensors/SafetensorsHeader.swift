/// One tensor of a safetensors file, as its header describes it.
public struct TensorInfo: Sendable, Hashable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// Offsets relative to the start of the data buffer, end exclusive.
    public let dataOffsets: Range<Int>

    public init(name: String, dtype: DType, shape: [Int], dataOffsets: Range<Int>) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.dataOffsets = dataOffsets
    }

    /// Number of elements (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { dataOffsets.count }
    /// The container-neutral view: a safetensors tensor is always plainly encoded.
    public var entry: TensorEntry { TensorEntry(name: name, shape: shape, encoding: .plain(dtype), byteCount: byteCount) }
}

/// Why a safetensors file was refused: the file, the tensor where there is one, and the rule.
public struct SafetensorsError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The rules of formats.md §1, plus this project's stricter ones.
    public enum Rule: String, Sendable {
        case headerTooSmall = "header too small"
        case headerTooLarge = "header too large"
        case invalidHeaderLength = "invalid header length"
        case invalidHeaderUTF8 = "invalid header: not UTF-8"
        case invalidJSON = "invalid header JSON"
        case invalidHeader = "invalid header"
        case duplicateTensor = "duplicate tensor name"
        case duplicateMetadataKey = "duplicate metadata key"
        case unknownDType = "unknown dtype"
        case invalidOffset = "invalid offset"
        case overflow = "size overflow"
        case misaligned = "misaligned slice"
        case invalidTensorInfo = "invalid tensor info"
        case incompleteBuffer = "incomplete buffer"
        case unreadable = "unreadable"
    }

    public let file: String
    public let tensor: String?
    public let rule: Rule
    public let detail: String

    public init(file: String, tensor: String? = nil, rule: Rule, detail: String) {
        self.file = file
        self.tensor = tensor
        self.rule = rule
        self.detail = detail
    }

    public var description: String {
        var s = file + ": "
        if let tensor { s += "tensor \"\(tensor)\": " }
        s += rule.rawValue
        if !detail.isEmpty { s += ": " + detail }
        return s
    }
}

/// The parsed, validated header of a safetensors file.
public struct SafetensorsHeader: Sendable {
    /// Tensors in the order the header lists them.
    public let tensors: [TensorInfo]
    /// `__metadata__` in file order; empty when absent or null.
    public let metadata: [(key: String, value: String)]
    /// Whether `__metadata__` was present (a non-null object, possibly empty).
    public let hasMetadata: Bool
    /// The header length N (JSON bytes, including padding).
    public let headerLength: Int
    /// Byte offset of the data buffer in the file: 8 + N.
    public var dataStart: Int { 8 + headerLength }
    /// Index of each tensor in `tensors`, by name.
    public let index: [String: Int]

    public static let maximumHeaderLength = 100_000_000

    public func tensor(named name: String) -> TensorInfo? {
        index[name].map { tensors[$0] }
    }

    /// The metadata value for `key`.
    public func metadataValue(_ key: String) -> String? {
        metadata.first(where: { $0.key == key })?.value
    }

    /// Validates a header by the rules of formats.md §1, in the reference's order.
    ///
    /// - Parameters:
    ///   - prefix: the first bytes of the file (at least the 8-byte length when the file has it).
    ///   - readHeader: returns the N header bytes, called only after N was checked against the file.
    ///   - fileSize: the file's length in bytes.
    public static func parse(
        file: String, fileSize: Int, prefix: [UInt8], readHeader: (Int) throws -> [UInt8]
    ) throws -> SafetensorsHeader {
        func fail(_ rule: SafetensorsError.Rule, _ detail: String, tensor: String? = nil) -> SafetensorsError {
            SafetensorsError(file: file, tensor: tensor, rule: rule, detail: detail)
        }
        guard fileSize >= 8, prefix.count >= 8 else {
            throw fail(.headerTooSmall, "the file has \(fileSize) bytes, fewer than the 8-byte length prefix")
        }
        var n64: UInt64 = 0
        for i in 0..<8 { n64 |= UInt64(prefix[i]) << (8 * UInt64(i)) }  // little endian
        guard n64 <= UInt64(maximumHeaderLength) else {
            throw fail(.headerTooLarge, "the header claims \(n64) bytes; the limit is \(maximumHeaderLength)")
        }
        let n = Int(n64)
        guard 8 + n <= fileSize else {
            throw fail(.invalidHeaderLength, "the header claims \(n) bytes but the file has only \(fileSize - 8) after the prefix")
        }
        let bytes = try readHeader(n)
        guard bytes.count == n else {
            throw fail(.invalidHeaderLength, "could read only \(bytes.count) of \(n) header bytes")
        }
        return try bytes.withUnsafeBytes { raw in
            guard isValidUTF8(raw) else {
                throw fail(.invalidHeaderUTF8, "")
            }
            return try parseJSON(raw, file: file, fileSize: fileSize, headerLength: n)
        }
    }

    private static let fields: [[UInt8]] = [Array("dtype".utf8), Array("shape".utf8), Array("data_offsets".utf8)]
    private static let dtypeNames: [[UInt8]] = DType.allCases.map { Array($0.rawValue.utf8) }

    /// The header in two passes over its bytes: the whole text is checked as JSON first (so a syntax
    /// error anywhere is reported before any rule about tensors, as the reference does), then read
    /// member by member straight into `TensorInfo`s, with no JSON tree built for the tensors.
    private static func parseJSON(_ raw: UnsafeRawBufferPointer, file: String, fileSize: Int, headerLength n: Int) throws -> SafetensorsHeader {
        func fail(_ rule: SafetensorsError.Rule, _ detail: String, tensor: String? = nil) -> SafetensorsError {
            SafetensorsError(file: file, tensor: tensor, rule: rule, detail: detail)
        }
        let members: Int
        do {
            members = try JSONParser.validate(raw)
        } catch {
            throw fail(.invalidJSON, error.description)
        }
        // From here on the text is valid JSON: only its meaning is checked.
        var p = JSONParser(raw, allowDuplicateKeys: true)
        p.skipWhitespace()
        guard p.current == UInt8(ascii: "{") else { throw fail(.invalidHeader, "the header is not a JSON object") }
        p.position += 1

        var tensors: [TensorInfo] = []
        var index: [String: Int] = [:]
        var metadata: [(key: String, value: String)] = []
        var hasMetadata = false
        var sawMetadataKey = false
        var shapes = ShapeCache()
        // A tensor entry takes at least 48 bytes (`"":{"dtype":"I8","shape":[],"data_offsets":[0,0]}`),
        // so a hostile header of tiny members reserves no more than a valid one could use.
        let reserved = min(members, n / 48 + 1)
        tensors.reserveCapacity(reserved)
        index.reserveCapacity(reserved)

        /// Moves to the next member or element; false (and past it) at the closing bracket.
        func next(_ p: inout JSONParser, _ close: UInt8) -> Bool {
            p.skipWhitespace()
            if p.current == UInt8(ascii: ",") { p.position += 1; p.skipWhitespace() }
            if p.current == close { p.position += 1; return false }
            return true
        }
        /// Reads a key and the colon after it; `position` is then at the value.
        func key(_ p: inout JSONParser) throws -> String {
            let k = try p.parseString()
            colon(&p)
            return k
        }
        func colon(_ p: inout JSONParser) {
            p.skipWhitespace()
            p.position += 1  // ':'
            p.skipWhitespace()
        }
        /// Which of the three fields a key names (0, 1, 2), or its text for any other key.
        func field(_ p: inout JSONParser) throws -> (known: Int?, name: String) {
            if let raw = p.rawString() {
                colon(&p)
                for (i, f) in Self.fields.enumerated() where raw.elementsEqual(f) { return (i, "") }
                return (nil, String(decoding: raw, as: UTF8.self))
            }
            let name = try key(&p)
            return (Self.fields.firstIndex { $0.elementsEqual(name.utf8) }, name)
        }
        let closeObject = UInt8(ascii: "}"), closeArray = UInt8(ascii: "]")

        while next(&p, closeObject) {
            let name = try key(&p)
            // (Canonical equivalence cannot make another string equal to this ASCII one.)
            if name.utf8.count == 12 && name == "__metadata__" {
                guard !sawMetadataKey else { throw fail(.invalidJSON, "duplicate field \"__metadata__\"") }
                sawMetadataKey = true
                switch try p.parseValue() {
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
            // One hash per name: a duplicate is found as it is inserted.
            guard index.updateValue(tensors.count, forKey: name) == nil else {
                throw fail(.duplicateTensor, "\"\(name)\" appears twice", tensor: name)
            }
            guard p.current == UInt8(ascii: "{") else { throw fail(.invalidJSON, "entry is not an object", tensor: name) }
            p.position += 1
            // Where each known field's value starts; other fields are only checked for duplicates.
            var dtypeAt: Int?, shapeAt: Int?, offsetsAt: Int?
            var others: Set<String> = []
            while next(&p, closeObject) {
                let (known, other) = try field(&p)
                let duplicate: Bool
                switch known {
                case 0: duplicate = dtypeAt != nil; dtypeAt = p.position
                case 1: duplicate = shapeAt != nil; shapeAt = p.position
                case 2: duplicate = offsetsAt != nil; offsetsAt = p.position
                default: duplicate = !others.insert(other).inserted  // unknown fields are ignored, as the reference does
                }
                guard !duplicate else {
                    throw fail(.invalidJSON, "duplicate field \"\(known.map { String(decoding: Self.fields[$0], as: UTF8.self) } ?? other)\"", tensor: name)
                }
                p.skipValue()
            }
            let end = p.position
            guard let dtypeAt else { throw fail(.invalidJSON, "missing field \"dtype\"", tensor: name) }
            guard let shapeAt else { throw fail(.invalidJSON, "missing field \"shape\"", tensor: name) }
            guard let offsetsAt else { throw fail(.invalidJSON, "missing field \"data_offsets\"", tensor: name) }

            p.position = dtypeAt
            guard p.current == UInt8(ascii: "\"") else { throw fail(.invalidJSON, "dtype is not a string", tensor: name) }
            let dtype: DType
            if let raw = p.rawString(), let i = Self.dtypeNames.firstIndex(where: { raw.elementsEqual($0) }) {
                dtype = DType.allCases[i]
            } else {
                p.position = dtypeAt
                let dtypeName = try p.parseString()
                guard let d = DType(rawValue: dtypeName) else { throw fail(.unknownDType, "\"\(dtypeName)\"", tensor: name) }
                dtype = d
            }

            p.position = shapeAt
            guard p.current == UInt8(ascii: "[") else { throw fail(.invalidJSON, "shape is not an array", tensor: name) }
            p.position += 1
            shapes.start()
            while next(&p, closeArray) {
                guard let u = p.uint64Value() else { throw fail(.invalidJSON, "shape holds a value that is not an unsigned 64-bit integer", tensor: name) }
                guard let d = Int(exactly: u) else { throw fail(.overflow, "dimension \(u) is too large", tensor: name) }
                shapes.append(d)
            }

            p.position = offsetsAt
            guard p.current == UInt8(ascii: "[") else { throw fail(.invalidJSON, "data_offsets is not an array of two integers", tensor: name) }
            p.position += 1
            var count = 0
            var b: UInt64?, e: UInt64?
            while next(&p, closeArray) {
                let v = p.uint64Value()
                if count == 0 { b = v } else if count == 1 { e = v }
                count += 1
            }
            guard count == 2 else { throw fail(.invalidJSON, "data_offsets is not an array of two integers", tensor: name) }
            guard let b, let e else {
                throw fail(.invalidJSON, "data_offsets holds a value that is not an unsigned 64-bit integer", tensor: name)
            }
            guard let begin = Int(exactly: b), let endOffset = Int(exactly: e) else {
                throw fail(.overflow, "data offsets [\(b), \(e)] are too large", tensor: name)
            }
            if endOffset < begin { throw fail(.invalidOffset, "data_offsets [\(begin), \(endOffset)] end before they begin", tensor: name) }
            tensors.append(TensorInfo(name: name, dtype: dtype, shape: shapes.finish(), dataOffsets: begin..<endOffset))
            p.position = end
        }

        // Rule 6: contiguous offsets in (begin, end) order, sizes that match the shapes.
        // Writers list tensors in offset order, so the (stable) sort is usually skipped.
        let ranges = tensors.map(\.dataOffsets)
        let inOrder = ranges.indices.dropFirst().allSatisfy {
            (ranges[$0 - 1].lowerBound, ranges[$0 - 1].upperBound) <= (ranges[$0].lowerBound, ranges[$0].upperBound)
        }
        let order = inOrder ? Array(ranges.indices) : ranges.indices.sorted {
            (ranges[$0].lowerBound, ranges[$0].upperBound) < (ranges[$1].lowerBound, ranges[$1].upperBound)
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

/// Hands out one array per distinct recent shape: headers repeat a few shapes over and over, and
/// sharing them saves an allocation per tensor.
private struct ShapeCache {
    private var recent: [[Int]] = []
    private var dims: [Int] = []

    mutating func start() { dims.removeAll(keepingCapacity: true) }

    mutating func append(_ d: Int) { dims.append(d) }

    mutating func finish() -> [Int] {
        if let i = recent.firstIndex(of: dims) {
            if i > 0 { recent.swapAt(0, i) }
            return recent[0]
        }
        let shape = Array(dims)
        recent.insert(shape, at: 0)
        if recent.count > 8 { recent.removeLast() }
        return shape
    }
}
