import Foundation

/// What `adapter inspect` shows of a diffusers pipeline folder: the pipeline class, then each
/// component that holds weights, as a model folder (its family and key layout when recognised),
/// and the components without weights (scheduler, tokenizers) by name.
public struct PipelineReport {
    public let path: String
    public let pipelineClass: String?
    /// (folder, library class, report) of each component that holds weights.
    public let components: [(folder: String, className: String?, report: CheckpointReport)]
    /// Components without tensor files.
    public let others: [(folder: String, className: String?)]

    public init(path: String, files: TensorFiles = TensorFiles()) throws {
        self.path = path
        let index = try PipelineMergePlan.components(of: path)
        pipelineClass = index.className
        var components: [(String, String?, CheckpointReport)] = [], others: [(String, String?)] = []
        for (key, className) in index.components {
            let folder = joinPath(path, key)
            // A folder with tensor files is read (its errors are the command's); one without is listed by name.
            let holdsTensors = FileSystem.kind(folder) == .directory
                && ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []).contains { name in
                    FolderCopy.tensorFileExtensions.contains { name.lowercased().hasSuffix($0) } || name.hasSuffix(".index.json")
                }
            guard holdsTensors else {
                others.append((key, className))
                continue
            }
            components.append((key, className, CheckpointReport(try Checkpoint(path: folder, files: files))))
        }
        self.components = components
        self.others = others
    }

    public func text(tensors: Bool) -> String {
        var lines = ["\(path)", "  pipeline    \(pipelineClass ?? "unknown (model_index.json has no _class_name)")"]
        lines.append("  components  \(components.map(\.folder).joined(separator: ", "))" + (others.isEmpty ? "" : "; without weights: \(others.map(\.folder).joined(separator: ", "))"))
        for c in components {
            lines.append("")
            lines.append("\(c.folder)/ (\(c.className ?? "unknown class"))")
            lines.append(c.report.text(tensors: tensors).split(separator: "\n", omittingEmptySubsequences: false).dropFirst().joined(separator: "\n"))
        }
        return lines.joined(separator: "\n")
    }

    public func json() -> JSONValue {
        .object(JSONObject([
            ("path", .string(path)),
            ("pipeline", pipelineClass.map { .string($0) } ?? .null),
            ("components", .object(JSONObject(components.map { ($0.folder, $0.report.json()) }))),
            ("without_weights", .array(others.map { .string($0.folder) })),
        ]))
    }
}
