/// A tensor to be written: name, dtype, shape. Its bytes come later, streamed.
public struct TensorSpec: Sendable, Hashable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]

    public init(name: String, dtype: DType, shape: [Int]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
    }

    public init(_ info: TensorInfo) {
        self.init(name: info.name, dtype: info.dtype, shape: info.shape)
    }

    public init(_ entry: TensorEntry) {
        self.init(name: entry.name, dtype: entry.dtype, shape: entry.shape)
    }
}

/// Why a set of tensors cannot be written.
public struct SafetensorsWriteError: Error, Sendable, CustomStringConvertible {
    public let file: String
    public let problem: String
    public var description: String { "\(file): cannot write: \(problem)" }
}

/// The layout of a safetensors file as the reference writer makes it: tensors ordered by dtype
/// alignment descending then name, contiguous offsets, compact JSON with `__metadata__` first,
/// padded with spaces to a multiple of 8.
public struct SafetensorsLayout: Sendable {
    /// Tensors in file order with their offsets.
    public let tensors: [TensorInfo]
    /// The 8-byte length prefix and the padded header JSON.
    public let headerBytes: [UInt8]
    /// The size of the whole file.
    public let fileSize: Int

    /// - Parameter metadata: nil writes no `__metadata__`; otherwise pairs are written in the given order.
    public init(tensors specs: [TensorSpec], metadata: [(key: String, value: String)]?, file: String = "<output>") throws {
        var names = Set<String>()
        for s in specs {
            guard s.name != "__metadata__" else { throw SafetensorsWriteError(file: file, problem: "a tensor may not be named __metadata__") }
            guard names.insert(s.name).inserted else { throw SafetensorsWriteError(file: file, problem: "tensor \"\(s.name)\" is given twice") }
        }
        let ordered = specs.sorted { a, b in
            if a.dtype != b.dtype { return a.dtype < b.dtype }
            return a.name.precedesInBytes(b.name)
        }
        var offset = 0
        var infos: [TensorInfo] = []
        var root = JSONObject()
        if let metadata {
            var seen = Set<String>()
            for (k, _) in metadata where !seen.insert(k).inserted {
                throw SafetensorsWriteError(file: file, problem: "metadata key \"\(k)\" is given twice")
            }
            root.members.append(("__metadata__", .object(JSONObject(metadata.map { ($0.key, JSONValue.string($0.value)) }))))
        }
        for s in ordered {
            var elements = 1
            for d in s.shape {
                let (p, o) = elements.multipliedReportingOverflow(by: d)
                guard !o, d >= 0 else { throw SafetensorsWriteError(file: file, problem: "tensor \"\(s.name)\" has an invalid shape \(s.shape)") }
                elements = p
            }
            let (bits, o) = elements.multipliedReportingOverflow(by: s.dtype.bits)
            guard !o, bits % 8 == 0 else { throw SafetensorsWriteError(file: file, problem: "tensor \"\(s.name)\" does not fill whole bytes") }
            let info = TensorInfo(name: s.name, dtype: s.dtype, shape: s.shape, dataOffsets: offset..<(offset + bits / 8))
            offset += bits / 8
            infos.append(info)
            root.members.append((s.name, .object(JSONObject([
                ("dtype", .string(s.dtype.rawValue)),
                ("shape", .array(s.shape.map { .integer($0) })),
                ("data_offsets", .array([.integer(info.dataOffsets.lowerBound), .integer(info.dataOffsets.upperBound)])),
            ]))))
        }
        var json = Array(JSONWriter.compact(.object(root)).utf8)
        json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - json.count % 8) % 8))
        var prefix = [UInt8](repeating: 0, count: 8)
        let n = UInt64(json.count)
        for i in 0..<8 { prefix[i] = UInt8(truncatingIfNeeded: n >> (8 * UInt64(i))) }
        self.tensors = infos
        self.headerBytes = prefix + json
        self.fileSize = headerBytes.count + offset
    }
}

/// Streams a safetensors file: the header first, then each tensor's bytes in layout order.
///
/// Holds no tensor data itself; the caller pushes bytes in chunks of any size. `finish` checks
/// that every byte of every tensor arrived.
public final class SafetensorsWriter: TensorFileWriter {
    public let layout: SafetensorsLayout
    let output: FileDescriptor
    private var written = 0
    private var buffer: UnsafeMutableRawBufferPointer
    private var buffered = 0
    /// With `hashing`: the SHA-256 of every byte written so far.
    private var hash: SHA256?
    /// With `hashing`, once `finish` returned: the file's SHA-256 (a split merge's manifest).
    public private(set) var sha256: String?

    /// Writes the header to `output` immediately. With `hashing`, every byte is hashed on its way
    /// out (region copies then go through this process instead of the kernel), so the file's
    /// checksum needs no second read.
    public init(layout: SafetensorsLayout, output: FileDescriptor, hashing: Bool = false) throws {
        self.layout = layout
        self.output = output
        self.buffer = .allocate(byteCount: 1 << 20, alignment: 64)
        if hashing { hash = SHA256() }
        try layout.headerBytes.withUnsafeBytes { try append(raw: $0) }
    }

    deinit { buffer.deallocate() }

    private var dataWritten: Int { written - layout.headerBytes.count }

    private func append(raw bytes: UnsafeRawBufferPointer) throws {
        guard written + bytes.count <= layout.fileSize else {
            throw SafetensorsWriteError(file: output.path, problem: "more bytes given than the tensors hold")
        }
        written += bytes.count
        hash?.update(bytes)
        if bytes.count >= buffer.count {
            try flush()
            try output.writeAll(bytes)
            return
        }
        if buffered + bytes.count > buffer.count { try flush() }
        UnsafeMutableRawBufferPointer(rebasing: buffer[buffered..<(buffered + bytes.count)]).copyMemory(from: bytes)
        buffered += bytes.count
    }

    private func flush() throws {
        guard buffered > 0 else { return }
        try output.writeAll(UnsafeRawBufferPointer(rebasing: buffer[0..<buffered]))
        buffered = 0
    }

    /// Appends data bytes, continuing the current tensor (tensors follow each other in layout order).
    public func append(_ bytes: UnsafeRawBufferPointer) throws {
        try append(raw: bytes)
    }

    /// Appends `count` bytes copied from another file, in the kernel where possible.
    public func append(copyingFrom source: FileDescriptor, offset: Int, count: Int) throws {
        guard written + count <= layout.fileSize else {
            throw SafetensorsWriteError(file: output.path, problem: "more bytes given than the tensors hold")
        }
        try flush()
        if hash != nil {
            try output.copyByReading(from: source, offset: offset, count: count) { self.hash!.update($0) }
        } else {
            try output.copy(from: source, offset: offset, count: count)
        }
        written += count
    }

    /// Appends a region of another file, in the kernel where possible.
    func append(_ region: FileRegion) throws {
        try append(copyingFrom: region.descriptor, offset: region.range.lowerBound, count: region.range.count)
    }

    /// Flushes and checks that the file is complete.
    public func finish() throws {
        try flush()
        guard written == layout.fileSize else {
            throw SafetensorsWriteError(file: output.path, problem: "only \(written) of \(layout.fileSize) bytes were given")
        }
        if var h = hash {
            sha256 = h.finish()
            hash = nil
        }
    }
}

extension SafetensorsWriter {
    /// Writes a whole safetensors file into `output` (an open, empty file): the header, then
    /// `data` once per tensor in layout order, appending exactly that tensor's bytes; checks that
    /// every byte arrived and fsyncs when asked. The one way whole files are written (adapters,
    /// exports, the atomic `write(to:)`).
    @discardableResult
    static func write(
        into output: FileDescriptor, path: String, tensors: [TensorSpec], metadata: [(key: String, value: String)]?, sync: Bool,
        data: (TensorInfo, SafetensorsWriter) throws -> Void
    ) throws -> SafetensorsLayout {
        let layout = try SafetensorsLayout(tensors: tensors, metadata: metadata, file: path)
        let writer = try SafetensorsWriter(layout: layout, output: output)
        for t in layout.tensors { try data(t, writer) }
        try writer.finish()
        if sync { try output.sync() }
        return layout
    }

    /// Writes a whole safetensors file: under a temporary name beside `path`, renamed into place
    /// only when every tensor's bytes were given. `data` is called once per tensor, in layout
    /// order, and appends exactly that tensor's bytes. On any error nothing appears at `path`.
    public static func write(
        to path: String, tensors: [TensorSpec], metadata: [(key: String, value: String)]?, replacing: Bool = false, sync: Bool = true,
        data: (TensorInfo, SafetensorsWriter) throws -> Void
    ) throws {
        let out = try TemporaryOutput(target: path, kind: .file)
        do {
            try write(into: out.file!, path: path, tensors: tensors, metadata: metadata, sync: sync, data: data)
            try out.commit(replacing: replacing)
        } catch {
            out.discard()
            throw error
        }
    }
}
