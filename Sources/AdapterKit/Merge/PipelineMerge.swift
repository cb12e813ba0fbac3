/// A diffusers pipeline folder as a merge base: `model_index.json` and a folder per component
/// (`unet/`, `transformer/`, `text_encoder/`, …, each a model folder, sharded or not). Every
/// component an adapter touches is merged by its own plan; every other entry (VAE, scheduler,
/// tokenizers, model_index.json) is copied; OUT is one folder that appears only when complete.
public struct PipelineMergePlan: Sendable {
    public let path: String
    /// The merged components: folder name → its plan.
    public let plans: [(folder: String, plan: MergePlan)]

    /// Whether `path` is a diffusers pipeline folder.
    public static func isPipeline(_ path: String) -> Bool {
        FileSystem.kind(path) == .directory && FileSystem.kind(joinPath(path, "model_index.json")) == .file
    }

    /// model_index.json's components: the entries naming a [library, class] (sorted), and the class.
    static func components(of path: String) throws -> (className: String?, components: [(folder: String, className: String?)]) {
        guard let index = try readJSONFile(joinPath(path, "model_index.json")).objectValue else {
            throw InputError(joinPath(path, "model_index.json"), "not a JSON object")
        }
        let components = index.keys.sorted().filter { !$0.hasPrefix("_") }.compactMap { key -> (String, String?)? in
            guard let entry = index[key]?.arrayValue, entry.count == 2 else { return nil }
            return (key, entry[1].stringValue)
        }
        return (index["_class_name"]?.stringValue, components)
    }

    /// The denoiser's folder of a pipeline (`unet/`, else `transformer/`), nil when it has neither.
    static func denoiserFolder(of path: String) -> String? {
        ["unet", "transformer"].first { FileSystem.kind(joinPath(path, $0)) == .directory }
    }

    public init(path: String, inputs: [MergeInput], options: MergeOptions = MergeOptions()) throws {
        self.path = path
        // Components are the entries naming a [library, class] whose folder exists.
        let folders = try Self.components(of: path).components.map(\.folder).filter { FileSystem.kind(joinPath(path, $0)) == .directory }
        let denoiser = folders.contains("unet") ? "unet" : folders.contains("transformer") ? "transformer" : nil
        /// The folder an adapter component lands in: kohya's `lora_unet_` and single-model adapters
        /// are the denoiser, whichever it is.
        func folder(_ component: String?) -> String? {
            switch component {
            case nil, "unet", "transformer": denoiser
            default: folders.contains(component!) ? component : nil
            }
        }
        var problems: [String] = []
        // Per folder, the inputs that land there (by position: the same file twice is two inputs).
        var byFolder: [String: [(index: Int, input: MergeInput, components: [String]?)]] = [:]
        for (n, input) in inputs.enumerated() {
            let components: [String?] = input.adapter.components.isEmpty ? [nil] : input.adapter.components
            var chosen = components
            if let only = options.components { chosen = components.filter { c in c.map { only.contains($0) } ?? true } }
            for c in chosen {
                guard let f = folder(c) else {
                    problems.append("\(input.adapter.path): modules for \(c ?? "the denoiser"), which the pipeline has no folder for (it has \(folders.joined(separator: ", ")))")
                    continue
                }
                if let i = byFolder[f]?.firstIndex(where: { $0.index == n }) {
                    if let c { byFolder[f]![i].components = (byFolder[f]![i].components ?? []) + [c] }
                } else {
                    byFolder[f, default: []].append((n, input, c.map { [$0] }))
                }
            }
        }
        var plans: [(String, MergePlan)] = []
        for f in byFolder.keys.sorted() {
            let entries = byFolder[f]!
            // One plan per component folder; its inputs restricted to the components that land there.
            let components = entries.compactMap(\.components).flatMap { $0 }
            do {
                let base = try Checkpoint(path: joinPath(path, f))
                let plan = try MergePlan(base: base, inputs: entries.map(\.input),
                                         options: MergeOptions(dropUnknown: options.dropUnknown, components: components.isEmpty ? nil : components,
                                                               dequantize: options.dequantize))
                plans.append((f, plan))
            } catch let e as ProblemList {
                problems += e.problems.map { "\(f): \($0)" }
            } catch let e as InputError {
                problems.append("\(f): \(e.problem)")
            }
        }
        guard problems.isEmpty else { throw ProblemList(subject: path, problems: problems) }
        guard !plans.isEmpty else { throw InputError(path, "no component of the pipeline is touched by the adapter") }
        self.plans = plans
    }

    /// Every file this merge reads.
    public var inputFiles: [String] { [path] + plans.flatMap(\.plan.inputFiles) }

    /// Writes OUT: each merged component through its plan, everything else copied.
    public func write(to output: String, options: MergeRunOptions = MergeRunOptions()) throws -> MergeSummary {
        try OutputRules.check(output, kind: .folder, inputs: inputFiles, force: options.force)
        let merged = Set(plans.map(\.folder))
        let others = try FolderCopy(folder: path, excluding: merged, label: "pipeline folder")
        let out = try TemporaryOutput(target: output, kind: .folder)
        var summary = MergeSummary()
        do {
            try others.copy(into: out.temporaryPath, sync: options.sync)
            for (folder, plan) in plans {
                var inner = options
                inner.force = false
                var s = try plan.write(to: joinPath(out.temporaryPath, folder), options: inner)
                // Each component's plan sees the other components' modules; that they are not its own is no news.
                s.notes.removeAll { $0.hasSuffix("(not selected with --component)") }
                summary.add(s, component: folder)
            }
            summary.filesCopied += others.fileCount
            if options.sync { FileSystem.syncDirectory(out.temporaryPath) }
            try out.commit(replacing: options.force)
        } catch {
            out.discard()
            throw error
        }
        if let note = others.note { summary.notes.append(note) }
        return summary
    }
}
