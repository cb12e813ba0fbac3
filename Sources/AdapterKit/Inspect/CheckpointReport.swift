/// What `adapter inspect` shows of a checkpoint: headers only.
public struct CheckpointReport: Sendable {
    public let path: String
    public let files: [String]
    public let metadata: [(key: String, value: String)]
    public let indexMetadata: JSONObject?
    /// The checkpoint's tensors, read in place (a header can list millions).
    private let checkpoint: Checkpoint

    /// Every tensor with the name of its file (built on each use).
    public var tensors: [(entry: TensorEntry, file: String)] {
        checkpoint.tensors.map { ($0.entry, files[$0.file]) }
    }

    public init(_ checkpoint: Checkpoint) {
        self.checkpoint = checkpoint
        path = checkpoint.path
        files = checkpoint.fileNames
        var seen = Set<String>()
        var pairs: [(key: String, value: String)] = []
        for f in checkpoint.files {
            for (k, v) in f.metadataPairs where seen.insert(k).inserted { pairs.append((k, v)) }
        }
        metadata = pairs
        indexMetadata = checkpoint.indexMetadata
    }

    public var parameterCount: Int { checkpoint.parameterCount }
    public var byteCount: Int { checkpoint.tensors.reduce(0) { $0 + $1.entry.byteCount } }

    /// Tensor counts per dtype, in the reference's dtype order.
    public var dtypeCounts: [(dtype: DType, count: Int)] {
        var counts = [Int](repeating: 0, count: DType.allCases.count)
        for t in checkpoint.tensors { counts[t.entry.dtype.writerRank] += 1 }
        return zip(DType.allCases, counts).filter { $0.1 > 0 }.map { ($0.0, $0.1) }
    }

    /// Tensors whose values need a scale tensor, by kind: "F8_E4M3 with 128×128 block scales × 61".
    ///
    /// Each kind says its scales' dtype and key, how many sit in another shard than their weight,
    /// and the bytes per parameter of those weights with their scales.
    var scaledSummary: String? {
        var counts: [String: Int] = [:], apart: [String: Int] = [:], bytes: [String: Int] = [:], params: [String: Int] = [:]
        var order: [String] = []
        for t in checkpoint.tensors {
            let kind: String, scaleName: String
            switch t.entry.encoding {
            case .plain: continue
            case .blockScaledFP8(let d, let name, let block):
                scaleName = name
                let suffix = name.hasSuffix("_scale_inv") ? "weight_scale_inv" : "weight_scale"
                kind = "\(d.rawValue) with \(block.map(String.init).joined(separator: "×")) block scales (\(checkpoint.tensor(name)?.entry.dtype.rawValue ?? "?"), \(suffix))"
            case .mxfp4(let name):
                scaleName = name
                kind = "MXFP4 (E2M1, one E8M0 exponent per 32 values, _blocks + _scales)"
            case .nvfp4(let name, let global):
                scaleName = name
                kind = "NVFP4 (E2M1, one E4M3 scale per 16 values and a global scale, weight_packed + weight_scale + weight_global_scale)"
                bytes[kind, default: 0] += checkpoint.tensor(global)?.entry.byteCount ?? 0
            }
            guard let (scale, file) = checkpoint.tensor(scaleName) else { continue }
            if counts[kind] == nil { order.append(kind) }
            counts[kind, default: 0] += 1
            if file != t.file { apart[kind, default: 0] += 1 }
            bytes[kind, default: 0] += t.entry.byteCount + scale.byteCount
            params[kind, default: 0] += t.entry.valueCount
        }
        return order.isEmpty ? nil : order.map { kind in
            let perParameter = Double(bytes[kind]!) / Double(max(1, params[kind]!))
            let elsewhere = apart[kind].map { ", \($0) scale tensor\($0 == 1 ? "" : "s") in another shard than the weight" } ?? ""
            return "\(kind) × \(counts[kind]!): \(formatFixed(perParameter, 3)) bytes per parameter\(elsewhere)"
        }.joined(separator: "; ")
    }

    /// The `--json` object. `adapter` is filled by the adapter report, null for checkpoints.
    public func json(adapter: JSONValue = .null) -> JSONValue {
        var o = JSONObject()
        o["path"] = .string(path)
        o["files"] = .array(files.map { .string($0) })
        o["metadata"] = .object(JSONObject(metadata.map { ($0.key, .string($0.value)) }))
        if let indexMetadata { o["index_metadata"] = .object(indexMetadata) }
        if let config = checkpoint.config { o["model"] = config.json }
        o["layout"] = BaseLayout(checkpoint).json
        o["tensor_count"] = .integer(checkpoint.tensors.count)
        o["parameter_count"] = .integer(parameterCount)
        o["byte_count"] = .integer(byteCount)
        o["dtypes"] = .object(JSONObject(dtypeCounts.map { ($0.dtype.rawValue, .integer($0.count)) }))
        o["tensors"] = .array(checkpoint.tensors.map { t in
            .object(JSONObject([
                ("name", .string(t.entry.name)),
                ("dtype", .string(t.entry.dtype.rawValue)),
                ("shape", .array(t.entry.shape.map { .integer($0) })),
                ("file", .string(files[t.file])),
            ] + Self.encodingMembers(t.entry.encoding)))
        })
        o["adapter"] = adapter
        return .object(o)
    }

    /// The JSON members that describe a scaled encoding (none for plain tensors, so their objects
    /// stay as they were).
    static func encodingMembers(_ e: TensorEncoding) -> [(String, JSONValue)] {
        switch e {
        case .plain: []
        case .blockScaledFP8(_, let scale, let block):
            [("encoding", .object(JSONObject([("kind", .string("block_scaled_fp8")), ("scale", .string(scale)),
                                              ("block", .array(block.map { .integer($0) }))])))]
        case .mxfp4(let scale):
            [("encoding", .object(JSONObject([("kind", .string("mxfp4")), ("scale", .string(scale)), ("block", .array([.integer(32)]))])))]
        case .nvfp4(let scale, let global):
            [("encoding", .object(JSONObject([("kind", .string("nvfp4")), ("scale", .string(scale)), ("global_scale", .string(global)),
                                              ("block", .array([.integer(16)]))])))]
        }
    }

    /// The human summary; with `tensors`, the full table too.
    public func text(tensors showTensors: Bool) -> String {
        var lines: [String] = []
        lines.append("\(path)")
        if let config = checkpoint.config { lines.append("  model       " + config.summary) }
        lines += BaseLayout(checkpoint).lines.map { "  " + $0 }
        lines.append("  files       \(files.count == 1 ? files[0] : "\(files.count) shards (\(files.first!) … \(files.last!))")")
        lines.append("  tensors     \(checkpoint.tensors.count)")
        lines.append("  parameters  \(formatCount(parameterCount))")
        lines.append("  bytes       \(formatBytes(byteCount))")
        lines += wrapped("  dtypes      ", dtypeCounts.map { "\($0.dtype.rawValue) × \($0.count)" })
        if let scaled = scaledSummary { lines.append("  encodings   " + scaled) }
        if !metadata.isEmpty {
            lines += wrapped("  metadata    ", metadata.map { "\($0.key)=\(truncated($0.value, 60))" })
        }
        if showTensors && !checkpoint.tensors.isEmpty {
            let tensors = self.tensors
            lines.append("")
            let nameWidth = min(80, tensors.map { $0.entry.name.count }.max() ?? 4)
            let shapes = tensors.map { "[" + $0.entry.shape.map(String.init).joined(separator: ", ") + "]" }
            let shapeWidth = max(5, shapes.map(\.count).max() ?? 5)
            lines.append(pad("name", nameWidth) + "  " + pad("dtype", 7) + "  " + pad("shape", shapeWidth) + "  file")
            for (t, shape) in zip(tensors, shapes) {
                lines.append(pad(t.entry.name, nameWidth) + "  " + pad(t.entry.dtype.rawValue, 7) + "  " + pad(shape, shapeWidth) + "  " + t.file)
            }
        }
        return lines.joined(separator: "\n")
    }
}

/// `label` then the items joined by ", ", wrapped at `width` columns with continuation lines
/// aligned under the first item.
func wrapped(_ label: String, _ items: [String], width: Int = 100) -> [String] {
    var lines: [String] = []
    var line = label
    let indent = String(repeating: " ", count: label.count)
    for (i, item) in items.enumerated() {
        let piece = item + (i == items.count - 1 ? "" : ",")
        if line.count > indent.count && line.count + 1 + piece.count > width {
            lines.append(line)
            line = indent + piece
        } else {
            line += (line.count > indent.count && line != label ? " " : "") + piece
        }
    }
    lines.append(line)
    return lines
}

func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}

func truncated(_ s: String, _ n: Int) -> String {
    s.count <= n ? s : String(s.prefix(n - 1)) + "…"
}

/// 7,241,732,096 → "7.24 B"; small counts as they are.
public func formatCount(_ n: Int) -> String {
    let units: [(Double, String)] = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")]
    for (scale, unit) in units where Double(n) >= scale {
        return formatFixed(Double(n) / scale, 2) + " " + unit + " (\(n))"
    }
    return String(n)
}

