import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

private let experts = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]

@Suite("MXFP4 experts (gpt-oss): decoded as transformers does, merged in Float32, requantized per 32 values")
struct MXFP4MergeTests {
    @Test("decoding is transformers' convert_moe_packed_tensors on every byte value and exponents 0 … 252")
    func decode() throws {
        let f = try SafetensorsFile(path: fixture("expected/mxfp4/decode.safetensors"))
        let blocks = try f.withBytes(of: "blocks") { Array($0) }, scales = try f.withBytes(of: "scales") { Array($0) }
        let want = try f.floats("values")
        let got = try #require(MXFP4.decode(blocks: blocks, scales: scales))
        #expect(got.count == want.count && want.count == 64 * 512)
        #expect(zip(got, want).allSatisfy { $0.bitPattern == $1.bitPattern }, "bit for bit, signed zeros included")
        #expect(MXFP4.decode(blocks: [UInt8](repeating: 0, count: 16), scales: [0xFF]) == nil, "0xFF is E8M0's NaN")
    }

    @Test("encoding: ties to the even code, saturation at ±6, signed zeros, and the exponent that decodes nearer")
    func encode() throws {
        func one(_ head: [Float], old: UInt8 = 127) -> (codes: [UInt8], scale: UInt8) {
            let values = head + [Float](repeating: 0, count: 32 - head.count)
            let (b, s) = MXFP4.encode(values, old: [old])
            return ((0..<32).map { j in j % 2 == 0 ? b[j / 2] & 15 : b[j / 2] >> 4 }, s[0])
        }
        // amax 6 → e₀ = 2 − 2 = 0: the grid itself; midpoints go to the even code.
        let ties = one([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -5, 0.3, -0.01])
        #expect(ties.scale == 127)
        #expect(Array(ties.codes.prefix(12)) == [7, 0, 2, 2, 4, 4, 6, 6, 8, 14, 1, 8])
        // amax 7.9 (just under 8): e₀ = 0 saturates 7.9 to 6 (error 1.9²); e₀ + 1 = 1 holds it as 4·2 (0.1²) → exponent 1.
        let under = one([7.9, 1, 2])
        #expect(under.scale == 128 && Array(under.codes.prefix(3)) == [6, 1, 2])
        // Values exact at e₀ (4 = 4·2⁰; e₀ + 1 would round 1.5 to 2): e₀ is kept.
        let exact = one([4, 1.5])
        #expect(exact.scale == 127 && Array(exact.codes.prefix(2)) == [6, 3])
        // A block of zeros keeps its old exponent; a negative zero keeps its sign bit.
        let zeros = one([-0.0], old: 100)
        #expect(zeros.scale == 100 && zeros.codes[0] == 8 && zeros.codes[1] == 0)
        // Tiny and huge blocks clamp the exponent to the E8M0 range: 2⁻¹²⁷ … 2¹²⁷.
        #expect(one([0x1p-130]).scale == 0)
        // And what it encodes decodes back within two units of its exponent (half the widest grid
        // step, 4 → 6, or a value saturated at 6 under e₀).
        let random = (0..<3200).map { i in Float(sin(Double(i) * 0.7)) * Float(pow(2.0, Double(i % 40) - 20)) }
        let (b, s) = MXFP4.encode(random)
        let back = try #require(MXFP4.decode(blocks: b, scales: s))
        for blk in 0..<100 {
            let step = Float(pow(2.0, Double(Int(s[blk]) - 127)))
            for j in 0..<32 where abs(back[blk * 32 + j] - random[blk * 32 + j]) > 2 * step {
                Issue.record("block \(blk) value \(j): \(random[blk * 32 + j]) → \(back[blk * 32 + j])")
            }
        }
    }

    @Test("merge: the experts' blocks and exponents are the Float64 reference's; the exponents are rewritten, the rest copied")
    func merge() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, summary) = try AdapterKitTests.merge(base: modelPath("tiny-gpt-oss-mxfp4"), adapters: [(adapterPath("mxfp4-lora"), 1)],
                                                          out: dir.file("out"), report: true)
        let original = try Checkpoint(path: modelPath("tiny-gpt-oss-mxfp4"))
        let reference = try SafetensorsFile(path: fixture("expected/mxfp4/tiny-gpt-oss-mxfp4+mxfp4-lora.safetensors"))
        func bytes(_ c: Checkpoint, _ name: String) throws -> [UInt8] {
            let (_, file) = try #require(c.tensor(name), "\(name)")
            return try c.files[file].withBytes(of: name) { Array($0) }
        }
        for name in experts {
            let blocks = try bytes(merged, name + "_blocks"), want = try reference.withBytes(of: name + "_blocks") { Array($0) }
            let scales = try bytes(merged, name + "_scales"), wantScales = try reference.withBytes(of: name + "_scales") { Array($0) }
            // Float32 accumulation against Float64 may round a value across a grid midpoint.
            let differ = zip(blocks, want).filter { $0 != $1 }.count
            #expect(blocks.count == want.count && differ * 200 <= blocks.count, "\(name): \(differ) of \(blocks.count) bytes differ")
            #expect(zip(scales, wantScales).filter { $0 != $1 }.count <= 1, "\(name): exponents")
            #expect(try bytes(merged, name + "_blocks") != bytes(original, name + "_blocks"))
            #expect(merged.tensor(name + "_blocks")?.entry.encoding == .mxfp4(scale: name + "_scales"))
            // The retention reported is ⟨deq(Q(W')) − W, W' − W⟩ / ‖W' − W‖², recomputed from our output.
            let w = try reference.doubles(name + ".base"), wp = try reference.doubles(name + ".merged")
            let q = try #require(MXFP4.decode(blocks: blocks, scales: scales))
            var dot = 0.0, norm = 0.0
            for i in q.indices {
                dot += (Double(q[i]) - w[i]) * (wp[i] - w[i])
                norm += (wp[i] - w[i]) * (wp[i] - w[i])
            }
            let report = try #require(summary.reports.first { $0.tensor == name + "_blocks" })
            #expect(abs(try #require(report.kept) - dot / norm) < 1e-3, "\(name): reported \(report.kept ?? -1), recomputed \(dot / norm)")
        }
        for (entry, _) in original.tensors where !experts.contains(where: { entry.name.hasPrefix($0 + "_") }) && !entry.name.contains("q_proj.weight") && !entry.name.contains("v_proj.weight") {
            #expect(try bytes(merged, entry.name) == bytes(original, entry.name), "\(entry.name)")
        }
        #expect(summary.notes.contains { $0.hasPrefix("requantized 2 quantized weights with fresh scales") })
        #expect(try String(contentsOfFile: dir.file("out/config.json"), encoding: .utf8).contains(#""quant_method": "mxfp4""#))
    }

    @Test("--dtype bf16: the experts written as the parameters transformers loads, [E, in, out] under their own names, each value rounded once")
    func dequantize() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (out, _) = try AdapterKitTests.merge(base: modelPath("tiny-gpt-oss-mxfp4"), adapters: [(adapterPath("mxfp4-lora"), 1)],
                                                 out: dir.file("out"), dequantize: .bf16)
        let reference = try SafetensorsFile(path: fixture("expected/mxfp4/tiny-gpt-oss-mxfp4+mxfp4-lora.safetensors"))
        for name in experts {
            let (entry, file) = try #require(out.tensor(name))
            #expect(entry.encoding == .plain(.bf16))
            #expect(entry.shape == (name.hasSuffix("gate_up_proj") ? [4, 64, 64] : [4, 32, 64]))
            let got = try out.files[file].withBytes(of: name) { raw in (0..<entry.elementCount).map { raw.load(fromByteOffset: $0 * 2, as: UInt16.self) } }
            let want = try reference.withBytes(of: name + ".bf16") { raw in (0..<entry.elementCount).map { raw.load(fromByteOffset: $0 * 2, as: UInt16.self) } }
            let differ = zip(got, want).filter { $0 != $1 }
            #expect(differ.allSatisfy { abs(Int($0) - Int($1)) == 1 } && differ.count * 100 <= got.count, "\(name): \(differ.count) values differ")
            #expect(out.tensor(name + "_blocks") == nil && out.tensor(name + "_scales") == nil)
        }
        let config = try String(contentsOfFile: dir.file("out/config.json"), encoding: .utf8)
        #expect(!config.contains("quantization_config"))
    }

    @Test("an exponent byte 0xFF (NaN) is refused with its position; per-expert modules onto MXFP4 are refused by name")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        var scales = [UInt8](repeating: 127, count: 4 * 12)
        scales[13] = 0xFF
        try writeSafetensors(dir.file("m/model.safetensors"), [
            ("model.layers.0.mlp.experts.gate_up_proj_blocks", .u8, [4, 12, 1, 16], [UInt8](repeating: 0x21, count: 4 * 12 * 16)),
            ("model.layers.0.mlp.experts.gate_up_proj_scales", .u8, [4, 12, 1], scales),
            ("model.layers.0.mlp.experts.down_proj_blocks", .u8, [4, 16, 1, 16], [UInt8](repeating: 0, count: 4 * 16 * 16)),
            ("model.layers.0.mlp.experts.down_proj_scales", .u8, [4, 16, 1], [UInt8](repeating: 127, count: 4 * 16)),
            ("model.layers.0.mlp.experts.down_proj_bias", .u8, [4, 16], [UInt8](repeating: 0, count: 4 * 16)),
        ])
        _ = dir.write("m/config.json", text: #"{"model_type": "gpt_oss", "num_local_experts": 4}"#)
        let base = try Checkpoint(path: dir.file("m"))
        #expect(base.tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")?.entry.valueCount == 4 * 12 * 32)
        // moe-gpt-oss-params was made for hidden 16: the blocks hold 32 values per row, so the shapes are named.
        let error = #expect(throws: ProblemList.self) {
            try MergePlan(base: base, inputs: [MergeInput(adapter: try Adapter(path: adapterPath("moe-gpt-oss-params")))])
        }
        #expect(error?.problems.contains { $0.contains("MXFP4") && $0.contains("gate_up_proj_blocks") } == true)
        // A per-expert module: one line that says what to use instead.
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.model.layers.0.mlp.experts.1.down_proj.lora_A.weight", .f32, [1, 6], floatBytes([Float](repeating: 0.5, count: 6))),
            ("base_model.model.model.layers.0.mlp.experts.1.down_proj.lora_B.weight", .f32, [16, 1], floatBytes([Float](repeating: 1, count: 16))),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1}"#)
        let perExpert = #expect(throws: ProblemList.self) {
            try MergePlan(base: base, inputs: [MergeInput(adapter: try Adapter(path: dir.file("ad")))])
        }
        #expect(perExpert?.problems.contains { $0.contains("holds MXFP4 experts; per-expert updates") && $0.contains("target_parameters") } == true)
        // The NaN exponent: found when the weight is read, before anything is left at OUT.
        let plan = try MergePlan(base: base, inputs: [MergeInput(adapter: try oneExpertAdapter(dir))])
        let nan = #expect(throws: (any Error).self) { try write(plan, to: dir.file("out")) }
        #expect("\(nan.map { String(describing: $0) } ?? "")".contains("0xFF"))
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
    }

    /// A target_parameters adapter for the 4 × [12, 32] gate_up blocks above (r 1).
    private func oneExpertAdapter(_ dir: TempDir) throws -> Adapter {
        try FileManager.default.createDirectory(atPath: dir.file("tp"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("tp/adapter_model.safetensors"), [
            ("base_model.model.model.layers.0.mlp.experts.lora_A.weight", .f32, [4, 32], floatBytes([Float](repeating: 0.1, count: 128))),
            ("base_model.model.model.layers.0.mlp.experts.lora_B.weight", .f32, [12, 4], floatBytes([Float](repeating: 0.1, count: 48))),
        ])
        _ = dir.write("tp/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj"]}"#)
        return try Adapter(path: dir.file("tp"))
    }
}

private let nvWeights = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]

@Suite("NVFP4 (compressed-tensors): decoded as its decompressor does, merged in Float32, fresh E4M3 group scales")
struct NVFP4MergeTests {
    let reference: SafetensorsFile
    let original: Checkpoint

    init() throws {
        reference = try SafetensorsFile(path: fixture("expected/nvfp4/tiny-nvfp4+nvfp4-lora.safetensors"))
        original = try Checkpoint(path: modelPath("tiny-nvfp4"))
    }

    func bytes(_ c: Checkpoint, _ name: String) throws -> [UInt8] {
        let (_, file) = try #require(c.tensor(name), "\(name)")
        return try c.files[file].withBytes(of: name) { Array($0) }
    }

    func decoded(_ c: Checkpoint, _ module: String) throws -> [Float] {
        let (_, file) = try #require(c.tensor(module + ".weight_global_scale"))
        let global = try c.files[file].floats(module + ".weight_global_scale")[0]
        return try #require(NVFP4.decode(packed: bytes(c, module + ".weight_packed"), scales: bytes(c, module + ".weight_scale"), global: global))
    }

    @Test("every weight of the base decodes bit for bit to compressed-tensors' decompression")
    func decode() throws {
        var weights = 0
        for t in reference.header.tensors where t.name.hasSuffix(".base") {
            let module = String(t.name.dropLast(".base".count))
            let want = try reference.doubles(t.name)
            let got = try decoded(original, module)
            #expect(got.count == want.count && zip(got, want).allSatisfy { Double($0) == $1 }, "\(module)")
            #expect(original.tensor(module + ".weight_packed")?.entry.encoding == .nvfp4(scale: module + ".weight_scale", global: module + ".weight_global_scale"))
            weights += 1
        }
        #expect(weights == 7)
    }

    @Test("merge: codes and group scales are the reference's; global and input scales and the other weights are copied")
    func merge() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, summary) = try AdapterKitTests.merge(base: modelPath("tiny-nvfp4"), adapters: [(adapterPath("nvfp4-lora"), 1)], out: dir.file("out"), report: true)
        for module in nvWeights {
            for suffix in [".weight_packed", ".weight_scale"] {
                let got = try bytes(merged, module + suffix), want = try reference.withBytes(of: module + suffix) { Array($0) }
                let differ = zip(got, want).filter { $0 != $1 }.count
                #expect(got.count == want.count && differ * 100 <= got.count, "\(module + suffix): \(differ) of \(got.count) bytes differ")
            }
            #expect(try bytes(merged, module + ".weight_packed") != bytes(original, module + ".weight_packed"))
            // Retention from our own output, decoded as compressed-tensors decodes it.
            let w = try reference.doubles(module + ".base"), wp = try reference.doubles(module + ".merged")
            let q = try decoded(merged, module)
            var dot = 0.0, norm = 0.0
            for i in q.indices {
                dot += (Double(q[i]) - w[i]) * (wp[i] - w[i])
                norm += (wp[i] - w[i]) * (wp[i] - w[i])
            }
            let report = try #require(summary.reports.first { $0.tensor == module + ".weight_packed" })
            #expect(abs(try #require(report.kept) - dot / norm) < 1e-3, "\(module): reported \(report.kept ?? -1), recomputed \(dot / norm)")
        }
        for (entry, _) in original.tensors where !nvWeights.contains(where: { entry.name.hasPrefix($0 + ".weight_packed") || entry.name.hasPrefix($0 + ".weight_scale") }) {
            #expect(try bytes(merged, entry.name) == bytes(original, entry.name), "\(entry.name)")
        }
        #expect(summary.notes.contains { $0.hasPrefix("requantized 3 quantized weights with fresh scales") })
    }

    @Test("--dtype bf16: X.weight [rows, K] rounded once, every quantization parameter and quantization_config gone")
    func dequantize() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (out, _) = try AdapterKitTests.merge(base: modelPath("tiny-nvfp4"), adapters: [(adapterPath("nvfp4-lora"), 1)], out: dir.file("out"), dequantize: .bf16)
        var exact = 0, total = 0
        for t in reference.header.tensors where t.name.hasSuffix(".base") {
            let module = String(t.name.dropLast(".base".count))
            let (entry, file) = try #require(out.tensor(module + ".weight"))
            #expect(entry.encoding == .plain(.bf16) && entry.shape == original.tensor(module + ".weight_packed").map { [$0.entry.shape[0], $0.entry.shape[1] * 2] })
            let got = try out.files[file].withBytes(of: entry.name) { raw in (0..<entry.elementCount).map { raw.load(fromByteOffset: $0 * 2, as: UInt16.self) } }
            let want: [UInt16]
            if nvWeights.contains(module) {
                want = try reference.withBytes(of: module + ".bf16") { raw in (0..<entry.elementCount).map { raw.load(fromByteOffset: $0 * 2, as: UInt16.self) } }
            } else {
                want = try reference.doubles(t.name).map(ElementConversion.doubleToBF16)  // BF16 values already: exact
            }
            for (g, w) in zip(got, want) {
                total += 1
                if g == w { exact += 1 } else { #expect(abs(Int(g) - Int(w)) == 1, "\(module): \(g) vs \(w)") }
            }
            for suffix in [".weight_packed", ".weight_scale", ".weight_global_scale", ".input_global_scale"] {
                #expect(out.tensor(module + suffix) == nil, "\(module + suffix)")
            }
        }
        #expect(Double(exact) >= 0.99 * Double(total))
        let config = try String(contentsOfFile: dir.file("out/config.json"), encoding: .utf8)
        #expect(!config.contains("quantization_config"))
    }

    @Test("a NaN group scale, a global scale of 0, and int4 pack-quantized weights are refused by name")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        func base(_ name: String, scale: UInt8, global: Float, packedType: DType = .u8) throws -> Checkpoint {
            try FileManager.default.createDirectory(atPath: dir.file(name), withIntermediateDirectories: true)
            var scales = [UInt8](repeating: 0x38, count: 4)
            scales[3] = scale
            let packed: [UInt8] = packedType == .u8 ? [UInt8](repeating: 0x22, count: 4 * 8) : [UInt8](repeating: 0, count: 4 * 4 * 4)
            try writeSafetensors(dir.file("\(name)/model.safetensors"), [
                ("a.weight_packed", packedType, packedType == .u8 ? [4, 8] : [4, 4], packed),
                ("a.weight_scale", .f8E4M3, [4, 1], scales),
                ("a.weight_global_scale", .f32, [1], floatBytes([global])),
            ])
            _ = dir.write("\(name)/config.json", text: #"{"model_type": "llama"}"#)
            return try Checkpoint(path: dir.file(name))
        }
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.a.lora_A.weight", .f32, [1, 16], floatBytes([Float](repeating: 0.5, count: 16))),
            ("base_model.model.a.lora_B.weight", .f32, [4, 1], floatBytes([1, 2, 3, 4])),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1}"#)
        let adapter = [MergeInput(adapter: try Adapter(path: dir.file("ad")))]
        for (name, scale, global, expected) in [("nan", UInt8(0x7F), Float(1), "is 0x7F (NaN in E4M3)"), ("zero", UInt8(0x38), Float(0), "not a finite positive scale")] {
            let plan = try MergePlan(base: try base(name, scale: scale, global: global), inputs: adapter)
            let error = #expect(throws: (any Error).self) { try write(plan, to: dir.file("out-\(name)")) }
            #expect(String(describing: error.map { $0 }).contains(expected), "\(name): \(String(describing: error))")
            #expect(!FileManager.default.fileExists(atPath: dir.file("out-\(name)")))
        }
        let int4 = #expect(throws: ProblemList.self) { try MergePlan(base: try base("int4", scale: 0x38, global: 1, packedType: .i32), inputs: adapter) }
        #expect(int4?.problems.contains { $0.contains("a.weight_packed") && $0.contains("I32") } == true, "\(String(describing: int4?.problems))")
    }
}
