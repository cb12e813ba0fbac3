import Foundation
import Testing
@testable import AdapterKit

@Suite("combine: several adapters made one")
struct CombineTests {
    /// Inputs for tiny-llama in four layouts and scale rules: real PEFT with rsLoRA, rank and alpha
    /// patterns, an embedding module and lm_head in modules_to_save; the MoSLoRA original layout
    /// (negative weight); mlx-lm; plain PEFT.
    let inputs: [(String, Double)] = [("real-lora-rslora-patterns", 1), ("moslora-original", -0.5), ("mlx", 0.75), ("peft-lora", 2)]

    func options(_ edit: (inout CombineOptions) -> Void = { _ in }) -> CombineOptions {
        var o = CombineOptions()
        o.sync = false
        edit(&o)
        return o
    }

    /// Σ wᵢ·sᵢ·Bᵢ·Mᵢ·Aᵢ per module from the inputs' own factors.
    func exactSum(_ inputs: [(String, Double)]) throws -> [String: [Double]] {
        var sum: [String: [Double]] = [:]
        for (name, w) in inputs {
            for m in try Adapter(path: adapterPath(name)).modules {
                let (ma, b) = try m.mixedA()
                let d = matmul(b, ma, rows: m.outFeatures, inner: m.rank, cols: m.inFeatures).map { $0 * m.scale * w }
                sum[m.baseName] = zip(sum[m.baseName] ?? [Double](repeating: 0, count: d.count), d).map { $0 + $1 }
            }
        }
        return sum
    }

    func dense(_ m: LoRAModule) throws -> [Double] {
        let (ma, b) = try m.mixedA()
        return matmul(b, ma, rows: m.outFeatures, inner: m.rank, cols: m.inFeatures).map { $0 * m.scale }
    }

    @Test("cat is exact for mixed layouts, scales, negative weights and mixers: each update is the weighted sum, and merging it is merging the inputs in one pass")
    func catIsExact() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let summary = try Combination.combine(inputs.map { CombineInput(path: adapterPath($0.0), weight: $0.1) }, output: dir.file("cat"), options: options())
        let combined = try Adapter(path: dir.file("cat"))
        let want = try exactSum(inputs)
        #expect(combined.modules.count == want.count && summary.modules.count == want.count)
        #expect(combined.hasMixer, "the MoSLoRA input keeps its mixer on a block diagonal")
        for m in combined.modules {
            let got = try dense(m), w = try #require(want[m.baseName])
            let scale = w.map(abs).max()!
            #expect(zip(got, w).allSatisfy { abs($0 - $1) <= 1e-6 * scale }, "\(m.baseName)")
        }
        // lm_head (modules_to_save) and the embedding PEFT saved whole beside its LoRA (save_embedding_layers).
        #expect(combined.replacements.map(\.baseName).sorted() == ["lm_head.weight", "model.embed_tokens.weight"])
        let config = try JSONParser.parse(readBytes(dir.file("cat/adapter_config.json")))
        #expect(config["modules_to_save"]?.arrayValue?.compactMap(\.stringValue) == ["lm_head"], "only what an input's config listed")
        // Merged into the bf16 base: the values of the four inputs merged in one pass (the Float32 sums
        // differ only in order, so a value may round to the neighbouring bf16 step).
        let base = modelPath("tiny-llama")
        let (one, _) = try merge(base: base, adapters: [(dir.file("cat"), 1)], out: dir.file("m1"))
        let (all, _) = try merge(base: base, adapters: inputs.map { (adapterPath($0.0), $0.1) }, out: dir.file("m2"))
        var equal = 0, count = 0
        for name in all.tensorNames {
            let x = try one.files[one.tensor(name)!.file].floats(name), y = try all.files[all.tensor(name)!.file].floats(name)
            for (p, q) in zip(x, y) {
                count += 1
                if p == q { equal += 1 }
                #expect(abs(p - q) <= max(abs(p), abs(q)) * 0x1p-8, "\(name): \(p) vs \(q)")
            }
        }
        #expect(Double(equal) >= 0.99 * Double(count), "\(equal) of \(count) values the same")
    }

    @Test("cat --form lora folds the mixers; --to kohya and mlx write the same updates")
    func catForms() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let some = [("moslora-original", 1.0), ("peft-lora", -1.0)]
        let want = try exactSum(some)
        for (name, layout) in [("lora", TargetLayout.peft), ("kohya.safetensors", .kohya), ("mlx", .mlx)] {
            _ = try Combination.combine(some.map { CombineInput(path: adapterPath($0.0), weight: $0.1) }, output: dir.file(name),
                                        options: options { $0.form = .lora; $0.layout = layout; $0.base = modelPath("tiny-llama") })
            var a = try Adapter(path: dir.file(name))
            if layout == .kohya {
                var w = try WorkingAdapter(a, options: ConvertOptions())
                try w.mapKohyaNames(base: modelPath("tiny-llama"))
                a = Adapter(path: a.path, format: a.format, store: a.store, configPath: nil, config: nil, modules: w.modules, replacements: [], unknownKeys: [], warnings: [])
            }
            #expect(!a.hasMixer && a.modules.count == want.count, "\(name)")
            for m in a.modules {
                let got = try dense(m), w = try #require(want[m.baseName], "\(name): \(m.baseName)")
                let scale = w.map(abs).max()!
                #expect(zip(got, w).allSatisfy { abs($0 - $1) <= 1e-5 * scale }, "\(name): \(m.baseName)")
            }
        }
    }

    @Test("svd --rank K is the best rank-K approximation of the exact sum: its error is the tail of the sum's singular values")
    func svd() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let s = try Combination.combine(inputs.map { CombineInput(path: adapterPath($0.0), weight: $0.1) }, output: dir.file("svd"),
                                        options: options { $0.method = .svd; $0.rank = 3 })
        let want = try exactSum(inputs)
        let a = try Adapter(path: dir.file("svd"))
        for m in a.modules {
            let w = want[m.baseName]!
            let sv = LinearAlgebra.singularValues(w, rows: m.outFeatures, cols: m.inFeatures)
            let got = try dense(m)
            let err = zip(got, w).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            let tail = sv.dropFirst(3).reduce(0) { $0 + $1 * $1 }, total = sv.reduce(0) { $0 + $1 * $1 }
            #expect(m.rank == min(3, sv.count) && abs(err - tail) <= 1e-9 * total, "\(m.baseName): \(err) vs \(tail)")
            let reported = try #require(s.modules.first { $0.name == m.baseName })
            #expect(abs(reported.energyKept - (total - tail) / total) <= 1e-9)
        }
    }

    @Test("cat sums lora_B biases with the weights and scales (GPT-2 Conv1D, fan_in_fan_out, lora_bias)")
    func biases() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let input = try #require(try Adapter(path: adapterPath("real-gpt2-conv1d")).modules.first)
        _ = try Combination.combine([CombineInput(path: adapterPath("real-gpt2-conv1d")), CombineInput(path: adapterPath("real-gpt2-conv1d"), weight: -0.25)],
                                    output: dir.file("out"), options: options())
        let m = try #require(try Adapter(path: dir.file("out")).modules.first)
        #expect(m.kind == .linearFanInFanOut && m.rank == 2 * input.rank)
        let want = try input.bias!.doubles().map { $0 * input.scale * 0.75 }, got = try m.bias!.doubles().map { $0 * m.scale }
        #expect(zip(got, want).allSatisfy { abs($0 - $1) <= 1e-6 * max(1, abs($1)) })
        let du = try dense(m), di = try dense(input).map { $0 * 0.75 }
        #expect(zip(du, di).allSatisfy { abs($0 - $1) <= 1e-6 * max(1, abs($1)) })
    }

    @Test("refused with one line and nothing written: DoRA, two modules_to_save of one tensor, different models, a missing rank")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let dora = #expect(throws: ProblemList.self) {
            try Combination.combine([CombineInput(path: adapterPath("real-dora")), CombineInput(path: adapterPath("peft-lora"))], output: dir.file("a"), options: options())
        }
        #expect(dora?.problems.first?.contains("is DoRA") == true)
        let twice = #expect(throws: ProblemList.self) {
            try Combination.combine([CombineInput(path: adapterPath("real-lora-rslora-patterns")), CombineInput(path: adapterPath("real-lora-rslora-patterns"))],
                                    output: dir.file("b"), options: options())
        }
        #expect(twice?.problems.contains { $0.contains("lm_head.weight is replaced whole (modules_to_save) by both") } == true)
        let models = #expect(throws: ProblemList.self) {
            try Combination.combine([CombineInput(path: adapterPath("peft-lora")), CombineInput(path: adapterPath("gguf-lora"))], output: dir.file("c"), options: options())
        }
        #expect(models?.problems.first?.contains("not the same model") == true)
        #expect(throws: InputError.self) {
            try Combination.combine([CombineInput(path: adapterPath("peft-lora")), CombineInput(path: adapterPath("mlx"))], output: dir.file("d"), options: options { $0.method = .ties })
        }
        for n in ["a", "b", "c", "d"] { #expect(!FileManager.default.fileExists(atPath: dir.file(n))) }
    }
}

@Suite("TIES and DARE on dense updates")
struct TaskArithmeticTests {
    @Test("a hand-worked TIES case: trim by magnitude, elect the sign of the sum, the mean of the agreeing entries")
    func ties() {
        // Two task vectors of 4 entries, density 0.5 (keep 2 each).
        let a: [Double] = [3, -1, 0.5, -2], b: [Double] = [-1, 2, 0.25, -4]
        // Trimmed: a → [3, 0, 0, -2], b → [0, 2, 0, -4]; signs of the sum: [+, +, 0, −];
        // agreeing means: [3, 2, 0, (-2 - 4) / 2].
        let out = TaskArithmetic.combine([a, b], weights: [1, 1], method: .ties, density: 0.5, seed: 0, count: 4)
        #expect(out == [3, 2, 0, -3])
    }

    @Test("DARE keeps each entry with probability d and rescales by 1/d; dare-linear is then the weighted sum")
    func dare() {
        let n = 20000
        let a = [Double](repeating: 1, count: n)
        let out = TaskArithmetic.combine([a], weights: [2], method: .dareLinear, density: 0.25, seed: 7, count: n)
        let kept = out.filter { $0 != 0 }
        #expect(kept.allSatisfy { $0 == 8 }, "survivors are 2 · 1 / 0.25")
        #expect(abs(Double(kept.count) / Double(n) - 0.25) < 0.02)
        #expect(out == TaskArithmetic.combine([a], weights: [2], method: .dareLinear, density: 0.25, seed: 7, count: n), "the same for a seed")
    }
}
