import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

@Suite("quantized bases: block-scaled FP8 merged in Float32 and requantized with fresh scales")
struct QuantizedMergeTests {
    @Test("E4M3 rounding (the merge's C kernel) is torch's float8_e4m3fn (after clamping to ±448) on every code, ties, subnormals and overflow")
    func e4m3() throws {
        let f = try SafetensorsFile(path: fixture("expected/fp8/e4m3-codes.safetensors"))
        let values = try f.floats("values")
        let codes = try f.withBytes(of: "codes") { Array($0) }
        #expect(values.count > 4000 && values.count == codes.count)
        // The merge's own encoder (the C kernel), with scale 1 so that the code is of the value itself.
        let ours = FP8.e4m3(values)
        var wrong = 0
        for (v, (g, c)) in zip(values, zip(ours, codes)) where g != c {
            wrong += 1
            if wrong < 5 { Issue.record("\(v): \(g) but torch gives \(c)") }
        }
        #expect(wrong == 0)
        // Runs of eight take the AVX2 path where the CPU has it; one value alone the portable loop: the same codes.
        #expect(values.map { FP8.e4m3([$0])[0] } == ours)
        // And through a scale: values × 4 over scale 4 round as the values do.
        #expect(FP8.e4m3(values.filter(\.isFinite).map { $0 * 4 }, scale: 4) == FP8.e4m3(values.filter(\.isFinite)))
        #expect(FP8.e8m0Ceiling(1) == 127 && FP8.e8m0Ceiling(1.5) == 128 && FP8.e8m0Ceiling(0.25) == 125)
    }

    @Test("merged codes and scales are the Float64 reference's (E4M3 codes within one step, most exact); the rest is copied",
          arguments: ["tiny-fp8", "tiny-fp8-e8m0", "tiny-fp8-channel"])
    func merge(_ base: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, summary) = try AdapterKitTests.merge(base: modelPath(base), adapters: [(adapterPath("fp8-lora"), 1)], out: dir.file("out"))
        let original = try Checkpoint(path: modelPath(base))
        let reference = try SafetensorsFile(path: fixture("expected/fp8/\(base)+fp8-lora.safetensors"))
        func bytes(_ c: Checkpoint, _ name: String) throws -> [UInt8] {
            let (_, file) = try #require(c.tensor(name), "\(name)")
            return try c.files[file].withBytes(of: name) { Array($0) }
        }
        let e8m0 = base.hasSuffix("e8m0"), channel = base.hasSuffix("channel")  // channel: compressed-tensors, BF16 scales per row
        var exact = 0, total = 0
        for weight in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"] {
            let got = try bytes(merged, weight), want = try reference.withBytes(of: weight) { Array($0) }
            #expect(got.count == want.count)
            for (g, w) in zip(got, want) {
                total += 1
                if g == w { exact += 1; continue }
                // One E4M3 step apart at most: Float32 accumulation against Float64 at a rounding boundary.
                #expect(g & 0x80 == w & 0x80 && abs(Int(g & 0x7F) - Int(w & 0x7F)) == 1, "\(weight): code \(g) vs reference \(w)")
            }
            let scaleName = weight + (channel ? "_scale" : "_scale_inv")
            if channel {
                let g = try bytes(merged, scaleName), w = try reference.withBytes(of: scaleName) { Array($0) }
                let gv = stride(from: 0, to: g.count, by: 2).map { Int(g[$0]) | Int(g[$0 + 1]) << 8 }
                let wv = stride(from: 0, to: w.count, by: 2).map { Int(w[$0]) | Int(w[$0 + 1]) << 8 }
                #expect(zip(gv, wv).allSatisfy { abs($0 - $1) <= 1 }, "\(scaleName): BF16 scales one step apart at most")
            } else if e8m0 {
                #expect(try bytes(merged, scaleName) == reference.withBytes(of: scaleName) { Array($0) }, "\(scaleName)")
            } else {
                let (_, file) = try #require(merged.tensor(scaleName))
                let g = try merged.files[file].floats(scaleName), w = try reference.floats(scaleName)
                #expect(zip(g, w).allSatisfy { abs($0 - $1) <= 2 * $1.ulp }, "\(scaleName)")
            }
        }
        #expect(Double(exact) >= 0.99 * Double(total), "\(exact) of \(total) codes are the reference's")
        // Untouched quantized weights and their scales, and everything else, byte for byte.
        let touched = Set(["q_proj", "v_proj", "down_proj"])
        for (entry, _) in original.tensors where !touched.contains(where: { entry.name.contains($0) }) {
            #expect(try bytes(merged, entry.name) == bytes(original, entry.name), "\(entry.name)")
        }
        if !channel {
            // The q_proj scales sit in the other shard than q_proj: rewritten there.
            #expect(merged.tensors.first { $0.entry.name == "model.layers.0.self_attn.q_proj.weight_scale_inv" }?.file == 1)
            #expect(try bytes(merged, "model.layers.0.self_attn.q_proj.weight_scale_inv") != bytes(original, "model.layers.0.self_attn.q_proj.weight_scale_inv"))
        }
        #expect(merged.tensor("model.layers.0.self_attn.q_proj.weight")?.entry.encoding == original.tensor("model.layers.0.self_attn.q_proj.weight")?.entry.encoding)
        #expect(summary.notes.contains { $0.hasPrefix("requantized 3 quantized weights with fresh scales") })
    }

    @Test("the retention the merge reports is the projection of what requantization kept onto the update")
    func retention() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, summary) = try AdapterKitTests.merge(base: modelPath("tiny-fp8"), adapters: [(adapterPath("fp8-lora"), 1)], out: dir.file("out"), report: true)
        let reference = try SafetensorsFile(path: fixture("expected/fp8/tiny-fp8+fp8-lora.safetensors"))
        for r in summary.reports {
            let w = try reference.doubles(r.tensor + ".base"), wp = try reference.doubles(r.tensor + ".merged")
            // deq(Q(W')) of our output, computed from its codes and scales here.
            let (entry, file) = try #require(merged.tensor(r.tensor))
            let codes = try merged.files[file].withBytes(of: r.tensor) { Array($0) }
            let scales = try merged.files[merged.tensor(r.tensor + "_scale_inv")!.file].floats(r.tensor + "_scale_inv")
            let k = entry.shape[1], blockColumns = (k + 7) / 8
            var dot = 0.0, norm = 0.0
            for i in codes.indices {
                let (row, col) = (i / k, i % k)
                let q = Double(ElementConversion.f8E4M3ToFloat(codes[i])) * Double(scales[(row / 4) * blockColumns + col / 8])
                dot += (q - w[i]) * (wp[i] - w[i])
                norm += (wp[i] - w[i]) * (wp[i] - w[i])
            }
            let kept = try #require(r.kept)
            #expect(abs(kept - dot / norm) < 1e-4, "\(r.tensor): reported \(kept), recomputed \(dot / norm)")
        }
        #expect(summary.reports.count == 3)
    }

    @Test("--dtype bf16: every quantized weight dequantized and rounded once (merged ones with their update), scales and quantization_config gone")
    func dequantize() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (out, _) = try AdapterKitTests.merge(base: modelPath("tiny-fp8"), adapters: [(adapterPath("fp8-lora"), 1)], out: dir.file("out"), dequantize: .bf16)
        let reference = try SafetensorsFile(path: fixture("expected/fp8/tiny-fp8+fp8-lora.safetensors"))
        let touched = Set(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"])
        var weights = 0, exact = 0, total = 0
        for t in reference.header.tensors where t.name.hasSuffix(".base") {
            let name = String(t.name.dropLast(".base".count))
            let want = try reference.doubles(touched.contains(name) ? name + ".merged" : t.name)
            let (entry, file) = try #require(out.tensor(name))
            #expect(entry.encoding == .plain(.bf16))
            let got = try out.files[file].withBytes(of: name) { raw in (0..<entry.elementCount).map { raw.load(fromByteOffset: $0 * 2, as: UInt16.self) } }
            for (g, w) in zip(got, want) {
                total += 1
                let rounded = ElementConversion.doubleToBF16(w)
                if g == rounded { exact += 1 } else { #expect(abs(Int(g) - Int(rounded)) == 1, "\(name): \(g) vs \(rounded)") }
            }
            weights += 1
            #expect(out.tensor(name + "_scale_inv") == nil)
        }
        #expect(weights == 7)
        // The untouched weights are exact (code × scale is exact in Float64); merged ones may differ
        // from numpy's Float64 sum by a last-place rounding of the accumulation at a BF16 tie.
        #expect(Double(exact) >= 0.99 * Double(total))
        let config = try String(contentsOfFile: dir.file("out/config.json"), encoding: .utf8)
        #expect(!config.contains("quantization_config") && config.contains(#""torch_dtype": "bfloat16""#))
        let index = try String(contentsOfFile: dir.file("out/model.safetensors.index.json"), encoding: .utf8)
        #expect(!index.contains("scale_inv"))
        #expect(try Checkpoint(path: dir.file("out")).warnings.isEmpty)
    }

    @Test("--dtype on a base without quantized weights is refused")
    func dequantizeNothing() throws {
        let inputs = [MergeInput(adapter: try Adapter(path: adapterPath("peft-lora")))]
        let error = #expect(throws: ProblemList.self) {
            try MergePlan(base: try Checkpoint(path: modelPath("tiny-llama")), inputs: inputs, options: MergeOptions(dequantize: .bf16))
        }
        #expect(error?.problems.contains { $0.contains("the base has no quantized weights") } == true)
    }
}

@Suite("--dtype on compressed-tensors models with static activation scales")
struct DequantizeCompressedTests {
    @Test("input_scale and zero points leave with the weight scales; the rest stays")
    func dropsQuantizationParameters() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        let one: [UInt8] = [0x80, 0x3F]  // BF16 1.0
        try writeSafetensors(dir.file("m/model.safetensors"), [
            ("a.weight", .f8E4M3, [2, 8], [UInt8](repeating: 0x38, count: 16)),
            ("a.weight_scale", .bf16, [2, 1], one + one),
            ("a.input_scale", .bf16, [1], one),
            ("norm.weight", .bf16, [8], [UInt8](repeating: 0, count: 16)),
        ])
        _ = dir.write("m/config.json", text: #"{"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}, "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}}"#)
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.a.lora_A.weight", .f32, [1, 8], floatBytes([Float](repeating: 0.5, count: 8))),
            ("base_model.model.a.lora_B.weight", .f32, [2, 1], floatBytes([1, 2])),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1}"#)
        let plan = try MergePlan(base: try Checkpoint(path: dir.file("m")), inputs: [MergeInput(adapter: try Adapter(path: dir.file("ad")))],
                                 options: MergeOptions(dequantize: .f32))
        #expect(plan.dropped == ["a.weight_scale", "a.input_scale"])
        let (out, _) = try write(plan, to: dir.file("out"))
        #expect(out.tensorNames.sorted() == ["a.weight", "norm.weight"])
        // Code 0x38 is 1.0, scale 1; B·A adds b_i × 0.5 to every column of row i (scale 1).
        #expect(try out.files[0].doubles("a.weight") == [Double](repeating: 1.5, count: 8) + [Double](repeating: 2, count: 8))
    }
}

@Suite("quantized values that cannot be decoded are refused before anything is written")
struct QuantizedPreflightTests {
    func model(_ dir: TempDir, code: UInt8, scale: Float) throws -> MergePlan {
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        var codes = [UInt8](repeating: 0x38, count: 16)
        codes[11] = code
        try writeSafetensors(dir.file("m/model.safetensors"), [
            ("a.weight", .f8E4M3, [2, 8], codes),
            ("a.weight_scale_inv", .f32, [1, 1], floatBytes([scale])),
        ])
        _ = dir.write("m/config.json", text: #"{"model_type": "llama", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}"#)
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            ("base_model.model.a.lora_A.weight", .f32, [1, 8], floatBytes([Float](repeating: 0.5, count: 8))),
            ("base_model.model.a.lora_B.weight", .f32, [2, 1], floatBytes([1, 2])),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1}"#)
        return try MergePlan(base: try Checkpoint(path: dir.file("m")), inputs: [MergeInput(adapter: try Adapter(path: dir.file("ad")))])
    }

    @Test("an E4M3 NaN code in a merged weight, and a negative or NaN scale, each one line naming where", arguments: [
        (UInt8(0x7F), Float(1), "code 127 at row 1, column 3 decodes to NaN"),
        (UInt8(0xFF), Float(1), "code 255 at row 1, column 3 decodes to NaN"),
        (UInt8(0x38), Float(-1), "its scale a.weight_scale_inv[0] is -1.0, not a finite scale"),
        (UInt8(0x38), Float.nan, "its scale a.weight_scale_inv[0] is nan, not a finite scale"),
    ])
    func refused(_ code: UInt8, _ scale: Float, _ message: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let plan = try model(dir, code: code, scale: scale)
        let error = #expect(throws: MergeError.self) { try plan.checkQuantizedValues() }
        #expect(error.map { "\($0)" }?.contains(message) == true, "\(String(describing: error))")
        // The merge runs the same check before it creates anything beside OUT.
        #expect(throws: MergeError.self) { try write(plan, to: dir.file("out")) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == ["ad", "m"])
    }
}
