import CLinearAlgebra
import Foundation

/// How many singular values `extract` keeps per module.
public enum ExtractTarget: Sendable {
    /// K (fewer only where a matrix is smaller).
    case rank(Int)
    /// The fewest that keep this fraction of ‖D‖²_F, at most `maxRank`.
    case energy(Double, maxRank: Int)
}

public struct ExtractOptions: Sendable {
    public var target: ExtractTarget = .rank(16)
    /// lora: B = U·√Σ, A = √Σ·Vᵀ, alpha = r; moslora: B = U, M = Σ (diagonal), A = Vᵀ in the
    /// original code's `lora_AB` layout (docs/formats.md §12).
    public var form: ResizeForm = .lora
    /// A full SVD of every difference instead of the randomized one (slow: for checking).
    public var exact = false
    /// Only modules whose name this matches (searched anywhere in it, as Python's `re.search`).
    public var include: String?
    /// No module whose name this matches.
    public var exclude: String?
    /// Module leaf names (`embed_tokens`, `lm_head`, `norm`) whose tensors are kept whole, as PEFT
    /// `modules_to_save` (every module with that leaf, as PEFT wraps them all).
    public var saveFull: [String] = []
    /// The factors' dtype; nil: each base tensor's own.
    public var dtype: DType?
    public var force = false
    public var sync = true
    public var threads = max(1, ProcessInfo.processInfo.activeProcessorCount)
    /// Randomized SVD settings: extra sketch columns, power iterations, seed.
    public var oversampling = 10
    public var powerIterations = 2
    public var seed: UInt64 = 0
    /// Called with (bytes read of TUNED, its total) as the pairs are read.
    public var progress: (@Sendable (Int, Int) -> Void)?

    public init() {}
}

/// What `extract` did.
public struct ExtractSummary: Sendable {
    public struct Module: Sendable {
        /// The module name in base-model terms (`model.layers.0.self_attn.q_proj`).
        public let name: String
        public let rows: Int
        public let cols: Int
        public let rank: Int
        /// Σ_{i<rank} σᵢ² / ‖D‖²_F.
        public let energyKept: Double
        /// ‖D − D_rank‖_F / ‖D‖_F.
        public let relativeError: Double
        /// ‖D‖_F.
        public let norm: Double
    }

    public var modules: [Module] = []
    /// Tensors in the adapter whole (`modules_to_save`).
    public var savedFull: [String] = []
    /// Tensors that differ but the adapter leaves out, each with why.
    public var leftOut: [(tensor: String, reason: String)] = []
    /// Tensors that are the same in both.
    public var unchanged = 0
    public var notes: [String] = []
    public var bytesRead = 0
    public var seconds = 0.0

    /// The report for scripts (`extract --json`).
    public var json: JSONObject {
        JSONObject([
            ("modules", .array(modules.map { m in
                .object(JSONObject([("name", .string(m.name)), ("rows", jsonInt(m.rows)), ("cols", jsonInt(m.cols)), ("rank", jsonInt(m.rank)),
                                    ("energy_kept", jsonNumber(m.energyKept)), ("relative_error", jsonNumber(m.relativeError)), ("norm", jsonNumber(m.norm))]))
            })),
            ("saved_full", .array(savedFull.map { .string($0) })),
            ("left_out", .array(leftOut.map { .object(JSONObject([("tensor", .string($0.tensor)), ("reason", .string($0.reason))])) })),
            ("unchanged", jsonInt(unchanged)),
            ("energy_kept", jsonNumber(totalEnergyKept)),
            ("seconds", jsonNumber(seconds)),
        ])
    }

    /// Σ kept energy / Σ ‖D‖² over the factored modules.
    public var totalEnergyKept: Double {
        let total = modules.reduce(0) { $0 + $1.norm * $1.norm }
        return total > 0 ? modules.reduce(0) { $0 + $1.energyKept * $1.norm * $1.norm } / total : 1
    }
}

/// Reads byte ranges of one tensor into a buffer of its own, reused for every range: straight
/// from the file when the tensor is one region of it (safetensors), else through the container.
final class BandReader {
    private let store: any TensorContainer
    private let entry: TensorEntry
    private let region: FileRegion?
    private let buffer: UnsafeMutableRawBufferPointer

    init(_ store: any TensorContainer, _ entry: TensorEntry, bytes: Int) {
        self.store = store
        self.entry = entry
        region = store.region(of: entry.name)
        buffer = .allocate(byteCount: max(1, bytes), alignment: 64)
    }

    deinit { buffer.deallocate() }

    /// Bytes `range` of the tensor (at most the buffer's size), valid until the next read.
    func read(_ range: Range<Int>) throws -> UnsafeRawBufferPointer {
        precondition(range.count <= buffer.count)
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<range.count])
        if let region {
            let got = try region.descriptor.read(into: target, at: region.range.lowerBound + range.lowerBound)
            guard got == range.count else {
                throw TensorReadError(file: region.path, tensor: entry.name, problem: "the file ended before the tensor's bytes did (it changed while being read)")
            }
        } else {
            try store.withBytes(of: entry.name, range: range) { target.copyMemory(from: $0) }
        }
        return UnsafeRawBufferPointer(target)
    }
}

public enum Extraction {
    /// Leaf names of embeddings and output heads: never factored by default (their differences are
    /// full-rank vocabulary rows); `--save-full` keeps them whole, `--include` factors them.
    static let embeddingLeaves: Set<String> = ["embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings",
                                               "position_embeddings", "token_type_embeddings", "tok_embeddings", "shared", "embed_positions"]

    /// `adapter extract BASE TUNED OUT`: for every weight matrix that differs, a low-rank factoring
    /// of D = TUNED − BASE (Float64 from the stored values), one pair of tensors in memory at a
    /// time, written as a PEFT LoRA (or MoSLoRA) folder at OUT.
    public static func extract(base basePath: String, tuned tunedPath: String, output: String, options: ExtractOptions = ExtractOptions()) throws -> ExtractSummary {
        let start = DispatchTime.now()
        // Memory must not grow with the number of modules: see la_fix_allocation_threshold.
        la_fix_allocation_threshold()
        switch options.target {
        case .rank(let k) where k < 1: throw InputError(output, "--rank must be at least 1")
        case .energy(let f, let cap) where !(f > 0 && f <= 1) || cap < 1: throw InputError(output, "--keep-energy must be in (0, 1] and --max-rank at least 1")
        default: break
        }
        func regex(_ pattern: String?, _ flag: String) throws -> Regex<AnyRegexOutput>? {
            guard let pattern else { return nil }
            do { return try Regex(pattern) } catch { throw InputError(pattern, "\(flag): not a regular expression (\(error))") }
        }
        let include = try regex(options.include, "--include"), exclude = try regex(options.exclude, "--exclude")
        let files = TensorFiles()
        let base = try Checkpoint(path: basePath, files: files), tuned = try Checkpoint(path: tunedPath, files: files)
        try OutputRules.check(output, kind: .folder, inputs: [basePath, tunedPath] + base.inputFiles + tuned.inputFiles, force: options.force)

        // Preflight: the same tensors with the same shapes, in plain float types.
        var problems: [String] = []
        let baseNames = Set(base.tensorNames), tunedNames = Set(tuned.tensorNames)
        let onlyBase = base.tensorNames.filter { !tunedNames.contains($0) }, onlyTuned = tuned.tensorNames.filter { !baseNames.contains($0) }
        if !onlyBase.isEmpty { problems.append("\(plural(onlyBase.count, "tensor")) of BASE \(onlyBase.count == 1 ? "is" : "are") not in TUNED (\(listed(onlyBase)))") }
        if !onlyTuned.isEmpty { problems.append("\(plural(onlyTuned.count, "tensor")) of TUNED \(onlyTuned.count == 1 ? "is" : "are") not in BASE (\(listed(onlyTuned)))") }
        for (t, _) in tuned.tensors {
            guard let (b, _) = base.tensor(t.name) else { continue }
            if b.shape != t.shape { problems.append("\(t.name) is \(b.shape) in BASE but \(t.shape) in TUNED"); continue }
            // Tensors that are not plain floating point (integer buffers, quantized weights) may only be equal.
            for (which, e) in [("BASE", b), ("TUNED", t)] where !isPlainFloat(e) {
                let same = try b.encoding == t.encoding && sameValues(b, base.files[base.tensor(b.name)!.file], t, tuned.files[tuned.tensor(t.name)!.file])
                if !same {
                    problems.append("\(e.name) in \(which) is \(e.encoding.name), not plain floating point, and differs (dequantize it first: adapter merge --dtype bf16)")
                }
                break
            }
        }
        guard problems.isEmpty else { throw ProblemList(subject: "extract", problems: problems) }

        var summary = ExtractSummary()
        var modules: [LoRAModule] = []
        var replacements: [Replacement] = []
        var savedLeaves: [String] = []
        let total = tuned.tensors.reduce(0) { $0 + $1.entry.byteCount }
        var read = 0
        let spill = try SpillFile(in: parentPath(output))
        // Reused from module to module: the difference (slot 0 of `difference`) and the sketches.
        let difference = LowRank.Buffers(), sketches = LowRank.Buffers()
        for (t, ti) in tuned.tensors {
            let (b, bi) = base.tensor(t.name)!
            let bStore = base.files[bi], tStore = tuned.files[ti]
            let isWeight = t.name.hasSuffix(".weight")
            let module = isWeight ? String(t.name.dropLast(".weight".count)) : t.name
            let leaf = String(module.split(separator: ".").last ?? Substring(module))
            let owner = isWeight ? leaf : String(module.split(separator: ".").dropLast().last ?? Substring(module))
            let matrix = isWeight && (t.shape.count == 2 || t.shape.count == 4) && t.elementCount > 0
            defer {
                read += t.byteCount
                options.progress?(read, total)
                bStore.release(b.name)
                tStore.release(t.name)
            }
            guard isPlainFloat(t) && isPlainFloat(b) else { summary.unchanged += 1; continue }  // equal: checked above
            let saveWhole = options.saveFull.contains(owner)
            let explicitlyIncluded = include.map { module.contains($0) } ?? false
            var selected = matrix && (include.map { module.contains($0) } ?? true) && !(exclude.map { module.contains($0) } ?? false)
            if Extraction.embeddingLeaves.contains(leaf) && !explicitlyIncluded { selected = false }
            if saveWhole {
                // Every module with that leaf, changed or not: PEFT's modules_to_save wraps them all,
                // and loads each from the adapter.
                replacements.append(Replacement(tensor: TensorRef(store: tStore, entry: t), baseName: t.name, outputKey: "base_model.model." + t.name))
                summary.savedFull.append(t.name)
                if !savedLeaves.contains(owner) { savedLeaves.append(owner) }
                continue
            }
            if !selected {
                guard try !sameValues(b, bStore, t, tStore) else { summary.unchanged += 1; continue }
                let why = !matrix ? "not a weight matrix; --save-full \(owner) keeps it whole"
                    : Extraction.embeddingLeaves.contains(leaf) && !explicitlyIncluded ? "an embedding or output head; --save-full \(leaf) keeps it whole"
                    : "left out by --include/--exclude"
                summary.leftOut.append((t.name, why))
                continue
            }
            let rows = t.shape[0], cols = t.elementCount / rows
            let d = difference.get(0, rows * cols)
            let normSquared = try Self.difference(b, bStore, t, tStore, rows: rows, cols: cols, into: d, threads: options.threads)
            summary.bytesRead += 2 * t.byteCount
            // NaN compares false with everything: checked before the test for an unchanged tensor.
            guard normSquared.isFinite else { throw InputError(tunedPath, "\(t.name): TUNED − BASE is not finite (NaN or infinity in a weight)") }
            guard normSquared > 0 else { summary.unchanged += 1; continue }
            let seed = options.seed ^ fnv1a(module)
            // The sketch: the rank asked for, or for --keep-energy the most it may keep.
            let sketch: Int
            switch options.target {
            case .rank(let want): sketch = min(want, rows, cols)
            case .energy(_, let cap): sketch = min(cap, rows, cols)
            }
            let svd = options.exact ? LowRank.exact(Array(UnsafeBufferPointer(start: d, count: rows * cols)), rows: rows, cols: cols)
                : LowRank.randomized(d, rows: rows, cols: cols, rank: sketch, oversampling: options.oversampling, powerIterations: options.powerIterations,
                                     seed: seed, threads: options.threads, buffers: sketches)
            var k = sketch
            if case .energy(let f, _) = options.target {
                var acc = 0.0
                for (i, s) in svd.s.prefix(sketch).enumerated() {
                    acc += s * s
                    if acc >= f * normSquared * (1 - 1e-12) { k = i + 1; break }
                }
            }
            let kept = svd.s.prefix(k).reduce(0) { $0 + $1 * $1 }
            let fraction = min(1, kept / normSquared)
            summary.modules.append(.init(name: module, rows: rows, cols: cols, rank: k, energyKept: fraction,
                                         relativeError: max(0, 1 - fraction).squareRoot(), norm: normSquared.squareRoot()))
            modules.append(try factors(svd.prefix(k), module: module, shape: t.shape, form: options.form, dtype: options.dtype ?? b.dtype, spill: spill))
        }
        if case .energy(let f, let cap) = options.target {
            let capped = summary.modules.filter { $0.rank == min(cap, $0.rows, $0.cols) && $0.energyKept < f }
            if !capped.isEmpty { summary.notes.append("\(plural(capped.count, "module")) reached --max-rank \(cap) before keeping \(formatNumber(f)) of the energy (\(listed(capped.map(\.name))))") }
        }
        guard !modules.isEmpty || !replacements.isEmpty else {
            throw InputError(tunedPath, summary.leftOut.isEmpty ? "TUNED is the same as BASE: there is nothing to extract"
                : "no weight matrix differs that the selection factors; \(plural(summary.leftOut.count, "tensor")) differ but are left out (\(listed(summary.leftOut.map(\.tensor))))")
        }
        try write(modules: modules, replacements: replacements, savedLeaves: savedLeaves, base: base, basePath: basePath, output: output, options: options,
                  notes: &summary.notes)
        if !summary.leftOut.isEmpty {
            summary.notes.append("the adapter leaves out \(plural(summary.leftOut.count, "tensor")) that differ: \(listed(summary.leftOut.map { "\($0.tensor) (\($0.reason))" }, limit: 4))")
        }
        summary.seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        return summary
    }

    static func isPlainFloat(_ e: TensorEntry) -> Bool {
        if case .plain(let d) = e.encoding { return d.isReadableAsFloat }
        return false
    }

    /// Whether two tensors of the same shape hold the same values (compared as stored when their
    /// dtypes agree, else as Float64).
    static func sameValues(_ b: TensorEntry, _ bs: any TensorContainer, _ t: TensorEntry, _ ts: any TensorContainer) throws -> Bool {
        if b.encoding == t.encoding { return try sameBytes(b, bs, t, ts) }
        return try bs.doubles(b.name) == ts.doubles(t.name)
    }

    /// D = TUNED − BASE (rows × cols, Float64 from the stored values) into `d`, read in bands of
    /// rows on every thread, and ‖D‖²_F (band sums added in band order: the same for any thread count).
    static func difference(_ b: TensorEntry, _ bs: any TensorContainer, _ t: TensorEntry, _ ts: any TensorContainer, rows: Int, cols: Int,
                           into d: UnsafeMutablePointer<Double>, threads: Int) throws -> Double {
        let band = max(1, (1 << 18) / max(cols, 1))
        let bands = (rows + band - 1) / band
        let codes: [DType: Int32] = [.f32: 0, .bf16: 1, .f64: 2]
        let fast = codes[t.dtype].flatMap { tc in codes[b.dtype].map { (tc, $0) } }
        let sums = UnsafeMutableBufferPointer<Double>.allocate(capacity: bands)
        defer { sums.deallocate() }
        let failure = Locked<(any Error)?>(nil)
        let out = UInt(bitPattern: d), partial = UInt(bitPattern: sums.baseAddress!)
        let (tw, bw) = (t.dtype.byteSize, b.dtype.byteSize)
        /// Band i from the bytes of its rows of TUNED (x) and BASE (y).
        let compute: @Sendable (Int, UnsafeRawPointer, UnsafeRawPointer) -> Void = { i, x, y in
            let r0 = i * band, r1 = min(rows, r0 + band), n = (r1 - r0) * cols
            let dst = UnsafeMutablePointer<Double>(bitPattern: out)! + r0 * cols
            var s = 0.0
            if let (tc, bc) = fast {
                s = la_difference(x, tc, y, bc, dst, n)
            } else {
                // Other float types: converted, then subtracted.
                var u = [Double](repeating: 0, count: n), v = [Double](repeating: 0, count: n)
                u.withUnsafeMutableBufferPointer { ElementConversion.toDouble(t.dtype, x, $0.baseAddress!, count: n) }
                v.withUnsafeMutableBufferPointer { ElementConversion.toDouble(b.dtype, y, $0.baseAddress!, count: n) }
                for j in 0..<n {
                    dst[j] = u[j] - v[j]
                    s += dst[j] * dst[j]
                }
            }
            UnsafeMutablePointer<Double>(bitPattern: partial)![i] = s
        }
        if ts.region(of: t.name) != nil && bs.region(of: b.name) != nil {
            DispatchQueue.concurrentPerform(iterations: min(threads, bands)) { worker in
                // Each worker reads its bands into two buffers of its own, reused band after band.
                let tuned = BandReader(ts, t, bytes: band * cols * tw), base = BandReader(bs, b, bytes: band * cols * bw)
                var i = worker
                while i < bands, failure.value == nil {
                    let r0 = i * band, r1 = min(rows, r0 + band)
                    do {
                        let x = try tuned.read(r0 * cols * tw..<r1 * cols * tw), y = try base.read(r0 * cols * bw..<r1 * cols * bw)
                        compute(i, x.baseAddress!, y.baseAddress!)
                    } catch {
                        failure.set(error)
                    }
                    i += threads
                }
            }
        } else {
            // A container that is not read by region (PyTorch zip members, checked and inflated
            // whole): both tensors once, then the bands from memory (reading each band through the
            // container would read the whole member once per band).
            try ts.withBytes(of: t.name) { tuned in
                try bs.withBytes(of: b.name) { base in
                    let x = UInt(bitPattern: tuned.baseAddress!), y = UInt(bitPattern: base.baseAddress!)
                    DispatchQueue.concurrentPerform(iterations: bands) { i in
                        let r0 = i * band
                        compute(i, UnsafeRawPointer(bitPattern: x)! + r0 * cols * tw, UnsafeRawPointer(bitPattern: y)! + r0 * cols * bw)
                    }
                }
            }
        }
        if let e = failure.value { throw e }
        return sums.reduce(0, +)
    }

    /// Whether two tensors hold the same bytes, compared in pieces of 4 MB.
    static func sameBytes(_ b: TensorEntry, _ bs: any TensorContainer, _ t: TensorEntry, _ ts: any TensorContainer) throws -> Bool {
        guard b.byteCount == t.byteCount else { return false }
        let piece = 4 << 20
        let x = BandReader(bs, b, bytes: min(piece, t.byteCount)), y = BandReader(ts, t, bytes: min(piece, t.byteCount))
        var o = 0
        while o < t.byteCount {
            let r = o..<min(t.byteCount, o + piece)
            if memcmp(try x.read(r).baseAddress!, try y.read(r).baseAddress!, r.count) != 0 { return false }
            o = r.upperBound
        }
        return true
    }

    /// The module for one truncated SVD, in the form asked for, its factors rounded once into `dtype`
    /// and written to `spill` (the module refers to them there).
    static func factors(_ svd: TruncatedSVD, module: String, shape: [Int], form: ResizeForm, dtype: DType, spill: SpillFile) throws -> LoRAModule {
        let k = svd.count, rows = svd.rows, cols = svd.cols
        let (a, b, m) = svd.factors(form)
        let name = "base_model.model." + module
        let conv = shape.count == 4
        let kind: LayerKind = !conv ? .linear : (shape[2] == 1 && shape[3] == 1 ? .conv1x1 : .convKxK)
        let aShape = conv ? [k] + shape.dropFirst() : [k, cols]
        let bShape = conv ? [rows, k, 1, 1] : [rows, k]
        let mixer = try m.map { try spill.append(name + ".lora_AB.weight", $0, shape: [k, k], dtype: dtype) }
        return LoRAModule(name: name, baseName: module, component: nil, kind: kind,
                          a: try spill.append(name + ".lora_A.weight", a, shape: aShape, dtype: dtype), mixer: mixer,
                          b: try spill.append(name + ".lora_B.weight", b, shape: bShape, dtype: dtype),
                          orientation: .peft, scale: 1, alpha: Double(k))
    }

    /// The PEFT folder: factors, whole tensors, and a config with r, lora_alpha = r, patterns where
    /// ranks differ, target_modules and modules_to_save.
    static func write(modules: [LoRAModule], replacements: [Replacement], savedLeaves: [String], base: Checkpoint, basePath: String, output: String,
                      options: ExtractOptions, notes: inout [String]) throws {
        let placeholder = Adapter(path: output, format: .peft, store: base.files[0], configPath: nil, config: nil, modules: [], replacements: [],
                                  unknownKeys: [], warnings: [])
        var config = AdapterWriter.freshPEFTConfig(WorkingAdapter(source: placeholder, modules: modules, replacements: []))
        config["base_model_name_or_path"] = .string(basePath)
        config["modules_to_save"] = savedLeaves.isEmpty ? .null : .array(savedLeaves.map { .string($0) })
        if base.config?.architectures.contains(where: { $0.hasSuffix("ForCausalLM") }) == true { config["task_type"] = .string("CAUSAL_LM") }
        let source = Adapter(path: output, format: .peft, store: base.files[0], configPath: nil, config: config, modules: [], replacements: [],
                             unknownKeys: [], warnings: [])
        var convert = ConvertOptions()
        convert.force = options.force
        convert.sync = options.sync
        notes += try AdapterConversion.write(WorkingAdapter(source: source, modules: modules, replacements: replacements), layout: .peft, style: .loraAB,
                                             output: output, options: convert)
    }

    /// FNV-1a of a name: a per-module seed that is the same on every machine.
    static func fnv1a(_ s: String) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in s.utf8 {
            h ^= UInt64(byte)
            h = h &* 0x100_0000_01B3
        }
        return h
    }
}
