import Foundation
import Testing
@testable import AdapterKit

// Fixtures come from Fixtures/make_pytorch_fixtures.py (torch 2.13 CPU); torch is never needed here.
// Each readable fixture has a `.expected.safetensors` twin holding torch's own values.

private let pytorchFixtures: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) {
            return url.appendingPathComponent("Fixtures/pytorch").path
        }
    }
    return "Fixtures/pytorch"
}()

private func pt(_ name: String) -> String { pytorchFixtures + "/" + name }

/// The path the hand-built os.system payloads would create if anything executed them.
private let payloadMarker = "/tmp/adapter-pytorch-fixture-pwned"

/// Every tensor of `file` has the name, dtype, shape and bytes torch gave it.
private func expectMatchesTorch(_ file: String, expected: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let checkpoint = try TorchCheckpoint(path: pt(file))
    let reference = try SafetensorsFile(path: pt(expected))
    #expect(Set(checkpoint.entries.map(\.name)) == Set(reference.entries.map(\.name)), sourceLocation: sourceLocation)
    for r in reference.entries {
        let t = try #require(checkpoint.entry(r.name), sourceLocation: sourceLocation)
        #expect(t.dtype == r.dtype, "\(r.name)", sourceLocation: sourceLocation)
        #expect(t.shape == r.shape, "\(r.name)", sourceLocation: sourceLocation)
        #expect(t.byteCount == r.byteCount, "\(r.name)", sourceLocation: sourceLocation)
        let bytes = try checkpoint.withBytes(of: r.name) { Array($0) }
        #expect(bytes == (try reference.withBytes(of: r.name) { Array($0) }), "\(r.name)", sourceLocation: sourceLocation)
    }
}

/// The one-line message a refused file gives.
private func refusal(_ file: String, readAll: Bool = false) -> String? {
    do {
        let c = try TorchCheckpoint(path: file)
        if readAll {
            for t in c.entries { _ = try c.withBytes(of: t.name) { $0.count } }
        }
        return nil
    } catch {
        return String(describing: error)
    }
}

private func isClose(_ a: [Float], _ b: [Float], tolerance: Float = 1e-6) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= tolerance * max(1, abs($1)) }
}

@Suite("PyTorch checkpoints")
struct PyTorchReaderTests {
    // MARK: - Reading what torch writes

    @Test("reads every dtype torch.save writes with typed storages, in pickle order")
    func everyDtype() throws {
        try expectMatchesTorch("dtypes.pt", expected: "dtypes.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("dtypes.pt"))
        #expect(c.entries.map(\.name) == ["f32", "f64", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool", "scalar", "empty"])
        #expect(c.entries.map(\.dtype) == [.f32, .f64, .f16, .bf16, .i64, .i32, .i16, .i8, .u8, .bool, .f32, .f32])
        #expect(c.entry("scalar")?.shape == [])
        #expect(c.entry("empty")?.shape == [0, 3])
        #expect(c.archiveName == "dtypes")
    }

    @Test("reads bf16 tensors written by torch.save")
    func bf16Values() throws {
        let c = try TorchCheckpoint(path: pt("dtypes.pt"))
        // bf16 keeps 8 significant bits: 1e-3 and 65504 round as torch rounds them.
        #expect(isClose(try c.floats("bf16"), [1.0, -2.5, 3.140625, 0.0010004, 65536.0, -0.0], tolerance: 1e-4))
        #expect(try c.withBytes(of: "i64") { Array($0) } == [Int64(-(1 << 62)), -1, 0, 1 << 62].withUnsafeBytes { Array($0) })
        #expect(try c.withBytes(of: "bool") { Array($0) } == [1, 0, 1])
    }

    @Test("reads UntypedStorage tensors rebuilt with a dtype (_rebuild_tensor_v3): u16 and float8")
    func untypedStorages() throws {
        try expectMatchesTorch("dtypes_v3.pt", expected: "dtypes_v3.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("dtypes_v3.pt"))
        #expect(c.entries.map(\.dtype) == [.u16, .f8E4M3, .f8E5M2])
    }

    @Test("reads several tensors sharing one storage, with storage offsets")
    func sharedStorage() throws {
        try expectMatchesTorch("shared.pt", expected: "shared.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("shared.pt"))
        #expect(try c.floats("window") == [2, 3, 4, 5, 6, 7])
        #expect(try c.floats("tail") == [9, 10, 11])
    }

    @Test("makes non-contiguous views (transposed, stepped, permuted) contiguous when read")
    func nonContiguous() throws {
        try expectMatchesTorch("noncontig.pt", expected: "noncontig.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("noncontig.pt"))
        #expect(c.entry("transposed")?.shape == [4, 3])
        #expect(try c.floats("transposed") == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
    }

    @Test("reads deflated members")
    func deflated() throws {
        try expectMatchesTorch("deflated.pt", expected: "dtypes.expected.safetensors")
    }

    @Test("reads ZIP64 end records and extra fields")
    func zip64() throws {
        try expectMatchesTorch("zip64.pt", expected: "dtypes.expected.safetensors")
    }

    @Test("unwraps {\"state_dict\": ...} and ignores the other training values (protocol 4, OrderedDict BUILD)")
    func nestedStateDict() throws {
        try expectMatchesTorch("nested.pt", expected: "nested.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("nested.pt"))
        #expect(c.entries.map(\.name) == ["weight", "bias"])
        #expect(c.unwrappedKey == "state_dict")
    }

    @Test("reads parameters saved directly (_rebuild_parameter, protocol 5)")
    func parameters() throws {
        try expectMatchesTorch("parameter.pt", expected: "parameter.expected.safetensors")
    }

    @Test("reads a PEFT adapter_model.bin whose archive folder is \"archive\"")
    func peftAdapter() throws {
        try expectMatchesTorch("adapter_model.bin", expected: "adapter_model.expected.safetensors")
        let c = try TorchCheckpoint(path: pt("adapter_model.bin"))
        #expect(c.archiveName == "archive")
        #expect(c.entries.map(\.name) == [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        ])
        #expect(c.entry("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")?.shape == [4, 16])
        let store: any TensorContainer = c
        #expect(try store.floats("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").count == 64)
    }

    // MARK: - Refusing hostile and unsupported files

    @Test("refuses hostile and unsupported files, each with its own one-line message", arguments: [
        ("hostile_os_system.pt", "refuses global os.system"),
        ("hostile_builtins_eval.pt", "refuses global builtins.eval"),
        ("hostile_inst.pt", "refuses INST of posix.system"),
        ("hostile_unknown_global.pt", "refuses global numpy.core.multiarray._reconstruct"),
        ("hostile_deep_marks.pt", "more than 10000 nested MARKs"),
        ("hostile_truncated.pt", "no end-of-central-directory record"),
        ("hostile_cd_offset.pt", "does not fit before the end record"),
        ("hostile_local_header.pt", "zip member \"dtypes/data/0\": the local header or data descriptor disagrees with the central directory on the CRC or sizes"),
        ("hostile_bomb.pt", "inflates to more than the declared 1000 bytes"),
        ("hostile_bomb_claim.pt", "more than deflate can produce"),
        ("hostile_short_storage.pt", "holds 40 bytes but the pickle declares 12 elements of 4 bytes"),
        ("hostile_big_endian.pt", "big-endian checkpoints are not supported"),
        ("legacy.pt", "legacy torch.save format"),
        ("torchscript.pt", "a TorchScript archive (torch.jit.save) is not supported"),
    ])
    func refuses(file: String, message: String) throws {
        let text = try #require(refusal(pt(file)))
        #expect(text.contains(message), "\(text)")
        #expect(text.hasPrefix(pt(file)), "\(text)")
        #expect(!text.contains("\n"))
    }

    @Test("a corrupted storage is refused on read with a CRC-32 mismatch")
    func crcMismatch() throws {
        let c = try TorchCheckpoint(path: pt("hostile_crc.pt"))
        let error = #expect(throws: ZipError.self) { try c.withBytes(of: "f32") { $0.count } }
        #expect(error?.description.contains("CRC-32 mismatch") == true)
        #expect(error?.description.contains("dtypes/data/0") == true)
    }

    @Test("nothing in a hostile pickle is executed")
    func nothingExecuted() {
        try? FileManager.default.removeItem(atPath: payloadMarker)
        for name in ["hostile_os_system.pt", "hostile_builtins_eval.pt", "hostile_inst.pt"] {
            #expect(refusal(pt(name)) != nil)
        }
        #expect(!FileManager.default.fileExists(atPath: payloadMarker))
    }

    @Test("refuses a file that is neither zip nor pickle, and a missing file")
    func notACheckpoint() {
        #expect(refusal(pt("dtypes.expected.safetensors"))?.contains("neither a zip archive nor a pickle") == true)
        #expect(refusal(pt("no-such.pt"))?.contains("No such file") == true)
    }

    // MARK: - The pickle interpreter on hand-made programs

    private func run(_ bytes: [UInt8]) -> String? {
        var m = PickleMachine(bytes)
        defer { m.breakCycles() }
        do { _ = try m.run(); return nil } catch { return error.description }
    }

    @Test("refuses REDUCE on a value that is not an allow-listed global")
    func reduceOnValue() {
        // (N, ()) REDUCE
        #expect(run([0x80, 2, 0x4e, 0x29, 0x52, 0x2e])?.contains("refuses REDUCE on a None") == true)
    }

    @Test("refuses reading the memo before writing it, and STOP with a bad stack")
    func memoAndStop() {
        #expect(run([0x80, 2, 0x68, 7, 0x2e])?.contains("memo entry 7 is read before it is written") == true)
        #expect(run([0x80, 2, 0x4e, 0x4e, 0x2e])?.contains("STOP with 2 values") == true)
        #expect(run([0x80, 2, 0x4e])?.contains("truncated") == true)
    }

    @Test("a global name holding a newline is refused in a one-line message")
    func newlineInGlobal() {
        let pickle: [UInt8] = [0x80, 4, 0x8c, 3] + Array("os\n".utf8) + [0x8c, 6] + Array("system".utf8) + [0x93, 0x2e]
        let text = run(pickle)
        #expect(text?.contains("refuses global \"os\\u{a}.system\"") == true, "\(text ?? "")")
        #expect(text?.contains("\n") == false)
    }

    @Test("a self-referencing list is refused, not walked forever")
    func cycle() throws {
        // {'a': l} where l = []; l.append(l)
        let pickle: [UInt8] = [0x80, 2, 0x7d, 0x58, 1, 0, 0, 0, 0x61, 0x5d, 0x71, 0, 0x68, 0, 0x61, 0x73, 0x2e]
        let dir = NSTemporaryDirectory() + "pt-cycle-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/cycle.pt"
        try Data(storedZip(["archive/data.pkl": pickle])).write(to: URL(fileURLWithPath: file))
        #expect(refusal(file)?.contains("nests deeper than 200 levels") == true)
    }

    // MARK: - No crash on damaged input

    @Test("tuples nested 100,000 deep are refused, not released recursively")
    func deepTuples() {
        let pickle: [UInt8] = [0x80, 2, 0x4e] + [UInt8](repeating: 0x85, count: 100_000) + [0x2e]
        #expect(run(pickle)?.contains("tuples nest deeper than 256 levels") == true)
    }

    @Test("a pickle that builds no dict is refused")
    func notADict() throws {
        let dir = NSTemporaryDirectory() + "pt-list-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/list.pt"
        try Data(storedZip(["x/data.pkl": [0x80, 2, 0x5d, 0x2e]])).write(to: URL(fileURLWithPath: file))
        #expect(refusal(file)?.contains("the checkpoint holds a list, not a dict of tensors") == true)
    }

    @Test("every truncation and every single-byte flip of a checkpoint is an error or a valid read, never a crash",
          arguments: ["shared.pt", "deflated.pt", "zip64.pt", "nested.pt"])
    func damagedInputs(name: String) throws {
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: pt(name))))
        let dir = NSTemporaryDirectory() + "pt-damage-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/damaged.pt"
        var refused = 0
        for cut in stride(from: 0, to: original.count, by: 7) {
            try Data(original[0..<cut]).write(to: URL(fileURLWithPath: file))
            if refusal(file, readAll: true) != nil { refused += 1 }
        }
        #expect(refused == (original.count + 6) / 7)
        for i in original.indices {
            var bytes = original
            bytes[i] ^= 0xA5
            try Data(bytes).write(to: URL(fileURLWithPath: file))
            _ = refusal(file, readAll: true)
        }
    }
}

/// A zip of stored members, written record by record, for hand-made pickles.
private func storedZip(_ members: KeyValuePairs<String, [UInt8]>) -> [UInt8] {
    func le(_ v: Int, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    var out: [UInt8] = []
    var central: [UInt8] = []
    for (name, data) in members {
        let n = Array(name.utf8)
        let crc = Int(crc32Of(data))
        let offset = out.count
        out += le(0x0403_4b50, 4) + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(crc, 4) + le(data.count, 4) + le(data.count, 4)
        out += le(n.count, 2) + le(0, 2) + n + data
        central += le(0x0201_4b50, 4) + le(20, 2) + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(crc, 4)
        central += le(data.count, 4) + le(data.count, 4) + le(n.count, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 2)
        central += le(0, 4) + le(offset, 4) + n
    }
    let cdOffset = out.count
    out += central
    out += le(0x0605_4b50, 4) + le(0, 2) + le(0, 2) + le(members.count, 2) + le(members.count, 2)
    out += le(central.count, 4) + le(cdOffset, 4) + le(0, 2)
    return out
}

/// CRC-32 (IEEE), bitwise: test-only, so the test does not depend on the code under test.
private func crc32Of(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes {
        crc ^= UInt32(b)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
    }
    return ~crc
}

/// ThreadSanitizer's runtime turns any SIGBUS into a crash, so the tests that provoke one run in
/// normal and AddressSanitizer builds only.
@Suite("PyTorch checkpoints that shrink while they are read",
       .enabled(if: MappedFile.guardedCopyRecovers, "skipped: ThreadSanitizer makes SIGBUS fatal"))
struct TorchTruncationTests {
    @Test("a checkpoint truncated after it was opened: reading a tensor is an error naming the change, never SIGBUS",
          arguments: ["adapter_model.bin", "deflated.pt", "dtypes.pt"])
    func truncatedAfterOpen(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = dir.file(name)
        try FileManager.default.copyItem(atPath: fixture("pytorch/" + name), toPath: path)
        let checkpoint = try TorchCheckpoint(path: path)
        // Another process rewrites the file in place: it first becomes (almost) empty.
        #expect(truncate(path, 64) == 0)
        var refused = 0
        for t in checkpoint.entries {
            do {
                _ = try checkpoint.withBytes(of: t.name) { $0.count }
            } catch {
                let text = String(describing: error)
                #expect(text.contains("changed while being read"), "\(text)")
                #expect(!text.contains("\n"))
                refused += 1
            }
        }
        #expect(refused == checkpoint.entries.filter { $0.byteCount > 0 }.count)
    }

    @Test("a guarded copy from pages a truncation removed returns false instead of raising SIGBUS")
    func guardedCopy() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = dir.write("big", [UInt8](repeating: 7, count: 3 * 65536))
        let fd = try FileDescriptor.openForReading(path)
        let map = try MappedFile(fd, count: 3 * 65536)
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(buffer.withUnsafeMutableBytes { map.copy(65536..<69632, to: $0.baseAddress!) })
        #expect(buffer.allSatisfy { $0 == 7 })
        #expect(truncate(path, 10) == 0)
        // Pages past the new end: the read faults, the copy reports it, the process lives on.
        #expect(!buffer.withUnsafeMutableBytes { map.copy(131072..<135168, to: $0.baseAddress!) })
        #expect(!buffer.withUnsafeMutableBytes { map.copy(65536..<69632, to: $0.baseAddress!) })
    }

    @Test("a zip truncated while its headers are parsed reads as truncated, not as a crash")
    func headersOutOfRange() throws {
        // The central directory of a valid file, mapped, then cut: parsing again from the same map
        // must see the missing bytes as out of range.
        let dir = TempDir()
        defer { dir.remove() }
        let path = dir.file("a.bin")
        try FileManager.default.copyItem(atPath: fixture("pytorch/adapter_model.bin"), toPath: path)
        let fd = try FileDescriptor.openForReading(path)
        let size = try fd.status().size
        let map = try MappedFile(fd, count: size)
        #expect(truncate(path, 100) == 0)
        let reader = ZipReader(path: path, map: map)
        let error = #expect(throws: ZipError.self) { _ = try reader.parseEntries() }
        #expect(error?.description.contains("truncated") == true || error?.description.contains("no end-of-central-directory") == true,
                "\(String(describing: error))")
    }
}
