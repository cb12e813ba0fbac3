/// What `inspect` says of a GGUF file: format and alignment, the architecture and what
/// `general.*` names, the metadata (long arrays summarised, never dumped), tensors per type with
/// their bytes, and with `--tensors` every tensor.
public struct GGUFReport {
    public let file: GGUFFile

    public init(_ file: GGUFFile) { self.file = file }

    /// llama.h `llama_ftype` names of `general.file_type`.
    static let fileTypes: [Int: String] = [0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0",
                                           9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
                                           14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
                                           19: "MOSTLY_IQ2_XXS", 20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
                                           24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M", 28: "MOSTLY_IQ2_S",
                                           29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M", 32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0",
                                           37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE"]

    /// Tensors and bytes per type, in the order the types first appear.
    public var types: [(type: GGMLType, tensors: Int, bytes: Int, values: Int)] {
        var order: [GGMLType] = []
        var counts: [GGMLType: (Int, Int, Int)] = [:]
        for t in file.tensors {
            if counts[t.type] == nil { order.append(t.type) }
            let c = counts[t.type] ?? (0, 0, 0)
            counts[t.type] = (c.0 + 1, c.1 + t.byteCount, c.2 + t.elementCount)
        }
        return order.map { ($0, counts[$0]!.0, counts[$0]!.1, counts[$0]!.2) }
    }

    public var parameterCount: Int { file.tensors.reduce(0) { $0 + $1.elementCount } }
    public var tensorBytes: Int { file.tensors.reduce(0) { $0 + $1.byteCount } }

    /// A value for a summary line: strings quoted, arrays of more than 8 items summarised.
    static func describe(_ v: GGUFValue, limit: Int = 8) -> String {
        switch v {
        case .string(let s): return quotedForMessage(s.count > 80 ? String(s.prefix(77)) + "…" : s)
        case .array(let t, let values):
            if values.count > limit {
                return "[\(values.count) \(GGUFValue.typeNames[t].map { $0.lowercased() } ?? "?") values]"
            }
            return "[" + values.map { describe($0, limit: limit) }.joined(separator: ", ") + "]"
        case .bool(let b): return b ? "true" : "false"
        case .f32(let f): return "\(f)"
        case .f64(let f): return "\(f)"
        case .u64(let u): return String(u)
        default: return v.integer.map(String.init) ?? "?"
        }
    }

    public func text(tensors showTensors: Bool) -> String {
        var lines = [file.path]
        lines.append("  format      GGUF v\(file.version), alignment \(file.alignment), data at byte \(file.dataOffset)")
        let arch = file.value("general.architecture")?.string
        var model = arch ?? "(no general.architecture)"
        if let type = file.value("general.type")?.string { model += ", type \(type)" }
        if let name = file.value("general.name")?.string { model += ", name \(quotedForMessage(name))" }
        if let ft = file.value("general.file_type")?.integer { model += ", file type \(Self.fileTypes[ft] ?? "\(ft)")" }
        lines.append("  model       " + model)
        lines.append("  tensors     \(file.tensors.count)")
        lines.append("  parameters  \(formatCount(parameterCount))")
        lines.append("  bytes       \(formatBytes(tensorBytes)) of tensor data in a \(formatBytes(file.fileSize)) file")
        lines += wrapped("  types       ", types.map { "\($0.type.name) × \($0.tensors) (\(formatBytes($0.bytes, exact: false)))" })
        lines.append("  metadata    \(file.metadata.count) keys")
        for (key, value) in file.metadata {
            lines.append("    \(key) = \(Self.describe(value))")
        }
        if showTensors {
            lines.append("")
            lines.append("name\ttype\tshape\tbytes\toffset")
            for t in file.tensors {
                lines.append("\(t.name)\t\(t.type.name)\t[\(t.shape.map(String.init).joined(separator: ", "))]\t\(t.byteCount)\t\(file.dataOffset + t.offset)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// The `--json` object; shapes in numpy order (`shape`) and GGML order (`ggml_dims`).
    public func json() -> JSONValue {
        func value(_ v: GGUFValue, summarise: Bool) -> JSONValue {
            switch v {
            case .string(let s): return .string(s)
            case .bool(let b): return .bool(b)
            case .f32(let f): return f.isFinite ? .real(Double(f)) : .string("\(f)")
            case .f64(let f): return f.isFinite ? .real(f) : .string("\(f)")
            case .array(let t, let values):
                if summarise && values.count > 64 {
                    return .object(JSONObject([("array_of", .string(GGUFValue.typeNames[t] ?? "?")), ("count", .integer(values.count))]))
                }
                return .array(values.map { value($0, summarise: summarise) })
            default:
                if case .u64(let u) = v { return .integer(u) }
                return .integer(v.integer ?? 0)
            }
        }
        var o = JSONObject()
        o["path"] = .string(file.path)
        o["format"] = .string("gguf")
        o["version"] = .integer(Int(file.version))
        o["alignment"] = .integer(file.alignment)
        o["architecture"] = file.value("general.architecture")?.string.map { .string($0) } ?? .null
        o["tensor_count"] = .integer(file.tensors.count)
        o["parameter_count"] = .integer(parameterCount)
        o["byte_count"] = .integer(tensorBytes)
        o["types"] = .object(JSONObject(types.map { ($0.type.name, .object(JSONObject([("tensors", .integer($0.tensors)), ("bytes", .integer($0.bytes))]))) }))
        o["metadata"] = .object(JSONObject(file.metadata.map { ($0.key, .object(JSONObject([("type", .string(GGUFValue.typeNames[$0.value.typeCode] ?? "?")),
                                                                                              ("value", value($0.value, summarise: true))]))) }))
        o["tensors"] = .array(file.tensors.map { t in
            .object(JSONObject([("name", .string(t.name)), ("type", .string(t.type.name)), ("shape", .array(t.shape.map { .integer($0) })),
                                ("ggml_dims", .array(t.dims.map { .integer($0) })), ("bytes", .integer(t.byteCount)),
                                ("offset", .integer(file.dataOffset + t.offset))]))
        })
        return .object(o)
    }
}
