import Dispatch
import Foundation

/// Options of a merge run.
public struct MergeRunOptions: Sendable {
    /// Replace an existing OUT (only after the new one is complete).
    public var force = false
    /// Collect per-tensor statistics for `--report`.
    public var report = false
    /// Worker threads for the kernel.
    public var threads = max(1, ProcessInfo.processInfo.activeProcessorCount)
    /// fsync each output file before it is renamed into place.
    public var sync = true
    /// Called with (bytes written, total bytes) as the merge progresses.
    public var progress: (@Sendable (Int, Int) -> Void)? = nil
    /// When a LyCORIS update is added row by row instead of through its exact factors (the tests
    /// force each way; results agree up to one rounding).
    var denseRows: DenseRowsPolicy = .whenCheaper

    public init() {}
}

/// When the merge adds a LyCORIS update from its rows (`DenseUpdate`) rather than its factors.
enum DenseRowsPolicy: Sendable {
    case whenCheaper, always, never
}

/// What a merge did.
public struct MergeSummary: Sendable {
    public struct TensorReport: Sendable {
        public let tensor: String
        public let modules: [String]
        public let statistics: UpdateStatistics
        /// For a requantized weight: ⟨deq(Q(W')) − W, ΔW⟩ / ‖ΔW‖², the part of the update kept.
        public let kept: Double?
    }

    public var modulesMerged = 0
    /// Updates added (more than modules when expert modules are split per expert).
    public var updatesMerged = 0
    public var tensorsChanged = 0
    public var tensorsCopied = 0
    public var filesCopied = 0
    public var bytesWritten = 0
    public var seconds = 0.0
    public var reports: [TensorReport] = []
    public var notes: [String] = []

    /// "merged 64 modules into 64 tensors, copied 227 tensors, wrote 2.00 GiB in 3.1 s"
    public var line: String {
        "merged \(plural(modulesMerged, "module"))\(updatesMerged > modulesMerged ? " (\(plural(updatesMerged, "update")): per expert, or per half of a swapped tensor)" : "") into \(plural(tensorsChanged, "tensor")), copied \(plural(tensorsCopied, "tensor"))"
            + (filesCopied > 0 ? " and \(plural(filesCopied, "other file"))" : "")
            + ", wrote \(formatBytes(bytesWritten, exact: false)) in \(formatFixed(seconds, 2)) s"
    }
}

extension MergeSummary {
    /// Adds a component's merge (a pipeline folder's): counts and bytes summed, notes and reports
    /// named by the component.
    mutating func add(_ other: MergeSummary, component: String) {
        modulesMerged += other.modulesMerged
        updatesMerged += other.updatesMerged
        tensorsChanged += other.tensorsChanged
        tensorsCopied += other.tensorsCopied
        filesCopied += other.filesCopied
        bytesWritten += other.bytesWritten
        seconds += other.seconds
        reports += other.reports.map { TensorReport(tensor: component + "/" + $0.tensor, modules: $0.modules, statistics: $0.statistics, kept: $0.kept) }
        notes += other.notes.map { component + ": " + $0 }
    }
}

/// A merge stopped by a result it must not write.
public struct MergeError: Error, Sendable, CustomStringConvertible {
    public let tensor: String
    public let problem: String
    public var description: String { "merge stopped at tensor \(tensor): \(problem); nothing was written" }
}
