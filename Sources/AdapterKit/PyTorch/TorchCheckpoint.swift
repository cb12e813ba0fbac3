import Foundation

/// A PyTorch checkpoint written by `torch.save` (zip format): `adapter_model.bin`, `.pt`, `.pth`.
///
/// The pickle is interpreted, never executed: only the opcodes and globals that rebuild tensors and
/// ordered dicts are accepted. Tensors of nested dicts are named by their keys joined with dots; a
/// single wrapper entry such as `{"state_dict": {...}}` is unwrapped. Stored storages are read from a
/// memory map; strided views are made contiguous when read.
///
/// A deflated storage is inflated at most once while the tensors viewing it are read, only as far as
/// the furthest byte any of its views needs, and only the bytes some view touches are kept; it is freed
/// when every view has been read or released. A few bytes of file can declare gigabytes of storage, so
/// the cost of reading is bounded by what the tensors use, never by what the storage claims.
public final class TorchCheckpoint: TensorContainer {
    /// A tensor and the member holding its storage.
    struct Record: Sendable {
        let tensor: TorchTensorReference
        let member: ZipArchive.Entry
        let isContiguous: Bool
        /// The storage bytes the view touches, from its first element to just past its last (empty
        /// for a tensor without elements).
        let byteRange: Range<Int>
    }

    public let path: String
    /// The archive's top-level folder name (`archive`, or the file stem torch used), without the slash.
    public let archiveName: String
    public let entries: [TensorEntry]
    public var format: ContainerFormat { .pytorch }
    /// Wrapper key that was unwrapped (`state_dict`, `model`, ...), if any.
    public let unwrappedKey: String?
    let archive: ZipArchive
    private let records: [String: Record]
    private let lookup: [String: Int]
    private let inflatedStorages: InflatedStorages

    /// Wrapper keys training scripts put a state dict under.
    static let wrapperKeys: Set<String> = ["state_dict", "model_state_dict", "model", "module", "params"]
    /// torch writes a few KiB of pickle per thousand tensors; anything this large is not a checkpoint.
    static let maxPickleBytes = 256 << 20
    /// Bounds the walk over the pickled value (shared sub-objects could make it exponential).
    static let maxVisits = 10_000_000
    static let maxDepth = 200

    /// Opens and validates a checkpoint: the zip structure, the pickle and every tensor's extent.
    public init(path: String) throws {
        self.path = path
        let fd: FileDescriptor
        do { fd = try FileDescriptor.openForReading(path) } catch let e as SystemError { throw InputError(path, e.reason) }
        let kind = try TensorFileKind.detect(fd, size: try fd.status().size)
        let magic = try fd.readBytes(count: 4, at: 0)
        if kind == .legacyPickle {
            throw InputError(path, "legacy torch.save format (a bare pickle, before PyTorch 1.6) is not supported; load it in torch and save it again, or convert it to safetensors")
        }
        guard kind == .torchZip || (magic.count == 4 && magic[0] == 0x50 && magic[1] == 0x4b) else {
            throw InputError(path, "not a PyTorch checkpoint: the file is neither a zip archive nor a pickle")
        }
        let archive = try ZipArchive(path: path)
        self.archive = archive

        guard let first = archive.entries.first, let slash = first.name.firstIndex(of: "/") else {
            throw InputError(path, "the archive has no top-level folder; torch.save puts every member under one")
        }
        let name = String(first.name[..<slash])
        let prefix = name + "/"
        self.archiveName = name
        if let stray = archive.entries.first(where: { !$0.name.hasPrefix(prefix) }) {
            throw InputError(path, "member \(quotedForMessage(stray.name)) is outside the archive folder \(quotedForMessage(prefix))")
        }
        if archive.entry(named: prefix + "constants.pkl") != nil || archive.entries.contains(where: { $0.name.hasPrefix(prefix + "code/") }) {
            throw InputError(path, "a TorchScript archive (torch.jit.save) is not supported: it holds a program, not a state dict; load it in torch and torch.save its state_dict()")
        }
        if let order = archive.entry(named: prefix + "byteorder") {
            let text = String(decoding: try archive.contents(of: order, limit: 64), as: UTF8.self)
            switch text {
            case "little": break
            case "big": throw InputError(path, "big-endian checkpoints are not supported (byteorder is \"big\")")
            default: throw InputError(path, "unknown byte order \(quotedForMessage(String(text.prefix(16)))) in \(quotedForMessage(prefix + "byteorder"))")
            }
        }
        guard let pickleEntry = archive.entry(named: prefix + "data.pkl") else {
            throw InputError(path, "no \(prefix)data.pkl member: not a torch.save checkpoint")
        }
        let pickle = try archive.contents(of: pickleEntry, limit: Self.maxPickleBytes)
        var machine = PickleMachine(pickle)
        defer { machine.breakCycles() }
        let root: PickleValue
        do { root = try machine.run() } catch { throw InputError(path, "\(prefix)data.pkl: \(error.description)") }

        let (found, wrapper) = try Self.collectTensors(root, path: path, pickleBytes: pickle.count)
        self.unwrappedKey = wrapper
        var records: [String: Record] = [:]
        var infos: [TensorEntry] = []
        var lookup: [String: Int] = [:]
        var total = 0  // the sum of the tensors' sizes, which must fit in an Int
        var spans: [String: InflatedStorages.Span] = [:]
        for (tensorName, t) in found {
            guard records[tensorName] == nil else { throw InputError(path, "tensor name \(quotedForMessage(tensorName)) occurs twice after joining nested keys") }
            let record = try Self.validate(t, name: tensorName, archive: archive, prefix: prefix, path: path)
            let bytes = try Self.byteCount(t, name: tensorName, path: path)
            guard let end = total.addingReportingOverflowChecked(bytes) else { throw InputError(path, "tensor sizes overflow") }
            lookup[tensorName] = infos.count
            infos.append(TensorEntry(name: tensorName, shape: t.shape, encoding: .plain(t.dtype), byteCount: bytes))
            records[tensorName] = record
            total = end
            if record.member.method == .deflated, bytes > 0 {
                spans[record.member.name, default: InflatedStorages.Span(member: record.member)].add(record.byteRange, viewer: tensorName)
            }
        }
        self.records = records
        self.entries = infos
        self.lookup = lookup
        self.inflatedStorages = InflatedStorages(archive: archive, spans: spans)
    }

    /// Bytes inflated from deflated members so far (kept or passed over): the cost of what was read.
    public var inflatedByteCount: Int { archive.inflatedByteCount }

    /// Whether inflated storage bytes are held now (views of them not yet all read or released).
    var inflatedStoragesHeld: Bool { inflatedStorages.holdsAny }
    /// How many inflated storage bytes are held now.
    var inflatedBytesHeld: Int { inflatedStorages.heldBytes }

    public var metadataPairs: [(key: String, value: String)] { [] }
    /// What torch's own safetensors export (`save_file(state_dict, …, metadata={"format": "pt"})`) writes.
    public var metadataForSafetensors: [(key: String, value: String)]? { [("format", "pt")] }

    public func entry(_ name: String) -> TensorEntry? {
        lookup[name].map { entries[$0] }
    }

    /// Stored members are checked (CRC) as they are read, and views may be strided: bytes come
    /// through `withBytes` only.
    public func region(of name: String) -> FileRegion? { nil }

    /// Calls `body` with the tensor's little-endian, row-major bytes: the storage slice when the tensor is
    /// contiguous (mapped when stored, inflated once when deflated), otherwise a buffer the elements are
    /// gathered into.
    public func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let r = records[name], let info = entry(name) else {
            throw TensorReadError(file: path, tensor: name, problem: "no such tensor")
        }
        if info.byteCount == 0 { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        // `storage` holds the storage's bytes from `first` on.
        func view(_ storage: UnsafeRawBufferPointer, first: Int) throws -> R {
            let start = r.byteRange.lowerBound - first
            if r.isContiguous {
                return try body(UnsafeRawBufferPointer(rebasing: storage[start..<(start + info.byteCount)]))
            }
            let out = UnsafeMutableRawBufferPointer.allocate(byteCount: info.byteCount, alignment: 64)
            defer { out.deallocate() }
            Self.gather(storage, first: first, r.tensor, into: out)
            return try body(UnsafeRawBufferPointer(out))
        }
        switch r.member.method {
        case .stored:
            return try archive.withContents(of: r.member) { try view($0, first: 0) }
        case .deflated:
            return try inflatedStorages.withStorage(r.member.name, viewer: name, range: r.byteRange) { try view($0, first: $1) }
        }
    }

    public func release(_ name: String) {
        guard let r = records[name] else { return }
        switch r.member.method {
        case .stored: archive.release(r.member)
        case .deflated: inflatedStorages.done(r.member.name, viewer: name)
        }
    }

    // MARK: - Walking the pickled value

    /// Tensors in the order the pickle lists them, and the wrapper key that was removed, if any.
    ///
    /// The walk's budgets grow with the pickle's size: a sub-object referenced twice at each of 30
    /// levels makes 2^30 paths, so a few hundred bytes could otherwise name millions of tensors.
    static func collectTensors(_ root: PickleValue, path: String, pickleBytes: Int) throws -> ([(String, TorchTensorReference)], String?) {
        guard case .dict(let top) = root else {
            throw InputError(path, "the checkpoint holds a \(root.kindName), not a dict of tensors")
        }
        let bytes = min(max(pickleBytes, 0), maxPickleBytes)
        var walker = Walker(path: path, maxVisits: min(maxVisits, 4 * bytes + 1024),
                            maxTotalNameBytes: min(Walker.maxTotalNameBytes, 16 * bytes + (1 << 20)))
        var perKey: [(key: String, value: PickleValue, tensors: [(String, TorchTensorReference)])] = []
        for (k, v) in top.items {
            let key = try walker.keyString(k)
            walker.found = []
            walker.components = [key]
            try walker.walk(v, depth: 1)
            perKey.append((key, v, walker.found))
        }
        let holding = perKey.filter { !$0.tensors.isEmpty }
        if holding.count == 1, let only = holding.first, wrapperKeys.contains(only.key), case .dict = only.value {
            let cut = only.key.count + 1
            return (only.tensors.map { (String($0.0.dropFirst(cut)), $0.1) }, only.key)
        }
        return (perKey.flatMap(\.tensors), nil)
    }

    /// A depth-first walk that names tensors by their keys joined with dots, within fixed budgets.
    private struct Walker {
        static let maxNameBytes = 64 << 10
        static let maxTotalNameBytes = 256 << 20
        let path: String
        /// Nodes a walk may visit and name bytes it may make, for this pickle.
        let maxVisits: Int
        let maxTotalNameBytes: Int
        var components: [String] = []
        var found: [(String, TorchTensorReference)] = []
        var visits = 0
        var nameBytes = 0

        func keyString(_ k: PickleValue) throws -> String {
            switch k {
            case .string(let s):
                guard s.utf8.count <= Self.maxNameBytes else { throw InputError(path, "a dict key is longer than \(Self.maxNameBytes) bytes") }
                return s
            case .int(let i): return String(i)
            default: throw InputError(path, "a dict key is a \(k.kindName), not a string")
            }
        }

        mutating func walk(_ v: PickleValue, depth: Int) throws {
            visits += 1
            guard visits <= maxVisits else {
                throw InputError(path, "the pickled value is too large to walk (more than \(maxVisits) nodes for a pickle of its size; shared sub-objects repeated)")
            }
            guard depth <= maxDepth else { throw InputError(path, "the pickled value nests deeper than \(maxDepth) levels") }
            switch v {
            case .tensor(let t):
                let name = components.joined(separator: ".")
                nameBytes += name.utf8.count
                guard name.utf8.count <= Self.maxNameBytes, nameBytes <= maxTotalNameBytes else {
                    throw InputError(path, "tensor names are too long (a name over \(Self.maxNameBytes) bytes, or \(maxTotalNameBytes) in all)")
                }
                found.append((name, t))
            case .dict(let d):
                for (k, child) in d.items { try descend(child, keyString(k), depth) }
            case .list(let l):
                for (i, child) in l.items.enumerated() { try descend(child, String(i), depth) }
            case .tuple(let items, _):
                for (i, child) in items.enumerated() { try descend(child, String(i), depth) }
            default:
                break // numbers, strings and the like are training state, not tensors
            }
        }

        private mutating func descend(_ child: PickleValue, _ component: String, _ depth: Int) throws {
            components.append(component)
            defer { components.removeLast() }
            try walk(child, depth: depth + 1)
        }
    }

    // MARK: - Checking tensors against their storages

    private static func byteCount(_ t: TorchTensorReference, name: String, path: String) throws -> Int {
        var n = t.dtype.byteSize
        for d in t.shape {
            guard let m = n.multipliedReportingOverflowChecked(d) else {
                throw InputError(path, "tensor \(quotedForMessage(name)): shape \(t.shape) overflows the size computation")
            }
            n = m
        }
        return n
    }

    private static func validate(_ t: TorchTensorReference, name: String, archive: ZipArchive, prefix: String,
                                 path: String) throws -> Record {
        func problem(_ s: String) -> InputError { InputError(path, "tensor \(quotedForMessage(name)): " + s) }
        guard t.dtype.bits % 8 == 0 else { throw problem("dtype \(t.dtype.rawValue) is not byte-sized") }
        let memberName = prefix + "data/" + t.storage.key
        guard let member = archive.entry(named: memberName) else {
            throw problem("its storage \(quotedForMessage(t.storage.key)) has no member \(quotedForMessage(memberName))")
        }
        let itemSize: Int
        switch t.storage.kind {
        case .typed(let d): itemSize = d.byteSize
        case .untyped: itemSize = 1
        }
        guard let declared = t.storage.count.multipliedReportingOverflowChecked(itemSize), declared == member.uncompressedSize else {
            throw problem("storage \(quotedForMessage(t.storage.key)) holds \(member.uncompressedSize) bytes but the pickle declares \(t.storage.count) elements of \(itemSize) bytes")
        }
        let elements = try byteCount(t, name: name, path: path) / max(t.dtype.byteSize, 1)
        // More elements than the storage holds means the view repeats elements (a zero or overlapping
        // stride): a few hundred bytes could then declare gigabytes to gather and write.
        guard elements <= member.uncompressedSize / max(t.dtype.byteSize, 1) else {
            throw problem("its view (shape \(t.shape), stride \(t.stride)) repeats elements of its \(member.uncompressedSize)-byte storage (a zero or overlapping stride); save a contiguous copy (.contiguous()) instead")
        }
        var contiguous = true
        var byteRange = 0..<0
        if elements > 0 {
            // The last element the view touches must lie inside the storage.
            var last = t.storageOffset
            var expected = 1
            for (size, stride) in zip(t.shape, t.stride).reversed() {
                guard let step = (size - 1).multipliedReportingOverflowChecked(stride),
                      let sum = last.addingReportingOverflowChecked(step) else { throw problem("its strides overflow") }
                last = sum
                if size != 1 && stride != expected { contiguous = false }
                if let e = expected.multipliedReportingOverflowChecked(size) { expected = e }
            }
            guard let endElement = last.addingReportingOverflowChecked(1),
                  let endByte = endElement.multipliedReportingOverflowChecked(t.dtype.byteSize),
                  endByte <= member.uncompressedSize else {
                throw problem("its view (offset \(t.storageOffset), shape \(t.shape), stride \(t.stride)) reaches past the \(member.uncompressedSize)-byte storage")
            }
            // Strides are never negative, so the first element is the lowest.
            byteRange = (t.storageOffset * t.dtype.byteSize)..<endByte
        }
        return Record(tensor: t, member: member, isContiguous: contiguous, byteRange: byteRange)
    }

    /// Copies a strided view into row-major order; `storage` holds the storage's bytes from byte `first`
    /// on, and the view was checked to lie inside it.
    static func gather(_ storage: UnsafeRawBufferPointer, first: Int, _ t: TorchTensorReference, into out: UnsafeMutableRawBufferPointer) {
        guard let base = storage.baseAddress, let dst = out.baseAddress else { return }
        let item = t.dtype.byteSize
        let dims = t.shape.count
        var index = [Int](repeating: 0, count: dims)
        var source = t.storageOffset
        var written = 0
        while written < out.count {
            (dst + written).copyMemory(from: base + (source * item - first), byteCount: item)
            written += item
            // Odometer step over the multi-index, moving the source offset by the strides.
            var d = dims - 1
            while d >= 0 {
                index[d] += 1
                source += t.stride[d]
                if index[d] < t.shape[d] { break }
                source -= t.stride[d] * t.shape[d]
                index[d] = 0
                d -= 1
            }
        }
    }
}

/// The deflated storages of a checkpoint, each inflated once on first use, as far as the furthest
/// byte its views need, keeping only the bytes some view touches; freed when every view has been read
/// or released.
final class InflatedStorages: @unchecked Sendable {
    /// What the views of one deflated storage need of it.
    struct Span {
        let member: ZipArchive.Entry
        /// Each view's bytes, from its first element to just past its last.
        var ranges: [Range<Int>] = []
        var viewers: Set<String> = []

        init(member: ZipArchive.Entry) { self.member = member }

        mutating func add(_ range: Range<Int>, viewer: String) {
            ranges.append(range)
            viewers.insert(viewer)
        }
    }

    private struct Slot {
        let member: ZipArchive.Entry
        /// The bytes kept: the views' ranges sorted and merged where they overlap or touch.
        let intervals: [Range<Int>]
        /// Where each interval starts in the buffer.
        let offsets: [Int]
        var buffer: UnsafeMutableRawBufferPointer?
        /// Views not yet read or released: the buffer is kept until there are none.
        var pending: Set<String>
        /// Reads in progress.
        var users = 0

        init(_ span: Span) {
            member = span.member
            var merged: [Range<Int>] = []
            for r in span.ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
                if let last = merged.last, r.lowerBound <= last.upperBound {
                    merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                } else {
                    merged.append(r)
                }
            }
            intervals = merged
            var at = 0
            offsets = merged.map { r in defer { at += r.count }; return at }
            pending = span.viewers
        }

        /// The interval holding `range` (each view's range lies inside one).
        func interval(holding range: Range<Int>) -> Int {
            var lo = 0, hi = intervals.count - 1
            while lo < hi {
                let mid = (lo + hi + 1) / 2
                if intervals[mid].lowerBound <= range.lowerBound { lo = mid } else { hi = mid - 1 }
            }
            return lo
        }
    }

    private let archive: ZipArchive
    private let lock = NSLock()
    private var slots: [String: Slot]

    init(archive: ZipArchive, spans: [String: Span]) {
        self.archive = archive
        slots = spans.mapValues { Slot($0) }
    }

    deinit {
        for slot in slots.values { slot.buffer?.deallocate() }
    }

    /// Calls `body` with the kept bytes around the view's `range` and the storage offset of their first byte.
    func withStorage<R>(_ member: String, viewer: String, range: Range<Int>, _ body: (UnsafeRawBufferPointer, Int) throws -> R) throws -> R {
        lock.lock()
        guard var slot = slots[member], !slot.intervals.isEmpty else {
            lock.unlock()
            preconditionFailure("a deflated storage without views was read")
        }
        let buffer: UnsafeMutableRawBufferPointer
        if let b = slot.buffer {
            buffer = b
        } else {
            // Inflated under the lock: a second reader of the same storage waits for it instead of inflating it again.
            do { buffer = try archive.inflate(slot.member, keeping: slot.intervals) } catch {
                lock.unlock()
                throw error
            }
            slot.buffer = buffer
        }
        slot.users += 1
        slots[member] = slot
        lock.unlock()
        defer { finish(member, viewer: viewer, reading: true) }
        let k = slot.interval(holding: range)
        let kept = UnsafeRawBufferPointer(rebasing: buffer[slot.offsets[k]..<(slot.offsets[k] + slot.intervals[k].count)])
        return try body(kept, slot.intervals[k].lowerBound)
    }

    /// The view will not be read again (a caller's `release`).
    func done(_ member: String, viewer: String) {
        finish(member, viewer: viewer, reading: false)
    }

    private func finish(_ member: String, viewer: String, reading: Bool) {
        lock.lock()
        defer { lock.unlock() }
        guard var slot = slots[member] else { return }
        if reading { slot.users -= 1 }
        slot.pending.remove(viewer)
        if slot.pending.isEmpty, slot.users == 0, let b = slot.buffer {
            b.deallocate()
            slot.buffer = nil
        }
        slots[member] = slot
    }

    /// Whether any storage's inflated bytes are held now.
    var holdsAny: Bool {
        lock.lock()
        defer { lock.unlock() }
        return slots.values.contains { $0.buffer != nil }
    }

    /// Bytes of inflated storage held now.
    var heldBytes: Int {
        lock.lock()
        defer { lock.unlock() }
        return slots.values.reduce(0) { $0 + ($1.buffer?.count ?? 0) }
    }
}
