/// Writes GGUF v3 files as gguf-py and llama.cpp write them: header, metadata, tensor infos,
/// padding to the alignment, then each tensor's data padded to the alignment (the last one too).
/// The layout is computed from the tensors' types and dims before a byte is written, so the
/// data can be appended one tensor at a time.
struct GGUFLayout {
    struct Tensor {
        let name: String
        /// GGML order.
        let dims: [Int]
        let type: GGMLType
        var offset = 0
        var byteCount: Int { dims.reduce(1, *) / type.blockSize * type.typeSize }
    }

    let metadata: [(key: String, value: GGUFValue)]
    private(set) var tensors: [Tensor]
    let alignment: Int
    /// Header, metadata, tensor infos and the padding before the data.
    let header: [UInt8]

    init(metadata: [(key: String, value: GGUFValue)], tensors: [Tensor], alignment: Int = 32) throws {
        var offset = 0
        var placed = tensors
        for i in placed.indices {
            let t = placed[i]
            guard t.name.utf8.count < GGUFFile.maxNameBytes else { throw InputError(t.name, "a GGUF tensor name is at most \(GGUFFile.maxNameBytes - 1) bytes") }
            guard (t.dims.first ?? 1) % t.type.blockSize == 0 else { throw InputError(t.name, "rows of \(t.dims.first ?? 1) values are not whole \(t.type.name) blocks") }
            placed[i].offset = offset
            offset = (offset + t.byteCount + alignment - 1) / alignment * alignment
        }
        self.metadata = metadata
        self.tensors = placed
        self.alignment = alignment
        var b = ByteSink()
        b.bytes += Array("GGUF".utf8)
        b.u32(3)
        b.u64(UInt64(placed.count))
        b.u64(UInt64(metadata.count))
        for (key, value) in metadata {
            b.string(key)
            b.u32(value.typeCode)
            b.value(value)
        }
        for t in placed {
            b.string(t.name)
            b.u32(UInt32(t.dims.count))
            for d in t.dims { b.u64(UInt64(d)) }
            b.u32(t.type.rawValue)
            b.u64(UInt64(t.offset))
        }
        while b.bytes.count % alignment != 0 { b.bytes.append(0) }
        header = b.bytes
    }

    /// Where a tensor's bytes come from: computed, computed in pieces (the closure hands each
    /// piece, in order, to the function it is given), or copied from a file range (by the kernel).
    enum Data {
        case bytes([UInt8])
        case stream((([UInt8]) throws -> Void) throws -> Void)
        case copy(FileDescriptor, offset: Int)
    }

    /// Writes the whole file: `data(i)` gives tensor i's bytes.
    func write(to fd: FileDescriptor, data: (Int) throws -> [UInt8]) throws {
        try write(to: fd) { .bytes(try data($0)) }
    }

    func write(to fd: FileDescriptor, source: (Int) throws -> Data) throws {
        try fd.writeAll(header)
        for (i, t) in tensors.enumerated() {
            switch try source(i) {
            case .bytes(let bytes):
                precondition(bytes.count == t.byteCount, "tensor \(t.name): \(bytes.count) bytes for \(t.byteCount)")
                try fd.writeAll(bytes)
            case .stream(let produce):
                var written = 0
                try produce { piece in
                    written += piece.count
                    precondition(written <= t.byteCount, "tensor \(t.name): more than \(t.byteCount) bytes")
                    try fd.writeAll(piece)
                }
                precondition(written == t.byteCount, "tensor \(t.name): \(written) bytes for \(t.byteCount)")
            case .copy(let from, let offset):
                try fd.copy(from: from, offset: offset, count: t.byteCount)
            }
            let pad = (alignment - t.byteCount % alignment) % alignment
            if pad > 0 { try fd.writeAll([UInt8](repeating: 0, count: pad)) }
        }
    }
}

/// Little-endian GGUF fields.
private struct ByteSink {
    var bytes: [UInt8] = []
    mutating func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u32(_ v: UInt32) { put(v) }
    mutating func u64(_ v: UInt64) { put(v) }
    mutating func string(_ s: String) { u64(UInt64(s.utf8.count)); bytes += Array(s.utf8) }

    mutating func value(_ v: GGUFValue) {
        switch v {
        case .u8(let x): put(x)
        case .i8(let x): put(x)
        case .u16(let x): put(x)
        case .i16(let x): put(x)
        case .u32(let x): put(x)
        case .i32(let x): put(x)
        case .f32(let x): put(x.bitPattern)
        case .bool(let x): put(UInt8(x ? 1 : 0))
        case .string(let s): string(s)
        case .array(let type, let values):
            u32(type)
            u64(UInt64(values.count))
            for e in values { value(e) }
        case .u64(let x): put(x)
        case .i64(let x): put(x)
        case .f64(let x): put(x.bitPattern)
        }
    }
}
