/// How a PEFT folder names its mixers.
public enum MixerKeyStyle: String, Sendable, CaseIterable {
    /// The original MoSLoRA code: `<module>.lora_AB.weight`, config `lora_use_mixer`, peft_type LORA.
    case loraAB = "lora_AB"
    /// PEFT pull requests #1905 / #2294: `<module>.lora_mixer.weight`, peft_type MOSLORA, `use_moslora`.
    case loraMixer = "lora_mixer"
}

/// A tensor to write: values rounded once into `dtype`, bytes copied as they are, or a region of
/// a file copied in the kernel (factors `extract` spilled as it went).
struct OutputTensor {
    let name: String
    let dtype: DType
    let shape: [Int]
    let bytes: [UInt8]
    var region: FileRegion? = nil

    init(name: String, dtype: DType, shape: [Int], values: [Double]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        var out = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        values.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBytes { dst in
                if !values.isEmpty { ElementConversion.fromDouble(dtype, src.baseAddress!, dst.baseAddress!, count: values.count) }
            }
        }
        bytes = out
    }

    /// A factor in its own shape: held values rounded into `dtype`; a stored tensor already in
    /// `dtype` copied from where it is.
    init(name: String, dtype: DType, holding tensor: TensorRef) throws {
        if !tensor.isHeld, tensor.dtype == dtype, let r = tensor.store?.region(of: tensor.name) {
            self.init(name: name, dtype: dtype, shape: tensor.shape, bytes: [])
            region = r
            return
        }
        self.init(name: name, dtype: dtype, shape: tensor.shape, values: tensor.isHeld ? tensor.held : try tensor.doubles())
    }

    init(name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
    }
}

/// Writes adapters in the layouts the converter supports, into a folder or file that does not exist yet.
enum AdapterWriter {
    // MARK: - Common

    /// The dtype a tensor is written in: `--dtype`, else its input dtype.
    static func outputType(_ input: DType, _ requested: DType?, tensor: String) throws -> DType {
        let t = requested ?? input
        guard t.isMergeable else {
            throw InputError.conversion(tensor, "dtype \(t.rawValue) cannot be written (F32, F16, BF16, F64 can); pass --dtype")
        }
        return t
    }

    /// Writes a safetensors file at `path`, or into `descriptor` (an output's temporary file) when given.
    static func writeFile(_ path: String, _ tensors: [OutputTensor], metadata: [(key: String, value: String)]?, sync: Bool,
                          descriptor: FileDescriptor? = nil) throws {
        var byName: [String: Int] = [:]
        for (i, t) in tensors.enumerated() { byName[t.name] = i }
        try SafetensorsWriter.write(into: try descriptor ?? FileDescriptor.createExclusive(path), path: path,
                                    tensors: tensors.map { TensorSpec(name: $0.name, dtype: $0.dtype, shape: $0.shape) },
                                    metadata: metadata, sync: sync) { info, writer in
            let t = tensors[byName[info.name]!]
            if let r = t.region { try writer.append(r) } else { try t.bytes.withUnsafeBytes { try writer.append($0) } }
        }
    }

    /// Writes a JSON config, refusing any number that is not finite: `inf` and `nan` are not
    /// JSON, and no reader would take them back.
    static func writeConfig(_ path: String, _ config: JSONObject, indent: Int, sync: Bool) throws {
        func check(_ v: JSONValue, _ at: String) throws {
            switch v {
            case .number(let text):
                guard let d = Double(text), d.isFinite else { throw InputError.conversion(path, "\(at) would be written as \(text), which is not a finite JSON number") }
            case .array(let a): for (i, x) in a.enumerated() { try check(x, "\(at)[\(i)]") }
            case .object(let o): for (k, x) in o.members { try check(x, at.isEmpty ? k : "\(at).\(k)") }
            default: break
            }
        }
        try check(.object(config), "")
        try writeText(path, JSONWriter.pretty(.object(config), indent: indent), sync: sync)
    }

    static func writeText(_ path: String, _ text: String, sync: Bool) throws {
        let fd = try FileDescriptor.createExclusive(path)
        try fd.writeAll(Array(text.utf8))
        if sync { try fd.sync() }
    }

    /// Keys in sorted order when the input had them sorted (PEFT and mlx write `sort_keys`), else as they were.
    static func keepingOrder(_ o: JSONObject, sorted: Bool) -> JSONObject {
        guard sorted else { return o }
        return JSONObject(o.members.sorted { $0.key.precedesInBytes($1.key) })
    }

    static func isSorted(_ o: JSONObject) -> Bool {
        zip(o.keys, o.keys.dropFirst()).allSatisfy { !$1.precedesInBytes($0) }
    }

    static func refuseReplacements(_ w: WorkingAdapter, _ layout: TargetLayout) throws {
        if let r = w.replacements.first {
            throw InputError.conversion(w.source.path, "\(layout.rawValue) cannot hold full tensors such as \(r.tensor.name) (modules_to_save)")
        }
    }

    // MARK: - PEFT

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `folder` (which exists).
    static func writePEFT(_ w: WorkingAdapter, folder: String, style: MixerKeyStyle, dtype: DType?, sync: Bool) throws -> [String] {
        var notes: [String] = []
        let sourceIsPEFT = w.source.format == .peft
        let useRSLoRA = sourceIsPEFT && (w.source.config?["use_rslora"]?.boolValue ?? false)
        var tensors: [OutputTensor] = []
        let kinds = Set(w.modules.map(\.kind))
        if kinds.contains(.linearFanInFanOut) && kinds.contains(.linear) {
            throw InputError.conversion(w.source.path, "PEFT's fan_in_fan_out is one flag for the whole adapter, but the modules mix both orientations")
        }
        for m in w.modules {
            let name = sourceIsPEFT ? m.name : "base_model.model." + m.baseName
            let aName = m.kind == .embedding ? name + ".lora_embedding_A" : name + ".lora_A.weight"
            let bName = m.kind == .embedding ? name + ".lora_embedding_B" : name + ".lora_B.weight"
            tensors.append(try OutputTensor(name: aName, dtype: try outputType(m.aType, dtype, tensor: aName), holding: m.a))
            tensors.append(try OutputTensor(name: bName, dtype: try outputType(m.bType, dtype, tensor: bName), holding: m.b))
            if let mixer = m.mixer {
                let mName = name + (style == .loraAB ? ".lora_AB.weight" : ".lora_mixer.weight")
                tensors.append(try OutputTensor(name: mName, dtype: try outputType(m.mixerType ?? m.aType, dtype, tensor: mName), holding: mixer))
            }
            if let mag = m.magnitude?.held {
                let n = name + ".lora_magnitude_vector"
                tensors.append(OutputTensor(name: n, dtype: try outputType(m.magnitudeType ?? m.bType, dtype, tensor: n), shape: [mag.count], values: mag))
            }
            if let bias = m.bias?.held {
                let n = name + ".lora_B.bias"
                tensors.append(OutputTensor(name: n, dtype: try outputType(m.biasType ?? m.bType, dtype, tensor: n), shape: [bias.count], values: bias))
            }
        }
        if !w.replacements.isEmpty && !sourceIsPEFT { try refuseReplacements(w, .peft) }
        for r in w.replacements {
            let info = r.tensor.entry, key = r.outputKey ?? info.name
            if let d = dtype, d != info.dtype {
                tensors.append(OutputTensor(name: key, dtype: try outputType(info.dtype, d, tensor: info.name), shape: info.shape, values: try r.tensor.doubles()))
            } else {
                let bytes = try r.tensor.store!.withBytes(of: info.name) { Array($0) }
                tensors.append(OutputTensor(name: key, dtype: info.dtype, shape: info.shape, bytes: bytes))
            }
        }
        let config = try peftConfig(w, style: style, useRSLoRA: useRSLoRA, notes: &notes)
        try writeFile(joinPath(folder, "adapter_model.safetensors"), tensors, metadata: [("format", "pt")], sync: sync)
        try writeConfig(joinPath(folder, "adapter_config.json"), config, indent: 2, sync: sync)
        return notes
    }

    static let mixerConfigKeys = ["lora_use_mixer", "lora_use_mixer_pattern", "use_moslora", "mixer_init"]

    static func peftConfig(_ w: WorkingAdapter, style: MixerKeyStyle, useRSLoRA: Bool, notes: inout [String]) throws -> JSONObject {
        let source = w.source.format == .peft ? w.source.config : nil
        var c = source ?? freshPEFTConfig(w)
        let sorted = isSorted(c)
        // A target_parameters module's r is each expert's, and its pattern key `module.parameter`.
        let ranks = w.modules.map(\.updateRank)
        let alphas = w.modules.map { useRSLoRA ? $0.scale * Double($0.updateRank).squareRoot() : $0.scale * Double($0.updateRank) }
        let r = mostCommon(ranks) ?? 8
        let alpha = mostCommon(alphas) ?? Double(r)
        // Members set as JSONObject's subscript would set them (a repeated name keeps its first place), in linear time.
        var rankMembers: [(key: String, value: JSONValue)] = [], alphaMembers: [(key: String, value: JSONValue)] = []
        var rankAt: [String: Int] = [:], alphaAt: [String: Int] = [:]
        func put(_ members: inout [(key: String, value: JSONValue)], _ at: inout [String: Int], _ key: String, _ value: JSONValue) {
            if let i = at[key] { members[i].value = value } else {
                at[key] = members.count
                members.append((key, value))
            }
        }
        for (i, m) in w.modules.enumerated() {
            if ranks[i] != r { put(&rankMembers, &rankAt, m.targetName, jsonInt(ranks[i])) }
            if alphas[i] != alpha { put(&alphaMembers, &alphaAt, m.targetName, jsonNumber(alphas[i])) }
        }
        let rankPattern = JSONObject(rankMembers), alphaPattern = JSONObject(alphaMembers)
        // PEFT applies a pattern key K to module N when N matches `(.*\.)?K$`: each key must pick out its own
        // module only. Every module name is looked up once in an index of all the keys.
        let names = w.modules.map(\.targetName)
        let keys = rankPattern.keys + alphaPattern.keys
        let index = PatternIndex(field: "rank_pattern and alpha_pattern", keys: keys)
        var hits = [Int](repeating: 0, count: keys.count)
        var others = [[String]](repeating: [], count: keys.count)
        do {
            for name in names {
                for k in try index.allMatches(name) {
                    hits[k] += 1
                    if name != keys[k] && others[k].count < 2 { others[k].append(name) }
                }
            }
        } catch let e as PatternCostError {
            throw InputError.conversion(w.source.path, e.description)
        }
        if let k = keys.indices.first(where: { hits[$0] != 1 }) {
            throw InputError.conversion(w.source.path, "module \(keys[k]) cannot be given its own rank or alpha: PEFT's pattern rule would also apply it to \(others[k].joined(separator: ", "))")
        }
        c["r"] = jsonInt(r)
        c["lora_alpha"] = jsonNumber(alpha)
        c["rank_pattern"] = .object(rankPattern)
        c["alpha_pattern"] = .object(alphaPattern)
        if w.expertsConverted {
            // The modules changed form: PEFT's two target lists say which are modules, which parameters.
            var modules: [String] = [], parameters: [String] = []
            for m in w.modules {
                if let p = m.parameter {
                    let t = m.baseName.split(separator: ".").suffix(2).joined(separator: ".") + "." + p.name
                    if !parameters.contains(t) { parameters.append(t) }
                } else {
                    let leaf = String(m.baseName.split(separator: ".").last ?? Substring(m.baseName))
                    if !modules.contains(leaf) { modules.append(leaf) }
                }
            }
            c["target_modules"] = .array(modules.sorted().map { .string($0) })
            c["target_parameters"] = parameters.isEmpty ? .null : .array(parameters.map { .string($0) })
        }
        c["use_rslora"] = .bool(useRSLoRA)
        c["use_dora"] = .bool(w.modules.contains { $0.magnitude != nil })
        c["fan_in_fan_out"] = .bool(w.modules.contains { $0.kind == .linearFanInFanOut })
        if w.modules.contains(where: { $0.bias != nil }) { c["lora_bias"] = .bool(true) } else if c["lora_bias"] != nil { c["lora_bias"] = .bool(false) }
        for k in mixerConfigKeys { c[k] = nil }
        let withMixer = w.modules.filter { $0.mixer != nil }
        if withMixer.isEmpty {
            c["peft_type"] = .string("LORA")
        } else if style == .loraAB {
            c["peft_type"] = .string("LORA")
            if withMixer.count == w.modules.count {
                c["lora_use_mixer"] = .bool(true)
                c["lora_use_mixer_pattern"] = .object(JSONObject())
            } else {
                c["lora_use_mixer"] = .bool(false)
                c["lora_use_mixer_pattern"] = .object(JSONObject(withMixer.map { ($0.baseName, JSONValue.bool(true)) }))
            }
        } else {
            c["peft_type"] = .string("MOSLORA")
            c["use_moslora"] = .bool(true)
            if withMixer.count != w.modules.count {
                notes.append("the lora_mixer layout has no per-module switch: \(w.modules.count - withMixer.count) module\(w.modules.count - withMixer.count == 1 ? "" : "s") without a mixer rely on the reader deciding per module")
            }
        }
        return keepingOrder(c, sorted: sorted)
    }

    /// A PEFT LoRA config for an adapter from another layout: the fields `LoraConfig` saves that matter here.
    static func freshPEFTConfig(_ w: WorkingAdapter) -> JSONObject {
        var targets: [String] = []
        for m in w.modules {
            let last = String(m.baseName.split(separator: ".").last ?? Substring(m.baseName))
            if !targets.contains(last) { targets.append(last) }
        }
        let baseModel = w.source.config?["model"]?.stringValue ?? w.source.config?["base_model_name_or_path"]?.stringValue
        return JSONObject([
            ("alpha_pattern", .object(JSONObject())),
            ("base_model_name_or_path", baseModel.map { .string($0) } ?? .null),
            ("bias", .string("none")),
            ("fan_in_fan_out", .bool(false)),
            ("inference_mode", .bool(true)),
            ("init_lora_weights", .bool(true)),
            ("lora_alpha", .number("8")),
            ("lora_dropout", .real(0)),
            ("modules_to_save", .null),
            ("peft_type", .string("LORA")),
            ("r", .number("8")),
            ("rank_pattern", .object(JSONObject())),
            ("target_modules", .array(targets.sorted().map { .string($0) })),
            ("task_type", .null),
            ("use_dora", .bool(false)),
            ("use_rslora", .bool(false)),
        ])
    }

    // MARK: - kohya

    /// Writes one kohya safetensors file: lora_down / lora_up / lora_mixer / alpha per module.
    static func writeKohya(_ w: WorkingAdapter, file: FileDescriptor, dtype: DType?, sync: Bool) throws -> [String] {
        try refuseReplacements(w, .kohya)
        var tensors: [OutputTensor] = []
        let components = w.modules.map(\.component)
        var seen = Set<String>()
        for m in w.modules {
            switch m.kind {
            case .embedding, .linearFanInFanOut:
                throw InputError.conversion(w.source.path, "module \(m.name) is \(m.kind == .embedding ? "an embedding" : "a fan_in_fan_out (Conv1D) layer"), which kohya cannot hold")
            default: break
            }
            if m.magnitude != nil { throw InputError.conversion(w.source.path, "module \(m.name) is DoRA, which kohya's LoRA layout cannot hold") }
            if m.bias != nil { throw InputError.conversion(w.source.path, "module \(m.name) has a lora_B.bias, which kohya cannot hold") }
            let name = w.source.format == .kohya && !w.renamed ? m.name : KohyaNames.prefix(for: m.component, components: components) + KohyaNames.key(m.baseName)
            guard seen.insert(name).inserted else {
                throw InputError.conversion(w.source.path, "two modules share the kohya name \(name) once dots become underscores")
            }
            let aType = try outputType(m.aType, dtype, tensor: name)
            tensors.append(try OutputTensor(name: name + ".lora_down.weight", dtype: aType, holding: m.a))
            tensors.append(try OutputTensor(name: name + ".lora_up.weight", dtype: try outputType(m.bType, dtype, tensor: name),
                                            holding: m.b))
            if let mixer = m.mixer {
                tensors.append(try OutputTensor(name: name + ".lora_mixer.weight", dtype: try outputType(m.mixerType ?? m.aType, dtype, tensor: name),
                                                holding: mixer))
            }
            // alpha = scale·r, stored in Float32 (Float64 for F64 output): a BF16 or F16 alpha would
            // round the scale itself (16·√8 is not a BF16 number). Never an infinite alpha.
            guard (m.scale * Double(m.rank)).isFinite, aType == .f64 || abs(m.scale * Double(m.rank)) <= Double(Float.greatestFiniteMagnitude) else {
                throw InputError.conversion(w.source.path, "module \(m.name): alpha = scale·r = \(m.scale * Double(m.rank)) is not a finite number")
            }
            tensors.append(OutputTensor(name: name + ".alpha", dtype: aType == .f64 ? .f64 : .f32, shape: [], values: [m.scale * Double(m.rank)]))
        }
        var meta: [(key: String, value: String)] = w.source.format == .kohya
            ? w.source.store.metadataPairs.filter { !$0.key.hasPrefix("sshs_") }  // hashes of the old tensors
            : [("ss_network_module", "networks.lora")]
        func set(_ key: String, _ value: String?) {
            meta.removeAll { $0.key == key }
            if let value { meta.append((key, value)) }
        }
        let rank = mostCommon(w.modules.map(\.rank)) ?? 0
        let alpha = mostCommon(w.modules.map { $0.scale * Double($0.rank) }) ?? 0
        set("ss_network_dim", String(rank))
        set("ss_network_alpha", Double(Float(alpha)).description)
        set("ss_adapter_algorithm", w.modules.contains { $0.heldMixer != nil } ? "moslora" : nil)
        if w.resized, let raw = meta.first(where: { $0.key == "ss_network_args" })?.value {
            set("ss_network_args", try resizedNetworkArgs(raw, w.modules, path: w.source.path))
        }
        meta.sort { $0.key.precedesInBytes($1.key) }
        try writeFile(file.path, tensors, metadata: meta, sync: sync, descriptor: file)
        return []
    }

    /// diffusers' LoRA file: `<component>.<module>.lora_A.weight` / `lora_B.weight` with the scale
    /// folded into B (diffusers reads a file without metadata as alpha = r), mixers as `lora_AB`
    /// when kept (the MoSLoRA code's names; diffusers skips them).
    static func writeDiffusers(_ w: WorkingAdapter, file: FileDescriptor, dtype: DType?, sync: Bool) throws -> [String] {
        try refuseReplacements(w, .diffusers)
        var tensors: [OutputTensor] = []
        var seen = Set<String>()
        for m in w.modules {
            guard m.kind != .embedding, m.kind != .linearFanInFanOut else {
                throw InputError.conversion(w.source.path, "module \(m.name) is a \(m.kind.rawValue) layer, which diffusers LoRAs do not hold")
            }
            if m.magnitude != nil { throw InputError.conversion(w.source.path, "module \(m.name) is DoRA, which this diffusers writer does not write") }
            if m.bias != nil { throw InputError.conversion(w.source.path, "module \(m.name) has a bias update, which this diffusers writer does not write") }
            guard let component = m.component else {
                throw InputError.conversion(w.source.path, "module \(m.name) has no component (unet, transformer, text_encoder, …); diffusers names every module by one")
            }
            let name = component + "." + m.baseName
            guard seen.insert(name).inserted else { throw InputError.conversion(w.source.path, "two modules are both \(name)") }
            tensors.append(try OutputTensor(name: name + ".lora_A.weight", dtype: try outputType(m.aType, dtype, tensor: name), holding: m.a))
            let scaled = m.b.holding(m.heldB.map { $0 * m.scale }, shape: m.b.shape)
            tensors.append(try OutputTensor(name: name + ".lora_B.weight", dtype: try outputType(m.bType, dtype, tensor: name), holding: scaled))
            if let mixer = m.mixer {
                tensors.append(try OutputTensor(name: name + ".lora_AB.weight", dtype: try outputType(m.mixerType ?? m.aType, dtype, tensor: name), holding: mixer))
            }
        }
        try writeFile(file.path, tensors, metadata: [("format", "pt")], sync: sync, descriptor: file)
        return []
    }

    /// kohya's `ss_network_args` after a resize: `conv_dim` / `conv_alpha` (and LyCORIS' `dim` /
    /// `alpha`) state ranks the file no longer has, so they are set to the new most common values
    /// (removed where no module of that kind is left); every other argument is kept.
    static func resizedNetworkArgs(_ raw: String, _ modules: [LoRAModule], path: String) throws -> String? {
        guard case .object(var args)? = try? JSONParser.parse(Array(raw.utf8)) else {
            return nil  // not the JSON object kohya writes: dropped rather than kept stale
        }
        let conv = modules.filter { $0.kind == .convKxK }
        let all = modules
        func text(_ v: Double) -> JSONValue { .string(formatNumber(v)) }
        for (key, group, isAlpha) in [("conv_dim", conv, false), ("conv_alpha", conv, true), ("dim", all, false), ("alpha", all, true)]
        where args[key] != nil {
            if group.isEmpty {
                args[key] = nil
            } else if isAlpha {
                args[key] = text(mostCommon(group.map { $0.scale * Double($0.rank) }) ?? 0)
            } else {
                args[key] = .string(String(mostCommon(group.map(\.rank)) ?? 0))
            }
        }
        return args.members.isEmpty ? nil : JSONWriter.compact(.object(args))
    }

    // MARK: - mlx-lm

    /// Writes `adapters.safetensors` and `adapter_config.json` into `folder`.
    static func writeMLX(_ w: WorkingAdapter, folder: String, dtype: DType?, base: String? = nil, sync: Bool) throws -> [String] {
        let baseLayerCount = try base.map { try layerCount($0) }
        try refuseReplacements(w, .mlx)
        var notes: [String] = []
        for m in w.modules {
            switch m.kind {
            case .linear: break
            case .embedding: throw InputError.conversion(w.source.path, "module \(m.name) is an embedding; writing mlx-lm's LoRAEmbedding layout is not supported yet")
            case .conv1x1, .convKxK: throw InputError.conversion(w.source.path, "module \(m.name) is a convolution; mlx-lm's LoRA layout holds linear layers only")
            case .linearFanInFanOut: throw InputError.conversion(w.source.path, "module \(m.name) is a fan_in_fan_out (Conv1D) layer; mlx-lm's LoRA layout holds nn.Linear layers only")
            }
            if m.bias != nil { throw InputError.conversion(w.source.path, "module \(m.name) has a lora_B.bias, which mlx-lm cannot hold") }
        }
        let dora = w.modules.filter { $0.magnitude != nil }.count
        if dora != 0 && dora != w.modules.count {
            throw InputError.conversion(w.source.path, "only \(dora) of \(w.modules.count) modules are DoRA; mlx-lm's fine_tune_type is one for all")
        }
        let folded = w.modules.filter { $0.heldMixer != nil }.count
        if folded > 0 { notes.append("mlx-lm has no mixer: folded the mixer into A (A' = M·A) in \(folded) module\(folded == 1 ? "" : "s")") }
        let rank = w.modules.map(\.rank).max() ?? 0
        let padded = w.modules.filter { $0.rank < rank }.count
        if padded > 0 { notes.append("mlx-lm has one rank: padded \(padded) module\(padded == 1 ? "" : "s") to rank \(rank) with zero rows and columns (exact)") }
        let scale = mostCommon(w.modules.map(\.scale)) ?? 20
        let rescaled = w.modules.filter { $0.scale != scale }.count
        if rescaled > 0 { notes.append("mlx-lm has one scale (\(formatNumber(scale))): folded the ratio into B for \(rescaled) module\(rescaled == 1 ? "" : "s")") }

        var tensors: [OutputTensor] = []
        for m in w.modules {
            let r = m.rank, n = m.inFeatures, out = m.outFeatures
            let ma = m.heldMixedA
            // lora_a (in, rank): Aᵀ with zero columns beyond r; lora_b (rank, out): Bᵀ·(s/scale) with zero rows.
            let ratio = m.scale / scale
            let (la, lb) = FactorOrientation.transposed.fromPEFT(a: ma, b: ratio == 1 ? m.heldB : m.heldB.map { $0 * ratio },
                                                                 rank: r, inFeatures: n, outFeatures: out, paddedRank: rank)
            tensors.append(OutputTensor(name: m.baseName + ".lora_a", dtype: try outputType(m.aType, dtype, tensor: m.name), shape: [n, rank], values: la))
            tensors.append(OutputTensor(name: m.baseName + ".lora_b", dtype: try outputType(m.bType, dtype, tensor: m.name), shape: [rank, out], values: lb))
            if let mag = m.magnitude?.held {
                tensors.append(OutputTensor(name: m.baseName + ".m", dtype: try outputType(m.magnitudeType ?? m.bType, dtype, tensor: m.name),
                                            shape: [mag.count], values: mag))
            }
        }
        var c: JSONObject
        if w.source.format == .mlx, let source = w.source.config {
            c = source
        } else {
            c = JSONObject([("fine_tune_type", .string("lora")), ("lora_parameters", .object(JSONObject())), ("num_layers", .number("0"))])
            let (keys, first) = mlxKeysAndLayers(w.modules.map(\.baseName))
            // mlx-lm wraps the LAST num_layers layers of the model; -1 wraps all of them. An
            // adapter from layer 0 up needs all; one that starts at layer L needs (layers − L),
            // which only the base model can tell; without it every layer is wrapped, and the
            // layers the file does not adapt keep a zero update.
            var numLayers = -1
            if let first, first > 0 {
                if let count = baseLayerCount {
                    numLayers = count - first
                } else {
                    notes.append("the adapter starts at layer \(first): num_layers -1 (every layer) is written, since mlx-lm wraps the last num_layers layers; layers it does not adapt get a zero update (pass --base MODEL to write the exact count)")
                }
            }
            c["num_layers"] = jsonInt(numLayers)
            c["lora_parameters"] = .object(JSONObject([("rank", jsonInt(rank)), ("scale", .real(scale)), ("dropout", .real(0)),
                                                       ("keys", .array(keys.map { .string($0) }))]))
            if let model = w.source.config?["base_model_name_or_path"]?.stringValue { c["model"] = .string(model) }
            c = keepingOrder(c, sorted: true)
        }
        var params = c["lora_parameters"]?.objectValue ?? JSONObject()
        params["rank"] = jsonInt(rank)
        params["scale"] = .real(scale)
        params["alpha"] = nil
        c["lora_parameters"] = .object(params)
        c["fine_tune_type"] = .string(dora > 0 ? "dora" : "lora")
        try writeFile(joinPath(folder, "adapters.safetensors"), tensors, metadata: [("format", "mlx")], sync: sync)
        try writeConfig(joinPath(folder, "adapter_config.json"), c, indent: 4, sync: sync)
        return notes
    }

    /// mlx-lm's `keys` (module paths inside a layer, `self_attn.q_proj`) and the first adapted
    /// layer index (nil when no module is inside a numbered layer).
    static func mlxKeysAndLayers(_ names: [String]) -> (keys: [String], firstLayer: Int?) {
        var keys: [String] = []
        var low: Int?
        for name in names {
            let parts = name.split(separator: ".").map(String.init)
            if let i = parts.firstIndex(of: "layers"), i + 1 < parts.count, let n = Int(parts[i + 1]) {
                low = min(low ?? n, n)
                let key = parts[(i + 2)...].joined(separator: ".")
                if !keys.contains(key) { keys.append(key) }
            } else if !keys.contains(name) {
                keys.append(name)
            }
        }
        return (keys.sorted(), low)
    }

    /// The number of numbered layers (`….layers.N.…`) of a base model.
    static func layerCount(_ base: String) throws -> Int {
        var high = -1
        for name in try Checkpoint(path: base).tensorNames {
            let parts = name.split(separator: ".")
            if let i = parts.firstIndex(of: "layers"), i + 1 < parts.count, let n = Int(parts[i + 1]) { high = max(high, n) }
        }
        return high + 1
    }
}
