import AdapterTestSupport
import Foundation
import Testing

@testable import AdapterKit

/// A tensor's values by name from a checkpoint (a file or a folder).
private func values(_ c: Checkpoint, _ name: String) throws -> [Double] {
    let (_, file) = try #require(c.tensor(name), "\(name) is in \(c.path)")
    return try c.files[file].doubles(name)
}

private func rowsOf(_ v: [Double], _ rows: Range<Int>, cols: Int) -> [Double] { Array(v[(rows.lowerBound * cols)..<(rows.upperBound * cols)]) }

/// A LoRA of random factors (seeded) for `modules`: (stored module name, out, in shape) → F32 file.
private func randomLoRA(_ path: String, _ modules: [(name: String, out: Int, inShape: [Int])], kohya: Bool, seed: UInt64 = 1) throws -> String {
    var g = SeededGenerator(seed: seed)
    var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
    for m in modules {
        let conv = m.inShape.count == 3
        let a = (0..<(2 * m.inShape.reduce(1, *))).map { _ in Float(g.gaussian() * 0.1) }
        let b = (0..<(m.out * 2)).map { _ in Float(g.gaussian() * 0.1) }
        let (down, up) = kohya ? (".lora_down.weight", ".lora_up.weight") : (".lora_A.weight", ".lora_B.weight")
        tensors.append((m.name + down, .f32, [2] + m.inShape, floatBytes(a)))
        tensors.append((m.name + up, .f32, conv ? [m.out, 2, 1, 1] : [m.out, 2], floatBytes(b)))
        if kohya { tensors.append((m.name + ".alpha", .f32, [], floatBytes([1]))) }
    }
    return try writeSafetensors(path, tensors)
}

/// The (out, in…) of a weight.
private func dims(_ c: Checkpoint, _ name: String) throws -> (Int, [Int]) {
    let s = try #require(c.tensor(name)?.entry.shape, "\(name) in \(c.path)")
    return (s[0], Array(s.dropFirst()))
}

@Suite("diffusion: single-file layouts recognised, and diffusers names placed on their keys (and back)")
struct DiffusionLayoutTests {
    @Test("the family and layout of each tiny single file and diffusers denoiser", arguments: [
        ("tiny-flux-dev.safetensors", "flux-dev", "BFL single file"), ("tiny-flux-dev-comfy.safetensors", "flux-dev", "under model.diffusion_model. (ComfyUI)"),
        ("tiny-flux-schnell.safetensors", "flux-schnell", "BFL single file"), ("tiny-sdxl.safetensors", "sdxl", "ldm single file"),
        ("tiny-sd1.safetensors", "sd1", "ldm single file"), ("tiny-sd3.safetensors", "sd3", "MMDiT single file"), ("tiny-sd3.5.safetensors", "sd3.5", "MMDiT"),
        ("tiny-flux-dev-diffusers/transformer", "flux-dev", "diffusers (FluxTransformer2DModel"), ("tiny-sdxl-diffusers/unet", "sdxl", "diffusers (UNet2DConditionModel"),
        ("tiny-sd3-diffusers/transformer", "sd3", "diffusers (SD3Transformer2DModel"),
    ])
    func detects(_ file: String, _ family: String, _ layout: String) throws {
        let d = try #require(DiffusionLayout.detect(try Checkpoint(path: fixture("models/" + file))))
        #expect(d.family.rawValue == family)
        #expect(d.layout.contains(layout), "\(d.layout)")
        let lines = BaseLayout(try Checkpoint(path: fixture("models/" + file))).lines.joined(separator: "\n")
        #expect(lines.contains("family      \(family)") && lines.contains("key layout  \(d.layout)"), "\(lines)")
    }

    @Test("an LLM, a lone diffusers UNet test file and a text encoder are not diffusion layouts")
    func notDiffusion() throws {
        for m in ["tiny-llama", "tiny-unet", "tiny-text-encoder"] {
            #expect(DiffusionLayout.detect(try Checkpoint(path: modelPath(m))) == nil, "\(m)")
        }
    }

    @Test("Flux: a diffusers-named LoRA merged into the BFL file lands in qkv thirds, linear1's q/k/v/mlp rows, norm_out's swapped halves; the same as into the diffusers folder")
    func fluxDiffusersNames() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try Checkpoint(path: fixture("models/tiny-flux-dev-diffusers/transformer"))
        let names = ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.0.attn.to_q",
                     "single_transformer_blocks.0.proj_mlp", "norm_out.linear", "single_transformer_blocks.0.proj_out", "time_text_embed.guidance_embedder.linear_1"]
        let lora = try randomLoRA(dir.file("lora.safetensors"), try names.map { n in let (o, i) = try dims(folder, n + ".weight"); return ("transformer." + n, o, i) }, kohya: false)
        for single in ["tiny-flux-dev", "tiny-flux-dev-comfy"] {
            let (s, _) = try merge(base: modelPath(single), adapters: [(lora, 1)], out: dir.file(single + ".safetensors"))
            let (f, _) = try merge(base: fixture("models/tiny-flux-dev-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file(single + "-folder"))
            let p = single.hasSuffix("comfy") ? "model.diffusion_model." : ""
            let d = 32, mlp = 128
            #expect(rowsOf(try values(s, p + "double_blocks.0.img_attn.qkv.weight"), d..<2 * d, cols: d) == (try values(f, "transformer_blocks.0.attn.to_k.weight")))
            #expect(rowsOf(try values(s, p + "double_blocks.0.txt_attn.qkv.weight"), 2 * d..<3 * d, cols: d) == (try values(f, "transformer_blocks.0.attn.add_v_proj.weight")))
            #expect(rowsOf(try values(s, p + "single_blocks.0.linear1.weight"), 0..<d, cols: d) == (try values(f, "single_transformer_blocks.0.attn.to_q.weight")))
            #expect(rowsOf(try values(s, p + "single_blocks.0.linear1.weight"), 3 * d..<3 * d + mlp, cols: d) == (try values(f, "single_transformer_blocks.0.proj_mlp.weight")))
            let adaLN = try values(s, p + "final_layer.adaLN_modulation.1.weight"), normOut = try values(f, "norm_out.linear.weight")
            #expect(rowsOf(adaLN, 0..<d, cols: d) == rowsOf(normOut, d..<2 * d, cols: d) && rowsOf(adaLN, d..<2 * d, cols: d) == rowsOf(normOut, 0..<d, cols: d))
            #expect(try values(s, p + "single_blocks.0.linear2.weight") == (try values(f, "single_transformer_blocks.0.proj_out.weight")))
            #expect(try values(s, p + "guidance_in.in_layer.weight") == (try values(f, "time_text_embed.guidance_embedder.linear_1.weight")))
            // The rows no module touched are the base's.
            let base = try Checkpoint(path: modelPath(single))
            #expect(rowsOf(try values(s, p + "double_blocks.0.img_attn.qkv.weight"), 0..<d, cols: d) == rowsOf(try values(base, p + "double_blocks.0.img_attn.qkv.weight"), 0..<d, cols: d))
        }
    }

    @Test("Flux: kohya's BFL names merged into the diffusers folder land on q/k/v, proj_mlp and both norm_out halves; the same as into the BFL file")
    func fluxOriginalNamesIntoDiffusers() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let single = try Checkpoint(path: modelPath("tiny-flux-dev"))
        let names = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "double_blocks.0.txt_mod.lin"]
        let lora = try randomLoRA(dir.file("kohya.safetensors"), try names.map { n in let (o, i) = try dims(single, n + ".weight"); return ("lora_unet_" + KohyaNames.key(n), o, i) }, kohya: true)
        let (s, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let (f, _) = try merge(base: fixture("models/tiny-flux-dev-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file("f"))
        let d = 32
        let qkv = try values(s, "double_blocks.0.img_attn.qkv.weight"), linear1 = try values(s, "single_blocks.0.linear1.weight")
        for (i, n) in ["to_q", "to_k", "to_v"].enumerated() {
            #expect(rowsOf(qkv, i * d..<(i + 1) * d, cols: d) == (try values(f, "transformer_blocks.0.attn.\(n).weight")))
            #expect(rowsOf(linear1, i * d..<(i + 1) * d, cols: d) == (try values(f, "single_transformer_blocks.0.attn.\(n).weight")))
        }
        #expect(rowsOf(linear1, 3 * d..<7 * d, cols: d) == (try values(f, "single_transformer_blocks.0.proj_mlp.weight")))
        let adaLN = try values(s, "final_layer.adaLN_modulation.1.weight"), normOut = try values(f, "norm_out.linear.weight")
        #expect(rowsOf(adaLN, 0..<d, cols: d) == rowsOf(normOut, d..<2 * d, cols: d) && rowsOf(adaLN, d..<2 * d, cols: d) == rowsOf(normOut, 0..<d, cols: d))
        #expect(try values(s, "double_blocks.0.txt_mod.lin.weight") == (try values(f, "transformer_blocks.0.norm1_context.linear.weight")))
    }

    @Test("SDXL: diffusers names into the ldm file (down/mid/up blocks, samplers, embeddings, CLIP-L, OpenCLIP in_proj thirds) equal the pipeline folder's merge")
    func sdxl() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let root = fixture("models/tiny-sdxl-diffusers")
        let unet = try Checkpoint(path: root + "/unet"), te2 = try Checkpoint(path: root + "/text_encoder_2"), te1 = try Checkpoint(path: root + "/text_encoder")
        let pairs: [(String, String)] = [  // diffusers → ldm, the converter's rules written out
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"), ("down_blocks.1.resnets.1.conv2", "input_blocks.5.0.out_layers.3"),
            ("mid_block.resnets.1.conv1", "middle_block.2.in_layers.2"), ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
            ("up_blocks.0.resnets.2.time_emb_proj", "output_blocks.2.0.emb_layers.1"), ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"), ("add_embedding.linear_1", "label_emb.0.0"),
            ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_2", "time_embed.2"),
        ]
        var modules = try pairs.map { p in let (o, i) = try dims(unet, p.0 + ".weight"); return ("unet." + p.0, o, i) }
        modules.append(("text_encoder.encoder.layers.0.self_attn.q_proj", 32, [32]))  // transformers 5 names, without text_model.
        let (o2, i2) = try dims(te2, "text_model.encoder.layers.1.self_attn.v_proj.weight")
        modules.append(("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj", o2, i2))
        modules.append(("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", 16, [32]))
        _ = te1
        let lora = try randomLoRA(dir.file("lora.safetensors"), modules, kohya: false)
        let (s, _) = try merge(base: modelPath("tiny-sdxl"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let summary = try PipelineMergePlan(path: root, inputs: [MergeInput(adapter: try Adapter(path: lora), weight: 1)]).write(to: dir.file("p"), options: { var o = MergeRunOptions(); o.sync = false; return o }())
        #expect(summary.modulesMerged == modules.count)
        let pu = try Checkpoint(path: dir.file("p/unet")), p1 = try Checkpoint(path: dir.file("p/text_encoder")), p2 = try Checkpoint(path: dir.file("p/text_encoder_2"))
        for (diffusers, ldm) in pairs {
            #expect(try values(s, "model.diffusion_model." + ldm + ".weight") == (try values(pu, diffusers + ".weight")), "\(diffusers)")
        }
        #expect(try values(s, "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight") == (try values(p1, "encoder.layers.0.self_attn.q_proj.weight")))
        let inProj = try values(s, "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
        #expect(rowsOf(inProj, 2 * o2..<3 * o2, cols: o2) == (try values(p2, "text_model.encoder.layers.1.self_attn.v_proj.weight")))
        #expect(try values(s, "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight") == (try values(p2, "text_model.encoder.layers.0.mlp.fc2.weight")))
    }

    @Test("SDXL: kohya's ldm names into the diffusers UNet land where the converter says")
    func sdxlKohyaIntoDiffusers() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let single = try Checkpoint(path: modelPath("tiny-sdxl"))
        let pairs: [(String, String)] = [("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
                                         ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"), ("middle_block.0.emb_layers.1", "mid_block.resnets.0.time_emb_proj"),
                                         ("output_blocks.1.1.proj_in", "up_blocks.0.attentions.1.proj_in"), ("out.2", "conv_out")]
        let lora = try randomLoRA(dir.file("k.safetensors"), try pairs.map { p in let (o, i) = try dims(single, "model.diffusion_model." + p.0 + ".weight"); return ("lora_unet_" + KohyaNames.key(p.0), o, i) }, kohya: true)
        let (s, _) = try merge(base: modelPath("tiny-sdxl"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let (f, _) = try merge(base: fixture("models/tiny-sdxl-diffusers/unet"), adapters: [(lora, 1)], out: dir.file("f"))
        for (ldm, diffusers) in pairs {
            #expect(try values(s, "model.diffusion_model." + ldm + ".weight") == (try values(f, diffusers + ".weight")), "\(ldm)")
        }
    }

    @Test("SD3.5: q/k/v thirds of x_block, context_block and attn2, the last block's swapped context modulation")
    func sd35() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try Checkpoint(path: fixture("models/tiny-sd3.5-diffusers/transformer"))
        let last = (folder.tensorNames.compactMap { n -> Int? in
            let p = n.split(separator: "."); return p.count > 1 && p[0] == "transformer_blocks" ? Int(p[1]) : nil
        }.max())!
        let names = ["transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn2.to_k", "transformer_blocks.\(last).norm1_context.linear"]
        let lora = try randomLoRA(dir.file("l.safetensors"), try names.map { n in let (o, i) = try dims(folder, n + ".weight"); return ("transformer." + n, o, i) }, kohya: false)
        let (s, _) = try merge(base: modelPath("tiny-sd3.5"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let (f, _) = try merge(base: fixture("models/tiny-sd3.5-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file("f"))
        let p = s.tensorNames.contains { $0.hasPrefix("model.diffusion_model.") } ? "model.diffusion_model." : ""
        let (d, _) = try dims(folder, "transformer_blocks.0.attn.to_q.weight")
        #expect(rowsOf(try values(s, p + "joint_blocks.0.x_block.attn.qkv.weight"), 2 * d..<3 * d, cols: d) == (try values(f, "transformer_blocks.0.attn.to_v.weight")))
        #expect(rowsOf(try values(s, p + "joint_blocks.0.context_block.attn.qkv.weight"), 0..<d, cols: d) == (try values(f, "transformer_blocks.0.attn.add_q_proj.weight")))
        #expect(rowsOf(try values(s, p + "joint_blocks.0.x_block.attn2.qkv.weight"), d..<2 * d, cols: d) == (try values(f, "transformer_blocks.0.attn2.to_k.weight")))
        let m = try values(s, p + "joint_blocks.\(last).context_block.adaLN_modulation.1.weight"), n = try values(f, "transformer_blocks.\(last).norm1_context.linear.weight")
        #expect(rowsOf(m, 0..<d, cols: d) == rowsOf(n, d..<2 * d, cols: d) && rowsOf(m, d..<2 * d, cols: d) == rowsOf(n, 0..<d, cols: d))
    }

    @Test("a module the layout does not have refuses the merge, naming it, on each layout",
          arguments: ["tiny-flux-dev", "tiny-flux-dev-comfy", "tiny-sdxl", "tiny-sd3", "tiny-sd3.5", "tiny-sd1", "tiny-sd2"])
    func unmapped(_ model: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let component = model.hasPrefix("tiny-flux") || model.hasPrefix("tiny-sd3") ? "transformer" : "unet"
        let lora = try randomLoRA(dir.file("l.safetensors"), [("\(component).transformer_blocks.99.attn.to_q", 32, [32])], kohya: false)
        #expect {
            try merge(base: modelPath(model), adapters: [(lora, 1)], out: dir.file("out.safetensors"))
        } throws: { "\($0)".contains("transformer_blocks.99.attn.to_q") }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out.safetensors")))
    }

    @Test("SD3: kohya's MMDiT names (lora_unet_joint_blocks_0_x_block_attn_qkv) land on the diffusers folder's q/k/v, like the single file")
    func sd3KohyaNames() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let single = try Checkpoint(path: modelPath("tiny-sd3"))
        let p = single.tensorNames.contains { $0.hasPrefix("model.diffusion_model.") } ? "model.diffusion_model." : ""
        let names = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1", "final_layer.adaLN_modulation.1"]
        let lora = try randomLoRA(dir.file("k.safetensors"), try names.map { n in let (o, i) = try dims(single, p + n + ".weight"); return ("lora_unet_" + KohyaNames.key(n), o, i) }, kohya: true)
        let (s, _) = try merge(base: modelPath("tiny-sd3"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let (f, _) = try merge(base: fixture("models/tiny-sd3-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file("f"))
        let folder = try Checkpoint(path: fixture("models/tiny-sd3-diffusers/transformer"))
        let (d, _) = try dims(folder, "transformer_blocks.0.attn.to_q.weight")
        let qkv = try values(s, p + "joint_blocks.0.x_block.attn.qkv.weight")
        for (i, n) in ["to_q", "to_k", "to_v"].enumerated() {
            #expect(rowsOf(qkv, i * d..<(i + 1) * d, cols: d) == (try values(f, "transformer_blocks.0.attn.\(n).weight")))
        }
        #expect(try values(s, p + "joint_blocks.0.context_block.mlp.fc1.weight") == (try values(f, "transformer_blocks.0.ff_context.net.0.proj.weight")))
        let m = try values(s, p + "final_layer.adaLN_modulation.1.weight"), n = try values(f, "norm_out.linear.weight")
        #expect(rowsOf(m, 0..<d, cols: d) == rowsOf(n, d..<2 * d, cols: d) && rowsOf(m, d..<2 * d, cols: d) == rowsOf(n, 0..<d, cols: d))
    }

    @Test("a text-encoder module on a Flux file, which holds none, is refused by component")
    func missingComponent() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let lora = try randomLoRA(dir.file("l.safetensors"), [("transformer.transformer_blocks.0.attn.to_q", 32, [32]), ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 8, [8])], kohya: false)
        #expect {
            try merge(base: modelPath("tiny-flux-dev"), adapters: [(lora, 1)], out: dir.file("out.safetensors"))
        } throws: { "\($0)".contains("modules for text_encoder, which this Flux.1 dev file does not hold") }
    }
}

@Suite("diffusion: ComfyUI-saved LoRAs (LoraSave: the model's own keys, lora_up/lora_down, diff, diff_b)")
struct ComfyLoRATests {
    @Test("diffusion_model.<key> modules land like kohya's; diff_b adds to the bias unscaled; a 1-D diff lands on BFL's norm .scale")
    func comfy() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var g = SeededGenerator(seed: 3)
        func r(_ n: Int) -> [Float] { (0..<n).map { _ in Float(g.gaussian() * 0.1) } }
        let (down, up, diffB, diff) = (r(2 * 32), r(96 * 2), r(96), r(16))
        let comfy = try writeSafetensors(dir.file("comfy.safetensors"), [
            ("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", .f32, [2, 32], floatBytes(down)),
            ("diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight", .f32, [96, 2], floatBytes(up)),
            ("diffusion_model.double_blocks.0.img_attn.qkv.diff_b", .f32, [96], floatBytes(diffB)),
            ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff", .f32, [16], floatBytes(diff)),
        ])
        // The same pair in kohya's names with alpha 4 (scale 2): the weight gets 2·B·A, the bias still diff_b.
        let kohya = try writeSafetensors(dir.file("kohya.safetensors"), [
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", .f32, [2, 32], floatBytes(down)),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", .f32, [96, 2], floatBytes(up.map { $0 / 2 })),
            ("lora_unet_double_blocks_0_img_attn_qkv.alpha", .f32, [], floatBytes([4])),
            ("lora_unet_double_blocks_0_img_attn_qkv.diff_b", .f32, [96], floatBytes(diffB)),
        ])
        let a = try Adapter(path: comfy)
        #expect(a.format == .kohya && a.unknownKeys.isEmpty)
        let (c, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(comfy, 1)], out: dir.file("c.safetensors"))
        let (k, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(kohya, 1)], out: dir.file("k.safetensors"))
        let base = try Checkpoint(path: modelPath("tiny-flux-dev"))
        #expect(try values(c, "double_blocks.0.img_attn.qkv.weight") == (try values(k, "double_blocks.0.img_attn.qkv.weight")))
        #expect(try values(c, "double_blocks.0.img_attn.qkv.bias") == (try values(k, "double_blocks.0.img_attn.qkv.bias")))
        // base + diff in Float64, rounded once into BF16: the bias exactly (its path is Float64), the
        // norm within one unit (it goes through the Float32 kernel).
        for (name, delta, ulps) in [("double_blocks.0.img_attn.qkv.bias", diffB, 0.0), ("double_blocks.0.img_attn.norm.query_norm.scale", diff, 1.0)] {
            let want = zip(try values(base, name), delta).map { Double(ElementConversion.bf16ToFloat(ElementConversion.doubleToBF16($0 + Double($1)))) }
            let got = try values(c, name)
            #expect(got.count == want.count && zip(got, want).allSatisfy { ulpDistance($0, $1, .bf16) <= ulps }, "\(name)")
            #expect(got != (try values(base, name)))
        }
    }
}

@Suite("diffusion: XLabs Flux LoRAs (processor.qkv_lora1/2, proj_lora1/2, single qkv_lora/proj_lora)")
struct XLabsLoRATests {
    @Test("each processor layer lands on its BFL tensor; a single block's qkv_lora on linear1's q/k/v rows only; the same on the diffusers folder")
    func xlabs() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var g = SeededGenerator(seed: 5)
        func r(_ n: Int) -> [UInt8] { floatBytes((0..<n).map { _ in Float(g.gaussian() * 0.1) }) }
        let lora = try writeSafetensors(dir.file("xlabs.safetensors"), [
            ("double_blocks.0.processor.qkv_lora1.down.weight", .f32, [2, 32], r(64)), ("double_blocks.0.processor.qkv_lora1.up.weight", .f32, [96, 2], r(192)),
            ("double_blocks.0.processor.proj_lora2.down.weight", .f32, [2, 32], r(64)), ("double_blocks.0.processor.proj_lora2.up.weight", .f32, [32, 2], r(64)),
            ("single_blocks.0.processor.qkv_lora.down.weight", .f32, [2, 32], r(64)), ("single_blocks.0.processor.qkv_lora.up.weight", .f32, [96, 2], r(192)),
            ("single_blocks.0.processor.proj_lora.down.weight", .f32, [2, 160], r(320)), ("single_blocks.0.processor.proj_lora.up.weight", .f32, [32, 2], r(64)),
        ])
        let a = try Adapter(path: lora)
        #expect(a.format == .diffusers && a.modules.count == 4 && a.unknownKeys.isEmpty)
        let (s, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let (f, _) = try merge(base: fixture("models/tiny-flux-dev-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file("f"))
        let base = try Checkpoint(path: modelPath("tiny-flux-dev"))
        let d = 32
        let linear1 = try values(s, "single_blocks.0.linear1.weight")
        #expect(rowsOf(linear1, 3 * d..<7 * d, cols: d) == rowsOf(try values(base, "single_blocks.0.linear1.weight"), 3 * d..<7 * d, cols: d), "the MLP rows are untouched")
        for (i, n) in ["to_q", "to_k", "to_v"].enumerated() {
            #expect(rowsOf(linear1, i * d..<(i + 1) * d, cols: d) == (try values(f, "single_transformer_blocks.0.attn.\(n).weight")))
            #expect(rowsOf(try values(s, "double_blocks.0.img_attn.qkv.weight"), i * d..<(i + 1) * d, cols: d) == (try values(f, "transformer_blocks.0.attn.\(n).weight")))
        }
        #expect(try values(s, "double_blocks.0.txt_attn.proj.weight") == (try values(f, "transformer_blocks.0.attn.to_add_out.weight")))
        #expect(try values(s, "single_blocks.0.linear2.weight") == (try values(f, "single_transformer_blocks.0.proj_out.weight")))
        #expect(try values(s, "double_blocks.0.txt_attn.proj.weight") != (try values(base, "double_blocks.0.txt_attn.proj.weight")))
    }
}

@Suite("diffusion: pipeline folders merged whole")
struct PipelineMergeTests {
    @Test("every touched component merged, everything else copied byte for byte, OUT appears complete")
    func pipeline() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let root = fixture("models/tiny-sd1-diffusers")
        let unet = try Checkpoint(path: root + "/unet")
        let (o, i) = try dims(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
        let lora = try randomLoRA(dir.file("l.safetensors"), [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", o, i)], kohya: true)
        var options = MergeRunOptions()
        options.sync = false
        let plan = try PipelineMergePlan(path: root, inputs: [MergeInput(adapter: try Adapter(path: lora), weight: 1)])
        #expect(plan.plans.map(\.folder) == ["unet"])
        _ = try plan.write(to: dir.file("out"), options: options)
        let files = try FileManager.default.subpathsOfDirectory(atPath: root).sorted()
        #expect(try FileManager.default.subpathsOfDirectory(atPath: dir.file("out")).sorted() == files)
        for f in files where !f.hasPrefix("unet/diffusion_pytorch_model") {
            var isDir: ObjCBool = false
            FileManager.default.fileExists(atPath: root + "/" + f, isDirectory: &isDir)
            if isDir.boolValue { continue }
            #expect(FileManager.default.contentsEqual(atPath: root + "/" + f, andPath: dir.file("out/" + f)), "\(f) is copied unchanged")
        }
        let (single, _) = try merge(base: root + "/unet", adapters: [(lora, 1)], out: dir.file("unet-alone"))
        #expect(try values(try Checkpoint(path: dir.file("out/unet")), "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
            == (try values(single, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")))
    }

    @Test("inspect of a pipeline folder: the pipeline class, each component with weights (the denoiser's family and layout), the others by name")
    func inspect() throws {
        let r = try PipelineReport(path: fixture("models/tiny-sdxl-diffusers"))
        #expect(r.pipelineClass == "StableDiffusionXLPipeline")
        #expect(r.components.map(\.folder) == ["text_encoder", "text_encoder_2", "unet"])
        let text = r.text(tensors: false)
        #expect(text.contains("unet/ (UNet2DConditionModel)") && text.contains("family      sdxl (Stable Diffusion XL)"), "\(text)")
    }

    @Test("diffusers-named diff_b beside a pair adds to the bias unscaled")
    func diffusersDiffB() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var g = SeededGenerator(seed: 8)
        func r(_ n: Int) -> [Float] { (0..<n).map { _ in Float(g.gaussian() * 0.1) } }
        let bias = r(32)
        let lora = try writeSafetensors(dir.file("d.safetensors"), [
            ("transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight", .f32, [2, 32], floatBytes(r(64))),
            ("transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight", .f32, [32, 2], floatBytes(r(64))),
            ("transformer.transformer_blocks.0.attn.to_out.0.diff_b", .f32, [32], floatBytes(bias)),
        ])
        let (s, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(lora, 1)], out: dir.file("s.safetensors"))
        let base = try Checkpoint(path: modelPath("tiny-flux-dev"))
        let want = zip(try values(base, "double_blocks.0.img_attn.proj.bias"), bias).map { Double(ElementConversion.bf16ToFloat(ElementConversion.doubleToBF16($0 + Double($1)))) }
        #expect(try values(s, "double_blocks.0.img_attn.proj.bias") == want)
    }

    @Test("a component the pipeline lacks, or a key no component has, refuses the whole merge and writes nothing")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let lora = try randomLoRA(dir.file("l.safetensors"), [("transformer.transformer_blocks.0.attn.to_q", 32, [32]), ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 8, [8])], kohya: false)
        #expect {
            _ = try PipelineMergePlan(path: fixture("models/tiny-flux-dev-diffusers"), inputs: [MergeInput(adapter: try Adapter(path: lora), weight: 1)])
        } throws: { "\($0)".contains("modules for text_encoder, which the pipeline has no folder for") }
        let bad = try randomLoRA(dir.file("b.safetensors"), [("unet.down_blocks.7.attentions.0.proj_in", 8, [8])], kohya: false)
        #expect {
            _ = try PipelineMergePlan(path: fixture("models/tiny-sd1-diffusers"), inputs: [MergeInput(adapter: try Adapter(path: bad), weight: 1)])
        } throws: { "\($0)".contains("unet: module unet.down_blocks.7.attentions.0.proj_in") }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
    }
}

@Suite("diffusion: convert between the diffusers and the original naming dialects")
struct DiffusionDialectTests {
    private func options(_ base: String) -> ConvertOptions {
        var o = ConvertOptions()
        o.base = base
        o.sync = false
        o.dtype = .f64
        return o
    }

    private func sameMerge(_ a: String, _ b: String, base: String, _ dir: TempDir) throws {
        let (x, _) = try merge(base: base, adapters: [(a, 1)], out: dir.file("x-" + UUID().uuidString))
        let (y, _) = try merge(base: base, adapters: [(b, 1)], out: dir.file("y-" + UUID().uuidString))
        for t in y.tensorNames where y.tensor(t)?.entry.dtype.isReadableAsFloat == true {
            let p = try values(x, t), q = try values(y, t)
            #expect(zip(p, q).allSatisfy { ulpDistance($0, $1, .bf16) <= 1 }, "\(t)")
        }
    }

    @Test("Flux: diffusers names → kohya's BFL names (q/k/v and q/k/v/mlp fused, rank Σr), and back; every merge the same")
    func flux() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try Checkpoint(path: fixture("models/tiny-flux-dev-diffusers/transformer"))
        let names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_k",
                     "single_transformer_blocks.0.proj_mlp", "norm_out.linear", "transformer_blocks.0.ff.net.2"]
        let lora = try randomLoRA(dir.file("d.safetensors"), try names.map { n in let (o, i) = try dims(folder, n + ".weight"); return ("transformer." + n, o, i) }, kohya: false)
        _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("k.safetensors"), to: .kohya, options: options(modelPath("tiny-flux-dev")))
        let k = try Adapter(path: dir.file("k.safetensors"))
        let byName = Dictionary(uniqueKeysWithValues: k.modules.map { ($0.name, $0) })
        #expect(Set(byName.keys) == ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1", "lora_unet_final_layer_adaLN_modulation_1",
                                      "lora_unet_double_blocks_0_img_mlp_2"])
        #expect(byName["lora_unet_double_blocks_0_img_attn_qkv"]?.rank == 4 && byName["lora_unet_single_blocks_0_linear1"]?.rank == 4)
        try sameMerge(lora, dir.file("k.safetensors"), base: modelPath("tiny-flux-dev"), dir)
        // And back onto diffusers names, with a pipeline folder as the base.
        _ = try AdapterConversion.convertLayout(input: dir.file("k.safetensors"), output: dir.file("d2.safetensors"), to: .diffusers,
                                                options: options(fixture("models/tiny-flux-dev-diffusers")))
        let back = try Adapter(path: dir.file("d2.safetensors"))
        #expect(back.format == .diffusers && back.modules.allSatisfy { $0.component == "transformer" })
        #expect(back.modules.contains { $0.baseName == "single_transformer_blocks.0.attn.to_q" }, "a fused module is split over every row block")
        try sameMerge(lora, dir.file("d2.safetensors"), base: fixture("models/tiny-flux-dev-diffusers/transformer"), dir)
    }

    @Test("SDXL: diffusers names → kohya's ldm UNet names, CLIP-L as lora_te1_, the second encoder as lora_te2_ in Hugging Face names")
    func sdxl() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let unet = try Checkpoint(path: fixture("models/tiny-sdxl-diffusers/unet")), te2 = try Checkpoint(path: fixture("models/tiny-sdxl-diffusers/text_encoder_2"))
        var modules = try ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.resnets.2.conv1"].map { n in
            let (o, i) = try dims(unet, n + ".weight"); return ("unet." + n, o, i)
        }
        let (o2, i2) = try dims(te2, "text_model.encoder.layers.1.self_attn.v_proj.weight")
        modules.append(("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj", o2, i2))
        let lora = try randomLoRA(dir.file("d.safetensors"), modules, kohya: false)
        _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("k.safetensors"), to: .kohya, options: options(modelPath("tiny-sdxl")))
        let names = Set(try Adapter(path: dir.file("k.safetensors")).modules.map(\.name))
        #expect(names == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_2_0_in_layers_2",
                          "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"])
        try sameMerge(lora, dir.file("k.safetensors"), base: modelPath("tiny-sdxl"), dir)
    }

    @Test("to-diffusers needs a base; a module the base does not have is refused by name")
    func refusals() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let lora = try randomLoRA(dir.file("k.safetensors"), [("lora_unet_double_blocks_7_img_attn_qkv", 96, [32])], kohya: true)
        #expect {
            _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("a.safetensors"), to: .diffusers)
        } throws: { "\($0)".contains("to-diffusers needs --base") }
        #expect {
            _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("b.safetensors"), to: .diffusers, options: options(modelPath("tiny-flux-dev")))
        } throws: { "\($0)".contains("lora_unet_double_blocks_7_img_attn_qkv is not a module of this Flux.1 dev model") }
        #expect(!FileManager.default.fileExists(atPath: dir.file("a.safetensors")) && !FileManager.default.fileExists(atPath: dir.file("b.safetensors")))
    }
}

@Suite("diffusion: 1×1 convolution factors on linear weights and back")
struct UnitKernelTests {
    @Test("an SD2 kohya LoRA with 1×1 conv factors for proj_in/proj_out (trained from a single file) merges like the linear one, into the file and the folder")
    func sd2ConvFactors() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let source = try SafetensorsFile(path: adapterPath("sd2-kohya-lora"))
        var reshaped = 0
        let tensors = try source.header.tensors.map { t -> (name: String, dtype: DType, shape: [Int], bytes: [UInt8]) in
            let bytes = try source.withBytes(of: t.name) { Array($0) }
            let proj = t.name.contains("_proj_in.") || t.name.contains("_proj_out.")
            guard proj, t.shape.count == 2 else { return (t.name, t.dtype, t.shape, bytes) }
            reshaped += 1
            return (t.name, t.dtype, t.shape + [1, 1], bytes)
        }
        #expect(reshaped > 0)
        let conv = try writeSafetensors(dir.file("conv.safetensors"), tensors, metadata: nil)
        #expect(try Adapter(path: conv).modules.contains { $0.kind == .conv1x1 })
        for base in [modelPath("tiny-sd2"), fixture("models/tiny-sd2-diffusers/unet")] {
            let components = base.hasSuffix("unet") ? ["unet"] : nil
            let (a, _) = try merge(base: base, adapters: [(conv, 1)], out: dir.file("a-" + UUID().uuidString), components: components)
            let (b, _) = try merge(base: base, adapters: [(adapterPath("sd2-kohya-lora"), 1)], out: dir.file("b-" + UUID().uuidString), components: components)
            for t in b.tensorNames where b.tensor(t)?.entry.dtype.isReadableAsFloat == true {
                #expect(try values(a, t) == (try values(b, t)), "\(t)")
            }
        }
    }
}

/// The hostile inputs of the review of this code: each gives one line, never a trap or a silent result.
@Suite("diffusion and LyCORIS: hostile inputs")
struct DiffusionHostileInputTests {
    private func f32(_ shape: [Int], _ seed: UInt64 = 1) -> [UInt8] {
        var g = SeededGenerator(seed: seed)
        return floatBytes((0..<shape.reduce(1, *)).map { _ in Float(g.gaussian() * 0.1) })
    }

    @Test("an ldm base whose downsampler is input block 0 (no division by zero); block indices past 2^20 are no blocks")
    func ldmIndices() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = try writeSafetensors(dir.file("b.safetensors"), [
            ("model.diffusion_model.input_blocks.0.0.op.weight", .f32, [4, 4, 3, 3], f32([4, 4, 3, 3])),
            ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", .f32, [4, 4, 3, 3], f32([4, 4, 3, 3])),
            ("model.diffusion_model.output_blocks.9223372036854775807.0.in_layers.2.weight", .f32, [4, 4, 3, 3], f32([4, 4, 3, 3])),
        ])
        let d = try #require(DiffusionLayout.detect(try Checkpoint(path: base)))
        #expect(d.family == .sd1)
        #expect(d.modules["unet"]?.keys.contains { $0.hasPrefix("up_blocks") } == false)
    }

    @Test("LyCORIS tensors of zero or absurd dimensions are refused before any arithmetic")
    func absurdShapes() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let m = "lora_unet_down_blocks_0_attentions_0_proj_in"
        let path = try writeSafetensors(dir.file("a.safetensors"), [(m + ".lokr_w1", .f32, [2, 0], []), (m + ".lokr_w2", .f32, [4, 4], f32([4, 4]))])
        #expect { _ = try Adapter(path: path) } throws: { "\($0)".contains("lokr_w1 has shape [2, 0]") }
        let both = try writeSafetensors(dir.file("b.safetensors"), [(m + ".lokr_w1", .f32, [2, 2], f32([2, 2])), (m + ".lokr_w1_a", .f32, [2, 1], f32([2, 1])),
                                                                    (m + ".lokr_w1_b", .f32, [1, 2], f32([1, 2])), (m + ".lokr_w2", .f32, [4, 4], f32([4, 4]))])
        #expect { _ = try Adapter(path: both) } throws: { "\($0)".contains("has both lokr_w1 and lokr_w1_a/lokr_w1_b") }
    }

    @Test("an original-named update taller than the tensors it is split over is refused, not truncated")
    func oversizedSplit() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let m = "lora_unet_double_blocks_0_img_attn_qkv"
        let lora = try writeSafetensors(dir.file("k.safetensors"), [(m + ".lora_down.weight", .f32, [2, 32], f32([2, 32])), (m + ".lora_up.weight", .f32, [100, 2], f32([100, 2], 2))])
        #expect {
            try merge(base: fixture("models/tiny-flux-dev-diffusers/transformer"), adapters: [(lora, 1)], out: dir.file("o"))
        } throws: { "\($0)".contains("the update has 100 rows, but the parts it lands on") }
    }

    @Test("XLabs' single-block qkv converts: to kohya as linear1 (MLP rows zero), to diffusers as to_q/k/v; a wrong height is refused")
    func xlabsConversions() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var o = ConvertOptions()
        o.sync = false
        o.dtype = .f64
        let x = "single_blocks.0.processor.qkv_lora"
        let lora = try writeSafetensors(dir.file("x.safetensors"), [(x + ".down.weight", .f32, [2, 32], f32([2, 32])), (x + ".up.weight", .f32, [96, 2], f32([96, 2], 2))])
        o.base = fixture("models/tiny-flux-dev-diffusers")
        _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("k.safetensors"), to: .kohya, options: o)
        #expect(try Adapter(path: dir.file("k.safetensors")).modules.map(\.name) == ["lora_unet_single_blocks_0_linear1"])
        o.base = modelPath("tiny-flux-dev")
        _ = try AdapterConversion.convertLayout(input: lora, output: dir.file("d.safetensors"), to: .diffusers, options: o)
        #expect(Set(try Adapter(path: dir.file("d.safetensors")).modules.map(\.baseName)) == ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"])
        for converted in ["k.safetensors", "d.safetensors"] {
            let (a, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(lora, 1)], out: dir.file("a-" + converted))
            let (b, _) = try merge(base: modelPath("tiny-flux-dev"), adapters: [(dir.file(converted), 1)], out: dir.file("b-" + converted))
            let x = try values(a, "single_blocks.0.linear1.weight"), y = try values(b, "single_blocks.0.linear1.weight")
            #expect(zip(x, y).allSatisfy { ulpDistance($0, $1, .bf16) <= 1 }, "\(converted)")
        }
        let short = try writeSafetensors(dir.file("s.safetensors"), [(x + ".down.weight", .f32, [2, 32], f32([2, 32])), (x + ".up.weight", .f32, [64, 2], f32([64, 2]))])
        #expect {
            _ = try AdapterConversion.convertLayout(input: short, output: dir.file("z.safetensors"), to: .kohya, options: o)
        } throws: { "\($0)".contains("the q/k/v rows of single_blocks.0.linear1") }
    }

    @Test("the same adapter given twice (--add) is applied twice on a pipeline folder, as on a model")
    func addTwice() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let m = "lora_unet_single_blocks_0_linear1"
        let lora = try writeSafetensors(dir.file("k.safetensors"), [(m + ".lora_down.weight", .f32, [2, 32], f32([2, 32])), (m + ".lora_up.weight", .f32, [224, 2], f32([224, 2], 2))])
        let adapter = try Adapter(path: lora)
        var run = MergeRunOptions()
        run.sync = false
        _ = try PipelineMergePlan(path: fixture("models/tiny-flux-dev-diffusers"), inputs: [MergeInput(adapter: adapter, weight: 1), MergeInput(adapter: adapter, weight: 1)]).write(to: dir.file("twice"), options: run)
        _ = try PipelineMergePlan(path: fixture("models/tiny-flux-dev-diffusers"), inputs: [MergeInput(adapter: adapter, weight: 2)]).write(to: dir.file("double"), options: run)
        let a = try Checkpoint(path: dir.file("twice/transformer")), b = try Checkpoint(path: dir.file("double/transformer"))
        #expect(try values(a, "single_transformer_blocks.0.proj_mlp.weight") == (try values(b, "single_transformer_blocks.0.proj_mlp.weight")))
    }

    @Test("a LoCon with a per-input dora_scale merges (its length is the inputs')")
    func loconPerInputDoRA() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let c = "lora_unet_down_blocks_0_resnets_0_conv1"
        let lora = try writeSafetensors(dir.file("l.safetensors"), [(c + ".lora_down.weight", .f32, [2, 4, 3, 3], f32([2, 4, 3, 3])), (c + ".lora_up.weight", .f32, [8, 2, 1, 1], f32([8, 2, 1, 1])),
                                                                   (c + ".dora_scale", .f32, [1, 4, 1, 1], floatBytes([1, 1.1, 0.9, 1.2]))])
        let (merged, _) = try merge(base: modelPath("tiny-unet"), adapters: [(lora, 1)], out: dir.file("o.safetensors"))
        #expect(try merged.files[0].doubles("down_blocks.0.resnets.0.conv1.weight") != (try Checkpoint(path: modelPath("tiny-unet")).files[0].doubles("down_blocks.0.resnets.0.conv1.weight")))
    }

    @Test("--report writes the same bytes as without it on the dense-rows path")
    func reportSameBytes() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (a, _) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-lokr-full"), 1)], out: dir.file("a.safetensors"), denseRows: .always)
        let (b, s) = try merge(base: modelPath("tiny-unet"), adapters: [(adapterPath("lycoris-lokr-full"), 1)], out: dir.file("b.safetensors"), report: true, denseRows: .always)
        _ = (a, b)
        #expect(FileManager.default.contentsEqual(atPath: dir.file("a.safetensors"), andPath: dir.file("b.safetensors")))
        #expect(!s.reports.isEmpty && s.reports.allSatisfy { $0.statistics.updateSquared > 0 })
    }
}
