import Foundation

/// Hooks for the fault-injection tests only, compiled into debug builds (what `swift test` runs)
/// and absent from release builds, which read none of these variables. Each is off unless its
/// environment variable is set, and then only slows the run down or makes it wait; none changes
/// what is written.
///
/// - `ADAPTER_TEST_DELAY_PER_TENSOR_MS=N`: the merge pauses N ms after each tensor, so a signal
///   can land mid-merge on tiny inputs.
/// - `ADAPTER_TEST_PAUSE_AT=PHASE` with `ADAPTER_TEST_PAUSE_FILE=PATH`: on reaching the named phase
///   of writing the output (`TestHook.phases`), the run creates PATH (holding the phase name) and
///   waits until the test removes it (at most 30 s) or a signal is recorded, so that the test can
///   send a signal or change the folder at exactly that point.
/// - `ADAPTER_TEST_RENAMEAT2=unsupported`: behave as on a file system without `renameat2`, so the
///   tests reach the fallbacks.
/// - `ADAPTER_TEST_LINKS=unsupported`: behave as on a file system without hard links (a split
///   merge's finish then copies the staged shards).
public enum TestHook {
    /// The phases of writing an output, in order. Not every run passes every phase: `exchanged`
    /// needs `--force` and an existing OUT on a file system with `renameat2(RENAME_EXCHANGE)`,
    /// `moved-aside` the same without it.
    public static let phases = ["before-fsync", "after-fsync", "before-replace", "moved-aside", "exchanged", "before-remove-old", "committed"]

#if ADAPTER_TEST_HOOKS
    static let environment = ProcessInfo.processInfo.environment

    /// Whether to behave as if `renameat2` did not exist.
    static let renameat2Unsupported = environment["ADAPTER_TEST_RENAMEAT2"] == "unsupported"
    /// Whether to behave as if hard links did not exist.
    static let linksUnsupported = environment["ADAPTER_TEST_LINKS"] == "unsupported"

    static let delayPerTensorMS: Int =
        environment["ADAPTER_TEST_DELAY_PER_TENSOR_MS"].flatMap { Int($0) }.map { min(max($0, 0), 10_000) } ?? 0

    static let pauseAt: String? = environment["ADAPTER_TEST_PAUSE_AT"]
    static let pauseFile: String? = environment["ADAPTER_TEST_PAUSE_FILE"]

    /// After each tensor of a merge.
    static func afterTensor() {
        if delayPerTensorMS > 0 { FileSystem.sleep(milliseconds: delayPerTensorMS) }
    }

    /// Marks reaching `name`; waits there when the tests asked for it.
    static func phase(_ name: String) {
        guard let pauseAt, pauseAt == name, let pauseFile else { return }
        guard (try? FileDescriptor.createExclusive(pauseFile).writeAll(Array(name.utf8))) != nil else { return }
        var waited = 0
        // A signal recorded during a commit ends the wait: the run then acts on it right here.
        while FileSystem.exists(noFollow: pauseFile) && waited < 30_000 && !TemporaryOutputRegistry.shared.hasPendingSignal {
            FileSystem.sleep(milliseconds: 2)
            waited += 2
        }
    }
#else
    static let renameat2Unsupported = false
    static let linksUnsupported = false
    @inline(__always) static func afterTensor() {}
    @inline(__always) static func phase(_ name: String) {}
#endif
}
