/// Refusals found while reading an adapter or planning a merge: all of them, reported together.
public struct ProblemList: Error, Sendable, CustomStringConvertible {
    /// What the problems concern: a file, or a merge's preflight (all its inputs at once).
    public let subject: String
    public let problems: [String]

    public init(subject: String, problems: [String]) {
        self.subject = subject
        self.problems = problems
    }

    /// One line: the first ten problems and how many more there are.
    public var description: String {
        let shown = problems.prefix(10).joined(separator: "; ")
        let more = problems.count > 10 ? "; and \(problems.count - 10) more" : ""
        return "\(subject): \(plural(problems.count, "problem")): \(shown)\(more)"
    }
}

/// A LoRA or MoSLoRA adapter in any supported layout, normalised into modules.
public final class Adapter: Sendable {
    /// The path as given (file or folder).
    public let path: String
    public let format: AdapterFormat
    /// The tensor file.
    public let store: any TensorContainer
    /// The config file read, if any, and its contents.
    public let configPath: String?
    public let config: JSONObject?
    public let modules: [LoRAModule]
    /// Full tensors that replace base tensors (`modules_to_save`, saved `base_layer` copies).
    public let replacements: [Replacement]
    /// Keys not understood, never dropped in silence.
    public let unknownKeys: [String]
    public let warnings: [String]

    /// Every file read: the weights and the config found beside them (which need not be the path
    /// given). OUT may not be, be inside, or contain any of them.
    public var inputFiles: [String] { [store.path] + (configPath.map { [$0] } ?? []) }

    /// Whether any module has a mixer.
    public var hasMixer: Bool { modules.contains { $0.hasMixer } }

    /// The components (`unet`, `text_encoder`, …) the modules belong to, in first-seen order.
    public var components: [String] { firstSeen(modules.compactMap(\.component)) }

    init(path: String, format: AdapterFormat, store: any TensorContainer, configPath: String?, config: JSONObject?,
         modules: [LoRAModule], replacements: [Replacement], unknownKeys: [String], warnings: [String]) {
        self.path = path
        self.format = format
        self.store = store
        self.configPath = configPath
        self.config = config
        self.modules = modules
        self.replacements = replacements
        self.unknownKeys = unknownKeys
        self.warnings = warnings
    }

    /// Reads an adapter file or folder of any supported layout; tensor files already opened through
    /// `files` are not opened again.
    public convenience init(path: String, files: TensorFiles = TensorFiles()) throws {
        let loaded = try AdapterLoader.load(path, files: files)
        self.init(path: path, format: loaded.format, store: loaded.store, configPath: loaded.configPath, config: loaded.config,
                  modules: loaded.modules, replacements: loaded.replacements, unknownKeys: loaded.unknownKeys, warnings: loaded.warnings)
    }

    /// Whether `path` looks like an adapter (by its files or its tensor names) rather than a model.
    /// The tensor files it opens to decide stay open in `files` for the command to use.
    public static func looksLikeAdapter(_ path: String, files: TensorFiles = TensorFiles()) -> Bool {
        if (try? AdapterLoader.locate(path, files: files)) != nil { return true }
        guard FileSystem.kind(path) == .directory,
              ["adapter_config.json", "lora_config.json"].contains(where: { FileSystem.kind(joinPath(path, $0)) == .file }) else { return false }
        // Decided by what the folder holds, as merge decides: no adapter weights, and a model
        // (an index or model.safetensors) whose tensor names are no adapter's, is a model with a
        // stray config (the checkpoint warns about it).
        if let checkpoint = try? Checkpoint(path: path, files: files), AdapterLoader.detectFormat(checkpoint.tensorNames) == nil { return false }
        // Otherwise a folder with an adapter config is an adapter even when the config is broken:
        // loading it then says what is wrong, instead of the folder being reported as a model.
        return true
    }
}
