/// Options shared by every conversion and by resize.
public struct ConvertOptions: Sendable {
    /// Write every factor in this dtype (rounded once, nearest even); nil keeps each tensor's input dtype.
    public var dtype: DType?
    /// Replace an existing OUT once the new output is complete.
    public var force = false
    /// A base model whose tensor names give kohya modules their dotted names (needed when a kohya
    /// adapter is written in a layout that names modules by their dotted path).
    public var base: String?
    /// For adapters holding several models (kohya, diffusers): the one part to convert into a
    /// single-model layout (PEFT, mlx).
    public var component: String?
    /// Convert even when the adapter has keys that are not understood (they are left out).
    public var dropUnknown = false
    /// fsync the output before it is renamed into place.
    public var sync = true
    /// `to-peft --experts`: rewrite Mixture-of-Experts modules per expert or fused (needs `base`).
    public var experts: ExpertForm?

    public init() {}
}

/// What a conversion did: notes for the user and, for resize, the energy kept per module.
public struct ConvertSummary: Sendable {
    public struct ModuleEnergy: Sendable {
        /// The module's base-model name.
        public let module: String
        public let rankBefore: Int
        public let rankAfter: Int
        /// Σ kept σ² / Σ σ² (1 for a zero update).
        public let energyKept: Double
        /// The singular values of B·M·A, descending (without the scale).
        public let singularValues: [Double]
    }

    public var modules = 0
    public var layout: TargetLayout = .peft
    public var notes: [String] = []
    public var energies: [ModuleEnergy] = []
    /// Smallest σmin/σmax of the mixers inverted (kaiming), nil when none were.
    public var worstConditionRatio: Double?

    /// Modules written with a mixer (MoSLoRA), and how their keys are named.
    public var mixers = 0
    public var mixerStyle: MixerKeyStyle = .loraAB

    public var line: String {
        let what: String
        if mixers == 0 {
            what = "LoRA"
        } else if layout == .kohya {
            what = "MoSLoRA, lora_mixer keys"
        } else {
            what = "MoSLoRA, \(mixerStyle.rawValue) keys"
        }
        return "wrote \(modules) module\(modules == 1 ? "" : "s") as \(layout.rawValue) (\(what))"
    }

    /// The form `--experts` wrote expert modules in, if it was given.
    public var experts: ExpertForm?

    /// Which runtimes load the output as written.
    public var loadedBy: String {
        if experts == .perExpert && mixers == 0 {
            return "per-expert modules: loaded as written by vLLM and SGLang (and by PEFT on models whose experts are separate modules); transformers 5 fuses the experts, so stock PEFT cannot load these into it: --experts fused for PEFT"
        }
        switch (layout, mixers > 0) {
        case (.peft, false):
            return "loaded as written by stock PEFT (PeftModel.from_pretrained) and the runtimes that read PEFT LoRA folders (transformers, vLLM)"
        case (.peft, true) where mixerStyle == .loraAB:
            return "MoSLoRA layout (lora_AB, lora_use_mixer): loaded by the MoSLoRA code; stock PEFT cannot load it (it ignores the mixers and gives another model): use to-peft without --keep-mixer, or moslora-to-lora, for PEFT"
        case (.peft, true):
            return "MoSLoRA layout (lora_mixer, peft_type MOSLORA): loaded by PEFT builds with the MoSLoRA pull requests; stock PEFT refuses peft_type MOSLORA: use to-peft without --keep-mixer, or moslora-to-lora, for PEFT"
        case (.kohya, false):
            return "loaded as written by kohya sd-scripts, ComfyUI, Forge and diffusers' load_lora_weights"
        case (.kohya, true):
            return "lora_mixer keys: only MoSLoRA-aware kohya loaders apply them; ComfyUI, Forge and diffusers skip them and give another model: convert without --keep-mixer for those"
        case (.mlx, _):
            return "loaded as written by mlx-lm (mlx_lm.generate --adapter-path, mlx_lm.fuse)"
        case (.diffusers, false):
            return "loaded as written by diffusers' load_lora_weights (scale folded into lora_B, so its alpha = r reading is exact)"
        case (.diffusers, true):
            return "lora_AB keys: only the MoSLoRA code applies them; diffusers skips them: convert without --keep-mixer for diffusers"
        case (.gguf, _):
            return "loaded as written by llama.cpp (llama-cli --lora, llama-server, llama-cpp-python lora_path) onto the base it names"
        }
    }
}

extension InputError {
    /// A conversion refused: "PATH: cannot convert: PROBLEM; nothing was written".
    static func conversion(_ path: String, _ problem: String) -> InputError {
        InputError(path, "cannot convert: \(problem); nothing was written")
    }
}

/// The layouts the converter can write.
public enum TargetLayout: String, Sendable, CaseIterable {
    case peft, kohya, mlx, gguf, diffusers

    /// Written as one file (the others are folders).
    var isFile: Bool { self == .kohya || self == .gguf || self == .diffusers }
}

/// Conversions hold every module in memory, in PEFT orientation, as Float64 (`TensorRef`s with held
/// values): adapter factors are small (r × in), and every output tensor is then rounded once from
/// these values. These accessors read and replace the held factors; shapes follow the values.
extension LoRAModule {
    /// A's dimensions after the rank in PEFT orientation: [in] or [in, k, k].
    var inShape: [Int] { orientation == .peft ? Array(a.shape.dropFirst()) : [inFeatures] }

    var aType: DType { a.dtype }
    var bType: DType { b.dtype }
    var mixerType: DType? { mixer?.dtype }
    var magnitudeType: DType? { magnitude?.dtype }
    var biasType: DType? { bias?.dtype }

    /// A (r × in), held; setting it may change the rank.
    var heldA: [Double] {
        get { a.held }
        set { a = a.holding(newValue, shape: [newValue.count / max(1, inFeatures)] + inShape) }
    }

    /// B (out × r), held; set after A when the rank changes.
    var heldB: [Double] {
        get { b.held }
        set {
            let out = outFeatures, k = newValue.count / max(1, out)
            b = b.holding(newValue, shape: b.shape.count == 4 ? [out, k, 1, 1] : [out, k])
        }
    }

    /// M (r × r), held, or nil; a new mixer is written in A's dtype.
    var heldMixer: [Double]? {
        get { mixer?.held }
        set {
            guard let v = newValue else { mixer = nil; return }
            let r = Int(Double(v.count).squareRoot())
            mixer = TensorRef(name: mixer?.name ?? name + ".mixer", held: v, shape: [r, r], dtype: mixer?.dtype ?? a.dtype)
        }
    }

    /// M·A (A without a mixer), from held factors.
    var heldMixedA: [Double] {
        guard let m = heldMixer else { return heldA }
        return matmul(m, heldA, rows: rank, inner: rank, cols: inFeatures)
    }

    /// The dense update scale·B·M·A (out × in), for checks and tests.
    func denseUpdate() -> [Double] {
        matmul(heldB, heldMixedA, rows: outFeatures, inner: rank, cols: inFeatures).map { $0 * scale }
    }
}

/// An adapter read into memory for conversion.
struct WorkingAdapter {
    let source: Adapter
    var modules: [LoRAModule]
    var replacements: [Replacement]
    var notes: [String] = []
    /// Set by resize: ranks changed, so rank-stating metadata (kohya `ss_network_args`) is rewritten.
    var resized = false
    /// Set by a diffusion dialect rewrite: module names are the base names, not the stored ones.
    var renamed = false
    /// Set by `--experts`: target_parameters and target_modules are written from the modules.
    var expertsConverted = false

    /// Modules already held (an adapter made here: extract, combine), written as if `source` were
    /// their input.
    init(source: Adapter, modules: [LoRAModule], replacements: [Replacement]) {
        self.source = source
        self.modules = modules
        self.replacements = replacements
    }

    /// Reads every module's factors; applies the component selection.
    init(_ adapter: Adapter, options: ConvertOptions) throws {
        source = adapter
        replacements = adapter.replacements
        if !adapter.unknownKeys.isEmpty {
            let shown = listed(adapter.unknownKeys)
            guard options.dropUnknown else {
                throw InputError.conversion(adapter.path, "\(adapter.unknownKeys.count) key\(adapter.unknownKeys.count == 1 ? " is" : "s are") not understood and would be lost (\(shown)); pass --drop-unknown to leave them out")
            }
            notes.append("left out \(unknownKeysPhrase(adapter.unknownKeys))")
        }
        var selected = adapter.modules
        if let component = options.component {
            let components = adapter.components
            guard components.contains(component) else {
                throw InputError.conversion(adapter.path, "no component \(component) (the adapter has \(components.isEmpty ? "none" : components.joined(separator: ", ")))")
            }
            selected = selected.filter { $0.component == component }
            let skipped = adapter.modules.count - selected.count
            if skipped > 0 { notes.append("left out \(plural(skipped, "module")) of other components") }
        }
        let lycorisDoRA = selected.filter { if case .lycoris = $0.doraRule { true } else { false } }
        if !lycorisDoRA.isEmpty {
            throw InputError.conversion(adapter.path, "\(plural(lycorisDoRA.count, "module")) (\(lycorisDoRA.prefix(3).map(\.name).joined(separator: ", "))) carry a LyCORIS dora_scale, whose rule (ε, per-input norms, the weight blend) no LoRA layout holds; merge it instead")
        }
        if let m = selected.first(where: { $0.declaredShape.map { $0.count != 2 && $0.count != 4 } ?? false }) {
            throw InputError.conversion(adapter.path, "module \(m.name) is a difference of a \(m.declaredShape!.count)-D tensor \(m.declaredShape!), which LoRA layouts cannot hold; merge it instead")
        }
        if selected.contains(where: \.flattened) {
            // LyCORIS keeps convolution factors flattened: only the base tells a conv from a linear layer.
            if let base = options.base {
                // A pipeline folder: its denoiser holds the convolutions.
                var path = base
                if PipelineMergePlan.isPipeline(base) {
                    guard let d = PipelineMergePlan.denoiserFolder(of: base) else {
                        throw InputError.conversion(base, "the pipeline folder has no unet/ or transformer/ to take module shapes from")
                    }
                    path = joinPath(base, d)
                }
                let names = NameMap(base: try Checkpoint(path: path))
                for i in selected.indices where selected[i].flattened {
                    let m = selected[i]
                    let t = names.diffusion?.slots(for: m, format: adapter.format)?.first?.tensor ?? names.weightName(forModule: m.baseName, format: adapter.format)
                    if let t, let shape = names.base.tensor(t)?.entry.shape {
                        selected[i] = m.withKernel(shape) ?? m
                    }
                }
            } else if selected.contains(where: { $0.flattened && $0.algorithm.isLyCORIS }) {
                notes.append("LyCORIS stores convolution factors flattened; without --base every such module is written as an [out, in·k·k] matrix (ComfyUI and Forge reshape it, diffusers does not): pass --base MODEL to write convolutions with their kernel shape")
            }
        }
        modules = try selected.map { try Self.read($0) }
    }

    /// The module with every factor held in PEFT orientation.
    private static func read(_ m: LoRAModule) throws -> LoRAModule {
        let f = try m.factors()
        // NaN or infinity would make every transform (inverse, QR, SVD) meaningless: refuse up front.
        for (part, values) in [("A", f.a), ("B", f.b), ("mixer", f.m ?? [])] where values.contains(where: { !$0.isFinite }) {
            throw InputError.conversion(m.a.path, "module \(m.name): its \(part) factor holds NaN or infinity")
        }
        let r = m.rank, out = m.outFeatures
        var held = m
        held.a = m.a.holding(f.a, shape: [r] + m.inShape)
        held.b = m.b.holding(f.b, shape: m.orientation == .peft ? m.b.shape : [out, r])
        held.mixer = f.m.map { m.mixer!.holding($0, shape: m.parameter == nil ? [r, r] : m.mixer!.shape) }
        held.magnitude = try m.magnitude.map { $0.holding(try $0.doubles(), shape: $0.shape) }
        // Held in PEFT's sense (added as scale · bias): a stored difference (diff_b) is divided by the scale.
        let biasFactor = m.biasScale.map { $0 / m.scale } ?? 1
        held.bias = try m.bias.map { $0.holding(try $0.doubles().map { $0 * biasFactor }, shape: $0.shape) }
        held.biasScale = nil
        held.dense = nil  // held factors are the module from now on (a conversion may change them)
        held.orientation = .peft
        held.split = nil  // experts are sliced from the held values from now on
        return held
    }

    /// Gives kohya modules (whose names lost their dots) their dotted names from a base model's keys.
    mutating func mapKohyaNames(base: String?) throws {
        guard source.format == .kohya else { return }
        guard let base else {
            throw InputError.conversion(source.path, "kohya module names lost their dots (lora_unet_down_blocks_0_…) and cannot be mapped back without the base model; pass --base MODEL")
        }
        let names = NameMap(base: try Checkpoint(path: base))
        var missing: [String] = []
        for i in modules.indices {
            if let dotted = names.dottedModule(forKohya: modules[i].baseName) {
                modules[i].baseName = dotted
            } else {
                missing.append(modules[i].name)
            }
        }
        guard missing.isEmpty else {
            throw InputError.conversion(source.path, "\(missing.count) kohya module\(missing.count == 1 ? "" : "s") match no single tensor of \(base) (\(missing.prefix(3).joined(separator: ", ")))")
        }
    }

    /// PaddleNLP names modules under the model type (`llama.layers.0…`) where transformers, and so
    /// PEFT, mlx-lm and kohya-style loaders, use `model.`: without renaming, stock PEFT finds none
    /// of the modules and loads nothing. With a base model each name is matched against its
    /// tensors (exactly one must fit); without one the top-level name becomes `model.`, with a note.
    mutating func mapPaddleNames(base: String?) throws {
        guard source.format == .paddle else { return }
        if let base {
            let names = NameMap(base: try Checkpoint(path: base))
            let byName = Dictionary(source.modules.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
            var missing: [String] = []
            for i in modules.indices {
                let probe = modules[i]
                let module = byName[probe.name]
                if let module, let found = names.target(for: module, format: .paddle) {
                    modules[i].baseName = String(found.tensor.dropLast(".weight".count))
                } else {
                    missing.append(probe.name)
                }
            }
            guard missing.isEmpty else {
                throw InputError.conversion(source.path, "\(missing.count) PaddleNLP module\(missing.count == 1 ? "" : "s") match no single tensor of \(base) (\(missing.prefix(3).joined(separator: ", ")))")
            }
            notes.append("PaddleNLP module names mapped to the names of \(base)")
            return
        }
        var renamed: Set<String> = []
        for i in modules.indices {
            let parts = modules[i].baseName.split(separator: ".", maxSplits: 1)
            guard parts.count == 2, parts[0] != "model" else { continue }
            renamed.insert(String(parts[0]))
            modules[i].baseName = "model." + parts[1]
        }
        if !renamed.isEmpty {
            notes.append("PaddleNLP's top-level name \(renamed.sorted().map { $0 + "." }.joined(separator: ", ")) written as transformers' model. (pass --base MODEL to match the names against the model itself)")
        }
    }

    /// Refuses several components in a single-model layout.
    func requireSingleComponent(_ layout: TargetLayout) throws {
        let seen = firstSeen(modules.compactMap(\.component))
        if seen.count > 1 {
            throw InputError.conversion(source.path, "the adapter holds several models (\(seen.joined(separator: ", "))) and \(layout.rawValue) holds one; choose one with --component")
        }
    }
}
