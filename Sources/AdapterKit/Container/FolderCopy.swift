/// The other files of a model or adapter folder — config, tokenizer, README — that an output
/// folder gets copied unchanged, found without ever following a link out of the folder.
///
/// Rules:
/// - regular files are copied, and plain subfolders with what they hold (names of any bytes, kept
///   exactly);
/// - a symbolic link to a regular file inside the folder is copied as that file's content (a
///   regular file in the output, never a link); in a Hugging Face cache snapshot, so is a link to a
///   regular file directly inside the cache's own `blobs/`;
/// - a link that leaves the folder, a link to a folder (`zzz → .` would recurse), a dangling link,
///   and version-control folders (`.git`, `.hg`, `.svn`) are not copied; they are listed in
///   `skipped`, for one note line;
/// - a FIFO, socket or device anywhere is refused: it cannot be copied, and reading a FIFO blocks.
public struct FolderCopy: Sendable {
    /// What the output gets, in an order where every folder comes before what it holds.
    public enum Item: Sendable {
        /// A folder to create (path relative to the folder).
        case folder(RawPath)
        /// A file to create (relative path) with the content of `source` (a full path, resolved when
        /// the entry is a link).
        case file(RawPath, source: RawPath)

        public var relativePath: RawPath {
            switch self {
            case .folder(let p), .file(let p, _): p
            }
        }
    }

    /// An entry left out and why ("a link that leaves the model folder").
    public struct Skipped: Sendable {
        public let name: String
        public let reason: String
    }

    /// Version-control folders, never copied: their history may hold anything, including weights
    /// and credentials, and no runtime reads them.
    public static let versionControlFolders: Set<String> = [".git", ".hg", ".svn"]

    /// File name endings of tensor files (safetensors, PyTorch, GGUF checkpoints).
    public static let tensorFileExtensions = [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"]

    public let folder: String
    /// What the folder is called in messages ("model folder").
    public let label: String
    public private(set) var items: [Item] = []
    public private(set) var skipped: [Skipped] = []
    /// Relative paths of the files to copy whose names end like a tensor file's.
    public private(set) var tensorFiles: [RawPath] = []
    /// The `skip` names that matched an entry.
    public private(set) var skippedByRequest: Set<String> = []

    /// Walks `folder`. `excluded`: relative paths that are not copied and not reported (the files the
    /// caller writes itself: shards, index). `skip`: relative paths the user asked to leave out, a
    /// file or a folder (with what it holds); each one found is listed in `skipped`.
    /// `label` names the folder in reasons ("model folder").
    public init(folder: String, excluding excluded: Set<String>, skip: Set<String> = [], label: String = "folder") throws {
        self.folder = folder
        self.label = label
        let root = RawPath(folder)
        guard let realRoot = FileSystem.realPath(root) else { throw InputError(folder, "no such folder") }
        let realRootString = realRoot.string
        let blobs = realRootString.flatMap { Checkpoint.hubCacheBlobs(ofSnapshot: $0) }.map(RawPath.init)
        var seenFolders: Set<FileIdentity> = []
        if let id = FileSystem.identity(realRoot) { seenFolders.insert(id) }

        func inside(_ real: RawPath) -> Bool {
            real.bytes.starts(with: realRoot.bytes + [0x2F]) || (blobs.map { parent(of: real) == $0 } ?? false)
        }

        func walk(_ relative: RawPath?, _ full: RawPath) throws {
            for name in try FileSystem.entries(ofDirectory: full, followingLink: relative == nil) {
                let rel = relative.map { $0.appending(name) } ?? name
                let path = full.appending(name)
                let shown = rel.display
                if let s = rel.string, excluded.contains(s) { continue }
                if skip.contains(shown) {
                    skippedByRequest.insert(shown)
                    let isFolder = FileSystem.type(path, following: false) == .directory
                    skipped.append(Skipped(name: shown + (isFolder ? "/" : ""), reason: "--skip-file"))
                    continue
                }
                guard let type = FileSystem.type(path, following: false) else { continue }  // removed meanwhile
                switch type {
                case .regular:
                    add(.file(rel, source: path))
                case .directory:
                    if Self.versionControlFolders.contains(name.display) {
                        skipped.append(Skipped(name: shown + "/", reason: "a version-control folder"))
                        continue
                    }
                    // A folder seen before (a bind mount of a parent) would recurse forever.
                    guard let id = FileSystem.identity(path), seenFolders.insert(id).inserted else {
                        skipped.append(Skipped(name: shown + "/", reason: "a folder seen before (a loop)"))
                        continue
                    }
                    add(.folder(rel))
                    try walk(rel, path)
                case .symbolicLink:
                    guard let real = FileSystem.realPath(path), let target = FileSystem.type(real, following: false) else {
                        skipped.append(Skipped(name: shown, reason: "a link to nothing"))
                        continue
                    }
                    // A link to a folder is never followed, inside or out: `zzz → .` would recurse.
                    if target == .directory {
                        skipped.append(Skipped(name: shown, reason: "a link to a folder"))
                        continue
                    }
                    guard inside(real) else {
                        skipped.append(Skipped(name: shown, reason: "a link that leaves the \(label)"))
                        continue
                    }
                    switch target {
                    case .regular:
                        add(.file(rel, source: real))
                    default:
                        throw InputError(path.display, "a link to \(target.phrase), which cannot be copied")
                    }
                default:
                    throw InputError(path.display, "not a regular file or folder but \(type.phrase), which cannot be copied")
                }
            }
        }
        try walk(nil, root)
    }

    private mutating func add(_ item: Item) {
        items.append(item)
        if case .file(let rel, _) = item, let last = rel.bytes.split(separator: 0x2F).last,
           Self.tensorFileExtensions.contains(where: { last.lowercasedASCII.reversed().starts(with: $0.utf8.reversed()) }) {
            tensorFiles.append(rel)
        }
    }

    /// How many files `copy` writes.
    public var fileCount: Int { items.reduce(0) { if case .file = $1 { $0 + 1 } else { $0 } } }

    /// Creates every item under `target` (an existing, empty folder), fsyncing files with `sync`.
    public func copy(into target: String, sync: Bool) throws {
        let base = RawPath(target)
        for item in items {
            switch item {
            case .folder(let rel):
                try FileSystem.makeDirectory(base.appending(rel))
            case .file(let rel, let source):
                try FileDescriptor.copyFile(source, to: base.appending(rel), followingLink: false, sync: sync)
            }
        }
    }

    /// One line naming what was left out and why, or nil when nothing was: "not copied from the model
    /// folder: .git/ (a version-control folder), tokenizer.model (a link that leaves the model folder)".
    public var note: String? {
        guard !skipped.isEmpty else { return nil }
        let shown = skipped.prefix(10).map { "\($0.name) (\($0.reason))" }.joined(separator: ", ")
        let more = skipped.count > 10 ? ", and \(skipped.count - 10) more" : ""
        return "not copied from the \(label): \(shown)\(more)"
    }
}

private func parent(of path: RawPath) -> RawPath {
    guard let slash = path.bytes.lastIndex(of: 0x2F) else { return RawPath(bytes: []) }
    return RawPath(bytes: Array(path.bytes[..<max(slash, 1)]))
}

private extension ArraySlice where Element == UInt8 {
    var lowercasedASCII: [UInt8] { map { $0 >= 0x41 && $0 <= 0x5A ? $0 + 32 : $0 } }
}
