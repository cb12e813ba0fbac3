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
            guard String(validating: raw, as: UTF8.self) != nil else {
                throw fail(.invalidHeaderUTF8, "")
            }
            return try parseJSON(raw, file: file, fileSize: fileSize, headerLength: n)
        }
    }

    private static func parseJSON(_ raw: UnsafeRawBufferPointer, file: String, fileSize: Int, headerLength n: Int) throws -> SafetensorsHeader {
        func fail(_ rule: SafetensorsError.Rule, _ detail: String, tensor: String? = nil) -> SafetensorsError {
            SafetensorsError(file: file, tensor: tensor, rule: rule, detail: detail)
        }
        let root: JSONValue
        do {
            root = try JSONParser.parse(raw, allowDuplicateKeys: true)
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
