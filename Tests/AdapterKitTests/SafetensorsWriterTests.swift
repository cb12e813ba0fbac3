import Foundation
import Testing
@testable import AdapterKit

/// Reads every tensor of a file and writes them again with the library's writer.
private func rewrite(_ source: String, to target: String) throws {
    let f = try SafetensorsFile(path: source)
    let tensors = try f.header.tensors.map { t in
        (name: t.name, dtype: t.dtype, shape: t.shape, bytes: try f.withBytes(of: t.name) { Array($0) })
    }
    try writeSafetensors(target, tensors, metadata: f.header.hasMetadata ? f.header.metadata : nil)
}

@Suite("safetensors writer: byte-identical to the reference")
struct SafetensorsWriterTests {
    @Test("rewriting a file the reference wrote gives the same bytes", arguments: [
        "golden-mixed", "golden-empty", "golden-only-metadata", "golden-scalar-zero", "golden-names",
    ])
    func golden(name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file(name + ".safetensors")
        try rewrite(fixture("safetensors/\(name).safetensors"), to: out)
        #expect(readBytes(out) == readBytes(fixture("safetensors/\(name).safetensors")))
    }

    @Test("an empty file is {} and six spaces")
    func empty() throws {
        let layout = try SafetensorsLayout(tensors: [], metadata: nil)
        #expect(layout.headerBytes == [8, 0, 0, 0, 0, 0, 0, 0] + Array("{}      ".utf8))
    }

    @Test("no tensors and empty metadata: a valid header, where safetensors 0.8.0 writes invalid JSON")
    func emptyMetadata() throws {
        #expect(throws: SafetensorsError.self) { try SafetensorsFile(path: fixture("safetensors/reference-bug-empty-metadata.safetensors")) }
        let layout = try SafetensorsLayout(tensors: [], metadata: [])
        #expect(layout.headerBytes == [24, 0, 0, 0, 0, 0, 0, 0] + Array(#"{"__metadata__":{}}     "#.utf8))
    }

    @Test("a tensor named __metadata__ and duplicate names are refused")
    func refusals() {
        #expect(throws: SafetensorsWriteError.self) {
            try SafetensorsLayout(tensors: [TensorSpec(name: "__metadata__", dtype: .f32, shape: [1])], metadata: nil)
        }
        #expect(throws: SafetensorsWriteError.self) {
            try SafetensorsLayout(tensors: [TensorSpec(name: "a", dtype: .f32, shape: [1]), TensorSpec(name: "a", dtype: .f16, shape: [1])], metadata: nil)
        }
    }

    @Test("the writer refuses too many and too few bytes")
    func byteCounts() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let layout = try SafetensorsLayout(tensors: [TensorSpec(name: "a", dtype: .f32, shape: [2])], metadata: nil)
        let w = try SafetensorsWriter(layout: layout, output: try FileDescriptor.createExclusive(dir.file("a")))
        try floatBytes([1]).withUnsafeBytes { try w.append($0) }
        #expect(throws: SafetensorsWriteError.self) { try w.finish() }
        #expect(throws: SafetensorsWriteError.self) { try floatBytes([1, 2]).withUnsafeBytes { try w.append($0) } }
    }

    @Test("a file appears at its path only when complete; a failed write leaves nothing")
    func atomic() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let target = dir.file("t.safetensors")
        struct Stop: Error {}
        #expect(throws: Stop.self) {
            try SafetensorsWriter.write(to: target, tensors: [TensorSpec(name: "a", dtype: .f32, shape: [1]), TensorSpec(name: "b", dtype: .f32, shape: [1])],
                                        metadata: nil) { t, w in
                if t.name == "b" { throw Stop() }
                try floatBytes([1]).withUnsafeBytes { try w.append($0) }
            }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).isEmpty)
        try SafetensorsWriter.write(to: target, tensors: [TensorSpec(name: "a", dtype: .f32, shape: [1])], metadata: nil) { _, w in
            try floatBytes([7]).withUnsafeBytes { try w.append($0) }
        }
        #expect(try SafetensorsFile(path: target).floats("a") == [7])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["t.safetensors"])
        // Too few bytes for a tensor is an error too, and the old file stays when replacing fails.
        #expect(throws: SafetensorsWriteError.self) {
            try SafetensorsWriter.write(to: target, tensors: [TensorSpec(name: "a", dtype: .f32, shape: [2])], metadata: nil, replacing: true) { _, w in
                try floatBytes([1]).withUnsafeBytes { try w.append($0) }
            }
        }
        #expect(try SafetensorsFile(path: target).floats("a") == [7])
    }

    @Test("what the writer makes, the reference reads back and writes identically", .enabled(if: pythonSafetensorsAvailable, pythonReferenceMissing))
    func pythonRoundTrip() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ours = dir.file("ours.safetensors")
        try writeSafetensors(ours, [
            (name: "z", dtype: .f32, shape: [2, 2], bytes: floatBytes([1, 2, 3, 4])),
            (name: "a", dtype: .bf16, shape: [3], bytes: [0x80, 0x3F, 0, 0x40, 0x40, 0x40]),
            (name: "m", dtype: .f64, shape: [], bytes: doubleBytes([0.25])),
            (name: "i", dtype: .i8, shape: [2], bytes: [1, 255]),
        ])
        let theirs = dir.file("theirs.safetensors")
        let script = """
        import sys
        from safetensors import safe_open, _safetensors_rust as st
        import numpy as np
        keep = []
        specs = {}
        with safe_open(sys.argv[1], "np") as f:
            meta = f.metadata()
            for k in f.keys():
                pass
        raw = open(sys.argv[1], "rb").read()
        import json, struct
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        names = {"F32": "float32", "BF16": "bfloat16", "F64": "float64", "I8": "int8"}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            b, e = v["data_offsets"]
            buf = np.frombuffer(raw[8 + n + b:8 + n + e], dtype=np.uint8).copy()
            keep.append(buf)
            specs[k] = st.TensorSpec(dtype=names[v["dtype"]], shape=v["shape"], data_ptr=buf.ctypes.data, data_len=e - b)
        st.serialize_file(specs, sys.argv[2], meta)
        """
        let r = try runProcess("/usr/bin/env", ["python3", "-c", script, ours, theirs])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(readBytes(ours) == readBytes(theirs))
    }
}
