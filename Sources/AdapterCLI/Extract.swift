import AdapterKit
import ArgumentParser
import Foundation

struct Extract: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Extract a LoRA (or MoSLoRA) adapter from a fine-tuned model: a low-rank factoring of TUNED − BASE per weight matrix.",
        usage: "adapter extract <base> <tuned> <output> (--rank <k> | --keep-energy <f> [--max-rank <k>]) [--form lora|moslora] [--exact] [--include <regex>] [--exclude <regex>] [--save-full <names>] [--dtype <dtype>] [--json] [--force] [--no-sync] [--quiet]",
        discussion: """
        BASE and TUNED are safetensors files or model folders (sharded or not) of one architecture; \
        tensors are paired by name and read one pair at a time. For each differing weight matrix \
        (conv weights flattened as PEFT does), D = TUNED − BASE in Float64 is factored by randomized \
        subspace iteration (Halko–Martinsson–Tropp; --exact: a full SVD). Embeddings and lm_head are \
        not factored: --save-full embed_tokens,lm_head keeps them whole (modules_to_save), as it keeps \
        norms or biases; every differing tensor the adapter leaves out is named. --form lora writes \
        B = U√Σ, A = √ΣVᵀ, lora_alpha = r; --form moslora writes B = U, a diagonal mixer Σ and A = Vᵀ \
        (lora_AB). Standard output: module, rank, energy kept, relative Frobenius error.
        """
    )

    @Argument(help: "The model before fine-tuning.", completion: .file())
    var base: String

    @Argument(help: "The fine-tuned model.", completion: .file())
    var tuned: String

    @Argument(help: "The adapter folder to write (must not exist unless --force).", completion: .file())
    var output: String

    @Option(help: "Rank of every module (this or --keep-energy is required).")
    var rank: Int?

    @Option(help: "Per module, the smallest rank that keeps this fraction of ‖D‖²_F (0 < F ≤ 1).")
    var keepEnergy: Double?

    @Option(help: "With --keep-energy: the highest rank a module may get.")
    var maxRank: Int = 128

    @Option(help: "lora: √σ in both factors; moslora: orthonormal factors and σ in a diagonal mixer.")
    var form: ResizeForm = .lora

    @Flag(help: "A full SVD of every difference instead of the randomized one (slow; for checking).")
    var exact = false

    @Option(help: "Only modules whose name matches this regular expression.")
    var include: String?

    @Option(help: "No module whose name matches this regular expression.")
    var exclude: String?

    @Option(help: "Comma-separated module names (embed_tokens,lm_head,norm) kept whole when they differ.")
    var saveFull: String?

    @Option(help: "The factors' dtype (f32, f16, bf16, f64); default: each base weight's.")
    var dtype: DType?

    @Option(help: "Power iterations of the randomized SVD.")
    var powerIterations: Int = 2

    @Option(help: "Seed of the randomized SVD's test matrices (the result is the same on every machine for a seed).")
    var seed: UInt64 = 0

    @Flag(help: "Print the report as JSON.")
    var json = false

    @Flag(help: "Replace OUTPUT if it exists (once the new adapter is complete).")
    var force = false

    @Flag(help: "Do not fsync the output before renaming it into place.")
    var noSync = false

    @Flag(help: "No notes or progress on standard error.")
    var quiet = false

    func validate() throws {
        try validateRankOrEnergy(rank: rank, keepEnergy: keepEnergy)
        if maxRank < 1 { throw ValidationError("--max-rank must be at least 1") }
        if powerIterations < 0 { throw ValidationError("--power-iterations must be at least 0") }
    }

    func run() throws {
        var o = ExtractOptions()
        o.target = rank.map { .rank($0) } ?? .energy(keepEnergy ?? 1, maxRank: maxRank)
        o.form = form
        o.exact = exact
        o.include = include
        o.exclude = exclude
        o.saveFull = (saveFull ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        o.dtype = dtype
        o.force = force
        o.sync = !noSync
        o.powerIterations = powerIterations
        o.seed = seed
        let bar = ProgressBar(enabled: !quiet && isatty(2) == 1)
        o.progress = { bar.update($0, $1) }
        let summary = try Extraction.extract(base: base, tuned: tuned, output: output, options: o)
        bar.finish()
        if json {
            try writeOutput(JSONWriter.pretty(.object(summary.json), indent: 2))
        } else {
            try writeOutput("module\trows\tcols\trank\tenergy_kept\trelative_error")
            for m in summary.modules {
                try writeOutput("\(m.name)\t\(m.rows)\t\(m.cols)\t\(m.rank)\t\(formatFixed(m.energyKept, 6))\t\(formatFixed(m.relativeError, 6))")
            }
        }
        guard !quiet else { return }
        for note in summary.notes { writeError("adapter: note: " + note) }
        writeError("adapter: extracted \(summary.modules.count) modules (energy kept \(formatFixed(summary.totalEnergyKept * 100, 2)) %)\(summary.savedFull.isEmpty ? "" : ", \(summary.savedFull.count) tensors kept whole"), \(summary.unchanged) tensors unchanged, in \(formatFixed(summary.seconds, 2)) s")
    }
}

