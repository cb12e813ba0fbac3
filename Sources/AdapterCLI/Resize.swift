import AdapterKit
import ArgumentParser
import Foundation

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reduce each module's rank by the exact SVD of its B·M·A; print the energy kept per module.",
        usage: "adapter resize (--rank <k> | --keep-energy <f>) <input> <output> [--form lora|moslora] [--dtype <dtype>] [--base <base>] [--component <component>] [--drop-unknown] [--force] [--no-sync] [--quiet]",
        discussion: """
        The SVD comes from QR of B and of (M·A)ᵀ and an SVD of the r×r core, never the out×in product. \
        Every module keeps its scale (alpha becomes scale·k). --form lora splits √σ into A and B; \
        --form moslora writes orthonormal A and B with σ in a diagonal mixer. Output layout: the input's \
        for PEFT, kohya and mlx, PEFT otherwise. Standard output: module, rank before, rank after, energy kept.
        """
    )

    @OptionGroup var io: ConvertIO<ResizedOutput>

    @OptionGroup var keep: KeptRank

    @Option(help: "lora: √σ in both factors; moslora: orthonormal factors and σ in a diagonal mixer.")
    var form: ResizeForm = .lora

    func run() throws {
        let summary = try AdapterConversion.resize(input: io.input, output: io.output, target: keep.target, form: form, options: io.options)
        try printEnergies(summary)
        io.finish(summary)
    }
}

/// `--rank K` or `--keep-energy F` for the commands that truncate an SVD (resize, to-lora).
struct KeptRank: ParsableArguments {
    @Option(help: "Keep at most this many singular values per module (this or --keep-energy is required).")
    var rank: Int?

    @Option(help: "Keep the fewest singular values whose Σσ² reaches this fraction of the total (0 < F ≤ 1; this or --rank is required).")
    var keepEnergy: Double?

    func validate() throws { try validateRankOrEnergy(rank: rank, keepEnergy: keepEnergy) }

    var target: ResizeTarget { rank.map { .rank($0) } ?? .energy(keepEnergy ?? 1) }
}

/// Standard output of an SVD truncation: module, rank before, rank after, energy kept.
func printEnergies(_ summary: ConvertSummary) throws {
    try writeOutput("module\trank_before\trank_after\tenergy_kept")
    for e in summary.energies {
        try writeOutput("\(e.module)\t\(e.rankBefore)\t\(e.rankAfter)\t\(formatFixed(e.energyKept, 6))")
    }
}

/// `--rank K` or `--keep-energy F`, exactly one of them, in range (resize and extract).
func validateRankOrEnergy(rank: Int?, keepEnergy: Double?) throws {
    switch (rank, keepEnergy) {
    case (nil, nil), (.some, .some): throw ValidationError("give exactly one of --rank and --keep-energy")
    case (.some(let k), nil) where k < 1: throw ValidationError("--rank must be at least 1")
    case (nil, .some(let f)) where !(f > 0 && f <= 1): throw ValidationError("--keep-energy must be in (0, 1]")
    default: break
    }
}

struct ToLoRA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "to-lora",
        abstract: "Turn LyCORIS LoHa, LoKr and full-diff modules (and any other) into plain LoRA by the exact SVD of each update; print the energy kept per module.",
        usage: "adapter convert to-lora (--rank <k> | --keep-energy <f>) <input> <output> [--layout kohya|peft] [--dtype <dtype>] [--base <base>] [--component <component>] [--drop-unknown] [--force] [--no-sync] [--quiet]",
        discussion: """
        For runtimes that load only LoRA (diffusers, vLLM, PEFT). Each module's update, as LyCORIS \
        defines it, is written as A = diag(√σ)·Vᵀ, B = U·diag(√σ) of its truncated SVD, computed from \
        its exact low-rank factors (LoHa: the Khatri–Rao products; LoKr: the Kronecker products); with \
        --keep-energy 1 nothing is lost but rounding. --layout: kohya (the default for LyCORIS and kohya \
        inputs) or peft. Standard output: module, rank of the update before, rank after, energy kept.
        """
    )

    @OptionGroup var io: ConvertIO<ResizedOutput>

    @OptionGroup var keep: KeptRank

    @Option(help: "The LoRA layout to write: kohya (one .safetensors file) or peft (a folder); default: the input's.")
    var layout: TargetLayout?

    func validate() throws {
        if let layout, ![.kohya, .peft].contains(layout) { throw ValidationError("--layout must be kohya or peft") }
    }

    func run() throws {
        let summary = try AdapterConversion.toLoRA(input: io.input, output: io.output, target: keep.target, layout: layout, options: io.options)
        try printEnergies(summary)
        io.finish(summary)
    }
}
