/// The rules for OUT shared by every command that writes (merge, convert, resize, to-safetensors).
public enum OutputRules {
    /// Checks OUT before anything is written: its folder exists; it does not exist unless
    /// `force`; it is not, is not inside, and does not contain any of `inputs` (the paths given
    /// and every file the run reads through them: configs beside an adapter's weights, shards
    /// through an index, the index itself); and with `force`, what is there is something this
    /// tool could have written (`replaceRefusal`).
    public static func check(_ output: String, kind: OutputKind, inputs: [String], force: Bool) throws {
        guard !output.isEmpty else { throw InputError(output, "empty output path") }
        let parent = parentPath(output)
        guard FileSystem.kind(parent) == .directory, let realParent = FileSystem.realPath(parent) else {
            throw InputError(output, "the folder \(parent) does not exist")
        }
        let exists = FileSystem.exists(noFollow: output)
        if exists && !force {
            throw InputError(output, "already exists; choose another path or pass --force to replace it")
        }
        let name = lastPathComponent(output)
        guard name != "." && name != ".." && !name.isEmpty else { throw InputError(output, "not a usable output name") }
        // Where OUT really lands: its real parent plus its name, and, if it is a link, its target.
        var outs = [joinPath(realParent, name)]
        if let real = FileSystem.realPath(output) { outs.append(real) }
        var seen = Set<String>()
        for input in inputs {
            guard let real = FileSystem.realPath(input), seen.insert(real).inserted else { continue }
            for out in outs {
                if out == real { throw InputError(output, "is the input \(input); the inputs are never modified") }
                if out.hasPrefix(real + "/") { throw InputError(output, "is inside the input \(input)") }
                if real.hasPrefix(out + "/") { throw InputError(output, "contains the input \(input)") }
            }
        }
        if exists, let refusal = replaceRefusal(output, kind: kind) {
            throw InputError(output, refusal + "; nothing was changed")
        }
    }

    /// Why `--force` may not replace what is at `path` with an output of `kind`, or nil when it may.
    ///
    /// It may replace only what this tool could have written: for a file output, a safetensors
    /// or GGUF file; for a folder output, a folder whose entries are all tensor files, configs and other
    /// JSON, tokenizer files, READMEs and licences (no subfolders, nothing else). A symbolic link
    /// is replaced itself, never what it points to.
    static func replaceRefusal(_ path: String, kind: OutputKind) -> String? {
        let what = FileSystem.entryKind(path)
        switch (kind, what) {
        case (_, .missing), (_, .symbolicLink):
            return nil
        case (.file, .file):
            guard isSafetensorsFile(path) || GGUFFile.looksLikeGGUF(path) else {
                return "--force replaces only a safetensors or GGUF file here, and this is neither"
            }
            return nil
        case (.file, .directory):
            return "--force replaces only a safetensors or GGUF file here, and this is a folder"
        case (.folder, .file):
            return "--force replaces only a model or adapter folder here, and this is a file"
        case (.folder, .directory):
            guard let entries = try? FileSystem.contents(ofDirectory: path) else {
                return "--force replaces only a folder it can list, and this one cannot be read"
            }
            for entry in entries {
                let problem: String?
                switch FileSystem.entryKind(joinPath(path, entry)) {
                case .directory: problem = "a folder"
                case .file, .symbolicLink: problem = isModelFolderFile(entry) ? nil : "not a tensor, config, tokenizer or README file"
                case .other, .missing: problem = "not a regular file"
                }
                if let problem {
                    return "--force replaces only a model or adapter folder this tool could have written, and this one holds \(entry) (\(problem))"
                }
            }
            return nil
        case (_, .other):
            return "--force replaces only a file or folder this tool could have written, and this is neither"
        }
    }

    /// A safetensors file by its structure: the header length fits and the header is a JSON object.
    private static func isSafetensorsFile(_ path: String) -> Bool {
        guard let fd = try? FileDescriptor.openForLocking(path), let status = try? fd.status(), status.isRegular else { return false }
        return (try? TensorFileKind.detect(fd, size: status.size)) == .safetensors
    }

    /// The files of a model or adapter folder: tensors, configs and other JSON (index, tokenizer,
    /// generation config), tokenizer models and vocabularies, chat templates, READMEs, licences.
    static func isModelFolderFile(_ name: String) -> Bool {
        let lower = name.lowercased()
        if ["readme", "license", "licence", "notice", ".gitattributes"].contains(lower) { return true }
        guard let dot = lower.lastIndex(of: "."), dot != lower.startIndex else { return false }
        let ext = lower[lower.index(after: dot)...]
        return ["safetensors", "bin", "pt", "json", "model", "tiktoken", "txt", "md", "jinja"].contains(String(ext))
    }
}
