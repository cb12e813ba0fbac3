/// GGUF (llama.cpp's model and adapter container, version 2 and 3, little-endian), read strictly
/// (docs/formats.md §11): every count, length, offset and alignment is checked against the file
/// with checked arithmetic before it is used, and every problem is one `InputError` line.
///
/// Layout: "GGUF", version u32, tensor count u64, metadata count u64; the metadata key/values
/// (key string, value type u32, value); the tensor infos (name string, n_dims u32, dims u64 each in
/// GGML order — innermost first, the reverse of numpy's —, GGML type u32, offset u64); padding to
/// `general.alignment` (default 32); the tensor data, each tensor at its offset from the data
/// start, one after the other, each padded to the alignment (gguf.cpp refuses any other order).
public final class GGUFFile: @unchecked Sendable {
    public let path: String
    public let version: UInt32
    /// Key/value pairs in file order.
    public let metadata: [(key: String, value: GGUFValue)]
    public let tensors: [GGUFTensorInfo]
    public let alignment: Int
    /// Where the tensor data starts (a multiple of `alignment`).
    public let dataOffset: Int
    public let fileSize: Int
    let descriptor: FileDescriptor
    private let index: [String: Int]

    /// llama.cpp's limits (ggml.h): GGML_MAX_DIMS and GGML_MAX_NAME.
    static let maxDimensions = 4
    static let maxNameBytes = 64

    public init(path: String) throws {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.openForReading(path) } catch let e as SystemError { throw InputError(path, "cannot read: \(e.reason)") }
        let status = try fd.status()
        guard status.isRegular else { throw InputError(path, "not a regular file") }
        self.path = path
        self.descriptor = fd
        self.fileSize = status.size
        var r = GGUFReader(fd, path: path, size: status.size)
        let magic = try r.bytes(4, what: "the magic")
        guard magic == Array("GGUF".utf8) else { throw InputError(path, "not a GGUF file (it does not start with \"GGUF\")") }
        let version = try r.u32("the version")
        if version > 0xFFFF && version.byteSwapped <= 3 { throw InputError(path, "a big-endian GGUF file; only little-endian files are read") }
        guard version == 2 || version == 3 else { throw InputError(path, "GGUF version \(version); versions 2 and 3 are read") }
        self.version = version
        let tensorCount = try r.count("the tensor count", minimumBytesEach: 24)
        let keyCount = try r.count("the metadata count", minimumBytesEach: 13)
        var metadata: [(String, GGUFValue)] = []
        var seen = Set<String>()
        metadata.reserveCapacity(keyCount)
        for i in 0..<keyCount {
            let key = try r.string("metadata key \(i)")
            guard seen.insert(key).inserted else { throw InputError(path, "metadata key \(quotedForMessage(key)) appears twice") }
            let type = try r.u32("the type of \(key)")
            metadata.append((key, try r.value(type: type, of: key, nested: false)))
        }
        self.metadata = metadata
        var alignment = 32
        if let a = metadata.first(where: { $0.0 == "general.alignment" })?.1 {
            guard case .u32(let v) = a else { throw InputError(path, "general.alignment is \(a.typeName), not UINT32") }
            guard v > 0, v & (v - 1) == 0 else { throw InputError(path, "general.alignment is \(v), not a power of two") }
            alignment = Int(v)
        }
        self.alignment = alignment
        var tensors: [GGUFTensorInfo] = []
        tensors.reserveCapacity(tensorCount)
        var index: [String: Int] = [:]
        var expected = 0
        for i in 0..<tensorCount {
            let name = try r.string("the name of tensor \(i)")
            guard name.utf8.count < Self.maxNameBytes else {
                throw InputError(path, "tensor name \(quotedForMessage(name)) is \(name.utf8.count) bytes; llama.cpp allows at most \(Self.maxNameBytes - 1)")
            }
            guard index[name] == nil else { throw InputError(path, "tensor \(quotedForMessage(name)) appears twice") }
            let nDims = try r.u32("the dimension count of \(name)")
            guard nDims <= Self.maxDimensions else { throw InputError(path, "tensor \(name) has \(nDims) dimensions; GGUF allows at most \(Self.maxDimensions)") }
            var dims: [Int] = []
            for d in 0..<Int(nDims) {
                let v = try r.u64("dimension \(d) of \(name)")
                guard v <= UInt64(Int64.max) else { throw InputError(path, "dimension \(d) of \(name) is \(v), beyond 2^63 − 1") }
                dims.append(Int(v))
            }
            let rawType = try r.u32("the type of \(name)")
            guard let type = GGMLType(rawValue: rawType) else { throw InputError(path, "tensor \(name) has GGML type \(rawType), which is not a known type") }
            let offset = try r.u64("the offset of \(name)")
            let elements = try dims.reduce(1) { n, d in
                let (p, o) = n.multipliedReportingOverflow(by: d)
                guard !o else { throw InputError(path, "tensor \(name)'s dimensions \(dims) overflow") }
                return p
            }
            let rowLength = dims.first ?? 1
            guard rowLength % type.blockSize == 0 else {
                throw InputError(path, "tensor \(name) has rows of \(rowLength) values, not a multiple of \(type.name)'s block of \(type.blockSize)")
            }
            let (bytes, overflow) = (elements / type.blockSize).multipliedReportingOverflow(by: type.typeSize)
            guard !overflow else { throw InputError(path, "tensor \(name) is too large to address") }
            guard offset == UInt64(expected) else {
                throw InputError(path, "tensor \(name) is at data offset \(offset), but the tensors before it end at \(expected) (GGUF tensors follow one another, each padded to \(alignment) bytes)")
            }
            let (end, o1) = expected.addingReportingOverflow(bytes)
            guard !o1, let padded = Self.padded(end, to: alignment) else { throw InputError(path, "tensor \(name) ends beyond what can be addressed") }
            index[name] = tensors.count
            tensors.append(GGUFTensorInfo(name: name, dims: dims, type: type, offset: Int(offset), byteCount: bytes))
            expected = padded
        }
        self.tensors = tensors
        self.index = index
        guard let dataOffset = Self.padded(r.position, to: alignment) else { throw InputError(path, "the header ends beyond what can be addressed") }
        self.dataOffset = dataOffset
        if let last = tensors.last {
            let (end, o) = dataOffset.addingReportingOverflow(last.offset + last.byteCount)
            guard !o, end <= status.size else {
                throw InputError(path, "the file holds \(status.size) bytes but its tensors need \(o ? "more than can be addressed" : "\(end)") (truncated?)")
            }
        }
    }

    static func padded(_ n: Int, to alignment: Int) -> Int? {
        let (s, o) = n.addingReportingOverflow(alignment - 1)
        return o ? nil : s / alignment * alignment
    }

    public func tensor(_ name: String) -> GGUFTensorInfo? { index[name].map { tensors[$0] } }

    /// The value of `key`, nil when absent.
    public func value(_ key: String) -> GGUFValue? { metadata.first { $0.key == key }?.value }

    /// The file range of a tensor's bytes.
    public func range(of t: GGUFTensorInfo) -> Range<Int> { (dataOffset + t.offset)..<(dataOffset + t.offset + t.byteCount) }

    /// A tensor's bytes.
    public func bytes(of t: GGUFTensorInfo) throws -> [UInt8] {
        let r = range(of: t)
        let b = try descriptor.readBytes(count: r.count, at: r.lowerBound)
        guard b.count == r.count else { throw InputError(path, "the file shrank while being read") }
        return b
    }

    /// Whether `path` starts with the GGUF magic.
    public static func looksLikeGGUF(_ path: String) -> Bool {
        guard let fd = try? FileDescriptor.openForReading(path), let b = try? fd.readBytes(count: 4, at: 0) else { return false }
        return b == Array("GGUF".utf8)
    }
}

/// One tensor of a GGUF file.
public struct GGUFTensorInfo: Sendable, Hashable {
    public let name: String
    /// In GGML order: dims[0] is the row length (numpy's last dimension).
    public let dims: [Int]
    public let type: GGMLType
    /// From the start of the data section.
    public let offset: Int
    public let byteCount: Int

    /// The shape in numpy order (outermost first), as safetensors and PyTorch give it.
    public var shape: [Int] { dims.reversed() }
    public var elementCount: Int { dims.reduce(1, *) }
}

/// A metadata value (gguf.h `gguf_type`).
public indirect enum GGUFValue: Sendable, Equatable {
    case u8(UInt8), i8(Int8), u16(UInt16), i16(Int16), u32(UInt32), i32(Int32), f32(Float), bool(Bool)
    case string(String)
    case array(elementType: UInt32, values: [GGUFValue])
    case u64(UInt64), i64(Int64), f64(Double)

    /// gguf.h's type names.
    static let typeNames: [UInt32: String] = [0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
                                              8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"]

    public var typeCode: UInt32 {
        switch self {
        case .u8: 0
        case .i8: 1
        case .u16: 2
        case .i16: 3
        case .u32: 4
        case .i32: 5
        case .f32: 6
        case .bool: 7
        case .string: 8
        case .array: 9
        case .u64: 10
        case .i64: 11
        case .f64: 12
        }
    }

    public var typeName: String {
        if case .array(let t, let v) = self { return "ARRAY[\(Self.typeNames[t] ?? "?")] of \(v.count)" }
        return Self.typeNames[typeCode] ?? "?"
    }

    /// An integer value of any integer type, nil otherwise.
    public var integer: Int? {
        switch self {
        case .u8(let v): Int(v)
        case .i8(let v): Int(v)
        case .u16(let v): Int(v)
        case .i16(let v): Int(v)
        case .u32(let v): Int(v)
        case .i32(let v): Int(v)
        case .u64(let v): v <= UInt64(Int.max) ? Int(v) : nil
        case .i64(let v): Int(v)
        default: nil
        }
    }

    public var string: String? { if case .string(let s) = self { s } else { nil } }
}

/// Reads a GGUF header through a window of the file, every read checked against the file's size.
struct GGUFReader {
    let fd: FileDescriptor
    let path: String
    let size: Int
    private(set) var position = 0
    private var window: [UInt8] = []
    private var windowStart = 0

    init(_ fd: FileDescriptor, path: String, size: Int) {
        self.fd = fd
        self.path = path
        self.size = size
    }

    var remaining: Int { size - position }

    /// `n` bytes from the current position.
    mutating func bytes(_ n: Int, what: String) throws -> [UInt8] {
        guard n >= 0, n <= remaining else { throw InputError(path, "the file ends inside \(what) (at byte \(position) of \(size))") }
        if position < windowStart || position + n > windowStart + window.count {
            windowStart = position
            window = try fd.readBytes(count: min(remaining, max(n, 1 << 20)), at: position)
            guard window.count >= n else { throw InputError(path, "the file shrank while being read") }
        }
        let start = position - windowStart
        position += n
        return Array(window[start..<start + n])
    }

    mutating func scalar<T: FixedWidthInteger>(_: T.Type, _ what: String) throws -> T {
        let b = try bytes(MemoryLayout<T>.size, what: what)
        return b.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(as: T.self)) }
    }

    mutating func u32(_ what: String) throws -> UInt32 { try scalar(UInt32.self, what) }
    mutating func u64(_ what: String) throws -> UInt64 { try scalar(UInt64.self, what) }

    /// A count of items each at least `minimumBytesEach` long: more than the rest of the file holds is refused.
    mutating func count(_ what: String, minimumBytesEach: Int) throws -> Int {
        let n = try u64(what)
        guard n <= UInt64(remaining / max(1, minimumBytesEach)) else {
            throw InputError(path, "\(what) is \(n), more than the \(remaining) bytes left can hold")
        }
        return Int(n)
    }

    mutating func string(_ what: String) throws -> String {
        let n = try u64("the length of \(what)")
        guard n <= UInt64(remaining) else { throw InputError(path, "\(what) claims \(n) bytes, more than the \(remaining) left") }
        let b = try bytes(Int(n), what: what)
        guard let s = String(validating: b, as: UTF8.self) else { throw InputError(path, "\(what) is not UTF-8") }
        return s
    }

    mutating func value(type: UInt32, of key: String, nested: Bool) throws -> GGUFValue {
        let what = "the value of \(key)"
        switch type {
        case 0: return .u8(try scalar(UInt8.self, what))
        case 1: return .i8(try scalar(Int8.self, what))
        case 2: return .u16(try scalar(UInt16.self, what))
        case 3: return .i16(try scalar(Int16.self, what))
        case 4: return .u32(try scalar(UInt32.self, what))
        case 5: return .i32(try scalar(Int32.self, what))
        case 6: return .f32(Float(bitPattern: try scalar(UInt32.self, what)))
        case 7:
            let b = try scalar(UInt8.self, what)
            guard b <= 1 else { throw InputError(path, "\(what) is a BOOL of \(b), not 0 or 1") }
            return .bool(b == 1)
        case 8: return .string(try string(what))
        case 9:
            guard !nested else { throw InputError(path, "\(key) holds an array of arrays, which GGUF readers do not accept") }
            let elementType = try u32("the element type of \(key)")
            guard let size = Self.minimumBytes[elementType] else {
                throw InputError(path, "\(key) is an array of type \(elementType), which is not a GGUF type")
            }
            let n = try count("the length of \(key)", minimumBytesEach: size)
            var values: [GGUFValue] = []
            values.reserveCapacity(n)
            for _ in 0..<n { values.append(try value(type: elementType, of: key, nested: true)) }
            return .array(elementType: elementType, values: values)
        case 10: return .u64(try scalar(UInt64.self, what))
        case 11: return .i64(try scalar(Int64.self, what))
        case 12: return .f64(Double(bitPattern: try scalar(UInt64.self, what)))
        default: throw InputError(path, "\(key) has value type \(type), which is not a GGUF type")
        }
    }

    /// The fewest bytes one value of a type takes (a string: its length).
    static let minimumBytes: [UInt32: Int] = [0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8]
}
