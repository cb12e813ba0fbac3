import Foundation

/// What an output is: one file, or a folder of files.
public enum OutputKind: Sendable, Equatable {
    case file
    case folder
}

/// Output that appears at its final path only when complete.
///
/// Everything is written under a temporary name beside the target (same folder, so the final
/// rename is atomic). The temporary is registered so that an error or a signal removes it, and
/// flock'd for as long as it exists, so that another run's cleanup of temporaries left by killed
/// processes never takes it for one.
///
/// The commit protocol (`commit`) runs on the calling thread and owns every rename and unlink
/// from its start: a signal during it is only recorded, and the commit then either stops before
/// anything at the target was touched or finishes. So the target always holds the complete old
/// output or the complete new one, whatever instruction the signal lands on.
public final class TemporaryOutput: @unchecked Sendable {
    /// The final path.
    public let target: String
    /// Where the output is built.
    public let temporaryPath: String
    public let kind: OutputKind
    /// For a file output: the temporary file, created and open for writing.
    public let file: FileDescriptor?
    /// One line about temporaries of killed runs removed from the folder, if there were any.
    public let notes: [String]
    /// Holds the flock on the temporary for as long as it exists.
    private let lock: FileDescriptor
    private var finished = false

    /// Removes temporaries that killed runs left beside `target`, then creates the temporary: an
    /// empty file (open in `file`) or an empty folder, locked.
    ///
    /// With `ownLeftoversOnly`, only leftovers of this same target are removed: in a folder that
    /// other machines write into at the same time (a split merge's staging folder on a shared
    /// filesystem), a process id says nothing about another machine's process, and flock may be
    /// local to each machine, so another target's temporary is never taken for a leftover.
    public init(target: String, kind: OutputKind, ownLeftoversOnly: Bool = false) throws {
        self.target = target
        self.kind = kind
        let folder = parentPath(target)
        notes = StaleTemporaries.removeLeftovers(in: folder, of: ownLeftoversOnly ? lastPathComponent(target) : nil)
        let path = joinPath(folder, TemporaryName.make(for: lastPathComponent(target)))
        temporaryPath = path
        let registry = TemporaryOutputRegistry.shared
        // Registered before it exists: a signal right after it is created still removes it.
        registry.register(path)
        do {
            switch kind {
            case .file:
                let fd = try FileDescriptor.createExclusive(path)
                file = fd
                lock = fd
            case .folder:
                try FileSystem.makeDirectory(path)
                file = nil
                do { lock = try FileDescriptor.openForLocking(path) } catch {
                    registry.remove(path)
                    throw error
                }
            }
        } catch {
            registry.forget(path)
            throw error
        }
        _ = lock.tryLock()  // best effort: without flock, the owner's pid alone protects it
    }

    deinit {
        if !finished { discard() }
    }

    /// Moves the finished output into place.
    ///
    /// Without `replacing`, the rename fails if anything appeared at the target meanwhile
    /// (`renameat2(RENAME_NOREPLACE)`; a hard link for files, or a plain rename for folders,
    /// which cannot replace a non-empty folder or a file, where it is missing). With `replacing`,
    /// an existing target is swapped with the new output atomically (`renameat2(RENAME_EXCHANGE)`),
    /// or, where the file system lacks that, a file is renamed over it and a folder is moved
    /// aside first; the old output is removed only once the new one is in place.
    ///
    /// A signal received during the commit makes it throw `OutputInterrupted` once the target is
    /// consistent: before the replace, the new output is removed and the old one stays; after it,
    /// the old one is removed and the new one stays.
    public func commit(replacing: Bool = false) throws {
        precondition(!finished, "commit after commit or discard")
        let registry = TemporaryOutputRegistry.shared
        registry.beginCommit()
        do {
            try registry.throwIfInterrupted(outputComplete: false)
            TestHook.phase("before-replace")
            try registry.throwIfInterrupted(outputComplete: false)
            if replacing && FileSystem.entryKind(target) != .missing {
                try replace()
            } else {
                try placeNew()
            }
        } catch {
            // Nothing at the target was changed (or it was put back): the new output goes.
            FileSystem.removeTree(temporaryPath)
            finished = true
            let signal = registry.endCommit(placed: nil, removing: temporaryPath)
            if let signal { throw OutputInterrupted(signal: signal, outputComplete: false) }
            throw error
        }
        finished = true
        FileSystem.syncDirectory(parentPath(target))
        TestHook.phase("committed")
        if let signal = registry.endCommit(placed: target, removing: temporaryPath) {
            throw OutputInterrupted(signal: signal, outputComplete: true)
        }
    }

    /// The new output onto a target that is not there: never replaces anything that appeared.
    private func placeNew() throws {
        switch FileSystem.renameNoReplace(temporaryPath, to: target) {
        case .done: return
        case .failed(let e): throw placementError(e)
        case .unsupported: break
        }
        switch kind {
        case .file:
            // A second name fails if anything is at the target; then the temporary name goes.
            switch FileSystem.hardLink(temporaryPath, to: target) {
            case .done:
                FileSystem.unlinkFile(temporaryPath)
            case .failed(let e):
                throw placementError(e)
            case .unsupported:
                throw InputError(target, "cannot move the output into place without risking replacing a file that appears there meanwhile: this file system has neither renameat2(RENAME_NOREPLACE) nor hard links; nothing was written")
            }
        case .folder:
            // rename(2) of a folder replaces only a missing path or an empty folder: a file or a
            // non-empty folder that appeared makes it fail (ENOTDIR, ENOTEMPTY, EEXIST).
            if case .failed(let e) = FileSystem.renameReplacing(temporaryPath, to: target) { throw placementError(e) }
        }
    }

    private func placementError(_ code: Int32) -> Error {
        switch code {
        case EEXIST, ENOTEMPTY, ENOTDIR, EISDIR:
            return InputError(target, "appeared while writing; nothing was replaced")
        default:
            return SystemError(path: target, operation: "rename", code: code)
        }
    }

    /// The new output over an existing target; the old one is removed once the new one is in place.
    private func replace() throws {
        // Checked before the run began; checked again here, in case it changed meanwhile.
        if let refusal = OutputRules.replaceRefusal(target, kind: kind) {
            throw InputError(target, refusal + "; nothing was replaced")
        }
        // The old output is locked too while it sits under the temporary name.
        let oldLock = try? FileDescriptor.openForLocking(target)
        _ = oldLock?.tryLock()
        switch FileSystem.exchange(temporaryPath, target) {
        case .done:
            // The target is the new output and the temporary name holds the old one. From here on
            // the commit only goes forward.
            TestHook.phase("exchanged")
            removeOld(temporaryPath)
            return
        case .failed(ENOENT) where FileSystem.entryKind(target) == .missing:
            try placeNew()  // it went away meanwhile
            return
        case .failed(let e):
            throw SystemError(path: target, operation: "exchange with the new output", code: e)
        case .unsupported:
            break
        }
        let oldKind = FileSystem.entryKind(target)
        if kind == .file && oldKind != .directory {
            // rename(2) replaces a file or a link atomically.
            if case .failed(let e) = FileSystem.renameReplacing(temporaryPath, to: target) {
                throw SystemError(path: target, operation: "rename", code: e)
            }
            return
        }
        // A folder cannot be renamed over a non-empty folder: move the old one aside first. Only
        // an uncatchable signal can stop the run between the two renames; the old output then
        // stays at the `.old` name, and the next run writing into this folder puts it back.
        let aside = temporaryPath + ".old"
        if case .failed(let e) = FileSystem.renameReplacing(target, to: aside) {
            throw SystemError(path: target, operation: "move aside", code: e)
        }
        TestHook.phase("moved-aside")
        if case .failed(let e) = FileSystem.renameReplacing(temporaryPath, to: target) {
            if case .failed = FileSystem.renameReplacing(aside, to: target) {
                throw SystemError(path: target, operation: "rename (the previous output is at \(aside))", code: e)
            }
            throw SystemError(path: target, operation: "rename", code: e)
        }
        removeOld(aside)
    }

    private func removeOld(_ path: String) {
        TestHook.phase("before-remove-old")
        FileSystem.removeTree(path)
    }

    /// Removes whatever was written. Nothing once committed.
    public func discard() {
        guard !finished else { return }
        finished = true
        TemporaryOutputRegistry.shared.remove(temporaryPath)
    }
}

/// A signal arrived while an output was being moved into place; the target is consistent.
public struct OutputInterrupted: Error, Sendable, CustomStringConvertible {
    public let signal: Int32
    /// Whether the new output is in place (otherwise the previous state is).
    public let outputComplete: Bool

    public var message: String {
        outputComplete ? "interrupted after the output was complete" : "interrupted; nothing was written"
    }

    public var description: String { message }
}

/// The temporaries in flight and the state of commits, shared with the signal handler.
///
/// While no commit is running, nothing at any target has been touched, so a signal removes the
/// temporaries itself and ends the process. While a commit runs, the signal is only recorded; the
/// committing thread acts on it as soon as the target is consistent.
public final class TemporaryOutputRegistry: @unchecked Sendable {
    public static let shared = TemporaryOutputRegistry()
    private let lock = NSLock()
    private var paths: Set<String> = []
    private var commitsRunning = 0
    private var pendingSignal: Int32?
    private var committedOutputs = 0

    func register(_ path: String) {
        lock.lock(); defer { lock.unlock() }
        paths.insert(path)
    }

    func forget(_ path: String) {
        lock.lock(); defer { lock.unlock() }
        paths.remove(path)
    }

    /// Removes one temporary and forgets it, serialised with a signal's cleanup.
    func remove(_ path: String) {
        lock.lock(); defer { lock.unlock() }
        FileSystem.removeTree(path)
        paths.remove(path)
    }

    /// From now on a signal is recorded, not acted on: the caller owns every rename and unlink.
    func beginCommit() {
        lock.lock(); defer { lock.unlock() }
        commitsRunning += 1
    }

    /// Ends a commit: `removing` is forgotten (it is gone or was renamed into place), `placed`
    /// counts as written. Returns the signal received meanwhile, if any.
    func endCommit(placed: String?, removing: String) -> Int32? {
        lock.lock(); defer { lock.unlock() }
        commitsRunning -= 1
        paths.remove(removing)
        if placed != nil { committedOutputs += 1 }
        return pendingSignal
    }

    func throwIfInterrupted(outputComplete: Bool) throws {
        lock.lock(); defer { lock.unlock() }
        if let signal = pendingSignal { throw OutputInterrupted(signal: signal, outputComplete: outputComplete) }
    }

    /// Whether a signal waits for a commit to reach a consistent state (the test hook stops
    /// pausing then).
    var hasPendingSignal: Bool {
        lock.lock(); defer { lock.unlock() }
        return pendingSignal != nil
    }

    /// Whether some output was already renamed into place (a signal after that must not claim
    /// that nothing was written).
    public var hasCommitted: Bool {
        lock.lock(); defer { lock.unlock() }
        return committedOutputs > 0
    }

    /// Called for SIGINT, SIGTERM and SIGHUP on the signal-handling thread. During a commit it only
    /// records the signal. Otherwise it removes every temporary, reports, and ends the process
    /// with status 128 + `signal`, holding the lock, so that no commit can begin meanwhile.
    public func interrupt(_ signal: Int32, report: (String) -> Void) {
        lock.lock()
        if commitsRunning > 0 {
            pendingSignal = signal
            lock.unlock()
            return
        }
        removeAllLocked()
        report(OutputInterrupted(signal: signal, outputComplete: committedOutputs > 0).message)
        FileSystem.exitImmediately(128 + signal)
    }

    /// Removes every registered temporary (after an error, before reporting it).
    public func removeAll() {
        lock.lock(); defer { lock.unlock() }
        removeAllLocked()
    }

    private func removeAllLocked() {
        for p in paths {
            // Moved aside first, atomically: a thread still writing into the temporary then gets
            // ENOENT for any new file instead of adding it to a tree being removed (which would stay).
            let aside = p + ".removing"
            if case .done = FileSystem.renameReplacing(p, to: aside) {
                FileSystem.removeTree(aside)
            } else {
                FileSystem.removeTree(p)
            }
        }
        paths.removeAll()
    }
}

/// Names of temporaries: `.NAME.adapter-tmp-PID-RANDOM`, plus `-HASH` when NAME had to be
/// shortened to keep the name, with any suffix this code adds (`.old`, `.removing`), within
/// NAME_MAX (255 bytes).
enum TemporaryName {
    static let marker = ".adapter-tmp-"
    static let nameMax = 255
    static let suffixes = [".removing", ".old"]
    static let longestSuffix = suffixes.map(\.utf8.count).max()!

    static func make(for name: String, pid: Int32 = FileSystem.processID, random: UInt32 = .random(in: 0...UInt32.max)) -> String {
        let tail = marker + "\(pid)-" + hexDigits(random)
        let budget = nameMax - longestSuffix - 1 - tail.utf8.count
        if name.utf8.count <= budget { return "." + name + tail }
        // Shortened at a character boundary; the hash of the whole name tells the long names apart.
        let hash = "-" + hexDigits(fnv1a(Array(name.utf8)))
        var prefix = ""
        var bytes = 0
        for scalar in name.unicodeScalars {
            let n = String(scalar).utf8.count
            if bytes + n > budget - hash.utf8.count { break }
            prefix.unicodeScalars.append(scalar)
            bytes += n
        }
        return "." + prefix + tail + hash
    }

    /// A temporary's owner and what NAME was, when `entry` is one of these names.
    struct Parsed: Equatable {
        var pid: Int32
        /// The target's name when it was not shortened.
        var targetName: String?
        /// `.old`, `.removing` or empty.
        var suffix: String
    }

    static func parse(_ entry: String) -> Parsed? {
        guard entry.hasPrefix("."), let range = entry.range(of: marker, options: .backwards) else { return nil }
        let stem = String(entry[entry.index(after: entry.startIndex)..<range.lowerBound])
        var rest = String(entry[range.upperBound...])
        var suffix = ""
        for s in suffixes where rest.hasSuffix(s) {
            suffix = s
            rest.removeLast(s.count)
        }
        let parts = rest.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3, !stem.isEmpty,
              let pid = Int32(parts[0]), pid > 0, parts[0].allSatisfy(\.isASCII),
              parts.dropFirst().allSatisfy({ $0.count == 8 && $0.allSatisfy(\.isHexDigit) }) else { return nil }
        return Parsed(pid: pid, targetName: parts.count == 2 ? stem : nil, suffix: suffix)
    }

    static func fnv1a(_ bytes: [UInt8]) -> UInt32 {
        var h: UInt32 = 0x811C_9DC5
        for b in bytes { h = (h ^ UInt32(b)) &* 0x0100_0193 }
        return h
    }
}

/// Temporaries that a killed run (SIGKILL, a crash, a power cut) left behind.
enum StaleTemporaries {
    /// Removes from `folder` every temporary whose process is gone and which no live process
    /// holds locked; a previous output moved aside by a run killed before the new one was in
    /// place is put back instead. Returns one line saying what was done, or nothing.
    static func removeLeftovers(in folder: String, of target: String? = nil) -> [String] {
        guard let names = try? FileSystem.contents(ofDirectory: folder) else { return [] }
        var removed: [String] = []
        var bytes = 0
        var restored: [String] = []
        var kept: [String] = []
        var owners = Set<Int32>()
        for name in names {
            guard let parsed = TemporaryName.parse(name), parsed.pid != FileSystem.processID,
                  target == nil || parsed.targetName == target,
                  FileSystem.processIsGone(parsed.pid) else { continue }
            let path = joinPath(folder, name)
            // A live process with this temporary open and locked (its pid seen from another pid
            // namespace, say) keeps it. A symbolic link cannot be locked and holds no data.
            let lock = try? FileDescriptor.openForLocking(path)
            if let lock {
                guard lock.tryLock() else { continue }
            } else if FileSystem.entryKind(path) != .symbolicLink {
                continue
            }
            if parsed.suffix == ".old" {
                // A previous output moved aside by a run killed before the new one was in place:
                // put back where it was if that place is still free, never removed.
                if let targetName = parsed.targetName, putBack(path, to: joinPath(folder, targetName)) {
                    restored.append(targetName)
                } else {
                    kept.append(name)
                }
                owners.insert(parsed.pid)
                continue
            }
            let size = FileSystem.treeSize(path)
            FileSystem.removeTree(path)
            guard FileSystem.entryKind(path) == .missing else { continue }
            removed.append(name)
            bytes += size
            owners.insert(parsed.pid)
        }
        guard !removed.isEmpty || !restored.isEmpty || !kept.isEmpty else { return [] }
        var parts: [String] = []
        if !removed.isEmpty {
            parts.append("removed \(removed.count == 1 ? removed[0] : "\(removed.count) temporaries (\(removed.joined(separator: ", ")))") (\(formatBytes(bytes, exact: false)))")
        }
        if !restored.isEmpty {
            parts.append("put back the previous output\(restored.count == 1 ? "" : "s") \(restored.joined(separator: ", ")), moved aside")
        }
        if !kept.isEmpty {
            parts.append("kept \(kept.joined(separator: ", ")), a previous output moved aside whose place is taken (rename it back or remove it yourself)")
        }
        let pids = owners.sorted().map(String.init).joined(separator: ", ")
        return [parts.joined(separator: "; ") + "; left by \(owners.count == 1 ? "process \(pids), which is" : "processes \(pids), which are") no longer running"]
    }

    /// Renames a moved-aside output back to `target` only if nothing is there.
    private static func putBack(_ path: String, to target: String) -> Bool {
        guard FileSystem.entryKind(target) == .missing else { return false }
        switch FileSystem.renameNoReplace(path, to: target) {
        case .done: return true
        case .failed: return false
        case .unsupported: break
        }
        switch FileSystem.entryKind(path) {
        case .directory:
            // rename(2) of a folder replaces nothing but an empty folder.
            return FileSystem.renameReplacing(path, to: target) == .done
        case .file:
            guard FileSystem.hardLink(path, to: target) == .done else { return false }
            FileSystem.unlinkFile(path)
            return true
        default:
            return false
        }
    }
}
