import Foundation

/// What an output is: one file, or a folder of files.
public enum OutputKind: Sendable, Equatable {
    case file
    case folder
}

/// Output that appears at its final path only when complete.
///
/// Everything is written under a temporary name beside the target (same folder, so the final
/// rename is atomic); the temporaries are registered so that an error or a signal removes them.
public final class TemporaryOutput: @unchecked Sendable {
    /// The final path.
    public let target: String
    /// Where the output is built.
    public let temporaryPath: String
    public let kind: OutputKind
    /// For a file output: the temporary file, created and open for writing.
    public let file: FileDescriptor?
    private var committed = false

    /// Creates the temporary beside `target`: an empty file (open in `file`) or an empty folder.
    public init(target: String, kind: OutputKind) throws {
        self.target = target
        self.kind = kind
        let name = lastPathComponent(target)
        let random = UInt32.random(in: 0...UInt32.max)
        let path = joinPath(parentPath(target), ".\(name).adapter-tmp-\(FileSystem.processID)-\(String(random, radix: 16))")
        temporaryPath = path
        // Registered before it exists: a signal right after it is created still removes it.
        TemporaryOutputRegistry.shared.register(path)
        do {
            switch kind {
            case .file:
                file = try FileDescriptor.createExclusive(path)
            case .folder:
                try FileSystem.makeDirectory(path)
                file = nil
            }
        } catch {
            TemporaryOutputRegistry.shared.unregister(path)
            throw error
        }
    }

    deinit {
        if !committed { discard() }
    }

    /// Moves the finished output into place. With `replacing`, an existing target is removed first
    /// (only after the new output is complete).
    public func commit(replacing: Bool = false) throws {
        if replacing && FileSystem.exists(noFollow: target) {
            // Move the old one aside first so that the target is never missing and half-built.
            let old = temporaryPath + ".old"
            TestHook.phase("before-replace")
            try FileSystem.rename(target, to: old)
            TemporaryOutputRegistry.shared.register(old)
            TestHook.phase("moved-aside")
            try FileSystem.rename(temporaryPath, to: target)
            TestHook.phase("before-remove-old")
            FileSystem.removeTree(old)
            TemporaryOutputRegistry.shared.unregister(old)
        } else {
            guard !FileSystem.exists(noFollow: target) else {
                throw SystemError(path: target, operation: "create (it already exists)", code: EEXIST)
            }
            TestHook.phase("before-replace")
            try FileSystem.rename(temporaryPath, to: target)
        }
        committed = true
        TemporaryOutputRegistry.shared.unregister(temporaryPath, committed: true)
        FileSystem.syncDirectory(parentPath(target))
        TestHook.phase("committed")
    }

    /// Removes whatever was written.
    public func discard() {
        FileSystem.removeTree(temporaryPath)
        TemporaryOutputRegistry.shared.unregister(temporaryPath)
    }
}

/// The temporaries in flight, removed together on a signal.
public final class TemporaryOutputRegistry: @unchecked Sendable {
    public static let shared = TemporaryOutputRegistry()
    private let lock = NSLock()
    private var paths: Set<String> = []

    func register(_ path: String) {
        lock.lock(); defer { lock.unlock() }
        paths.insert(path)
    }

    func unregister(_ path: String, committed: Bool = false) {
        lock.lock(); defer { lock.unlock() }
        paths.remove(path)
        if committed { committedOutputs += 1 }
    }

    private var committedOutputs = 0

    /// Whether some output was already renamed into place (a signal after that must not claim
    /// that nothing was written).
    public var hasCommitted: Bool {
        lock.lock(); defer { lock.unlock() }
        return committedOutputs > 0
    }

    /// Removes every registered temporary (called from a signal handler's dispatch source).
    public func removeAll() {
        lock.lock(); defer { lock.unlock() }
        for p in paths {
            // Moved aside first, atomically: a thread still writing into the temporary then gets
            // ENOENT for any new file instead of adding it to a tree being removed (which would stay).
            let aside = p + ".removing"
            FileSystem.removeTree((try? FileSystem.rename(p, to: aside)) != nil ? aside : p)
        }
        paths.removeAll()
    }
}
