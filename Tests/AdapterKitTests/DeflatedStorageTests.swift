import CZlib
import Foundation
import Testing
@testable import AdapterKit

// Hostile PyTorch checkpoints whose few KB or MB of deflated data declare storages of hundreds of MB or
// GB, built here (nothing big is committed): what reading them costs is measured by the bytes inflated.

/// A protocol-2 pickle of `{name: _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())}`,
/// every tensor a float32 view of one `FloatStorage` ("0") of `elements` elements, as torch.save writes it.
func torchPickle(elements: Int, tensors: [(name: String, offset: Int, shape: [Int], stride: [Int])]) -> [UInt8] {
    var p: [UInt8] = [0x80, 2, 0x7d]  // PROTO 2, EMPTY_DICT
    func string(_ s: String) {
        let u = Array(s.utf8)
        p.append(0x58)  // BINUNICODE
        p += withUnsafeBytes(of: UInt32(u.count).littleEndian) { Array($0) }
        p += u
    }
    func int(_ v: Int) {
        p.append(0x8a)  // LONG1, 8 bytes little-endian
        p.append(8)
        p += withUnsafeBytes(of: Int64(v).littleEndian) { Array($0) }
    }
    func global(_ module: String, _ name: String) { p.append(0x63); p += Array("\(module)\n\(name)\n".utf8) }
    func tuple(_ items: [Int]) { p.append(0x28); items.forEach(int); p.append(0x74) }
    p.append(0x28)  // MARK for SETITEMS
    for t in tensors {
        string(t.name)
        global("torch._utils", "_rebuild_tensor_v2")
        p.append(0x28)  // MARK: the arguments
        p.append(0x28)  // MARK: the persistent id
        string("storage"); global("torch", "FloatStorage"); string("0"); string("cpu"); int(elements)
        p.append(0x74)  // TUPLE
        p.append(0x51)  // BINPERSID
        int(t.offset)
        tuple(t.shape)
        tuple(t.stride)
        p.append(0x89)  // False
        global("collections", "OrderedDict"); p.append(0x29); p.append(0x52)  // OrderedDict()
        p.append(0x74)  // TUPLE
        p.append(0x52)  // REDUCE
    }
    p.append(0x75)  // SETITEMS
    p.append(0x2e)  // STOP
    return p
}

/// A raw deflate stream of `count` zero bytes (a multiple of 1 MiB) and its CRC-32: one full-flushed
/// megabyte compressed once and repeated (each copy is independent), so gigabytes cost milliseconds.
func zeroDeflate(_ count: Int) -> (data: [UInt8], crc: UInt32) {
    precondition(count % (1 << 20) == 0)
    let chunk = [UInt8](repeating: 0, count: 1 << 20)
    var stream = z_stream()
    precondition(deflateInit2_(&stream, 9, Z_DEFLATED, -MAX_WBITS, 9, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK)
    defer { deflateEnd(&stream) }
    var out = [UInt8](repeating: 0, count: 1 << 20)
    func run(_ input: [UInt8], _ flush: Int32) -> [UInt8] {
        var produced: [UInt8] = []
        input.withUnsafeBufferPointer { inp in
            stream.next_in = UnsafeMutablePointer(mutating: inp.baseAddress)
            stream.avail_in = uInt(inp.count)
            repeat {
                out.withUnsafeMutableBufferPointer { o in
                    stream.next_out = o.baseAddress
                    stream.avail_out = uInt(o.count)
                    _ = deflate(&stream, flush)
                    produced += o[0..<(o.count - Int(stream.avail_out))]
                }
            } while stream.avail_out == 0
        }
        return produced
    }
    let segment = run(chunk, Z_FULL_FLUSH)
    precondition(run(chunk, Z_FULL_FLUSH) == segment, "full-flushed segments of zeros should be identical")
    let end = run([], Z_FINISH)
    let n = count >> 20
    var data: [UInt8] = []
    data.reserveCapacity(segment.count * n + end.count)
    for _ in 0..<n { data += segment }
    data += end
    let one = chunk.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }
    var crc: uLong = 0
    for _ in 0..<n { crc = crc32_combine(crc, one, 1 << 20) }
    return (data, UInt32(crc))
}

/// `bytes` as one raw deflate stream.
func deflateRaw(_ bytes: [UInt8]) -> [UInt8] {
    var stream = z_stream()
    precondition(deflateInit2_(&stream, 9, Z_DEFLATED, -MAX_WBITS, 9, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK)
    defer { deflateEnd(&stream) }
    var out = [UInt8](repeating: 0, count: Int(deflateBound(&stream, uLong(bytes.count))) + 16)
    let n = bytes.withUnsafeBufferPointer { inp in
        out.withUnsafeMutableBufferPointer { o in
            stream.next_in = UnsafeMutablePointer(mutating: inp.baseAddress)
            stream.avail_in = uInt(inp.count)
            stream.next_out = o.baseAddress
            stream.avail_out = uInt(o.count)
            precondition(deflate(&stream, Z_FINISH) == Z_STREAM_END)
            return o.count - Int(stream.avail_out)
        }
    }
    return Array(out[0..<n])
}

/// A zip archive written record by record: (name, payload, deflated, crc, uncompressed size).
func rawZip(_ members: [(name: String, payload: [UInt8], deflated: Bool, crc: UInt32, size: Int)]) -> [UInt8] {
    func u16(_ v: Int) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8 & 0xff)] }
    func u32(_ v: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    var out: [UInt8] = [], central: [UInt8] = []
    for m in members {
        let name = Array(m.name.utf8), method = m.deflated ? 8 : 0, offset = out.count
        out += u32(0x0403_4b50) + u16(20) + u16(0) + u16(method) + u16(0) + u16(0x21) + u32(Int(m.crc))
        out += u32(m.payload.count) + u32(m.size) + u16(name.count) + u16(0) + name + m.payload
        central += u32(0x0201_4b50) + u16(20) + u16(20) + u16(0) + u16(method) + u16(0) + u16(0x21) + u32(Int(m.crc))
        central += u32(m.payload.count) + u32(m.size) + u16(name.count) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(offset) + name
    }
    let cd = out.count
    out += central
    out += u32(0x0605_4b50) + u16(0) + u16(0) + u16(members.count) + u16(members.count) + u32(central.count) + u32(cd) + u16(0)
    return out
}

/// A torch.save checkpoint whose float32 tensors all view one deflated storage of `storageBytes` zeros.
func deflatedCheckpoint(_ dir: TempDir, _ name: String, storageBytes: Int,
                        tensors: [(name: String, offset: Int, shape: [Int], stride: [Int])]) -> String {
    let pickle = torchPickle(elements: storageBytes / 4, tensors: tensors)
    let storage = zeroDeflate(storageBytes)
    func stored(_ n: String, _ b: [UInt8]) -> (String, [UInt8], Bool, UInt32, Int) {
        (n, b, false, UInt32(b.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }), b.count)
    }
    return dir.write(name, rawZip([stored("archive/data.pkl", pickle), stored("archive/byteorder", Array("little".utf8)),
                                   ("archive/data/0", storage.data, true, storage.crc, storageBytes)]))
}

@Suite("Deflated storages cost what their views need")
struct DeflatedStorageTests {
    static let mib = 1 << 20

    @Test("a 4-byte view at the start of a deflated 2 GiB storage inflates only its own bytes")
    func bombAtStart() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = deflatedCheckpoint(dir, "bomb.bin", storageBytes: 2048 * Self.mib, tensors: [("w", 0, [1], [1])])
        #expect(readBytes(path).count < 3 * Self.mib)
        let c = try TorchCheckpoint(path: path)
        #expect(try c.floats("w") == [0])
        #expect(c.inflatedByteCount == 4)
    }

    @Test("a view at the end of a deflated storage inflates up to its last byte and keeps only the view")
    func bombAtEnd() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let size = 64 * Self.mib
        let path = deflatedCheckpoint(dir, "bomb.bin", storageBytes: size, tensors: [("w", size / 4 - 2, [2], [1])])
        let c = try TorchCheckpoint(path: path)
        #expect(try c.floats("w") == [0, 0])
        // The whole storage passes through zlib once (its CRC-32 checked), but 8 bytes are kept.
        #expect(c.inflatedByteCount == size)
        #expect(!c.inflatedStoragesHeld)
    }

    @Test("twenty one-element views of a 256 MB deflated storage inflate it once, up to the furthest view")
    func manyViewsInflateOnce() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let size = 256 * Self.mib, elements = size / 4
        let views = (0..<20).map { i in (name: "t\(i)", offset: i * (elements / 20), shape: [1, 1], stride: [1, 1]) }
        let path = deflatedCheckpoint(dir, "views.bin", storageBytes: size, tensors: views)
        let c = try TorchCheckpoint(path: path)
        #expect(try c.floats(views[0].name) == [0])
        // Only the bytes the twenty views touch are kept, not the 243 MB between the first and the last.
        #expect(c.inflatedBytesHeld == 20 * 4)
        for v in views.dropFirst() { #expect(try c.floats(v.name) == [0]) }
        let furthest = (19 * (elements / 20) + 1) * 4
        #expect(c.inflatedByteCount == furthest)
        // Every view was read: the storage is freed.
        #expect(!c.inflatedStoragesHeld)
    }

    @Test("strided views of a deflated storage are gathered from the part that was kept, with torch's values")
    func stridedView() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // Storage element i holds Float(i); A is a 3 × 2 view with strides (10, 3) from element 1000.
        let elements = 4096
        let values = (0..<elements).map { Float($0) }
        let storage = values.withUnsafeBytes { Array($0) }
        let packed = deflateRaw(storage)
        let pickle = torchPickle(elements: elements, tensors: [("a", 1000, [3, 2], [10, 3]), ("b", 3000, [2], [1]), ("c", 3500, [0], [1])])
        let crc = { (b: [UInt8]) in UInt32(b.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }) }
        let path = dir.write("strided.bin", rawZip([("archive/data.pkl", pickle, false, crc(pickle), pickle.count),
                                                     ("archive/data/0", packed, true, crc(storage), storage.count)]))
        let c = try TorchCheckpoint(path: path)
        #expect(try c.floats("a") == [1000, 1003, 1010, 1013, 1020, 1023])
        #expect(c.inflatedStoragesHeld)  // "b" is not read yet; "c" has no elements and needs nothing
        #expect(c.inflatedBytesHeld == (1024 - 1000) * 4 + 2 * 4)  // A's extent (elements 1000 … 1023) and B's
        #expect(try c.floats("c") == [])
        #expect(c.inflatedStoragesHeld)
        #expect(try c.floats("b") == [3000, 3001])
        #expect(!c.inflatedStoragesHeld)
        #expect(c.inflatedByteCount == 3002 * 4)
        // Read again after it was freed: inflated again, same values.
        #expect(try c.floats("a") == [1000, 1003, 1010, 1013, 1020, 1023])
        #expect(!c.inflatedStoragesHeld)
    }

    @Test("overlapping and touching views of a deflated storage share the kept bytes and read torch's values")
    func overlappingViews() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let storage = (0..<4096).map { Float($0) }.withUnsafeBytes { Array($0) }
        let views: [(name: String, offset: Int, shape: [Int], stride: [Int])] = [
            ("w", 3000, [2, 2], [1, 2]), ("x", 100, [50], [1]), ("y", 120, [10], [1]), ("z", 149, [3], [1]), ("v", 152, [1], [1]),
        ]
        let pickle = torchPickle(elements: 4096, tensors: views)
        let crc = { (b: [UInt8]) in UInt32(b.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }) }
        let path = dir.write("overlap.bin", rawZip([("archive/data.pkl", pickle, false, crc(pickle), pickle.count),
                                                     ("archive/data/0", deflateRaw(storage), true, crc(storage), storage.count)]))
        let c = try TorchCheckpoint(path: path)
        #expect(try c.floats("y") == (120..<130).map(Float.init))
        // x, y, z and v merge into elements 100 … 152; w is elements 3000 … 3003.
        #expect(c.inflatedBytesHeld == (153 - 100) * 4 + 4 * 4)
        #expect(try c.floats("w") == [3000, 3002, 3001, 3003])
        #expect(try c.floats("x") == (100..<150).map(Float.init))
        #expect(try c.floats("z") == [149, 150, 151])
        #expect(try c.floats("v") == [152])
        #expect(!c.inflatedStoragesHeld)
        #expect(c.inflatedByteCount == 3004 * 4)
    }

    @Test("a view reaching the end of a deflated storage gets its CRC-32 checked")
    func crcCheckedWhenWhole() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let storage = (0..<1024).map { Float($0) }.withUnsafeBytes { Array($0) }
        let pickle = torchPickle(elements: 1024, tensors: [("w", 1020, [4], [1])])
        let crc = { (b: [UInt8]) in UInt32(b.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }) }
        let path = dir.write("crc.bin", rawZip([("archive/data.pkl", pickle, false, crc(pickle), pickle.count),
                                                 ("archive/data/0", deflateRaw(storage), true, crc(storage) ^ 1, storage.count)]))
        let c = try TorchCheckpoint(path: path)
        let error = #expect(throws: ZipError.self) { try c.floats("w") }
        #expect(error?.description.contains("CRC-32 mismatch") == true)
    }

    @Test("inspect reads an adapter of deflated storages once per storage")
    func adapterReportReadsOnce() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let size = 16 * Self.mib, elements = size / 4
        var views: [(name: String, offset: Int, shape: [Int], stride: [Int])] = []
        for i in 0..<4 {
            views.append(("base_model.model.layers.\(i).q_proj.lora_A.weight", (2 * i) * (elements / 8), [1, 1], [1, 1]))
            views.append(("base_model.model.layers.\(i).q_proj.lora_B.weight", (2 * i + 1) * (elements / 8), [1, 1], [1, 1]))
        }
        let path = deflatedCheckpoint(dir, "adapter_model.bin", storageBytes: size, tensors: views)
        let adapter = try Adapter(path: path)
        let report = try AdapterReport(adapter)
        #expect(report.modules.count == 4)
        let c = try #require(adapter.store as? TorchCheckpoint)
        #expect(c.inflatedByteCount == (7 * (elements / 8) + 1) * 4)
    }

    @Test("a deflated storage whose stream ends before what a view needs is refused")
    func shortStream() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // The storage claims 4 MiB + 512 bytes but the stream holds 4 MiB of zeros; the view is its last element.
        let declared = 4 * Self.mib + 512
        let pickle = torchPickle(elements: declared / 4, tensors: [("w", declared / 4 - 1, [1], [1])])
        let storage = zeroDeflate(4 * Self.mib)
        let crc = UInt32(pickle.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) })
        let path = dir.write("short.bin", rawZip([("archive/data.pkl", pickle, false, crc, pickle.count),
                                                   ("archive/data/0", storage.data, true, storage.crc, declared)]))
        let c = try TorchCheckpoint(path: path)
        let error = #expect(throws: ZipError.self) { try c.floats("w") }
        #expect(error?.description.contains("inflates to \(4 * Self.mib) bytes, not the declared \(declared)") == true, "\(String(describing: error))")
        #expect(c.inflatedByteCount == 4 * Self.mib)
    }
}
