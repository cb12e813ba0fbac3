/// The two naming dialects of diffusion LoRAs: diffusers' module names (diffusers and PEFT files,
/// kohya's SD 1.x/2.x LoRAs) and the original checkpoints' (kohya's SDXL and Flux LoRAs, ComfyUI).
/// Converting moves factors by the layout table's row pairs, exactly:
/// - to original names, the diffusers modules that share a fused tensor (to_q, to_k, to_v → qkv;
///   …, proj_mlp → linear1) become one module whose A stacks their (mixed) A's and whose B holds
///   each one's scale·B in its rows and its own columns: rank Σ rᵢ, the same update;
/// - to diffusers names, an original module is split by rows of B, every part keeping A (and the
///   mixer) and the scale.
/// Text encoders keep Hugging Face names in both dialects.
public enum DiffusionDialect: String, Sendable {
    case original, diffusers
}

extension WorkingAdapter {
    /// Renames (and fuses or splits) the denoiser's modules into `dialect` by `layout`'s pairs.
    mutating func rewrite(into dialect: DiffusionDialect, layout d: DiffusionLayout, textNames: (String, String) -> String?) throws -> [String] {
        var out: [LoRAModule] = []
        var notes: [String] = []
        var fused: [String: [(module: LoRAModule, pairs: [DiffusionLayout.NamePair])]] = [:]
        var fusedOrder: [String] = []
        let denoiser = d.denoiser
        // XLabs' single-block qkv (linear1's first rows) is a name of its own in the table, on either
        // side of a pair; conversions treat such a module as the top rows of linear1 instead.
        let synthetic = "." + DiffusionLayout.singleQKV
        let pairs = d.pairs.filter { $0.component == denoiser && !$0.original.hasSuffix(synthetic) && !$0.diffusers.hasSuffix(synthetic) }
        let byDiffusers = Dictionary(grouping: pairs, by: \.diffusers), byOriginal = Dictionary(grouping: pairs, by: \.original)
        let heights = d.heights[denoiser] ?? [:], widths = d.widths[denoiser] ?? [:]
        var split = 0
        for m in modules {
            let c = d.component(m.component)
            guard c == denoiser else {
                // A text encoder: Hugging Face names either way; kohya's underscores get their dots back.
                var t = m
                if source.format == .kohya {
                    guard let dotted = textNames(c, m.baseName) else {
                        throw InputError.conversion(source.path, "module \(m.name): no tensor of the base's \(c) has this name")
                    }
                    t.baseName = dotted
                }
                out.append(t)
                continue
            }
            // The module's name in the table: kohya's underscores resolved, ComfyUI's / PEFT's prefixes dropped.
            var name = m.baseName
            if source.format == .kohya { name = (d.kohya[c]?[KohyaNames.key(name)] ?? nil) ?? name }
            for p in DiffusionLayout.strippable where name.hasPrefix(p) && byDiffusers[name] == nil && byOriginal[name] == nil {
                name.removeFirst(p.count)
            }
            let xlabsQKV = name.hasSuffix(synthetic)
            if xlabsQKV { name.removeLast(".qkv".count) }  // XLabs: linear1's q/k/v rows
            let asDiffusers = byDiffusers[name], asOriginal = byOriginal[name]
            // The module must be the shape the table says (its top rows, for XLabs' qkv).
            let partial = asOriginal != nil && xlabsQKV
            if let height = heights[name], let width = widths[name] {
                // XLabs' qkv is q, k and v: three times the hidden width (linear1's inputs).
                let expected = partial ? 3 * width : height
                guard m.outFeatures == expected, m.inFeatures == width else {
                    throw InputError.conversion(source.path, "module \(m.name) is [\(m.outFeatures), \(m.inFeatures)], but \(partial ? "the q/k/v rows of " : "")\(name) of this \(d.family.description) model are [\(expected), \(width)]")
                }
            }
            switch dialect {
            case .original:
                if asOriginal != nil {
                    var o = m
                    o.baseName = name
                    if partial, let height = heights[name] {
                        // linear1's q/k/v rows: B padded with zero rows for the MLP's (exact: they add nothing).
                        var b = [Double](repeating: 0, count: height * m.rank)
                        let hb = m.heldB
                        for i in 0..<m.outFeatures { for t in 0..<m.rank { b[i * m.rank + t] = hb[i * m.rank + t] } }
                        o.b = m.b.holding(b, shape: [height, m.rank])
                    }
                    out.append(o)
                } else if let ps = asDiffusers {
                    let target = ps[0].original
                    guard ps.allSatisfy({ $0.original == target }) else {
                        throw InputError.conversion(source.path, "module \(m.name) is part of more than one original tensor")
                    }
                    if fused[target] == nil { fusedOrder.append(target) }
                    fused[target, default: []].append((m, ps))
                } else {
                    throw InputError.conversion(source.path, "module \(m.name) is not a module of this \(d.family.description) model")
                }
            case .diffusers:
                if asDiffusers != nil {
                    var o = m
                    o.baseName = name
                    out.append(o)
                } else if var ps = asOriginal {
                    if partial { ps = ps.filter { $0.originalRows.upperBound <= m.outFeatures } }
                    let parts = try splitting(m, pairs: ps, heights: heights)
                    if parts.count > 1 { split += 1 }
                    out += parts
                } else {
                    throw InputError.conversion(source.path, "module \(m.name) is not a module of this \(d.family.description) model")
                }
            }
        }
        var fusedCount = 0
        for target in fusedOrder {
            let parts = fused[target]!
            let height = heights[target] ?? 0
            // One module covering the whole tensor by itself is a rename: it keeps DoRA, bias and mixer.
            if parts.count == 1, let p = parts[0].pairs.first, parts[0].pairs.count == 1, p.originalRows == 0..<height,
               p.diffusersRows == 0..<parts[0].module.outFeatures {
                var o = parts[0].module
                o.baseName = target
                out.append(o)
                continue
            }
            out.append(try fusing(parts, into: target, height: height))
            fusedCount += 1
        }
        // kohya names the main network lora_unet_ in every family; diffusers by its folder.
        for i in out.indices where d.component(out[i].component) == denoiser {
            out[i].component = dialect == .original ? "unet" : denoiser
        }
        modules = out
        renamed = true
        if fusedCount > 0 {
            notes.append("fused the diffusers modules of \(plural(fusedCount, "original tensor")) (q/k/v → qkv, q/k/v/mlp → linear1, swapped halves) into one module each: A stacked, B block-diagonal with each part's scale, alpha = rank (scale 1); mixers folded into A")
        }
        if split > 0 {
            notes.append("split \(plural(split, "original module")) over the diffusers modules its rows belong to (B by rows; A, mixer and scale shared)")
        }
        return notes
    }

    /// One module from the diffusers modules that land on rows of one original tensor.
    private func fusing(_ parts: [(module: LoRAModule, pairs: [DiffusionLayout.NamePair])], into target: String, height: Int) throws -> LoRAModule {
        let first = parts[0].module
        for (m, _) in parts {
            guard m.inShape == first.inShape, m.magnitude == nil, m.bias == nil, m.parameter == nil else {
                let why = m.magnitude != nil ? "DoRA" : m.bias != nil ? "a bias" : m.parameter != nil ? "expert parameters" : "inputs \(m.inShape), not \(first.inShape)"
                throw InputError.conversion(source.path, "module \(m.name) has \(why) and cannot be fused with the other parts of \(target)")
            }
        }
        let n = first.inFeatures
        let rank = parts.reduce(0) { $0 + $1.module.rank }
        var a = [Double](), b = [Double](repeating: 0, count: height * rank)
        var column = 0
        for (m, pairs) in parts {
            a += m.heldMixedA
            let hb = m.heldB, r = m.rank
            for p in pairs {
                for (i, row) in p.originalRows.enumerated() {
                    let from = p.diffusersRows.lowerBound + i
                    for t in 0..<r { b[row * rank + column + t] = m.scale * hb[from * r + t] }
                }
            }
            column += r
        }
        var f = first
        f.name = target
        f.baseName = target
        f.a = first.a.holding(a, shape: [rank] + first.inShape)
        f.b = first.b.holding(b, shape: first.inShape.count == 3 ? [height, rank, 1, 1] : [height, rank])
        f.mixer = nil
        f.scale = 1
        f.alpha = Double(rank)
        precondition(a.count == rank * n)
        return f
    }

    /// The diffusers modules an original module's rows belong to: B split by rows, A and the mixer kept.
    private func splitting(_ m: LoRAModule, pairs: [DiffusionLayout.NamePair], heights: [String: Int]) throws -> [LoRAModule] {
        let covered = pairs.reduce(0) { $0 + $1.originalRows.count }
        guard covered == m.outFeatures else {
            throw InputError.conversion(source.path, "module \(m.name) has \(m.outFeatures) rows, but its diffusers modules take \(covered)")
        }
        if pairs.count == 1, let p = pairs.first, p.diffusersRows == 0..<(heights[p.diffusers] ?? -1) {
            var o = m
            o.baseName = p.diffusers
            return [o]
        }
        guard m.magnitude == nil, m.bias == nil else {
            throw InputError.conversion(source.path, "module \(m.name) has \(m.magnitude != nil ? "DoRA" : "a bias"), which cannot be split over the diffusers modules of its rows")
        }
        let r = m.rank, hb = m.heldB
        var parts: [LoRAModule] = []
        for (target, ps) in Dictionary(grouping: pairs, by: \.diffusers).sorted(by: { $0.key.precedesInBytes($1.key) }) {
            let height = heights[target] ?? ps.map(\.diffusersRows.upperBound).max()!
            var b = [Double](repeating: 0, count: height * r)
            for p in ps {
                for (i, row) in p.diffusersRows.enumerated() {
                    let from = p.originalRows.lowerBound + i
                    for t in 0..<r { b[row * r + t] = hb[from * r + t] }
                }
            }
            var o = m
            o.name = m.name + "→" + target
            o.baseName = target
            o.b = m.b.holding(b, shape: m.inShape.count == 3 ? [height, r, 1, 1] : [height, r])
            parts.append(o)
        }
        return parts
    }
}

extension WorkingAdapter {
    /// For a diffusion base (a single file, a diffusers folder or pipeline): its layout table, and
    /// how kohya's underscored text-encoder names get their dots back.
    static func diffusionBase(_ path: String) throws -> (DiffusionLayout, (String, String) -> String?)? {
        if PipelineMergePlan.isPipeline(path) {
            guard let denoiser = PipelineMergePlan.denoiserFolder(of: path) else {
                throw InputError.conversion(path, "the pipeline folder has no unet/ or transformer/ to take module names from")
            }
            guard let d = DiffusionLayout.detect(try Checkpoint(path: joinPath(path, denoiser))) else {
                throw InputError.conversion(path, "\(denoiser)/ is not a denoiser whose layout adapter knows (UNet2DConditionModel, FluxTransformer2DModel, SD3Transformer2DModel)")
            }
            var maps: [String: NameMap] = [:]
            for c in ["text_encoder", "text_encoder_2", "text_encoder_3"] where FileSystem.kind(joinPath(path, c)) == .directory {
                maps[c] = NameMap(base: try Checkpoint(path: joinPath(path, c)))
            }
            return (d, { c, name in maps[c]?.dottedModule(forKohya: name) })
        }
        let base = try Checkpoint(path: path)
        guard let d = DiffusionLayout.detect(base) else { return nil }
        let names = NameMap(base: base)
        return (d, { c, name in (d.kohya[c]?[KohyaNames.key(name)] ?? nil) ?? names.dottedModule(forKohya: name) })
    }
}
