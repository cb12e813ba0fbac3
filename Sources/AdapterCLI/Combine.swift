import AdapterKit
import ArgumentParser
import Foundation

struct Combine: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Combine several adapters of one model into one: exactly (cat), or at a rank K (svd, ties, dare-linear, dare-ties).",
        usage: "adapter combine <adapter>[:<weight>] <adapter>[:<weight>] … -o <output> [--method cat|svd|ties|dare-linear|dare-ties] [--rank <k>] [--density <d>] [--seed <s>] [--form lora|moslora] [--to peft|kohya|mlx] [--base <model>] [--dtype <dtype>] [--drop-unknown] [--force] [--no-sync] [--quiet]",
        discussion: """
        cat (the default) is exact: each module's update is Σ wᵢ·scaleᵢ·Bᵢ·Mᵢ·Aᵢ at rank Σ rᵢ, with every \
        input's scale (alpha/r, rsLoRA, rank and alpha patterns, kohya alphas) and weight (negative too) \
        folded into B so one alpha serves; MoSLoRA inputs give a block-diagonal mixer unless --form lora. \
        svd is the best rank-K approximation of that exact sum, from the factors. ties, dare-linear and \
        dare-ties apply TIES-Merging / DARE to each module's dense update (--density, --seed: the same \
        result on every machine) and return to rank K by an exact SVD. Standard output: module, inputs, \
        rank, energy kept.
        """
    )

    @Argument(help: "Adapters (any layout), each optionally with :WEIGHT.", completion: .file())
    var adapters: [WeightedAdapter] = []

    @Option(name: .shortAndLong, help: "The adapter to write (must not exist unless --force).", completion: .file())
    var output: String

    @Option(help: "cat, svd, ties, dare-linear or dare-ties.")
    var method: CombineMethod = .cat

    @Option(help: "The rank of svd, ties and dare outputs.")
    var rank: Int?

    @Option(help: "ties and dare: the fraction of each update kept (0 < d ≤ 1).")
    var density: Double = 0.5

    @Option(help: "dare: the seed of the random drops.")
    var seed: UInt64 = 0

    @Option(help: "lora: mixers folded into the factors; moslora: mixers kept (cat) or σ in a diagonal mixer (svd, ties, dare).")
    var form: ResizeForm?

    @Option(help: "The output layout: peft, kohya or mlx.")
    var to: TargetLayout = .peft

    @Option(help: "A base model, for kohya or PaddleNLP inputs whose module names need it.", completion: .file())
    var base: String?

    @Option(help: "Write factors in this dtype (rounded once, nearest even); default: each input factor's.")
    var dtype: DType?

    @Flag(help: "Combine even when an adapter has keys that are not understood (they are left out).")
    var dropUnknown = false

    @Flag(help: "Replace OUTPUT if it exists (once the new adapter is complete).")
    var force = false

    @Flag(name: .customLong("no-sync"), help: "Do not fsync the output before renaming it into place.")
    var noSync = false

    @Flag(help: "No notes on standard error.")
    var quiet = false

    func validate() throws {
        if adapters.count < 2 { throw ValidationError("give at least two adapters to combine") }
        if method != .cat && rank == nil { throw ValidationError("--method \(method.rawValue) needs --rank") }
        if let r = rank, r < 1 { throw ValidationError("--rank must be at least 1") }
        if to == .gguf { throw ValidationError("--to gguf: combine to PEFT, then convert to-gguf --base") }
    }

    func run() throws {
        var o = CombineOptions()
        o.method = method
        o.rank = rank
        o.density = density
        o.seed = seed
        o.form = form
        o.layout = to
        o.base = base
        o.dtype = dtype
        o.dropUnknown = dropUnknown
        o.force = force
        o.sync = !noSync
        let summary = try Combination.combine(adapters.map { CombineInput(path: $0.path, weight: $0.weight) }, output: output, options: o)
        try writeOutput("module\tinputs\trank\tenergy_kept")
        for m in summary.modules { try writeOutput("\(m.name)\t\(m.inputs)\t\(m.rank)\t\(formatFixed(m.energyKept, 6))") }
        guard !quiet else { return }
        for n in summary.notes { writeError("adapter: note: \(n)") }
        writeError("adapter: combined \(adapters.count) adapters into \(summary.modules.count) modules (\(method.rawValue)) at \(output)")
    }
}

extension CombineMethod: ExpressibleByArgument {}
extension TargetLayout: ExpressibleByArgument {}
