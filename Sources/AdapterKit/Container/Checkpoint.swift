/// An input the tool refuses, with the path it concerns and what is wrong, in one line.
public struct InputError: Error, Sendable, CustomStringConvertible {
    public let path: String
    public let problem: String

    public init(_ path: String, _ problem: String) {
        self.path = path
        self.problem = problem
    }

    public var description: String { "\(path): \(problem)" }
}

/// A model checkpoint: one safetensors file, or a folder holding `model.safetensors` or shards
/// with `model.safetensors.index.json`. Only headers are read when it is opened.
public final class Checkpoint: Sendable {
    /// The path as given.
    public let path: String
    /// Whether `path` is a folder.
    public let isFolder: Bool
    /// The tensor files, in shard order.
    public let files: [any TensorContainer]
    /// Names of the tensor files relative to the folder (the file name for a single file).
    public let fileNames: [String]
    /// The shard index file name, when the checkpoint is sharded.
    public let indexFileName: String?
    /// The `metadata` object of the index (without `total_size` checks applied twice).
    public let indexMetadata: JSONObject?
    /// For folders: the top-level entries (UTF-8 names) that are not a tensor file of the
    /// checkpoint or the index, sorted. What an output copies is decided by `FolderCopy`, which
    /// sees every name and does not follow links.
    public let otherEntries: [String]
    /// Tensors in order: by file, then as each file lists them.
    public let tensors: [(entry: TensorEntry, file: Int)]
    /// The folder's `config.json`, read (nil for a single file or without one).
    public let config: ModelConfig?
    /// What is odd about the folder but not wrong (a stray adapter config), for a warning line each.
    public let warnings: [String]
    /// Position in `tensors` by name, for several files (nil for one: its own index answers).
    private let lookup: [String: Int]?
    /// Entries whose logical encoding is not their file's plain one (block-scaled FP8), by name.
    private let scaledEntries: [String: TensorEntry]

    /// Opens a file or folder and validates it (the index against the shards); tensor files already
    /// opened through `opened` are not opened (nor their headers parsed) again.
    public init(path: String, files opened: TensorFiles = TensorFiles()) throws {
        self.path = path
        switch FileSystem.kind(path) {
        case .missing:
            throw InputError(path, "no such file or folder")
        case .other:
            throw InputError(path, "not a regular file or folder but \((FileSystem.type(path) ?? .unknown).phrase)")
        case .file:
            isFolder = false
            files = [try opened.open(path)]
            fileNames = [lastPathComponent(path)]
            indexFileName = nil
            indexMetadata = nil
            otherEntries = []
        case .directory:
            isFolder = true
            let entries = try FileSystem.contents(ofDirectory: path)
            let layout = try Self.folderLayout(path, entries)
            indexFileName = layout.index
            fileNames = layout.shards
            files = try layout.shards.map { try opened.open(joinPath(path, $0)) }
            indexMetadata = layout.metadata
            let used = Set(layout.shards + (layout.index.map { [$0] } ?? []))
            otherEntries = entries.filter { !used.contains($0) }
            if let indexName = layout.index {
                try Self.validate(index: layout.weightMap, total: layout.totalSize, files: files, names: layout.shards,
                                  indexPath: joinPath(path, indexName))
            }
        }
        var all: [(entry: TensorEntry, file: Int)] = []
        all.reserveCapacity(files.reduce(0) { $0 + $1.entries.count })
        // One file has no duplicates (its reader refused them) and is looked up through its own index.
        var lookup: [String: Int]? = files.count == 1 ? nil : [:]
        for (i, f) in files.enumerated() {
            for t in f.entries {
                if lookup != nil {
                    if let other = lookup?.updateValue(all.count, forKey: t.name) {
                        throw InputError(f.path, "tensor \"\(t.name)\" is also in \(fileNames[all[other].file]); a tensor may be in one shard only")
                    }
                }
                all.append((t, i))
            }
        }
        self.lookup = lookup
        var warnings: [String] = []
        config = isFolder ? ModelConfig.read(folder: path, warnings: &warnings) : nil
        // Quantized weights and their scale tensors, found by name: one index for the three
        // recognisers, built only when a tensor could be one of them.
        let candidate = all.contains { t in
            t.entry.dtype == .f8E4M3 || t.entry.dtype == .f8E5M2 || t.entry.name.hasSuffix("_blocks") || t.entry.name.hasSuffix(".weight_packed")
        }
        if candidate {
            let position = lookup ?? Dictionary(all.enumerated().map { ($1.entry.name, $0) }, uniquingKeysWith: { a, _ in a })
            Self.recogniseScaledFP8(&all, position: position, block: config?.weightBlockSize, compressed: config?.compressedFP8, warnings: &warnings)
            Self.recogniseMXFP4(&all, position: position, warnings: &warnings)
            Self.recogniseNVFP4(&all, position: position, warnings: &warnings)
        }
        tensors = all
        scaledEntries = Dictionary(all.lazy.filter { if case .plain = $0.entry.encoding { false } else { true } }.map { ($0.entry.name, $0.entry) },
                                   uniquingKeysWith: { a, _ in a })
        // A model folder may hold an adapter config by mistake (a training run saved into it); it
        // is read as the model its tensors are, by inspect as by merge, and the config is named.
        if isFolder && AdapterLoader.detectFormat(all.map(\.entry.name)) == nil {
            for config in ["adapter_config.json", "lora_config.json"] where otherEntries.contains(config) {
                warnings.append("the folder holds \(config) but no adapter weights, and its tensors are a model's: read as a model; \(config) is not used")
            }
        }
        self.warnings = warnings
    }

    /// Marks block-scaled FP8 weights: an F8 `X.weight` [N, K] (or experts [E, N, K]) with an
    /// `X.weight_scale_inv` of one scale per block, [⌈N/b₀⌉, ⌈K/b₁⌉] (or [E, …]), Float32 or UE8M0
    /// (F8_E8M0), in any shard; value = code × its block's scale, edge blocks partial (transformers'
    /// `finegrained_fp8`). The block is the config's `weight_block_size`, else 128×128; a scale
    /// tensor whose shape or dtype does not fit is named in a warning and the weight stays plain.
    ///
    /// compressed-tensors' `float-quantized` FP8 (llm-compressor `FP8`, `FP8_DYNAMIC`, `FP8_BLOCK`)
    /// is the same encoding with other names and blocks: the scale is `X.weight_scale`, in the
    /// model's float dtype (BF16, F16 or F32), one per output row for the `channel` strategy
    /// ([N, 1]: blocks of 1 × K), one per tensor for `tensor` ([1]: one N × K block), or per
    /// `block_structure` block for `block`.
    static func recogniseScaledFP8(_ all: inout [(entry: TensorEntry, file: Int)], position: [String: Int], block configured: [Int]?,
                                   compressed: ModelConfig.CompressedFP8? = nil, warnings: inout [String]) {
        guard all.contains(where: { $0.entry.dtype == .f8E4M3 || $0.entry.dtype == .f8E5M2 }) else { return }
        for i in all.indices {
            let e = all[i].entry
            guard e.dtype == .f8E4M3 || e.dtype == .f8E5M2, e.shape.count == 2 || e.shape.count == 3 else { continue }
            let n = e.shape[e.shape.count - 2], k = e.shape[e.shape.count - 1]
            let block: [Int], expected: [[Int]], dtypes: [DType], j: Int
            if let c = compressed, let found = position[e.name + "_scale"] {
                j = found
                dtypes = [.bf16, .f16, .f32]
                switch c.strategy {
                case "channel": (block, expected) = ([1, max(1, k)], [Array(e.shape.dropLast(2)) + [n, 1]])
                case "tensor": (block, expected) = ([max(1, n), max(1, k)], [[1], [], Array(e.shape.dropLast(2)) + [1, 1]])
                case "block" where c.block != nil:
                    block = c.block!
                    expected = [Array(e.shape.dropLast(2)) + [(n + block[0] - 1) / block[0], (k + block[1] - 1) / block[1]]]
                default:
                    warnings.append("\(e.name): compressed-tensors strategy \(quotedForMessage(c.strategy)) is not read; \(e.name) is read as plain \(e.dtype.rawValue)")
                    continue
                }
            } else if let found = position[e.name + "_scale_inv"] {
                j = found
                block = configured ?? [128, 128]
                dtypes = [.f32, .f8E8M0]
                expected = [Array(e.shape.dropLast(2)) + [(n + block[0] - 1) / block[0], (k + block[1] - 1) / block[1]]]
            } else {
                continue
            }
            let scale = all[j].entry
            guard dtypes.contains(scale.dtype), expected.contains(scale.shape) else {
                warnings.append("\(scale.name) is \(scale.dtype.rawValue) \(scale.shape), not the \(dtypes.map(\.rawValue).joined(separator: " or ")) \(expected[0]) that \(block[0])×\(block[1]) block scales of \(e.name) \(e.shape) need: \(e.name) is read as plain \(e.dtype.rawValue)")
                continue
            }
            all[i].entry = TensorEntry(name: e.name, shape: e.shape, encoding: .blockScaledFP8(e.dtype, scale: scale.name, block: block), byteCount: e.byteCount)
        }
    }

    /// Marks MXFP4 tensors (gpt-oss experts): `X_blocks` U8 [..., rows, G, 16] with `X_scales` U8
    /// (or F8_E8M0) [..., rows, G] in any shard (transformers' `integrations/mxfp4.py`). A scale
    /// tensor of another shape or dtype is named in a warning and the blocks stay plain bytes.
    static func recogniseMXFP4(_ all: inout [(entry: TensorEntry, file: Int)], position: [String: Int], warnings: inout [String]) {
        guard all.contains(where: { $0.entry.name.hasSuffix("_blocks") }) else { return }
        for i in all.indices {
            let e = all[i].entry
            guard e.name.hasSuffix("_blocks"), case .plain(.u8) = e.encoding,
                  let j = position[String(e.name.dropLast("_blocks".count)) + "_scales"] else { continue }
            let scale = all[j].entry
            let expected = Array(e.shape.dropLast())
            guard e.shape.count >= 3, e.shape.last == 16, scale.dtype == .u8 || scale.dtype == .f8E8M0, scale.shape == expected else {
                warnings.append("\(e.name) \(e.shape) and \(scale.name) \(scale.dtype.rawValue) \(scale.shape) are not MXFP4's [..., rows, G, 16] blocks with U8 [..., rows, G] exponents: \(e.name) is read as plain U8")
                continue
            }
            all[i].entry = TensorEntry(name: e.name, shape: e.shape, encoding: .mxfp4(scale: scale.name), byteCount: e.byteCount)
        }
    }

    /// Marks NVFP4 weights (compressed-tensors `nvfp4-pack-quantized`): `X.weight_packed` U8
    /// [rows, K/2] with `X.weight_scale` F8_E4M3 [rows, K/16] and `X.weight_global_scale` F32 [1]
    /// (compressed-tensors' `compressors/nvfp4`). Siblings of another shape or dtype are named in a
    /// warning and the codes stay plain U8 (int4 `pack-quantized` stores I32 `weight_packed`).
    static func recogniseNVFP4(_ all: inout [(entry: TensorEntry, file: Int)], position: [String: Int], warnings: inout [String]) {
        guard all.contains(where: { $0.entry.name.hasSuffix(".weight_packed") }) else { return }
        for i in all.indices {
            let e = all[i].entry
            guard e.name.hasSuffix(".weight_packed"), case .plain(.u8) = e.encoding else { continue }
            let module = String(e.name.dropLast("_packed".count))
            guard let j = position[module + "_scale"], let g = position[module + "_global_scale"] else { continue }
            let scale = all[j].entry, global = all[g].entry
            guard e.shape.count == 2, e.shape[1] % 8 == 0, scale.dtype == .f8E4M3, scale.shape == [e.shape[0], e.shape[1] / 8],
                  global.dtype == .f32, global.shape == [1] || global.shape.isEmpty else {
                warnings.append("\(e.name) \(e.shape), \(scale.name) \(scale.dtype.rawValue) \(scale.shape) and \(global.name) \(global.dtype.rawValue) \(global.shape) are not NVFP4's [rows, K/2] codes with F8_E4M3 [rows, K/16] scales and an F32 [1] global scale: \(e.name) is read as plain U8")
                continue
            }
            all[i].entry = TensorEntry(name: e.name, shape: e.shape, encoding: .nvfp4(scale: scale.name, global: global.name), byteCount: e.byteCount)
        }
    }

    /// The scale tensors quantized weights name (FP8 block scales, MXFP4 exponents).
    public var scaleTensorNames: Set<String> {
        Set(scaledEntries.values.flatMap(\.encoding.scaleTensors))
    }

    /// The tensor named `name` and the index of its file.
    public func tensor(_ name: String) -> (entry: TensorEntry, file: Int)? {
        guard let lookup else {
            if let scaled = scaledEntries[name] { return (scaled, 0) }
            return files.first?.entry(name).map { ($0, 0) }
        }
        return lookup[name].map { tensors[$0] }
    }

    public var tensorNames: [String] { tensors.map(\.entry.name) }

    /// Every file a merge reads: the tensor files (shards through the index), the index, and the
    /// other files copied. OUT may not be, be inside, or contain any of them.
    public var inputFiles: [String] {
        guard isFolder else { return [path] }
        // Of the other entries, what a merge may read: files, plain folders, and links to files
        // (a link to a folder is never followed, so what it points at is not an input).
        let read = otherEntries.filter { entry in
            let full = joinPath(path, entry)
            switch FileSystem.entryKind(full) {
            case .file, .directory: return true
            case .symbolicLink: return FileSystem.kind(full) == .file
            default: return false
            }
        }
        return (fileNames + (indexFileName.map { [$0] } ?? []) + read).map { joinPath(path, $0) }
    }

    public var parameterCount: Int { tensors.reduce(0) { $0 + $1.entry.valueCount } }
    public var byteCount: Int { tensors.reduce(0) { $0 + $1.entry.byteCount } }

    // MARK: - Folder layout

    struct FolderLayout {
        var shards: [String]
        var index: String?
        var weightMap: [(tensor: String, file: String)]
        var totalSize: Int?
        var metadata: JSONObject?
    }

    private static func folderLayout(_ folder: String, _ entries: [String]) throws -> FolderLayout {
        let indexes = entries.filter { $0.hasSuffix(".safetensors.index.json") }
        let singles = entries.filter { $0.hasSuffix(".safetensors") }
        let indexName: String?
        if entries.contains("model.safetensors.index.json") {
            indexName = "model.safetensors.index.json"
        } else if entries.contains("model.safetensors") {
            return FolderLayout(shards: ["model.safetensors"], index: nil, weightMap: [], totalSize: nil, metadata: nil)
        } else if indexes.count == 1 {
            indexName = indexes[0]
        } else if indexes.isEmpty && singles.count == 1 {
            return FolderLayout(shards: singles, index: nil, weightMap: [], totalSize: nil, metadata: nil)
        } else if indexes.isEmpty && singles.isEmpty && entries.contains("pytorch_model.bin") {
            return FolderLayout(shards: ["pytorch_model.bin"], index: nil, weightMap: [], totalSize: nil, metadata: nil)
        } else if indexes.isEmpty && singles.isEmpty {
            throw InputError(folder, "the folder holds no .safetensors file and no model.safetensors.index.json")
        } else {
            throw InputError(folder, "the folder holds several checkpoints (\((indexes.isEmpty ? singles : indexes).joined(separator: ", "))); name one file")
        }
        let indexPath = joinPath(folder, indexName!)
        let (map, total, metadata) = try parseIndex(indexPath)
        var shards: [String] = []
        var seen = Set<String>()
        for (_, file) in map where seen.insert(file).inserted {
            try checkInside(folder: folder, file: file, indexPath: indexPath)
            shards.append(file)
        }
        shards.sort { $0.precedesInBytes($1) }
        return FolderLayout(shards: shards, index: indexName, weightMap: map, totalSize: total, metadata: metadata)
    }

    /// Parses `model.safetensors.index.json`: `{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`.
    static func parseIndex(_ indexPath: String) throws -> (map: [(tensor: String, file: String)], total: Int?, metadata: JSONObject?) {
        let root = try readJSONFile(indexPath)
        guard let object = root.objectValue else { throw InputError(indexPath, "the index is not a JSON object") }
        guard let weightMap = object["weight_map"]?.objectValue else {
            throw InputError(indexPath, "the index has no \"weight_map\" object")
        }
        var map: [(tensor: String, file: String)] = []
        for (tensor, value) in weightMap.members {
            guard let file = value.stringValue else {
                throw InputError(indexPath, "weight_map entry \"\(tensor)\" is not a file name")
            }
            map.append((tensor, normalisedShardName(file)))
        }
        var total: Int?
        var metadata: JSONObject?
        if let m = object["metadata"], !m.isNull {
            guard let mo = m.objectValue else { throw InputError(indexPath, "the index \"metadata\" is not an object") }
            metadata = mo
            if let t = mo["total_size"], !t.isNull {
                guard let v = t.int, v >= 0 else { throw InputError(indexPath, "total_size is not a non-negative integer") }
                total = v
            }
        }
        return (map, total, metadata)
    }

    /// A shard name without `.` components: `./model-00001-of-00002.safetensors` is the file
    /// `model-00001-of-00002.safetensors` (some exporters write it so; transformers joins it to the
    /// folder and reads the same file). Anything else is kept for `checkInside` to judge.
    static func normalisedShardName(_ file: String) -> String {
        let parts = file.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.contains("."), parts.contains(where: { $0 != "." }) else { return file }
        return parts.filter { $0 != "." }.joined(separator: "/")
    }

    /// Refuses shard names that leave the folder: absolute paths, `..`, or links pointing outside.
    static func checkInside(folder: String, file: String, indexPath: String) throws {
        let parts = file.split(separator: "/", omittingEmptySubsequences: false)
        guard !file.isEmpty, !file.hasPrefix("/"), !parts.contains(".."), !parts.contains(""), !file.contains("\0") else {
            throw InputError(indexPath, "shard name \"\(file)\" leaves the model folder")
        }
        let full = joinPath(folder, file)
        guard let real = FileSystem.realPath(full) else { throw InputError(indexPath, "shard \"\(file)\" is missing") }
        guard let realFolder = FileSystem.realPath(folder),
              real.hasPrefix(realFolder + "/") || isHubCacheBlob(real, snapshot: realFolder) else {
            throw InputError(indexPath, "shard \"\(file)\" resolves outside the model folder")
        }
    }

    /// The Hugging Face hub cache keeps each file once, in `models--org--name/blobs/<hash>`, and a
    /// revision as `models--org--name/snapshots/<rev>/` whose files are links `../../blobs/<hash>`.
    /// For a (real) folder laid out so — its parent is `snapshots/` and beside that is a plain
    /// `blobs/` folder — this is the real path of that `blobs/`; nil for any other folder.
    static func hubCacheBlobs(ofSnapshot realFolder: String) -> String? {
        let snapshots = parentPath(realFolder)
        guard lastPathComponent(snapshots) == "snapshots", snapshots != realFolder else { return nil }
        let blobs = joinPath(parentPath(snapshots), "blobs")
        return FileSystem.type(blobs, following: false) == .directory ? blobs : nil
    }

    /// Whether `real` (a resolved path) is a regular file directly inside the hub cache's `blobs/`
    /// of the snapshot folder `realFolder`: the one place outside a model folder its links may lead.
    static func isHubCacheBlob(_ real: String, snapshot realFolder: String) -> Bool {
        guard let blobs = hubCacheBlobs(ofSnapshot: realFolder) else { return false }
        return parentPath(real) == blobs && FileSystem.type(real, following: false) == .regular
    }

    /// Checks the index against the shards' headers: every listed tensor is in the shard named,
    /// every tensor of a shard is listed, and `total_size` is the sum of tensor bytes.
    static func validate(index map: [(tensor: String, file: String)], total: Int?, files: [any TensorContainer], names: [String], indexPath: String) throws {
        var fileOf: [String: String] = [:]
        for (tensor, file) in map {
            guard fileOf[tensor] == nil else { throw InputError(indexPath, "tensor \"\(tensor)\" is listed twice") }
            fileOf[tensor] = file
        }
        var sum = 0
        for (store, name) in zip(files, names) {
            for t in store.entries {
                guard let listed = fileOf[t.name] else {
                    throw InputError(indexPath, "shard \(name) holds tensor \"\(t.name)\", which the index does not list")
                }
                guard listed == name else {
                    throw InputError(indexPath, "tensor \"\(t.name)\" is in shard \(name) but the index names \(listed)")
                }
                fileOf[t.name] = nil
                sum += t.byteCount
            }
        }
        if let (tensor, file) = fileOf.min(by: { $0.key < $1.key }) {
            throw InputError(indexPath, "tensor \"\(tensor)\" is listed in \(file), which does not hold it")
        }
        if let total, total != sum {
            throw InputError(indexPath, "total_size is \(total) but the shards' tensors hold \(sum) bytes")
        }
    }
}

/// What a tensor file is, decided by its structure rather than by its first bytes alone: the
/// first bytes of a safetensors file are the low bytes of its header length, which can be 0x80
/// (a pickle's first byte) or `PK` (a zip's) as well as anything else.
enum TensorFileKind: Equatable {
    /// 8 bytes of header length N, N ≤ size − 8, and `{` at offset 8.
    case safetensors
    /// A zip archive: an end-of-central-directory record ends the file.
    case torchZip
    /// A bare pickle written by torch.save before 1.6: 0x80, a protocol byte, then torch's magic number.
    case legacyPickle
    /// None of these.
    case unknown

    /// torch.save's legacy magic number 0x1950a86a20f9469cfc6c as pickled first (LONG1, 10 bytes, little-endian).
    static let legacyMagic: [UInt8] = [0x8A, 0x0A, 0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19]

    static func detect(_ fd: FileDescriptor, size: Int) throws -> TensorFileKind {
        let head = try fd.readBytes(count: min(size, 14), at: 0)
        if head.count >= 9 {
            var n: UInt64 = 0
            for i in 0..<8 { n |= UInt64(head[i]) << (8 * UInt64(i)) }
            if n >= 2, n <= UInt64(size - 8), head[8] == UInt8(ascii: "{") { return .safetensors }
        }
        if head.count == 14, head[0] == 0x80, (2...5).contains(head[1]), Array(head[2...]) == legacyMagic { return .legacyPickle }
        // The end-of-central-directory record: 22 bytes, signature PK\5\6, its comment running to the end of the file.
        let tailCount = min(size, 22 + 0xFFFF)
        if tailCount >= 22 {
            let tail = try fd.readBytes(count: tailCount, at: size - tailCount)
            var at = tail.count - 22
            while at >= 0 {
                if tail[at] == 0x50, tail[at + 1] == 0x4B, tail[at + 2] == 0x05, tail[at + 3] == 0x06,
                   at + 22 + (Int(tail[at + 20]) | Int(tail[at + 21]) << 8) == tail.count {
                    return .torchZip
                }
                at -= 1
            }
        }
        return .unknown
    }
}

/// Tensor files opened once for a command that looks at the same file more than once (inspect decides
/// whether a path is an adapter, then reads it as one or as a model): each path is opened, and its
/// header parsed, on first use only. Not shared between threads.
public final class TensorFiles {
    private var opened: [String: any TensorContainer] = [:]

    public init() {}

    /// The file at `path`, opened now or earlier; failures are not remembered.
    public func open(_ path: String) throws -> any TensorContainer {
        if let store = opened[path] { return store }
        let store = try openTensorFile(path)
        opened[path] = store
        return store
    }
}

/// Opens a tensor file, deciding by its structure: safetensors, a PyTorch zip checkpoint, or a
/// legacy torch.save pickle (which gets its own refusal). A file that is none of these is refused
/// with the safetensors rule it breaks and a word that it is not a PyTorch checkpoint either.
public func openTensorFile(_ path: String) throws -> any TensorContainer {
    let fd: FileDescriptor
    do { fd = try FileDescriptor.openForReading(path) } catch let e as SystemError { throw InputError(path, e.reason) }
    let status = try fd.status()
    guard status.isRegular else { throw InputError(path, "not a regular file") }
    switch try TensorFileKind.detect(fd, size: status.size) {
    case .safetensors:
        return try SafetensorsFile(path: path)
    case .torchZip, .legacyPickle:
        return try TorchCheckpoint(path: path)
    case .unknown:
        do {
            return try SafetensorsFile(path: path)
        } catch let e as SafetensorsError {
            let detail = (e.detail.isEmpty ? "" : e.detail + "; ")
                + "nor is it a PyTorch zip (no end-of-central-directory record) or a legacy torch.save pickle (no protocol header with torch's magic number)"
            throw SafetensorsError(file: e.file, tensor: e.tensor, rule: e.rule, detail: detail)
        }
    }
}

/// Reads and parses a JSON file strictly (duplicate keys refused), with the path in any error.
public func readJSONFile(_ path: String, limit: Int = 64 << 20) throws -> JSONValue {
    let fd: FileDescriptor
    do { fd = try FileDescriptor.openForReading(path) } catch let e as SystemError { throw InputError(path, e.reason) }
    let size = try fd.status().size
    guard size <= limit else { throw InputError(path, "the file is \(size) bytes, larger than the \(limit)-byte limit for JSON") }
    let bytes = try fd.readBytes(count: size, at: 0)
    do {
        return try JSONParser.parse(bytes)
    } catch {
        throw InputError(path, "invalid JSON: \(error.description)")
    }
}
