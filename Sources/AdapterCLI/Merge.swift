import AdapterKit
import ArgumentParser
import Foundation

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fold scale·B·M·A (or B·A) of one or more adapters into a base model.",
        discussion: """
        Every element is computed in Float32 (Float64 for F64 bases) as W + Σ scale·(B·M·A) and \
        rounded once into the base dtype. The base is streamed one tensor at a time; OUT appears \
        only when complete.
        """
    )

    @Argument(help: "The base model: a .safetensors file or a model folder.")
    var base: String

    @Argument(help: "The adapter (any supported layout).")
    var adapter: String

    @Argument(help: "Where to write the merged model (a file when BASE is a file, a folder when it is a folder).")
    var out: String

    @Option(parsing: .unconditional, help: "Multiply the adapter's update (−1 un-merges an adapter merged before).")
    var weight: Double = 1

    @Option(name: .customLong("add"), help: ArgumentHelp("Merge a further adapter in the same pass, optionally weighted (a path holding a colon takes an explicit weight: a:b:1).", valueName: "adapter[:weight]"))
    var additional: [WeightedAdapter] = []

    @Option(name: .customLong("component"), help: "For kohya / diffusers adapters holding several models: the part to merge (unet, text_encoder, text_encoder_2, transformer). Repeatable.")
    var components: [String] = []

    @Option(name: .customLong("skip-file"), help: ArgumentHelp("Leave a file (or folder) of a model-folder BASE out of OUT, relative to the folder; a tensor file that is not part of the merge (a stray model.safetensors beside the shards) is refused unless named here. Repeatable.", valueName: "name"))
    var skipFiles: [String] = []

    @Flag(name: [.customLong("drop-unknown"), .customLong("allow-unknown")],
          help: "Merge even when the adapter has keys that are not understood (they are left out). --allow-unknown is the same flag.")
    var dropUnknown = false

    @Flag(help: "Replace OUT if it exists (only once the new output is complete).")
    var force = false

    @Flag(help: "Print per tensor max |ΔW| and how much of the update survived rounding.")
    var report = false

    @Flag(help: "No progress and no summary.")
    var quiet = false

    @Flag(name: .customLong("no-sync"), help: "Do not fsync the output before renaming it into place.")
    var noSync = false

    @Option(help: "Kernel threads (default: all cores).")
    var threads: Int?

    @Option(help: ArgumentHelp("Write only part I of N of the output's shards into a staging folder beside OUT (.OUT.parts/), with a manifest of checksums; run every part (on any machines that share the folder), then --finish.", valueName: "I/N"))
    var part: MergePart?

    @Flag(help: "Check the staged parts of a split merge (--part) and assemble OUT from them; the same inputs and options as the parts.")
    var finish = false

    @Option(help: ArgumentHelp("For a quantized base: write every quantized weight dequantized in this dtype, without scales or quantization_config, instead of requantizing the merged ones.", valueName: "dtype"))
    var dtype: DequantizedDType?

    func validate() throws {
        guard weight.isFinite else { throw ValidationError("--weight must be a finite number") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if part != nil && finish { throw ValidationError("--part writes one part and --finish assembles them: give one of the two") }
        if finish && report { throw ValidationError("--report applies to the parts, which merge; --finish only assembles them") }
    }

    func run() throws {
        var inputs = [MergeInput(adapter: try Adapter(path: adapter), weight: weight)]
        for extra in additional {
            inputs.append(MergeInput(adapter: try Adapter(path: extra.path), weight: extra.weight))
        }
        if GGUFFile.looksLikeGGUF(base) {
            try mergeGGUF(inputs)
            return
        }
        if PipelineMergePlan.isPipeline(base) {
            try mergePipeline(inputs)
            return
        }
        let checkpoint = try Checkpoint(path: base)
        try OutputRules.check(out, kind: checkpoint.isFolder ? .folder : .file,
                               inputs: [base] + checkpoint.inputFiles + inputs.flatMap { [$0.adapter.path] + $0.adapter.inputFiles }, force: force)
        let plan = try MergePlan(base: checkpoint, inputs: inputs,
                                 options: MergeOptions(dropUnknown: dropUnknown, components: components.isEmpty ? nil : components,
                                                       skipFiles: skipFiles, dequantize: dtype?.dtype))
        var options = runOptions()
        let progress = ProgressBar(enabled: !quiet && FileSystem.isTerminal(2))
        if progress.enabled {
            options.progress = { done, total in progress.update(done, total) }
        }
        for w in checkpoint.warnings where !quiet { writeError("adapter: warning: \(base): \(w)") }
        printWarnings(inputs)
        if let part {
            let result = try plan.writePart(part, output: out, options: options)
            progress.finish()
            try report(part: result, inputs: inputs, rounded: Set(plan.changedTensorDTypes).intersection([.bf16, .f16]))
            return
        }
        if finish {
            let (summary, parts) = try plan.finishParts(output: out, options: options)
            progress.finish()
            if !quiet {
                for n in summary.notes { writeError("adapter: note: \(n)") }
                writeError("adapter: finished \(out) from \(parts == 1 ? "1 part" : "\(parts) parts"): checked and placed \(plural(checkpoint.files.count, "shard"))\(summary.filesCopied > 0 ? ", copied \(plural(summary.filesCopied, "other file"))" : ""), \(formatBytes(summary.bytesWritten, exact: false)) in \(formatFixed(summary.seconds, 2)) s")
            }
            return
        }
        let summary = try plan.write(to: out, options: options)
        progress.finish()
        try finish(summary, inputs: inputs, rounded: Set(plan.changedTensorDTypes).intersection([.bf16, .f16]))
    }

    /// The run options every kind of base shares.
    private func runOptions() -> MergeRunOptions {
        var options = MergeRunOptions()
        options.force = force
        options.report = report
        options.sync = !noSync
        if let threads { options.threads = threads }
        return options
    }

    private func printWarnings(_ inputs: [MergeInput]) {
        for input in inputs where !quiet {
            for w in input.adapter.warnings { writeError("adapter: warning: \(input.adapter.path): \(w)") }
        }
    }

    /// A diffusers pipeline folder: every touched component merged, the rest copied.
    private func mergePipeline(_ inputs: [MergeInput]) throws {
        if part != nil || finish { throw ValidationError("--part and --finish split a model folder's shards; a pipeline folder is merged whole") }
        if !skipFiles.isEmpty { throw ValidationError("--skip-file applies to a model folder; a pipeline folder's components are each merged or copied whole") }
        try OutputRules.check(out, kind: .folder, inputs: [base] + inputs.flatMap { [$0.adapter.path] + $0.adapter.inputFiles }, force: force)
        let plan = try PipelineMergePlan(path: base, inputs: inputs,
                                         options: MergeOptions(dropUnknown: dropUnknown, components: components.isEmpty ? nil : components, dequantize: dtype?.dtype))
        printWarnings(inputs)
        let summary = try plan.write(to: out, options: runOptions())
        if !quiet { writeError("adapter: pipeline components merged: \(plan.plans.map(\.folder).joined(separator: ", "))") }
        try finish(summary, inputs: inputs, rounded: Set(plan.plans.flatMap(\.plan.changedTensorDTypes)).intersection([.bf16, .f16]))
    }

    /// A part's report: what it merged and where it staged it, or that it was already there.
    private func report(part result: PartSummary, inputs: [MergeInput], rounded: Set<DType>) throws {
        let files = plural(result.files.count, "shard")
        guard result.wrote else {
            if !quiet { writeError("adapter: part \(result.part): already staged in \(result.staging) (\(files), checksums match); nothing to do") }
            return
        }
        var summary = result.merge
        summary.notes.append("part \(result.part) staged \(files) in \(result.staging); when every part is done: adapter merge --finish with the same inputs")
        try finish(summary, inputs: inputs, rounded: rounded, prefix: "part \(result.part): ")
    }

    /// A GGUF base: llama.cpp names, each tensor kept in its GGML type (or --dtype's).
    private func mergeGGUF(_ inputs: [MergeInput]) throws {
        if !components.isEmpty || !skipFiles.isEmpty { throw ValidationError("--component and --skip-file do not apply to a GGUF base") }
        if part != nil || finish { throw ValidationError("--part and --finish split a safetensors merge by its shards; a GGUF base is one file, merged in one process") }
        try OutputRules.check(out, kind: .file, inputs: [base] + inputs.flatMap { [$0.adapter.path] + $0.adapter.inputFiles }, force: force)
        let plan = try GGUFMergePlan(base: base, inputs: inputs, dropUnknown: dropUnknown, dequantize: dtype?.dtype)
        printWarnings(inputs)
        let summary = try plan.write(to: out, options: runOptions())
        try finish(summary, inputs: inputs, rounded: [])
    }

    private func finish(_ summary: MergeSummary, inputs: [MergeInput], rounded: Set<DType>, prefix: String = "") throws {
        if report {
            // Merges into quantized weights add a column: the part of the update requantization kept.
            let quantized = summary.reports.contains { $0.kept != nil }
            try writeOutput("tensor\tmodules\tmax_abs_delta\tsurvived" + (quantized ? "\tkept" : ""))
            for r in summary.reports.sorted(by: { $0.tensor < $1.tensor }) {
                let kept = quantized ? "\t" + (r.kept.map { formatFixed($0, 4) } ?? "-") : ""
                try writeOutput("\(r.tensor)\t\(r.modules.count)\t\(formatSig(r.statistics.maxAbsUpdate))\t\(formatFixed(r.statistics.survival, 4))" + kept)
            }
        }
        if !quiet {
            for n in summary.notes { writeError("adapter: note: \(n)") }
            if inputs.contains(where: { $0.weight < 0 }), let dtype = rounded.sorted().first {
                writeError("adapter: note: a negative weight undoes a merge only up to rounding: the merge rounded W + Δ once into \(dtype.rawValue) and this rounds again, so some elements end one rounding (half a \(dtype.rawValue) step of max(|W|, |W'|)) from the original base; --report shows per tensor how much of the update survived")
            }
            writeError("adapter: " + prefix + summary.line)
        }
    }
}

/// `--add PATH[:WEIGHT]`: "path:0.5" is (path, 0.5), "path" is (path, 1). After the last colon
/// must come a finite number, so "x:abc" is a usage error, not a path "x:abc" that fails later; a
/// path that holds a colon is given with its weight ("a:b:1").
struct WeightedAdapter: ExpressibleByArgument {
    let path: String
    let weight: Double

    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":") else {
            guard !argument.isEmpty else { return nil }
            (path, weight) = (argument, 1)
            return
        }
        let number = argument[argument.index(after: colon)...]
        guard let w = Double(number), w.isFinite, colon != argument.startIndex else { return nil }
        (path, weight) = (String(argument[..<colon]), w)
    }

    static var defaultCompletionKind: CompletionKind { .file() }
}

/// A one-line progress bar on a terminal: bytes, rate, time left.
final class ProgressBar: @unchecked Sendable {
    let enabled: Bool
    private let start = Date()
    private var last = Date.distantPast
    private let lock = NSLock()

    init(enabled: Bool) { self.enabled = enabled }

    func update(_ done: Int, _ total: Int) {
        guard enabled else { return }
        lock.lock(); defer { lock.unlock() }
        let now = Date()
        guard now.timeIntervalSince(last) > 0.1 || done == total else { return }
        last = now
        let elapsed = max(0.001, now.timeIntervalSince(start))
        let rate = Double(done) / elapsed
        let fraction = total > 0 ? Double(done) / Double(total) : 1
        let width = 30
        let filled = Int(fraction * Double(width))
        let left = rate > 0 ? Double(total - done) / rate : 0
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        let text = "\r\(bar) \(formatFixed(fraction * 100, 1))%  \(formatFixed(Double(done) / 1_048_576, 0))/\(formatFixed(Double(total) / 1_048_576, 0)) MiB  \(formatFixed(rate / 1_048_576, 0)) MiB/s  \(formatFixed(left, 0)) s left "
        StandardStreams.writeError(text)
    }

    func finish() {
        guard enabled else { return }
        StandardStreams.writeError("\r\u{1B}[K")
    }
}

extension MergePart: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}

/// The dtypes a dequantized model is written in (`merge --dtype`).
enum DequantizedDType: String, ExpressibleByArgument, CaseIterable {
    case bf16, f16, f32

    init?(argument: String) { self.init(rawValue: argument.lowercased()) }

    var dtype: DType {
        switch self {
        case .bf16: .bf16
        case .f16: .f16
        case .f32: .f32
        }
    }
}
