import AdapterKit
import ArgumentParser
import Foundation

extension DType: ExpressibleByArgument {
    public init?(argument: String) {
        guard let d = DType(rawValue: argument.uppercased()), d.isMergeable else { return nil }
        self = d
    }

    /// The dtypes factors can be written in: those a merge computes in.
    public static var allValueStrings: [String] { allCases.filter(\.isMergeable).map(\.rawValue) }
}

extension MixerInit: ExpressibleByArgument {}
extension MixerKeyStyle: ExpressibleByArgument {}
extension FoldSide: ExpressibleByArgument {}
extension ResizeForm: ExpressibleByArgument {}
extension ExpertForm: ExpressibleByArgument {}

/// What a command writes, for the help of its OUTPUT argument.
protocol OutputKind {
    static var outputHelp: String { get }
}

enum PEFTFolderOutput: OutputKind {
    static var outputHelp: String { "The PEFT folder to write (adapter_config.json, adapter_model.safetensors); it must not exist unless --force." }
}

enum MLXFolderOutput: OutputKind {
    static var outputHelp: String { "The mlx-lm folder to write (adapter_config.json, adapters.safetensors); it must not exist unless --force." }
}

enum KohyaFileOutput: OutputKind {
    static var outputHelp: String { "The kohya .safetensors file to write; it must not exist unless --force." }
}

enum GGUFFileOutput: OutputKind {
    static var outputHelp: String { "The llama.cpp LoRA .gguf file to write; it must not exist unless --force." }
}

enum DiffusersFileOutput: OutputKind {
    static var outputHelp: String { "The .safetensors file to write; it must not exist unless --force." }
}

enum ResizedOutput: OutputKind {
    static var outputHelp: String { "Where to write, in the input's layout: a folder for PEFT and mlx inputs, a .safetensors file for kohya ones; it must not exist unless --force." }
}

/// IN, OUT and the options every conversion shares.
struct ConvertIO<Output: OutputKind>: ParsableArguments {
    @Argument(help: "The adapter to read (any supported layout). It is never modified.")
    var input: String

    @Argument(help: ArgumentHelp(Output.outputHelp))
    var output: String

    @Option(help: "Write factors in this dtype (rounded once, nearest even); default: each tensor's input dtype.")
    var dtype: DType?

    @Option(help: "A base model whose tensor names give kohya modules back their dots (needed to write kohya adapters as PEFT or mlx).")
    var base: String?

    @Option(help: "For adapters holding several models (unet, text_encoder, …): the one to convert into a single-model layout.")
    var component: String?

    @Flag(help: "Convert even when the adapter has keys that are not understood (they are left out).")
    var dropUnknown = false

    @Flag(help: "Replace OUT if it exists (only once the new output is complete).")
    var force = false

    @Flag(name: .customLong("no-sync"), help: "Do not fsync the output before renaming it into place.")
    var noSync = false

    @Flag(help: "No notes and no summary.")
    var quiet = false

    var options: ConvertOptions {
        var o = ConvertOptions()
        o.dtype = dtype
        o.force = force
        o.base = base
        o.component = component
        o.dropUnknown = dropUnknown
        o.sync = !noSync
        return o
    }

    func finish(_ summary: ConvertSummary) {
        guard !quiet else { return }
        for n in summary.notes { writeError("adapter: note: \(n)") }
        writeError("adapter: \(summary.line) to \(output)")
    }
}

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Rewrite an adapter exactly: add or fold MoSLoRA mixers, or change its layout.",
        discussion: "Every conversion keeps scale·B·M·A of every module (up to the output dtype's rounding).",
        subcommands: [LoRAToMoSLoRA.self, MoSLoRAToLoRA.self, ToPEFT.self, ToMLX.self, ToKohya.self, ToDiffusers.self, ToLoRA.self, ToGGUF.self, ToSafetensors.self]
    )
}

struct LoRAToMoSLoRA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-to-moslora",
        abstract: "Insert an r×r mixer in every module and write a PEFT MoSLoRA folder.",
        usage: "adapter convert lora-to-moslora <input> <output> [--mixer identity|orthogonal|kaiming] [--seed <seed>] [--mixer-key lora_AB|lora_mixer] [--min-condition-ratio <ratio>] [--dtype <dtype>] [--base <base>] [--component <component>] [--drop-unknown] [--force] [--no-sync] [--quiet]",
        discussion: """
        identity: M = I, A and B unchanged. orthogonal: M = Q (seeded random orthogonal), A' = QᵀA. \
        kaiming: M Kaiming-uniform (a = √5, bound 1/√r), A' = M⁻¹A, refused when σmin/σmax of M is below \
        --min-condition-ratio (the update's error grows with the condition number). Modules that already \
        have a mixer keep it; embeddings get none.
        """
    )

    @OptionGroup var io: ConvertIO<PEFTFolderOutput>

    @Option(help: "The mixer to insert.")
    var mixer: MixerInit = .identity

    @Option(help: "Seed for orthogonal and kaiming mixers (the same seed gives the same file on every machine).")
    var seed: UInt64 = 0

    @Option(help: "lora_AB: the original MoSLoRA code's layout; lora_mixer: the PEFT pull-request layout (peft_type MOSLORA).")
    var mixerKey: MixerKeyStyle = .loraAB

    @Option(help: "Refuse a kaiming mixer whose σmin/σmax is below this.")
    var minConditionRatio: Double = AdapterConversion.defaultMinimumConditionRatio

    func validate() throws {
        guard minConditionRatio.isFinite, minConditionRatio >= 0, minConditionRatio <= 1 else {
            throw ValidationError("--min-condition-ratio must be between 0 and 1")
        }
    }

    func run() throws {
        io.finish(try AdapterConversion.loraToMoSLoRA(input: io.input, output: io.output, mixer: mixer, seed: seed, keyStyle: mixerKey,
                                                      minimumConditionRatio: minConditionRatio, options: io.options))
    }
}

struct MoSLoRAToLoRA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moslora-to-lora",
        abstract: "Fold every mixer into A (A' = M·A) or B (B' = B·M) and write a plain PEFT LoRA folder."
    )

    @OptionGroup var io: ConvertIO<PEFTFolderOutput>

    @Option(help: "The factor that takes the mixer.")
    var foldInto: FoldSide = .a

    func run() throws {
        io.finish(try AdapterConversion.mosLoRAToLoRA(input: io.input, output: io.output, foldInto: foldInto, options: io.options))
    }
}

struct ToPEFT: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-peft",
        abstract: "Write the adapter as a PEFT folder that stock PEFT loads (mixers folded into A; per-module ranks and alphas as rank_pattern / alpha_pattern).",
        discussion: """
        Stock PEFT has no mixer: it would ignore lora_AB tensors and give another model, so every mixer \
        is folded exactly (A' = M·A). --keep-mixer writes the MoSLoRA layout instead (lora_AB, or \
        lora_mixer when the input had it), for the MoSLoRA code; stock PEFT cannot load that.         --experts rewrites Mixture-of-Experts modules exactly, against --base MODEL: per-expert (one         module per expert and projection, named as the model stores its experts: what vLLM and SGLang         load) or fused (PEFT target_parameters on the fused 3-D parameters: what PEFT 0.17+ loads).
        """
    )

    @OptionGroup var io: ConvertIO<PEFTFolderOutput>

    @Flag(help: "Keep the mixers (MoSLoRA layout for the MoSLoRA code; stock PEFT cannot load it).")
    var keepMixer = false

    @Option(help: "Rewrite expert modules: per-expert or fused (needs --base).")
    var experts: ExpertForm?

    func run() throws {
        var options = io.options
        options.experts = experts
        io.finish(try AdapterConversion.convertLayout(input: io.input, output: io.output, to: .peft, keepMixer: keepMixer, options: options))
    }
}

struct ToMLX: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-mlx",
        abstract: "Write the adapter as an mlx-lm folder (mixers folded into A; one rank and one scale, others folded exactly)."
    )

    @OptionGroup var io: ConvertIO<MLXFolderOutput>

    func run() throws {
        io.finish(try AdapterConversion.convertLayout(input: io.input, output: io.output, to: .mlx, options: io.options))
    }
}

struct ToGGUF: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-gguf",
        abstract: "Write the adapter as a llama.cpp LoRA GGUF (--base: the GGUF or Hugging Face model it is for).",
        discussion: """
        llama.cpp applies adapter.lora.alpha / r to every module, so each module's own scale (rsLoRA, \
        rank_pattern, alpha_pattern, kohya alphas) is folded into lora_b, MoSLoRA mixers into lora_a \
        (A' = M·A), and the q/k rows of LLaMA-family models are permuted as convert_hf_to_gguf.py \
        permutes their weights. Names: model.layers.N.self_attn.q_proj → blk.N.attn_q.weight, … \
        (llama, mistral, qwen2, qwen3).
        """
    )

    @OptionGroup var io: ConvertIO<GGUFFileOutput>

    func validate() throws {
        if io.base == nil { throw ValidationError("to-gguf needs --base: the GGUF file or Hugging Face model the adapter is for") }
    }

    func run() throws {
        io.finish(try AdapterConversion.convertLayout(input: io.input, output: io.output, to: .gguf, options: io.options))
    }
}

struct ToDiffusers: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-diffusers",
        abstract: "Write the adapter as one diffusers LoRA file (unet./transformer./text_encoder… prefixes, lora_A/lora_B) for the --base it is for.",
        discussion: """
        --base (a single-file checkpoint, a diffusers pipeline folder or its denoiser) gives the module \
        names: modules in the original names (kohya's SDXL and Flux LoRAs, ComfyUI's) are renamed, and a \
        fused one (qkv, linear1) is split by rows of B over to_q/to_k/to_v (and proj_mlp), each part \
        keeping A and the scale. The scale is folded into lora_B, since diffusers reads a file without \
        metadata as alpha = r. Mixers are folded into A unless --keep-mixer (lora_AB keys, which diffusers skips).
        """
    )

    @OptionGroup var io: ConvertIO<DiffusersFileOutput>

    @Flag(help: "Keep the mixers as lora_AB.weight (only the MoSLoRA code applies them).")
    var keepMixer = false

    func run() throws {
        io.finish(try AdapterConversion.convertLayout(input: io.input, output: io.output, to: .diffusers, keepMixer: keepMixer, options: io.options))
    }
}

struct ToKohya: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-kohya",
        abstract: "Write the adapter as one kohya .safetensors file (lora_unet_ for single-model adapters, lora_te_ for text encoders).",
        discussion: """
        alpha = scale·r per module, stored in F32. With --base a diffusion model, modules get that \
        family's kohya names: the original keys for SDXL, Flux and SD3 (to_q/to_k/to_v fused into qkv, \
        Flux's q/k/v/proj_mlp into linear1: A stacked, B block-diagonal, exact), diffusers' for SD 1/2. \
        Mixers are folded into lora_down (A' = M·A) so that \
        ComfyUI, Forge and diffusers, which skip unknown keys, apply the whole update; --keep-mixer writes \
        them as lora_mixer.weight with metadata ss_adapter_algorithm=moslora instead.
        """
    )

    @OptionGroup var io: ConvertIO<KohyaFileOutput>

    @Flag(help: "Keep the mixers as lora_mixer.weight (only MoSLoRA-aware loaders apply them).")
    var keepMixer = false

    func run() throws {
        io.finish(try AdapterConversion.convertLayout(input: io.input, output: io.output, to: .kohya, keepMixer: keepMixer, options: io.options))
    }
}
