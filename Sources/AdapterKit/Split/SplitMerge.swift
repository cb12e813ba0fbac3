import Dispatch
import Foundation

/// One part of a split merge: part `index` of `count`, counted from 1.
public struct MergePart: Sendable, Hashable, CustomStringConvertible {
    public let index: Int
    public let count: Int

    public init?(index: Int, count: Int) {
        guard count >= 1, index >= 1, index <= count else { return nil }
        self.index = index
        self.count = count
    }

    /// "2/7".
    public init?(_ text: String) {
        let pieces = text.split(separator: "/", omittingEmptySubsequences: false)
        guard pieces.count == 2, pieces.allSatisfy({ !$0.isEmpty && $0.utf8.allSatisfy { $0 >= 0x30 && $0 <= 0x39 } }),
              let i = Int(pieces[0]), let n = Int(pieces[1]) else { return nil }
        self.init(index: i, count: n)
    }

    public var description: String { "\(index)/\(count)" }
    /// The part's folder and manifest in the staging folder: `part-2-of-7`, `part-2-of-7.json`.
    var folderName: String { "part-\(index)-of-\(count)" }
    var manifestName: String { folderName + ".json" }
}

/// What a part or a finish did.
public struct PartSummary: Sendable {
    public var part: MergePart
    /// False when the part found its files complete and matching, and wrote nothing.
    public var wrote: Bool
    public var files: [String]
    public var merge: MergeSummary
    public var staging: String
}

/// Parts of a split merge that `--finish` cannot use: one line each.
public struct PartsNotReady: AdapterError {
    public let lines: [String]
    public var description: String { lines.joined(separator: "\n") }
}

/// A split merge: `writePart` writes one part's output shards into a staging folder beside OUT,
/// with a manifest (plan digest, size and SHA-256 of each file); `finishParts` checks every
/// part and assembles OUT exactly as a one-process merge writes it.
///
/// Staging layout, for OUT `/x/merged`: `/x/.merged.parts/part-I-of-N/…` (the part's shards,
/// committed as a folder) and `/x/.merged.parts/part-I-of-N.json` (written after the folder, so
/// a manifest only ever describes complete files).
extension MergePlan {
    /// Which base files (shards) each of `parts` parts writes: the largest first, each to the part
    /// with the fewest bytes so far (the lower index on ties), so the split depends only on the
    /// sizes and is the same on every machine. Each part's list is in base order.
    public static func assignShards(sizes: [Int], parts: Int) -> [[Int]] {
        precondition(parts >= 1)
        var load = [Int](repeating: 0, count: parts)
        var assigned = [[Int]](repeating: [], count: parts)
        let order = sizes.indices.sorted { sizes[$0] != sizes[$1] ? sizes[$0] > sizes[$1] : $0 < $1 }
        for i in order {
            let target = load.indices.min { load[$0] != load[$1] ? load[$0] < load[$1] : $0 < $1 }!
            assigned[target].append(i)
            load[target] += sizes[i]
        }
        return assigned.map { $0.sorted() }
    }

    /// The shards of each part for this base (sized by their tensor bytes).
    func shardAssignment(parts: Int) -> [[Int]] {
        Self.assignShards(sizes: base.files.map { $0.entries.reduce(0) { $0 + $1.byteCount } }, parts: parts)
    }

    /// The staging folder of OUT: `.NAME.parts` beside it.
    public static func stagingFolder(for output: String) -> String {
        joinPath(parentPath(output), "." + lastPathComponent(output) + ".parts")
    }

    /// SHA-256 of everything that decides the output's bytes: the tool's version, the base's index
    /// and every file's name, size and tensor table (names, encodings, shapes, offsets, metadata),
    /// the contents of every adapter file read, each input's weight, and the merge options. The
    /// base's tensor bytes are not read: a base changed in place behind the same headers is not
    /// detected (the shards' checksums still catch any part file changed after it was written).
    public func planDigest() throws -> String {
        var h = SHA256()
        func line(_ s: String) { h.update(s + "\n") }
        line("adapter split merge plan 1; adapter \(AdapterVersion.string)")
        line("base \(base.isFolder ? "folder" : "file") files \(base.files.count)")
        if let index = base.indexFileName {
            line("index \(index) \(try SHA256.file(joinPath(base.path, index)).digest)")
        }
        for (i, store) in base.files.enumerated() {
            let size = try FileDescriptor.openForReading(store.path).status().size
            line("file \(base.fileNames[i]) \(store.format) \(size)")
            for (k, v) in store.metadataForSafetensors ?? [] { line("metadata \(k.debugDescription) \(v.debugDescription)") }
            for e in store.entries {
                let region = store.region(of: e.name).map { "\($0.range.lowerBound)" } ?? "-"
                line("tensor \(e.name.debugDescription) \(e.encoding) \(e.shape) \(e.byteCount) \(region)")
            }
        }
        for (n, input) in inputs.enumerated() {
            line("input \(n) weight \(String(input.weight.bitPattern, radix: 16))")
            for path in input.adapter.inputFiles {
                line("adapter file \(lastPathComponent(path)) \(try SHA256.file(path).digest)")
            }
        }
        line("options drop-unknown \(options.dropUnknown) components \(options.components.map { $0.sorted().joined(separator: ",") } ?? "-") skip \(options.skipFiles.sorted().joined(separator: ",")) dequantize \(options.dequantize?.rawValue ?? "-")")
        return h.finish()
    }

    /// Writes part `part` of the merge into the staging folder beside `output` (after the same
    /// checks as a whole merge, so every part refuses the same bad input). A part whose manifest
    /// is there, with this plan's digest and matching files, writes nothing.
    public func writePart(_ part: MergePart, output: String, options: MergeRunOptions = MergeRunOptions()) throws -> PartSummary {
        try OutputRules.check(output, kind: base.isFolder ? .folder : .file, inputs: inputFiles, force: options.force)
        try checkQuantizedValues()
        let digest = try planDigest()
        let staging = Self.stagingFolder(for: output)
        try Self.makeStagingFolder(staging)
        let shards = shardAssignment(parts: part.count)[part.index - 1]
        let fileName = lastPathComponent(output)
        var summary = PartSummary(part: part, wrote: false, files: [], merge: MergeSummary(), staging: staging)
        let manifestPath = joinPath(staging, part.manifestName)
        let folder = joinPath(staging, part.folderName)
        if FileSystem.entryKind(manifestPath) != .missing {
            if let manifest = try? PartManifest.read(manifestPath), manifest.digest == digest, manifest.part == part,
               manifest.problems(in: folder).isEmpty {
                summary.files = manifest.files.map(\.name)
                return summary
            }
            // Left by a different merge, or its files changed: this part is written again.
            summary.merge.notes.append("replaced \(part.manifestName) and its files, which did not match this merge")
            FileSystem.unlinkFile(manifestPath)
        }
        if FileSystem.entryKind(folder) != .missing { FileSystem.removeTree(folder) }
        // The folder of shards, committed whole; then the manifest that vouches for it.
        // Other parts, perhaps on other machines, write into the staging folder meanwhile: only
        // this part's own leftovers are cleaned up.
        let out = try TemporaryOutput(target: folder, kind: .folder, ownLeftoversOnly: true)
        summary.merge.notes += out.notes
        var files: [PartManifest.File] = []
        do {
            var assembly = OutputAssembly(plan: self, output: output, options: options)
            assembly.hashing = true  // hashed on the way out: no second read of what was written
            let names = try assembly.writeShards(shards, into: out.temporaryPath, fileName: fileName)
            let merged = assembly.partSummary
            files = assembly.checksums.enumerated().map {
                PartManifest.File(name: names[$0.offset], bytes: $0.element.size, sha256: $0.element.digest)
            }
            if options.sync { FileSystem.syncDirectory(out.temporaryPath) }
            try out.commit()
            // The modules this part's tensors take updates from (an update placed on two shards counts in both parts).
            let partTensors = Set(shards.flatMap { base.files[$0].entries.map(\.name) })
            var partMerge = merged
            partMerge.modulesMerged = Set(changes.filter { partTensors.contains($0.key) }.flatMap { $0.value.moduleNames }).count
            partMerge.notes = summary.merge.notes + merged.notes
            summary.merge = partMerge
        } catch {
            out.discard()
            throw error
        }
        let manifest = PartManifest(part: part, digest: digest, files: files)
        try manifest.write(manifestPath, sync: options.sync)
        if options.sync { FileSystem.syncDirectory(staging) }
        summary.wrote = true
        summary.files = files.map(\.name)
        return summary
    }

    /// Checks that a complete set of parts of this plan is staged beside `output`, every file with
    /// its manifest's size and checksum, then writes OUT from them (the other files copied, the
    /// index written, fsync, the atomic rename) and removes the staging folder. Parts missing or
    /// not matching throw `PartsNotReady`, one line each, and nothing is written.
    public func finishParts(output: String, options: MergeRunOptions = MergeRunOptions()) throws -> (summary: MergeSummary, parts: Int) {
        try OutputRules.check(output, kind: base.isFolder ? .folder : .file, inputs: inputFiles, force: options.force)
        let digest = try planDigest()
        let staging = Self.stagingFolder(for: output)
        guard FileSystem.entryKind(staging) == .directory else {
            throw PartsNotReady(lines: ["\(staging): no parts are staged for \(output); run adapter merge --part I/N with the same inputs first"])
        }
        let manifests = try chooseParts(staging: staging, digest: digest)
        let count = manifests.count
        let assignment = shardAssignment(parts: count)
        var staged = [String](repeating: "", count: base.files.count)
        var problems: [String] = []
        var toCheck: [(part: MergePart, file: PartManifest.File, path: String)] = []
        for (manifest, index) in zip(manifests, 1...count) {
            let part = manifest.part
            let expected = assignment[index - 1].map { base.isFolder ? OutputAssembly.outputName(base.fileNames[$0], base.files[$0]) : lastPathComponent(output) }
            guard manifest.files.map(\.name) == expected else {
                problems.append("part \(part): its manifest lists \(manifest.files.map(\.name)) but this merge gives it \(expected); rerun adapter merge --part \(part)")
                continue
            }
            for (k, file) in manifest.files.enumerated() {
                let path = joinPath(joinPath(staging, part.folderName), file.name)
                staged[assignment[index - 1][k]] = path
                toCheck.append((part, file, path))
            }
        }
        // Every byte read back and hashed, on all cores (the progress bar, if any, counts them).
        let toHash = toCheck.reduce(0) { $0 + $1.file.bytes }
        var hashed: (@Sendable (Int) -> Void)? = nil
        if let bar = options.progress { hashed = { done in bar(done, toHash) } }
        let sums = try Self.checksums(toCheck.map(\.path), progress: hashed)
        for (k, item) in toCheck.enumerated() {
            guard let sum = sums[k] else {
                problems.append("part \(item.part): \(item.path) is missing; rerun adapter merge --part \(item.part)")
                continue
            }
            if sum.size != item.file.bytes {
                problems.append("part \(item.part): \(item.path) has \(sum.size) bytes, its manifest \(item.file.bytes); rerun adapter merge --part \(item.part)")
            } else if sum.digest != item.file.sha256 {
                problems.append("part \(item.part): \(item.path) does not match its SHA-256 (changed or damaged after the part was written); rerun adapter merge --part \(item.part)")
            }
        }
        if !problems.isEmpty { throw PartsNotReady(lines: problems) }
        var assembly = OutputAssembly(plan: self, output: output, options: options)
        let summary = try assembly.run(staged: staged)
        FileSystem.removeTree(staging)
        return (summary, count)
    }

    /// The complete set of this plan's manifests in `staging`, in part order (the split into the
    /// fewest parts, if several are complete: they hold the same bytes), or every reason there is none.
    private func chooseParts(staging: String, digest: String) throws -> [PartManifest] {
        var matching: [Int: [Int: PartManifest]] = [:]
        var foreign: [String] = []
        // Parts whose manifest is there but unusable: named once, by the line above, not again as missing.
        var reported = Set<MergePart>()
        for name in try FileSystem.contents(ofDirectory: staging).sorted() {
            guard let part = PartManifest.part(fromFileName: name) else { continue }
            let path = joinPath(staging, name)
            do {
                let manifest = try PartManifest.read(path)
                if manifest.part == part && manifest.digest == digest {
                    matching[part.count, default: [:]][part.index] = manifest
                    continue
                }
                foreign.append(manifest.part != part
                    ? "\(path): names part \(manifest.part), not \(part); rerun adapter merge --part \(part)"
                    : "part \(part): made from a different merge (another base, adapter, weight, option or version: its plan digest is \(manifest.digest.prefix(12))…, this merge's \(digest.prefix(12))…); rerun adapter merge --part \(part) with these inputs")
            } catch {
                foreign.append("\(path): not a part manifest (\(error)); rerun adapter merge --part \(part)")
            }
            reported.insert(part)
        }
        if let complete = matching.keys.sorted().first(where: { matching[$0]!.count == $0 }) {
            return (1...complete).map { matching[complete]![$0]! }
        }
        var lines = foreign
        // The split most parts were made for: its missing parts (those with a foreign manifest are named above).
        if let (count, present) = matching.max(by: { $0.value.count != $1.value.count ? $0.value.count < $1.value.count : $0.key > $1.key }) {
            for i in 1...count where present[i] == nil {
                let part = MergePart(index: i, count: count)!
                if !reported.contains(part) {
                    lines.append("part \(part) is missing (no \(joinPath(staging, part.manifestName))); run adapter merge --part \(part)")
                }
            }
        } else if lines.isEmpty {
            lines.append("\(staging): no finished part; run adapter merge --part I/N with the same inputs first")
        }
        throw PartsNotReady(lines: lines)
    }

    private static func makeStagingFolder(_ path: String) throws {
        switch FileSystem.entryKind(path) {
        case .directory: return
        case .missing:
            do { try FileSystem.makeDirectory(path) } catch where FileSystem.entryKind(path) == .directory {
                return  // another part made it meanwhile
            }
        default:
            throw InputError(path, "is in the way of the split merge's staging folder (not a folder); remove it")
        }
    }

    /// Size and SHA-256 of each file, several at once; nil for a file that is not there.
    static func checksums(_ paths: [String], progress: (@Sendable (Int) -> Void)? = nil) throws -> [(size: Int, digest: String)?] {
        let results = ChecksumResults(count: paths.count)
        // One read buffer per worker, reused from file to file.
        let workers = min(paths.count, max(1, ProcessInfo.processInfo.activeProcessorCount))
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 64)
            defer { buffer.deallocate() }
            while let k = results.claim() {
                if FileSystem.entryKind(paths[k]) != .file { continue }
                let r = Result { try SHA256.file(paths[k], buffer: buffer) }
                let done = results.set(k, r)
                progress?(done)
            }
        }
        return try results.values.map { try $0?.get() }
    }

}

private final class ChecksumResults: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var values: [Result<(size: Int, digest: String), Error>?]
    private var next = 0
    init(count: Int) { values = Array(repeating: nil, count: count) }
    /// The next file to hash, for whichever worker is free.
    func claim() -> Int? {
        lock.lock(); defer { lock.unlock() }
        guard next < values.count else { return nil }
        next += 1
        return next - 1
    }
    private var bytes = 0
    /// Records file k's result; returns the bytes hashed so far.
    func set(_ k: Int, _ r: Result<(size: Int, digest: String), Error>) -> Int {
        lock.lock(); defer { lock.unlock() }
        values[k] = r
        if case .success(let s) = r { bytes += s.size }
        return bytes
    }
}

/// A part's manifest: which part of which plan, and the size and SHA-256 of each file it wrote.
struct PartManifest {
    struct File: Equatable {
        let name: String
        let bytes: Int
        let sha256: String
    }

    static let format = "adapter-merge-part/1"
    let part: MergePart
    let digest: String
    let files: [File]

    /// The part a manifest's file name claims: `part-2-of-7.json`.
    static func part(fromFileName name: String) -> MergePart? {
        guard name.hasPrefix("part-"), name.hasSuffix(".json") else { return nil }
        let middle = name.dropFirst(5).dropLast(5)
        guard let of = middle.range(of: "-of-") else { return nil }
        let i = middle[..<of.lowerBound], n = middle[of.upperBound...]
        guard !i.isEmpty, !n.isEmpty, i.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), n.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let index = Int(i), let count = Int(n) else { return nil }
        return MergePart(index: index, count: count)
    }

    static func read(_ path: String) throws -> PartManifest {
        guard let root = try readJSONFile(path).objectValue, root["format"]?.stringValue == format,
              let index = root["part"]?.int, let count = root["parts"]?.int,
              let part = MergePart(index: index, count: count),
              let digest = root["plan_digest"]?.stringValue, case .array(let list)? = root["files"] else {
            throw InputError(path, "not a manifest of \(format)")
        }
        let files = try list.map { v -> File in
            guard let o = v.objectValue, let name = o["name"]?.stringValue, let bytes = o["bytes"]?.int,
                  let sum = o["sha256"]?.stringValue, !name.isEmpty, !name.split(separator: "/").contains("..") else {
                throw InputError(path, "a file entry is not {name, bytes, sha256}")
            }
            return File(name: name, bytes: bytes, sha256: sum)
        }
        return PartManifest(part: part, digest: digest, files: files)
    }

    /// Files in `folder` that are missing or differ from this manifest (every byte is hashed).
    func problems(in folder: String) -> [String] {
        let sums = (try? MergePlan.checksums(files.map { joinPath(folder, $0.name) })) ?? []
        guard sums.count == files.count else { return ["unreadable"] }
        return zip(files, sums).compactMap { f, s in s.map { $0.size == f.bytes && $0.digest == f.sha256 } == true ? nil : f.name }
    }

    func write(_ path: String, sync: Bool) throws {
        let root = JSONObject([
            ("format", .string(Self.format)),
            ("adapter_version", .string(AdapterVersion.string)),
            ("part", .integer(part.index)),
            ("parts", .integer(part.count)),
            ("plan_digest", .string(digest)),
            ("files", .array(files.map { .object(JSONObject([("name", .string($0.name)), ("bytes", .integer($0.bytes)), ("sha256", .string($0.sha256))])) })),
        ])
        let out = try TemporaryOutput(target: path, kind: .file, ownLeftoversOnly: true)
        do {
            try out.file!.writeAll(Array((JSONWriter.pretty(.object(root), indent: 2) + "\n").utf8))
            if sync { try out.file!.sync() }
            try out.commit(replacing: true)
        } catch {
            out.discard()
            throw error
        }
    }
}

