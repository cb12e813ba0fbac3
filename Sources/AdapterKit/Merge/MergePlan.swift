/// One adapter to merge, with the weight of its update.
public struct MergeInput: Sendable {
    public let adapter: Adapter
    /// Multiplies the update (−1 un-merges).
    public let weight: Double

    public init(adapter: Adapter, weight: Double = 1) {
        self.adapter = adapter
        self.weight = weight
    }
}

/// Options of a merge.
public struct MergeOptions: Sendable {
    public var dropUnknown = false
    /// Restricts multi-model adapters (kohya, diffusers) to these components (`unet`, `text_encoder`, …).
    public var components: [String]? = nil
    /// Files (or folders) of a folder base to leave out of OUT, relative to the folder: a stray
    /// tensor file that is not part of the merge is refused unless it is named here.
    public var skipFiles: [String] = []
    /// `--dtype`: write every quantized weight of the base dequantized in this float dtype (merged
    /// or not), drop their scale tensors and `quantization_config`; nil requantizes merged weights
    /// in their own scheme.
    public var dequantize: DType? = nil

    public init(dropUnknown: Bool = false, components: [String]? = nil, skipFiles: [String] = [], dequantize: DType? = nil) {
        self.dropUnknown = dropUnknown
        self.components = components
        self.skipFiles = skipFiles
        self.dequantize = dequantize
    }
}

/// Every base tensor's fate, checked before a byte is written.
public struct MergePlan: Sendable {
    public let base: Checkpoint
    public let inputs: [MergeInput]
    /// The edits of the tensors that change, by base name.
    public let changes: [String: TensorEdit]

    /// The dtypes of the tensors an update changes (sorted), for notices about rounding.
    public var changedTensorDTypes: [DType] {
        Array(Set(changes.values.filter { !$0.terms.isEmpty }.map(\.base.dtype))).sorted()
    }
    /// Modules left out because of `--component`, per component.
    public let skipped: [String: Int]
    public let notes: [String]
    /// For a folder base: its other files (config, tokenizer, …), copied into OUT unchanged.
    public let otherFiles: FolderCopy?
    /// Tensors left out of OUT (the scales of dequantized weights).
    public private(set) var dropped: Set<String> = []
    /// The dtype quantized weights are written in, when the merge dequantizes (`--dtype`).
    public private(set) var dequantizedTo: DType? = nil

    /// The options the plan was made with (a split merge's parts and finish compare their digests).
    public private(set) var options = MergeOptions()

    /// Adapter modules merged (a `target_parameters` module counts once however many experts it holds).
    public let moduleCount: Int
    /// Low-rank updates added: one per module, or one per expert (and gate / up part) of an expert module.
    public var updateCount: Int { changes.values.reduce(0) { $0 + $1.terms.count } }

    /// A plan made of edits already resolved (by a name map that places updates on rows of fused
    /// or expert tensors); the edits are not checked again.
    init(base: Checkpoint, inputs: [MergeInput], edits: [TensorEdit], notes: [String] = []) throws {
        self.base = base
        self.inputs = inputs
        self.changes = Dictionary(edits.map { ($0.baseName, $0) }, uniquingKeysWith: { a, _ in a })
        self.moduleCount = edits.reduce(0) { $0 + $1.terms.count }
        self.skipped = [:]
        self.notes = notes
        self.otherFiles = try Self.otherFiles(of: base, skip: [])
    }

    /// Maps every module to exactly one base tensor and checks shapes, dtypes, mixers and
    /// unknown keys; throws a `ProblemList` with every failure.
    public init(base: Checkpoint, inputs: [MergeInput], options: MergeOptions = MergeOptions()) throws {
        self.base = base
        self.inputs = inputs
        self.options = options
        var problems: [String] = []
        var notes: [String] = []
        var changes: [String: TensorEdit] = [:]
        var skipped: [String: Int] = [:]
        let names = NameMap(base: base)
        var unmapped = 0, familySpecific = false, merged = 0
        if base.files.count > 1, let file = base.files.first(where: { $0.format != .safetensors }) {
            throw InputError(file.path, "sharded PyTorch checkpoints are not supported as a base; convert the shards first: adapter convert to-safetensors")
        }
        otherFiles = try Self.otherFiles(of: base, skip: options.skipFiles)

        /// The untouched edit of a base tensor (nil when the base has none).
        func fresh(_ name: String) -> TensorEdit? {
            guard let (entry, file) = base.tensor(name) else { return nil }
            return TensorEdit(baseName: name, base: entry, file: file)
        }
        func plan(_ name: String) -> TensorEdit? { changes[name] ?? fresh(name) }

        for input in inputs {
            let adapter = input.adapter
            let label = inputs.count > 1 ? "\(adapter.path): " : ""
            if !adapter.unknownKeys.isEmpty && !options.dropUnknown {
                problems.append("\(label)\(unknownKeysPhrase(adapter.unknownKeys)); use --drop-unknown to merge without them")
            }
            let components = adapter.components
            var selected = options.components
            if selected == nil, components.count > 1, let d = names.diffusion {
                // A single-file checkpoint holds its denoiser and text encoders together.
                let missing = components.filter { d.modules[d.component($0)] == nil }
                if !missing.isEmpty {
                    problems.append("\(label)the adapter has modules for \(missing.joined(separator: ", ")), which this \(d.family.description) file does not hold; choose the parts it has with --component")
                    continue
                }
            } else if selected == nil && components.count > 1 {
                problems.append("\(label)the adapter has modules for \(components.joined(separator: ", ")); choose with --component (the base is one model)")
                continue
            }
            if let s = selected, components.isEmpty { selected = nil; if !s.isEmpty { notes.append("\(label)--component ignored: the adapter is for one model") } }
            // Replacements first: an update of the same tensor applies to the replaced values.
            for r in adapter.replacements {
                // modules_to_save are named as the model in memory: the family's renames apply too.
                guard let target = names.replacedTensor(r.baseName, format: adapter.format), var p = plan(target) else {
                    problems.append("\(label)\(r.tensor.name) replaces \(r.baseName), which the base does not have")
                    continue
                }
                if p.replacement != nil {
                    problems.append("\(label)\(target) is replaced by two adapters")
                    continue
                }
                if !p.terms.isEmpty {
                    problems.append("\(label)\(target) is replaced after another adapter updated it; list the replacing adapter first")
                    continue
                }
                if !r.tensor.entry.dtype.isReadableAsFloat || RowCodec(p.base.encoding) == nil {
                    problems.append("\(label)\(r.tensor.name): cannot convert \(r.tensor.entry.dtype.rawValue) to \(p.base.dtype.rawValue)")
                    continue
                }
                if r.tensor.shape != p.base.shape {
                    notes.append("\(target) changes shape from \(p.base.shape) to \(r.tensor.shape) (replaced by \(r.tensor.name))")
                }
                if input.weight != 1 {
                    notes.append("\(target) is replaced whole; --weight does not scale replacements")
                }
                p.replacement = r
                changes[target] = p
            }
            for module in adapter.modules {
                if let selected, let c = module.component, !selected.contains(c) {
                    skipped[c, default: 0] += 1
                    continue
                }
                let placements: [UpdatePlacement]
                switch names.placements(for: module, format: adapter.format) {
                case .success(let found): placements = found
                case .failure(let problem):
                    problems.append("\(label)module \(module.name): \(problem.text)")
                    unmapped += 1
                    // Names a family's rename or expert layout would have placed.
                    familySpecific = familySpecific || ["experts", "language_model", "vision_tower", "visual", "multi_modal_projector"]
                        .contains { module.baseName.contains($0) }
                    continue
                }
                var placed = true
                for placement in placements {
                    if let problem = Self.place(placement, weight: input.weight, into: &changes, fresh: fresh) {
                        problems.append(label + problem)
                        placed = false
                    }
                }
                if placed { merged += 1 }
            }
        }
        if unmapped > 0 && names.family == nil && (base.config?.modelType != nil || familySpecific) {
            let type = base.config?.modelType.map { "its model_type \(quotedForMessage($0)) is not a family with known renames" }
                ?? "it has no config.json naming its model_type"
            problems.append("\(plural(unmapped, "module")) did not map to the base, whose family is not known: \(type)")
        }
        // The replacement must come before the updates: re-check shapes against it.
        for (name, p) in changes.sorted(by: { $0.key.precedesInBytes($1.key) }) where p.replacement != nil {
            for t in p.terms where t.rows == .all && t.module.expectedBaseShape != p.outputShape {
                problems.append("module \(t.module.name): update has shape \(t.module.expectedBaseShape) but the replaced \(name) has shape \(p.outputShape)")
            }
        }
        if changes.isEmpty && problems.isEmpty {
            problems.append("no module of the adapter applies to this base")
        }
        if let d = options.dequantize {
            // Every quantized weight becomes a plain tensor of `d`; its scales go.
            guard d.isMergeable, d != .f64 else { throw InputError(base.path, "--dtype \(d.rawValue): dequantized weights are written as BF16, F16 or F32") }
            let quantized = base.tensors.filter { if case .plain = $0.entry.encoding { false } else { true } }
            if quantized.isEmpty {
                problems.append("--dtype \(d.rawValue): the base has no quantized weights to dequantize (its float tensors keep their dtypes)")
            }
            for (entry, _) in quantized {
                let scale: String
                switch entry.encoding {
                case .plain: continue
                case .blockScaledFP8(_, let s, _), .mxfp4(let s), .nvfp4(let s, _): scale = s
                }
                guard var p = plan(entry.name) else { continue }
                p.outputDType = d
                if case .nvfp4(_, let global) = entry.encoding {
                    // compressed-tensors' `X.weight_packed` is written as the plain `X.weight`.
                    changes[global] = nil
                    dropped.insert(global)
                    let name = String(entry.name.dropLast("_packed".count))
                    if base.tensor(name) != nil {
                        problems.append("--dtype \(d.rawValue): \(entry.name) would be written as \(name), which the base already has")
                    }
                    p.outputName = name
                }
                // MXFP4 `X_blocks` is written as the parameter `X`, as transformers loads it.
                if case .mxfp4 = entry.encoding {
                    let name = String(entry.name.dropLast("_blocks".count))
                    if base.tensor(name) != nil {
                        problems.append("--dtype \(d.rawValue): \(entry.name) would be written as \(name), which the base already has")
                    }
                    p.outputName = name
                }
                changes[entry.name] = p
                changes[scale] = nil
                dropped.insert(scale)
                // compressed-tensors' other quantization parameters of the module go with it
                // (static activation scales, zero points): a plain model has no use for them.
                if let module = [".weight", ".weight_packed"].lazy.compactMap({ entry.name.hasSuffix($0) ? String(entry.name.dropLast($0.count)) : nil }).first {
                    for suffix in [".input_scale", ".input_zero_point", ".weight_zero_point", ".input_global_scale"] where base.tensor(module + suffix) != nil {
                        dropped.insert(module + suffix)
                    }
                }
            }
            dequantizedTo = d
            if !quantized.isEmpty {
                let others = dropped.count - quantized.count
                notes.append("dequantized \(plural(quantized.count, "quantized weight")) to \(d.rawValue) (each value rounded once), left out their \(plural(quantized.count, "scale tensor"))\(others > 0 ? ", \(plural(others, "other quantization parameter"))" : "") and config.json's quantization_config")
            }
        }
        guard problems.isEmpty else { throw ProblemList(subject: "preflight", problems: problems) }
        self.changes = changes
        self.moduleCount = merged
        self.skipped = skipped
        self.notes = notes
    }
}

extension MergePlan {
    /// Adds one placed update to the edits: checks its shape against the rows (and columns) it
    /// lands on, the base's encoding, DoRA and `lora_B.bias`. Returns the problem, or nil.
    static func place(_ placement: UpdatePlacement, weight: Double, into changes: inout [String: TensorEdit],
                      fresh: (String) -> TensorEdit?) -> String? {
        let module = placement.module, placed = placement.target
        let target = placed.tensor
        guard var p = changes[target] ?? fresh(target) else { return "module \(module.name): no base tensor \(target)" }
        if target.hasSuffix(".weight_packed"), case .plain(let d) = p.base.encoding {
            return "module \(module.name): base tensor \(target) is compressed-tensors packed \(d.rawValue) but not NVFP4 (U8 codes with an F8_E4M3 weight_scale per 16 values and a weight_global_scale: the base's warnings say what is missing); int4 pack-quantized weights are not merged"
        }
        if let columns = placed.viewColumns {
            if let other = p.viewColumns, other != columns {
                return "module \(module.name): \(target) is viewed with \(other) columns by another update, \(columns) by this one"
            }
            p.viewColumns = columns
        }
        let term = MergeTerm(module: module, factor: module.scale * weight, rows: placed.rows, transposed: placed.transposed, columns: placed.columns)
        let expected = module.expectedBaseShape
        switch placed.rows {
        case .all:
            let actual = p.valueShape
            // A 1×1 convolution and a linear layer are the same [out, in] weight: kohya's SD2 LoRAs
            // trained from single files carry 1×1 conv factors for proj_in/proj_out, which SD2
            // stores as linear (and SD1's the other way round).
            let unitKernel = [.linear, .conv1x1].contains(module.kind) && Self.withoutUnitKernel(expected) == Self.withoutUnitKernel(actual)
            if (expected != actual && !unitKernel) || placed.transposed || placed.columns != nil {
                return "module \(module.name): update has shape \(expected) (\(module.kind.rawValue)) but \(target) has shape \(actual)"
            }
        case .range(let rows):
            // A slice of the tensor's 2-D view: the update is rows × the view's columns (or the
            // columns it selects), transposed where the placement says so.
            let width = placed.columns?.count ?? p.columns
            let slice = [rows.count, width]
            let update = placed.transposed ? [module.inFeatures, module.outFeatures] : expected
            let fits = rows.upperBound <= p.rows && (placed.columns?.isWithin(p.columns) ?? true)
            if !fits || expected.count != 2 || update != slice || module.kind.isTransposed {
                let what = placed.columns.map { " (\($0.count) of its \(p.columns) columns)" } ?? ""
                return "module \(module.name): update has shape \(expected) (\(module.kind.rawValue)\(placed.transposed ? ", stored transposed" : "")) but rows \(rows.lowerBound)..<\(rows.upperBound) of \(target) are \(slice)\(what)"
            }
            if module.magnitude != nil { return "module \(module.name): DoRA on a slice of \(target) is not supported" }
        }
        if case .blockScaledFP8(let codes, let scale, _) = p.base.encoding {
            // Requantized with fresh scales: the scale tensor is rewritten with the weight.
            guard codes == .f8E4M3 else {
                return "module \(module.name): base tensor \(target) is \(p.base.encoding.name); only E4M3 block-scaled weights are requantized"
            }
            if module.magnitude != nil { return "module \(module.name): DoRA into the quantized \(target) is not supported" }
            if changes[scale] == nil {
                guard var sp = fresh(scale) else { return "module \(module.name): the scales \(scale) of \(target) are missing" }
                sp.scalesOf = target
                changes[scale] = sp
            }
        } else if case .mxfp4(let scale) = p.base.encoding {
            if module.magnitude != nil { return "module \(module.name): DoRA into the MXFP4 \(target) is not supported" }
            if changes[scale] == nil {
                guard var sp = fresh(scale) else { return "module \(module.name): the scales \(scale) of \(target) are missing" }
                sp.scalesOf = target
                changes[scale] = sp
            }
        } else if case .nvfp4(let scale, _) = p.base.encoding {
            // Fresh group scales under the kept global scale (vLLM fuses q/k/v and gate/up under one).
            if module.magnitude != nil { return "module \(module.name): DoRA into the NVFP4 \(target) is not supported" }
            if changes[scale] == nil {
                guard var sp = fresh(scale) else { return "module \(module.name): the scales \(scale) of \(target) are missing" }
                sp.scalesOf = target
                changes[scale] = sp
            }
        } else if RowCodec(p.base.encoding) == nil {
            if case .plain(let d) = p.base.encoding, d == .f8E4M3 || d == .f8E5M2 {
                return "module \(module.name): base tensor \(target) holds \(d.rawValue) codes without scales that fit (\(target)_scale_inv or \(target)_scale missing, or of another shape or dtype: the base's warnings say which); nothing was written"
            }
            if case .plain = p.base.encoding {
                return "module \(module.name): base tensor \(target) has dtype \(p.base.dtype.rawValue); merges need F32, F64, F16 or BF16 (or E4M3 with block scales)"
            }
            return "module \(module.name): base tensor \(target) is \(p.base.encoding.name); merging into it is not supported yet"
        }
        if module.magnitude != nil {
            if module.kind.isTransposed { return "module \(module.name): DoRA on a \(module.kind.rawValue) layer is not supported" }
            if p.dora != nil || !p.terms.isEmpty { return "module \(module.name): DoRA cannot be combined with another update of \(target)" }
            p.dora = term
        } else if p.dora != nil {
            return "module \(module.name): \(target) already has a DoRA update, which cannot be combined"
        }
        p.terms.append(term)
        changes[target] = p
        if let bias = module.bias {
            guard placed.rows == .all, target.hasSuffix(".weight") else {
                return "module \(module.name): lora_B.bias on a slice of \(target) is not supported"
            }
            let biasName = String(target.dropLast(".weight".count)) + ".bias"
            guard var bp = changes[biasName] ?? fresh(biasName) else {
                return "module \(module.name): has lora_B.bias but the base has no \(biasName)"
            }
            guard bp.base.shape == [module.outFeatures], RowCodec(bp.base.encoding) != nil else {
                return "module \(module.name): \(biasName) has shape \(bp.base.shape) \(bp.base.dtype.rawValue), expected [\(module.outFeatures)]"
            }
            bp.biasTerms.append((bias, (module.biasScale ?? module.scale) * weight, module.name))
            changes[biasName] = bp
        }
        return nil
    }

    /// A shape without trailing 1×1 kernel dimensions ([out, in, 1, 1] → [out, in]).
    static func withoutUnitKernel(_ shape: [Int]) -> [Int] {
        var s = shape
        while s.count > 2 && s.last == 1 { s.removeLast() }
        return s
    }

    /// A folder base's other files, found before a byte is written so that what cannot be copied (a
    /// FIFO) is refused first. A tensor file among them is not part of the merge: copied, it would
    /// put unmerged weights beside the merged ones (transformers loads a stray model.safetensors
    /// before the index), so it is refused unless `skip` names it.
    static func otherFiles(of base: Checkpoint, skip: [String]) throws -> FolderCopy? {
        guard base.isFolder else {
            if let name = skip.first { throw InputError(base.path, "--skip-file \(name): the base is a single file, not a model folder") }
            return nil
        }
        let own = Set(base.fileNames + (base.indexFileName.map { [$0] } ?? []))
        var names = Set<String>()
        for raw in skip {
            var name = Checkpoint.normalisedShardName(raw)
            while name.count > 1 && name.hasSuffix("/") { name.removeLast() }
            if own.contains(name) {
                throw InputError(base.path, "--skip-file \(raw): \(name) is part of the merge (a shard or the index), not a file to leave out")
            }
            names.insert(name)
        }
        let other = try FolderCopy(folder: base.path, excluding: own, skip: names, label: "model folder")
        if let missing = names.subtracting(other.skippedByRequest).sorted().first {
            throw InputError(base.path, "--skip-file \(missing): the model folder holds no such file or folder")
        }
        let stray = other.tensorFiles.map(\.display)
        if stray.count == 1 {
            throw InputError(base.path, "\(stray[0]) is a tensor file that is not part of the merge; copied into OUT it would be unmerged weights a loader may pick up: remove it or pass --skip-file \(stray[0])")
        }
        if stray.count > 1 {
            let shown = stray.prefix(5).joined(separator: ", ") + (stray.count > 5 ? ", …" : "")
            throw InputError(base.path, "\(stray.count) tensor files are not part of the merge (\(shown)); copied into OUT they would be unmerged weights a loader may pick up: remove them or pass --skip-file for each")
        }
        return other
    }
}
