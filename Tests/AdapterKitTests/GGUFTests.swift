import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

/// GGUF bytes built field by field, for malformed files.
struct GGUFBytes {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func string(_ s: String) { u64(UInt64(s.utf8.count)); bytes += Array(s.utf8) }
    mutating func pad(_ alignment: Int = 32) { while bytes.count % alignment != 0 { bytes.append(0) } }

    /// A whole file: `kvs` as (key, type, value bytes), tensors as (name, dims, type, offset), then `data`.
    static func file(version: UInt32 = 3, kvs: [(String, UInt32, [UInt8])] = [], tensors: [(String, [UInt64], UInt32, UInt64)] = [],
                     data: [UInt8] = [], tensorCount: UInt64? = nil, alignment: Int = 32) -> [UInt8] {
        var b = GGUFBytes()
        b.bytes = Array("GGUF".utf8)
        b.u32(version)
        b.u64(tensorCount ?? UInt64(tensors.count))
        b.u64(UInt64(kvs.count))
        for (k, t, v) in kvs {
            b.string(k)
            b.u32(t)
            b.bytes += v
        }
        for (name, dims, type, offset) in tensors {
            b.string(name)
            b.u32(UInt32(dims.count))
            for d in dims { b.u64(d) }
            b.u32(type)
            b.u64(offset)
        }
        b.pad(alignment)
        return b.bytes + data
    }

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
}

@Suite("GGUF: the reader, against files gguf-py wrote and files that break every rule")
struct GGUFReaderTests {
    @Test("every metadata type gguf-py writes reads back as written")
    func metadata() throws {
        let f = try GGUFFile(path: fixture("gguf/codecs.gguf"))
        #expect(f.version == 3 && f.alignment == 32 && f.dataOffset % 32 == 0)
        #expect(f.value("general.architecture") == .string("test"))
        #expect(f.value("test.u8") == .u8(200) && f.value("test.i8") == .i8(-100))
        #expect(f.value("test.u16") == .u16(60000) && f.value("test.i16") == .i16(-30000))
        #expect(f.value("test.u32") == .u32(4_000_000_000) && f.value("test.i32") == .i32(-2_000_000_000))
        #expect(f.value("test.f32") == .f32(0.5) && f.value("test.bool") == .bool(true))
        #expect(f.value("test.string") == .string("héllo"))
        #expect(f.value("test.strings") == .array(elementType: 8, values: [.string("a"), .string("bc"), .string("")]))
        #expect(f.value("test.ints") == .array(elementType: 5, values: [.i32(1), .i32(2), .i32(3)]))
        #expect(f.value("test.u64") == .u64(1 << 63 + 5) && f.value("test.i64") == .i64(-(1 << 62)) && f.value("test.f64") == .f64(0.1))
    }

    @Test("tensor infos: GGML dims reversed into shapes, types, offsets one after another")
    func tensors() throws {
        let f = try GGUFFile(path: fixture("gguf/tiny-llama.gguf"))
        #expect(f.tensors.count == 12)
        let q = try #require(f.tensor("blk.0.attn_k.weight"))
        #expect(q.type == .q8_0 && q.dims == [64, 32] && q.shape == [32, 64] && q.byteCount == 32 * 2 * 34)
        #expect(f.tensor("output.weight")?.type == .f16 && f.tensor("blk.0.attn_norm.weight")?.shape == [64])
        for (a, b) in zip(f.tensors, f.tensors.dropFirst()) {
            #expect(b.offset == (a.offset + a.byteCount + 31) / 32 * 32)
        }
        #expect(f.value("tokenizer.ggml.tokens").map { if case .array(_, let v) = $0 { v.count } else { 0 } } == 64)
    }

    @Test("malformed files: one line each, naming what is wrong", arguments: [
        (Array("GGUX".utf8) + [UInt8](repeating: 0, count: 20), "not a GGUF file"),
        (GGUFBytes.file(version: 1), "GGUF version 1"),
        (GGUFBytes.file(version: 0x0300_0000), "big-endian"),
        (GGUFBytes.file(tensorCount: 1 << 40), "more than the"),
        (GGUFBytes.file(kvs: [("a", 8, GGUFBytes.le(UInt64(1) << 50))]), "claims"),
        (GGUFBytes.file(kvs: [("a", 4, GGUFBytes.le(UInt32(1))), ("a", 4, GGUFBytes.le(UInt32(2)))]), "appears twice"),
        (GGUFBytes.file(kvs: [("a", 13, [])]), "value type 13"),
        (GGUFBytes.file(kvs: [("a", 7, [2])]), "not 0 or 1"),
        (GGUFBytes.file(kvs: [("a", 9, GGUFBytes.le(UInt32(9)) + GGUFBytes.le(UInt64(1)) + GGUFBytes.le(UInt32(4)) + GGUFBytes.le(UInt64(0)))]), "array of arrays"),
        (GGUFBytes.file(kvs: [("general.alignment", 4, GGUFBytes.le(UInt32(3)))]), "not a power of two"),
        (GGUFBytes.file(kvs: [("general.alignment", 10, GGUFBytes.le(UInt64(32)))]), "not UINT32"),
        (GGUFBytes.file(tensors: [(String(repeating: "x", count: 64), [4], 0, 0)], data: [UInt8](repeating: 0, count: 16)), "at most 63"),
        (GGUFBytes.file(tensors: [("t", [1, 1, 1, 1, 1], 0, 0)], data: [0, 0, 0, 0]), "at most 4"),
        (GGUFBytes.file(tensors: [("t", [4], 5, 0)], data: [UInt8](repeating: 0, count: 16)), "GGML type 5"),
        (GGUFBytes.file(tensors: [("t", [16], 8, 0)], data: [UInt8](repeating: 0, count: 64)), "not a multiple of Q8_0's block of 32"),
        (GGUFBytes.file(tensors: [("a", [4], 0, 0), ("b", [4], 0, 16)], data: [UInt8](repeating: 0, count: 64)), "end at 32"),
        (GGUFBytes.file(tensors: [("t", [1 << 40, 1 << 40], 0, 0)]), "overflow"),
        (GGUFBytes.file(tensors: [("t", [64], 0, 0)], data: [UInt8](repeating: 0, count: 100)), "truncated"),
    ])
    func malformed(_ bytes: [UInt8], _ message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let path = dir.write("bad.gguf", bytes)
        let error = #expect(throws: InputError.self) { try GGUFFile(path: path) }
        #expect(error?.problem.contains(message) == true, "\(String(describing: error?.problem))")
        #expect(error.map { !"\($0)".contains("\n") } == true)
    }

    @Test("every prefix of a real file, and single-byte changes to its header, read or fail with an InputError: never a crash")
    func truncatedAndMutated() throws {
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: fixture("gguf/tiny-llama.gguf"))))
        let f = try GGUFFile(path: fixture("gguf/tiny-llama.gguf"))
        let dir = TempDir()
        defer { dir.remove() }
        let path = dir.file("t.gguf")
        // Every cut inside the header and the first tensor's data.
        for n in stride(from: 0, to: f.dataOffset + 64, by: 7) {
            _ = dir.write("t.gguf", Array(bytes[..<n]))
            #expect(throws: InputError.self) { try GGUFFile(path: path) }
        }
        var rng = SystemRandomNumberGenerator()
        var failures = 0
        for _ in 0..<400 {
            var m = bytes
            let i = Int.random(in: 0..<f.dataOffset, using: &rng)
            m[i] = UInt8.random(in: 0...255, using: &rng)
            _ = dir.write("t.gguf", m)
            do { _ = try GGUFFile(path: path) } catch is InputError { failures += 1 }
        }
        #expect(failures > 0)
    }
}

@Suite("GGML block codecs: ggml's reference quantizers and dequantization, bit for bit against gguf-py")
struct GGMLCodecTests {
    @Test("decoding and encoding each type gives gguf-py's values and bytes", arguments: [GGMLType.q8_0, .q4_0, .q4_1, .q5_0, .q5_1, .f16, .bf16])
    func codec(_ type: GGMLType) throws {
        let f = try GGUFFile(path: fixture("gguf/codecs.gguf"))
        let source = try #require(f.tensor("source")), q = try #require(f.tensor(type.name)), d = try #require(f.tensor(type.name + ".decoded"))
        let values = try #require(GGMLCodec.decode(.f32, f.bytes(of: source), count: source.elementCount))
        let want = try #require(GGMLCodec.decode(.f32, f.bytes(of: d), count: d.elementCount))
        let decoded = try #require(GGMLCodec.decode(type, f.bytes(of: q), count: q.elementCount))
        #expect(zip(decoded, want).allSatisfy { $0.bitPattern == $1.bitPattern }, "\(type.name): decoding")
        let encoded = try #require(GGMLCodec.encode(type, values))
        let reference = try f.bytes(of: q)
        let differ = zip(encoded, reference).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
        #expect(encoded.count == reference.count && differ.isEmpty, "\(type.name): bytes \(differ.prefix(8)) differ")
    }

    @Test("K-quants decode bit for bit as llama.cpp's own dequantize_row_q*_K", arguments: [GGMLType.q2_K, .q3_K, .q4_K, .q5_K, .q6_K])
    func kQuantDecoding(_ type: GGMLType) throws {
        let f = try GGUFFile(path: fixture("gguf/codecs.gguf"))
        let q = try #require(f.tensor(type.name)), d = try #require(f.tensor(type.name + ".decoded"))
        #expect(q.type == type)
        let want = try #require(GGMLCodec.decode(.f32, f.bytes(of: d), count: d.elementCount))
        let got = try #require(GGMLCodec.decode(type, f.bytes(of: q), count: q.elementCount))
        let differ = zip(got, want).filter { $0.bitPattern != $1.bitPattern }.count
        #expect(differ == 0, "\(type.name): \(differ) of \(got.count) values differ")
        // Our port of the reference quantizer writes llama.cpp's bytes.
        if GGMLCodec.kQuants.contains(type) {
            let source = try #require(f.tensor("source"))
            let values = try #require(GGMLCodec.decode(.f32, f.bytes(of: source), count: source.elementCount))
            let ours = try #require(GGMLCodec.encode(type, values)), reference = try f.bytes(of: q)
            let bytes = zip(ours, reference).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
            #expect(ours.count == reference.count && bytes.isEmpty, "\(type.name): bytes \(bytes.prefix(8)) of \(ours.count) differ")
        }
    }

    @Test("K-quants: our ports of the reference quantizers write llama.cpp's bytes on 64 rows of nine kinds of values", arguments: [GGMLType.q2_K, .q3_K, .q4_K, .q5_K, .q6_K])
    func kQuantEncoding(_ type: GGMLType) throws {
        let f = try GGUFFile(path: fixture("gguf/kquants.gguf"))
        let source = try #require(f.tensor("source")), q = try #require(f.tensor(type.name))
        let values = try #require(GGMLCodec.decode(.f32, f.bytes(of: source), count: source.elementCount))
        let ours = try #require(GGMLCodec.encode(type, values)), reference = try f.bytes(of: q)
        let blocks = Set(zip(ours, reference).enumerated().filter { $0.element.0 != $0.element.1 }.map { $0.offset / type.typeSize })
        #expect(ours.count == reference.count && blocks.isEmpty, "\(type.name): blocks \(blocks.sorted().prefix(8)) of \(ours.count / type.typeSize) differ")
    }

    @Test("types without a codec here, and partial blocks, are nil")
    func unsupported() {
        #expect(GGMLCodec.encode(.iq4_xs, [Float](repeating: 0, count: 256)) == nil)
        #expect(GGMLCodec.decode(.q4_K, [UInt8](repeating: 0, count: 144), count: 256) == [Float](repeating: 0, count: 256))
        #expect(GGMLCodec.decode(.iq2_xs, [UInt8](repeating: 0, count: 74), count: 256) == nil)
        #expect(GGMLCodec.encode(.q8_0, [Float](repeating: 0, count: 16)) == nil)
        #expect(GGMLCodec.decode(.q8_0, [UInt8](repeating: 0, count: 33), count: 32) == nil)
    }
}

@Suite("GGUF writing: the layout round-trips through the reader; to-gguf's names, folds and refusals")
struct GGUFWriterTests {
    @Test("metadata of every type and tensors of several types come back as written")
    func roundTrip() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let metadata: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string("llama")), ("a.u8", .u8(7)), ("a.i64", .i64(-3)), ("a.f64", .f64(2.5)), ("a.bool", .bool(false)),
            ("a.strings", .array(elementType: 8, values: [.string("x"), .string("")])), ("a.u64", .u64(.max)),
        ]
        let values = (0..<64).map { Float($0) / 7 }
        let tensors = [GGUFLayout.Tensor(name: "t.f32", dims: [64], type: .f32), GGUFLayout.Tensor(name: "t.q8", dims: [32, 2], type: .q8_0),
                       GGUFLayout.Tensor(name: "t.f16", dims: [3], type: .f16)]
        let data = [try #require(GGMLCodec.encode(.f32, values)), try #require(GGMLCodec.encode(.q8_0, values)), try #require(GGMLCodec.encode(.f16, [1, 2, 3]))]
        let layout = try GGUFLayout(metadata: metadata, tensors: tensors)
        let path = dir.file("t.gguf")
        let fd = try FileDescriptor.createExclusive(path)
        try layout.write(to: fd) { data[$0] }
        let f = try GGUFFile(path: path)
        #expect(f.metadata.map(\.key) == metadata.map(\.key))
        #expect(zip(f.metadata, metadata).allSatisfy { $0.value == $1.value })
        #expect(f.tensors.map(\.name) == ["t.f32", "t.q8", "t.f16"] && f.tensor("t.q8")?.shape == [2, 32])
        for (i, t) in f.tensors.enumerated() { #expect(try f.bytes(of: t) == data[i], "\(t.name)") }
        #expect(f.fileSize % 32 == 0, "the last tensor is padded too, as gguf-py writes it")
    }

    @Test("q/k rows in convert_hf_to_gguf.py's order: per head, the two rope halves interleaved")
    func permutation() {
        // 2 heads of 4 rows: [h0: 0 1 | 2 3, h1: 4 5 | 6 7] → [0 2 1 3, 4 6 5 7].
        let m = (0..<8).map(Double.init)
        #expect(GGUFBase.permutedRows(m, rows: 8, cols: 1, heads: 2) == [0, 2, 1, 3, 4, 6, 5, 7])
        #expect(GGUFBase.ggufName(forModule: "base_model.model.model.layers.3.mlp.down_proj") == "blk.3.ffn_down.weight")
        #expect(GGUFBase.ggufName(forModule: "model.layers.0.self_attn.rotary_emb") == nil)
    }

    @Test("a Hugging Face MoE base names its llama.cpp architecture; Qwen's are not permuted, Mixtral's are (it is llama)")
    func architectures() throws {
        let qwen = try GGUFBase(path: modelPath("tiny-qwen3-moe"))
        #expect(qwen.architecture == "qwen3moe" && !qwen.permutesQK && qwen.shapes["blk.0.attn_q.weight"] != nil)
        let mixtral = try GGUFBase(path: modelPath("tiny-mixtral"))
        #expect(mixtral.architecture == "llama" && mixtral.permutesQK)
    }

    @Test("to-gguf stacks per-expert modules into one 3-D pair per expert tensor: each expert's update, zeros where none")
    func stackedExperts() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var o = ConvertOptions()
        o.base = modelPath("tiny-qwen3-moe")
        let summary = try AdapterConversion.convertLayout(input: adapterPath("moe-qwen3-moe-per-expert"), output: dir.file("e.gguf"), to: .gguf, options: o)
        #expect(summary.notes.contains { $0.contains("stacked 2 per-expert modules into blk.0.ffn_gate_exps.weight.lora_a/lora_b (4 experts, rank 2; experts without a module get a zero update)") })
        let f = try GGUFFile(path: dir.file("e.gguf"))
        let source = try Adapter(path: adapterPath("moe-qwen3-moe-per-expert"))
        let alpha = 4.0, r = 2
        var adapted = 0
        for (leaf, g) in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")] {
            let a = try #require(f.tensor("blk.0.\(g).weight.lora_a")), b = try #require(f.tensor("blk.0.\(g).weight.lora_b"))
            let la = try #require(GGMLCodec.decode(a.type, f.bytes(of: a), count: a.elementCount)).map(Double.init)
            let lb = try #require(GGMLCodec.decode(b.type, f.bytes(of: b), count: b.elementCount)).map(Double.init)
            #expect(a.dims[1] == r && a.dims[2] == 4 && b.dims[0] == r && b.dims[2] == 4)
            let inputs = a.dims[0], out = b.dims[1]
            for e in 0..<4 {
                // What llama.cpp applies for expert e: alpha / r · B_e · A_e.
                var got = [Double](repeating: 0, count: out * inputs)
                for i in 0..<out { for j in 0..<inputs { for t in 0..<r { got[i * inputs + j] += alpha / Double(r) * lb[(e * out + i) * r + t] * la[(e * r + t) * inputs + j] } } }
                var want = [Double](repeating: 0, count: out * inputs)
                if let m = source.modules.first(where: { $0.baseName == "model.layers.0.mlp.experts.\(e).\(leaf)" }) {
                    let ma = try m.a.doubles(), mb = try m.b.doubles()
                    for i in 0..<out { for j in 0..<inputs { for t in 0..<m.rank { want[i * inputs + j] += m.scale * mb[i * m.rank + t] * ma[t * inputs + j] } } }
                }
                #expect(zip(got, want).allSatisfy { abs($0 - $1) <= 1e-6 * max(1, abs($1)) }, "\(g) expert \(e)")
                if want.contains(where: { $0 != 0 }) { adapted += 1 }
            }
        }
        #expect(adapted == 6, "experts 0 and 2 of three projections carry an update")
    }

    @Test("to-gguf refuses two modules on one llama.cpp tensor (target_parameters and per-expert modules of the same experts)")
    func twiceAdapted() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // Both fixtures' tensors in one PEFT folder: the config of the target_parameters one, with the
        // per-expert modules' leaves added to target_modules.
        let params = try SafetensorsFile(path: adapterPath("moe-qwen3-moe-params") + "/adapter_model.safetensors")
        let perExpert = try SafetensorsFile(path: adapterPath("moe-qwen3-moe-per-expert") + "/adapter_model.safetensors")
        var tensors: [(String, DType, [Int], [UInt8])] = []
        for f in [params, perExpert] {
            for e in f.entries where !tensors.contains(where: { $0.0 == e.name }) {
                tensors.append((e.name, e.dtype, e.shape, try f.withBytes(of: e.name) { Array($0) }))
            }
        }
        try FileManager.default.createDirectory(atPath: dir.file("both"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("both/adapter_model.safetensors"), tensors)
        _ = dir.write("both/adapter_config.json", text: #"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}"#)
        var o = ConvertOptions()
        o.base = modelPath("tiny-qwen3-moe")
        let error = #expect(throws: ProblemList.self) {
            try AdapterConversion.convertLayout(input: dir.file("both"), output: dir.file("e.gguf"), to: .gguf, options: o)
        }
        #expect(error?.problems.contains { $0.contains("two modules of the adapter both adapt blk.0.ffn_gate_exps.weight") } == true, "\(error?.problems ?? [])")
        #expect(!FileManager.default.fileExists(atPath: dir.file("e.gguf")))
    }

    private func gguf() -> ConvertOptions {
        var o = ConvertOptions()
        o.base = modelPath("tiny-llama")
        return o
    }

    @Test("to-gguf writes LoRA tensors and alpha; refuses what llama.cpp adapters cannot hold, listing each")
    func convert() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let summary = try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: dir.file("a.gguf"), to: .gguf,
                                                          options: gguf())
        #expect(summary.notes.contains { $0.contains("permuted the rows of 2 q/k lora_b") })
        let f = try GGUFFile(path: dir.file("a.gguf"))
        #expect(f.value("general.type") == .string("adapter") && f.value("adapter.type") == .string("lora"))
        #expect(f.value("adapter.lora.alpha") == .f32(8) && f.value("general.architecture") == .string("llama"))
        let a = try #require(f.tensor("blk.0.attn_q.weight.lora_a")), b = try #require(f.tensor("blk.0.attn_q.weight.lora_b"))
        #expect(a.dims[1] == b.dims[0] && a.dims[0] == 16 && b.dims[1] == 16)
        // No --base: a usage problem; DoRA, an embedding and modules_to_save: refused by name, nothing written.
        #expect(throws: InputError.self) { try AdapterConversion.convertLayout(input: adapterPath("peft-lora"), output: dir.file("b.gguf"), to: .gguf) }
        let dora = #expect(throws: ProblemList.self) {
            try AdapterConversion.convertLayout(input: adapterPath("peft-dora"), output: dir.file("c.gguf"), to: .gguf, options: gguf())
        }
        #expect(dora?.problems.contains { $0.contains("DoRA") } == true)
        #expect(!FileManager.default.fileExists(atPath: dir.file("b.gguf")) && !FileManager.default.fileExists(atPath: dir.file("c.gguf")))
    }
}

@Suite("merges into GGUF bases")
struct GGUFMergeTests {
    func lora(_ dir: TempDir, _ modules: [(String, Int, Int)], rank: Int = 2) throws -> Adapter {
        var tensors: [(String, DType, [Int], [UInt8])] = []
        for (m, out, inp) in modules {
            tensors.append(("base_model.model.\(m).lora_A.weight", .f32, [rank, inp], floatBytes((0..<rank * inp).map { Float(($0 % 7) - 3) * 0.01 })))
            tensors.append(("base_model.model.\(m).lora_B.weight", .f32, [out, rank], floatBytes((0..<out * rank).map { Float(($0 % 5) - 2) * 0.01 })))
        }
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), tensors)
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": \#(rank), "lora_alpha": \#(rank)}"#)
        return try Adapter(path: dir.file("ad"))
    }

    @Test("adapted tensors keep their type (or take --dtype's), the rest and the metadata are copied byte for byte")
    func merge() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture("gguf/tiny-llama.gguf")
        let a = try lora(dir, [("model.layers.0.self_attn.v_proj", 32, 64), ("model.layers.0.mlp.down_proj", 64, 128)])
        let original = try GGUFFile(path: base)
        for dtype in [nil, DType.f16] {
            let out = dir.file("out-\(dtype?.rawValue ?? "same").gguf")
            let summary = try GGUFMergePlan(base: base, inputs: [MergeInput(adapter: a)], dequantize: dtype).write(to: out)
            #expect(summary.tensorsChanged == 2 && summary.tensorsCopied == 10)
            let merged = try GGUFFile(path: out)
            #expect(merged.metadata.map(\.key) == original.metadata.map(\.key))
            #expect(zip(merged.metadata, original.metadata).allSatisfy { $0.value == $1.value }, "file_type stays: token_embd keeps Q8_0")
            for t in original.tensors {
                let m = try #require(merged.tensor(t.name))
                let touched = t.name == "blk.0.attn_v.weight" || t.name == "blk.0.ffn_down.weight"
                #expect(m.type == (touched ? (dtype == nil ? t.type : .f16) : t.type) && m.dims == t.dims, "\(t.name)")
                if !touched { #expect(try merged.bytes(of: m) == original.bytes(of: t), "\(t.name)") }
            }
            if dtype == nil { #expect(summary.notes.contains { $0.hasPrefix("requantized 2 quantized weights") }) }
            // Merged a row at a time (and three rows): the same file.
            for values in [1, 3 * 128] {
                let banded = dir.file("band-\(values)-\(dtype?.rawValue ?? "same").gguf")
                _ = try GGUFMergePlan(base: base, inputs: [MergeInput(adapter: a)], dequantize: dtype).write(to: banded, bandValues: values)
                #expect(try Data(contentsOf: URL(fileURLWithPath: banded)) == Data(contentsOf: URL(fileURLWithPath: out)), "bands of \(values) values")
            }
        }
    }

    @Test("refused before anything is written: unmapped modules, wrong shapes, K-quant tensors, no module at all")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture("gguf/tiny-llama.gguf")
        let a = try lora(dir, [("model.layers.0.self_attn.rotary", 4, 4), ("model.layers.0.self_attn.q_proj", 32, 64), ("model.layers.9.self_attn.q_proj", 64, 64)])
        let error = #expect(throws: ProblemList.self) { try GGUFMergePlan(base: base, inputs: [MergeInput(adapter: a)]) }
        let problems = error?.problems ?? []
        #expect(problems.count == 3)
        #expect(problems.contains { $0.contains("llama.cpp has no tensor for model.layers.0.self_attn.rotary") })
        #expect(problems.contains { $0.contains("the update is [32, 64] but blk.0.attn_q.weight is [64, 64]") })
        #expect(problems.contains { $0.contains("the base has no blk.9.attn_q.weight") })
        // A type without a codec here (the importance-matrix IQ types): named, with what is read.
        let meta: [(key: String, value: GGUFValue)] = [("general.architecture", .string("llama"))]
        let layout = try GGUFLayout(metadata: meta, tensors: [GGUFLayout.Tensor(name: "blk.0.attn_v.weight", dims: [256, 2], type: .iq4_xs)])
        let fd = try FileDescriptor.createExclusive(dir.file("k.gguf"))
        try layout.write(to: fd) { _ in [UInt8](repeating: 0, count: 2 * 136) }
        let k = try lora(TempDir(), [("model.layers.0.self_attn.v_proj", 2, 256)])
        let kq = #expect(throws: ProblemList.self) { try GGUFMergePlan(base: dir.file("k.gguf"), inputs: [MergeInput(adapter: k)]) }
        #expect(kq?.problems.first?.contains("blk.0.attn_v.weight is IQ4_XS, which merges do not decode") == true)
    }
}

@Suite("merges into GGUF Mixture-of-Experts bases (blk.N.ffn_*_exps)")
struct GGUFExpertMergeTests {
    /// tiny-qwen3-moe as a GGUF (qwen3moe: no q/k permutation): its per-expert weights stacked into
    /// llama.cpp's 3-D `ffn_{gate,up,down}_exps` [E, out, in], the rest by name, all F32.
    func gguf(_ dir: TempDir) throws -> String {
        let hf = try Checkpoint(path: modelPath("tiny-qwen3-moe"))
        var tensors: [GGUFLayout.Tensor] = [], data: [[UInt8]] = []
        func add(_ name: String, _ shape: [Int], _ values: [Float]) {
            tensors.append(GGUFLayout.Tensor(name: name, dims: shape.reversed(), type: .f32))
            data.append(GGMLCodec.encode(.f32, values)!)
        }
        let store = hf.files[0]
        let q = try #require(store.entry("model.layers.0.self_attn.q_proj.weight"))
        add("blk.0.attn_q.weight", q.shape, try store.floats(q.name))
        for (leaf, gguf) in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")] {
            var values: [Float] = []
            var shape: [Int] = []
            for e in 0..<4 {
                let t = try #require(store.entry("model.layers.0.mlp.experts.\(e).\(leaf).weight"))
                shape = t.shape
                values += try store.floats(t.name)
            }
            add("blk.0.\(gguf).weight", [4] + shape, values)
        }
        let layout = try GGUFLayout(metadata: [("general.architecture", .string("qwen3moe"))], tensors: tensors)
        let path = dir.file("moe.gguf")
        try layout.write(to: try FileDescriptor.createExclusive(path)) { data[$0] }
        return path
    }

    @Test("target_parameters and per-expert adapters land on each expert's rows: PEFT's merged values", arguments: ["qwen3-moe-params", "qwen3-moe-per-expert"])
    func experts(_ adapterName: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try gguf(dir)
        let plan = try GGUFMergePlan(base: base, inputs: [MergeInput(adapter: try Adapter(path: adapterPath("moe-" + adapterName)))])
        let summary = try plan.write(to: dir.file("out.gguf"))
        #expect(summary.tensorsChanged >= 3)
        // In bands of one, two or five rows (band edges inside and across the experts' row ranges): the same bytes.
        let whole = try Data(contentsOf: URL(fileURLWithPath: dir.file("out.gguf")))
        for values in [1, 2 * 32, 5 * 32] {
            _ = try plan.write(to: dir.file("band-\(values).gguf"), bandValues: values)
            #expect(try Data(contentsOf: URL(fileURLWithPath: dir.file("band-\(values).gguf"))) == whole, "bands of \(values) values")
        }
        let out = try GGUFFile(path: dir.file("out.gguf"))
        let reference = try SafetensorsFile(path: fixture("expected/moe/\(adapterName).safetensors"))
        var compared = 0
        for (leaf, gguf) in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")] {
            let t = try #require(out.tensor("blk.0.\(gguf).weight"))
            let values = try #require(GGMLCodec.decode(.f32, out.bytes(of: t), count: t.elementCount))
            let per = t.elementCount / 4
            for e in 0..<4 {
                let name = "model.layers.0.mlp.experts.\(e).\(leaf).weight"
                guard reference.entry(name) != nil else { continue }
                let want = try reference.floats(name)
                let got = Array(values[e * per..<(e + 1) * per])
                #expect(zip(got, want).allSatisfy { abs($0 - $1) <= 1e-6 + 1e-5 * abs($1) }, "\(name)")
                compared += 1
            }
        }
        // Every expert tensor PEFT's merge changed was compared (the per-expert adapter adapts some experts).
        #expect(compared == reference.header.tensors.filter { $0.name.contains(".experts.") }.count && compared >= 6)
    }
}
