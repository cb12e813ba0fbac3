import Foundation
import Testing
@testable import AdapterKit

/// Every (base, adapter) pair with a numpy-computed expected merge in Fixtures/expected.
let expectedPairs: [String] = {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: fixture("expected"))) ?? []
    return names.filter { $0.hasSuffix(".safetensors") && !$0.hasSuffix(".delta.safetensors") }
        .map { String($0.dropLast(".safetensors".count)) }.sorted()
}()

func modelPath(_ name: String) -> String {
    let folder = fixture("models/" + name)
    return FileManager.default.fileExists(atPath: folder) ? folder : folder + ".safetensors"
}

func adapterPath(_ name: String) -> String {
    let folder = fixture("adapters/" + name)
    return FileManager.default.fileExists(atPath: folder) ? folder : folder + ".safetensors"
}

/// Merges with the library into `out` and returns the output checkpoint.
@discardableResult
func merge(base: String, adapters: [(String, Double)], out: String, components: [String]? = nil, report: Bool = false,
           allowUnknown: Bool = false, dequantize: DType? = nil, denseRows: DenseRowsPolicy = .whenCheaper) throws -> (Checkpoint, MergeSummary) {
    let inputs = try adapters.map { MergeInput(adapter: try Adapter(path: $0.0), weight: $0.1) }
    let plan = try MergePlan(base: try Checkpoint(path: base), inputs: inputs,
                             options: MergeOptions(dropUnknown: allowUnknown, components: components, dequantize: dequantize))
    return try write(plan, to: out, report: report, denseRows: denseRows)
}

/// Writes a plan without fsync and returns the output checkpoint.
@discardableResult
func write(_ plan: MergePlan, to out: String, report: Bool = false, denseRows: DenseRowsPolicy = .whenCheaper) throws -> (Checkpoint, MergeSummary) {
    var options = MergeRunOptions()
    options.report = report
    options.denseRows = denseRows
    options.sync = false
    let summary = try plan.write(to: out, options: options)
    return (try Checkpoint(path: out), summary)
}

/// Distance in units of the last place of `dtype` between two stored values.
func ulpDistance(_ a: Double, _ b: Double, _ dtype: DType) -> Double {
    let e = max(abs(a), abs(b), dtype == .bf16 ? 1e-38 : 6e-8)
    let bits: Double = switch dtype { case .bf16: 8; case .f16: 11; case .f32: 24; default: 53 }
    return abs(a - b) / (pow(2, (log2(e)).rounded(.down) - bits + 1))
}

@Suite("merge: results against independent numpy references")
struct MergeReferenceTests {
    @Test("the numpy references are present")
    func present() {
        #expect(expectedPairs.count >= 20)
    }

    @Test("merged tensors equal the Float64 reference rounded once; other tensors are copied bit for bit", arguments: expectedPairs)
    func pair(_ pair: String) throws {
        let parts = pair.split(separator: "+").map(String.init)
        let base = modelPath(parts[0])
        let adapter = adapterPath(parts[1])
        let components: [String]? = parts[0] == "tiny-unet" ? ["unet"] : parts[0] == "tiny-text-encoder" ? ["text_encoder"] : nil
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file(base.hasSuffix(".safetensors") ? "out.safetensors" : "out")
        let (merged, _) = try merge(base: base, adapters: [(adapter, 1)], out: out, components: components)
        let expected = try SafetensorsFile(path: fixture("expected/\(pair).safetensors"))
        let original = try Checkpoint(path: base)
        #expect(merged.tensorNames.sorted() == original.tensorNames.sorted())
        for (info, file) in merged.tensors {
            let got = try merged.files[file].doubles(info.name)
            #expect(info.dtype == original.tensor(info.name)!.entry.dtype)
            if let e = expected.info(info.name) {
                let want = try expected.doubles(e.name)
                let delta = try SafetensorsFile(path: fixture("expected/\(pair).delta.safetensors")).doubles(e.name)
                let base = original.tensor(info.name).map { try? original.files[$0.file].doubles(info.name) } ?? nil
                let deltaMax = delta.map { abs($0) }.max() ?? 0
                #expect(e.shape == info.shape)
                var worst = 0.0, exact = 0
                for (i, (g, w)) in zip(got, want).enumerated() {
                    // Float32 accumulation noise (Float64 for F64 bases) on the scale of the terms,
                    // plus one unit in the last place of the stored type.
                    let w0 = base.map { i < $0.count ? abs($0[i]) : 0 } ?? 0
                    let noise = (info.dtype == .f64 ? 0x1p-50 : 0x1p-21) * (w0 + deltaMax)
                    let excess = max(0, abs(g - w) - noise)
                    worst = max(worst, ulpDistance(w + (g > w ? excess : -excess), w, info.dtype))
                    if g == w { exact += 1 }
                }
                #expect(worst <= 1, "\(info.name): \(worst) ulp beyond Float32 noise")
                if info.dtype == .bf16 || info.dtype == .f16 {
                    #expect(exact >= got.count * 99 / 100, "\(info.name): only \(exact) of \(got.count) exact")
                }
            } else {
                let a = try merged.files[file].withBytes(of: info.name) { Array($0) }
                let o = try original.files[original.tensor(info.name)!.file].withBytes(of: info.name) { Array($0) }
                #expect(a == o, "\(info.name) changed but has no expected value")
            }
        }
    }

    @Test("un-merge with --weight -1 returns the base within one ulp")
    func unmerge() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = modelPath("tiny-llama")
        let adapter = adapterPath("moslora-original")
        let (merged, _) = try merge(base: base, adapters: [(adapter, 1)], out: dir.file("merged"))
        let (back, _) = try merge(base: dir.file("merged"), adapters: [(adapter, -1)], out: dir.file("back"))
        let original = try Checkpoint(path: base)
        var moved = 0, total = 0
        for (info, file) in back.tensors {
            let a = try back.files[file].doubles(info.name)
            let m = try merged.files[merged.tensor(info.name)!.file].doubles(info.name)
            let o = try original.files[original.tensor(info.name)!.file].doubles(info.name)
            for i in a.indices {
                // W'' = round(round(W + Δ) − Δ): off by at most one unit at the magnitude where it was rounded.
                let scale = max(abs(m[i]), abs(o[i]), abs(a[i]))
                let ulp = Double(Float(bitPattern: Float(scale).bitPattern & 0x7F80_0000)) * 0x1p-7
                #expect(abs(a[i] - o[i]) <= ulp, "\(info.name)[\(i)]: \(a[i]) vs \(o[i])")
                if a[i] != o[i] { moved += 1 }
                total += 1
            }
        }
        #expect(moved < total / 4)
    }

    @Test("two adapters in one pass equal the sum of their exact updates")
    func twoAdapters() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = modelPath("tiny-llama-f64")
        let a1 = adapterPath("peft-lora"), a2 = adapterPath("moslora-original")
        let (merged, _) = try merge(base: base, adapters: [(a1, 0.5), (a2, 2)], out: dir.file("o.safetensors"))
        let d1 = try SafetensorsFile(path: fixture("expected/tiny-llama+peft-lora.delta.safetensors"))
        let d2 = try SafetensorsFile(path: fixture("expected/tiny-llama+moslora-original.delta.safetensors"))
        let original = try Checkpoint(path: base)
        for name in Set(d1.header.tensors.map(\.name) + d2.header.tensors.map(\.name)) {
            let w = try original.files[0].doubles(name)
            let u1 = d1.info(name) != nil ? try d1.doubles(name) : [Double](repeating: 0, count: w.count)
            let u2 = d2.info(name) != nil ? try d2.doubles(name) : [Double](repeating: 0, count: w.count)
            let got = try merged.files[0].doubles(name)
            for i in w.indices {
                let want = w[i] + 0.5 * u1[i] + 2 * u2[i]
                #expect(abs(got[i] - want) <= 1e-12 * max(1, abs(want)), "\(name)[\(i)]")
            }
        }
    }

    @Test("--report: max |ΔW| equals the reference update's, survival near 1 for F32")
    func report() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (_, summary) = try merge(base: modelPath("tiny-llama-f32"), adapters: [(adapterPath("moslora-original"), 1)],
                                     out: dir.file("o.safetensors"), report: true)
        let delta = try SafetensorsFile(path: fixture("expected/tiny-llama-f32+moslora-original.delta.safetensors"))
        #expect(summary.reports.count == delta.header.tensors.count)
        for r in summary.reports {
            let d = try delta.doubles(r.tensor)
            let maxAbs = d.map { abs($0) }.max()!
            #expect(abs(r.statistics.maxAbsUpdate - maxAbs) <= 1e-6 * maxAbs)
            #expect(abs(r.statistics.survival - 1) < 1e-4)
        }
    }
}

@Suite("merge: results against the real PEFT library's merge_and_unload")
struct MergeAgainstPEFTTests {
    /// Pairs in Fixtures/expected/real: PEFT (0.21) saved the adapter and its own merged weights.
    static let pairs: [String] = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fixture("expected/real"))) ?? []
        return names.filter { $0.hasSuffix(".safetensors") }.map { String($0.dropLast(".safetensors".count)) }.sorted()
    }()

    @Test("the PEFT references are present: LoRA, rsLoRA with patterns, DoRA, Conv1D with lora_bias, embedding")
    func present() {
        #expect(Self.pairs.count == 5)
    }

    @Test("every tensor PEFT changed, we change to the same values (Float32 rounding apart)", arguments: pairs)
    func pair(_ pair: String) throws {
        let parts = pair.split(separator: "+").map(String.init)
        let dir = TempDir()
        defer { dir.remove() }
        let (merged, _) = try merge(base: modelPath(parts[0]), adapters: [(adapterPath(parts[1]), 1)], out: dir.file("o.safetensors"))
        let peft = try SafetensorsFile(path: fixture("expected/real/\(pair).safetensors"))
        let base = try Checkpoint(path: modelPath(parts[0]))
        #expect(!peft.header.tensors.isEmpty)
        for t in peft.header.tensors {
            let want = try peft.doubles(t.name)
            let got = try merged.files[0].doubles(t.name)
            let w = try base.files[0].doubles(t.name)
            let scale = zip(want, w).map { abs($0 - $1) }.max()! + w.map { abs($0) }.max()!
            for i in want.indices {
                #expect(abs(got[i] - want[i]) <= 0x1p-20 * scale, "\(t.name)[\(i)]: \(got[i]) vs PEFT \(want[i])")
            }
        }
        // And nothing else changed.
        let changed = Set(peft.header.tensors.map(\.name))
        for (info, file) in merged.tensors where !changed.contains(info.name) {
            #expect(try merged.files[file].doubles(info.name) == base.files[0].doubles(info.name), "\(info.name)")
        }
    }
}

@Suite("merge: rounding once, everywhere")
struct RoundOnceTests {
    /// x = 1 + 2⁻⁸ + 2⁻³⁰: through Float32 it becomes 1 + 2⁻⁸, a BF16 tie that rounds to even (1);
    /// rounded once from Float64 it is above the tie and becomes 1 + 2⁻⁷.
    static let x = 1 + 0x1p-8 + 0x1p-30

    @Test("an F64 modules_to_save replacement lands in a BF16 base rounded once, alone or with an update")
    func f64Replacement() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // Base: lm_head.weight and q.weight, BF16 [1, 2].
        let bf16One: [UInt8] = [0x80, 0x3F]
        try writeSafetensors(dir.file("base.safetensors"), [
            (name: "lm_head.weight", dtype: .bf16, shape: [1, 2], bytes: bf16One + bf16One),
            (name: "q.weight", dtype: .bf16, shape: [1, 2], bytes: bf16One + bf16One),
        ])
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        try writeSafetensors(dir.file("ad/adapter_model.safetensors"), [
            (name: "base_model.model.lm_head.weight", dtype: .f64, shape: [1, 2], bytes: doubleBytes([Self.x, -Self.x])),
            (name: "base_model.model.q.weight", dtype: .f64, shape: [1, 2], bytes: doubleBytes([Self.x, Self.x])),
            // A zero update on q: the replacement still goes through the merge kernel's path.
            (name: "base_model.model.q.lora_A.weight", dtype: .f32, shape: [1, 2], bytes: floatBytes([0, 0])),
            (name: "base_model.model.q.lora_B.weight", dtype: .f32, shape: [1, 1], bytes: floatBytes([0])),
        ])
        _ = dir.write("ad/adapter_config.json", text: #"{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "modules_to_save": ["lm_head", "q"]}"#)
        let (out, _) = try merge(base: dir.file("base.safetensors"), adapters: [(dir.file("ad"), 1)], out: dir.file("out.safetensors"))
        // 1 + 2⁻⁷ in BF16 is 0x3F81.
        let lm = try out.files[0].withBytes(of: "lm_head.weight") { Array($0) }
        #expect(lm == [0x81, 0x3F, 0x81, 0xBF], "\(lm)")
        let q = try out.files[0].withBytes(of: "q.weight") { Array($0) }
        #expect(q == [0x81, 0x3F, 0x81, 0x3F], "\(q)")
    }
}
