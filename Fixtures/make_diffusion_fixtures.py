#!/usr/bin/env python3
"""Diffusion base models in both layouts: a diffusers folder and the original single file.

    pip install torch==2.* diffusers==0.42.* transformers==5.24.* safetensors   # only to regenerate
    python3 Fixtures/make_diffusion_fixtures.py [family …]   # flux-dev flux-schnell sd3 sd3.5 sd1 sdxl sd2; default all

For each family a tiny random model is built with the real diffusers / transformers classes
(test-sized configs like diffusers' own tests; every parameter redrawn from a seeded generator so
no two tensors are equal and a wrong row slice or swap cannot go unnoticed) and saved twice:

- Fixtures/models/tiny-<family>-diffusers/: a pipeline-like folder written by `save_pretrained`
  (`transformer/` or `unet/`, `text_encoder/`, `text_encoder_2/`) and a minimal `model_index.json`.
  Denoisers are BF16, text encoders F32. transformers 5.24 saves CLIPTextModel without the
  `text_model.` prefix that hub repos saved by transformers 4 have (it loads both).
- Fixtures/models/tiny-<family>.safetensors: one checkpoint in the original layout, written by
  this script's own inverse of diffusers' single-file converters (`*_to_*` below, each naming
  the converter it undoes):
  Flux in BFL names (bare, and `-comfy` with ComfyUI's `model.diffusion_model.` prefix); SD1.x
  `model.diffusion_model.*` (ldm UNet) + `cond_stage_model.transformer.*` (CLIP-L); SDXL
  `model.diffusion_model.*` + `conditioner.embedders.0.transformer.*` (CLIP-L) +
  `conditioner.embedders.1.model.*` (OpenCLIP-G: fused `in_proj_weight`, (width, proj)
  `text_projection`); SD2.x `model.diffusion_model.*` (linear proj_in/out) + `cond_stage_model.model.*`
  (OpenCLIP-H names); SD3 / SD3.5 `model.diffusion_model.joint_blocks.*` (MMDiT). The keys real
  files carry and diffusers drops are written too (`…position_ids`, `…logit_scale`, and for SD2 the
  whole 24th OpenCLIP layer `transformer.resblocks.23.*` and `text_projection`: SD2 conditions on the
  penultimate layer, so its diffusers text_encoder is a 23-layer CLIPTextModel, and diffusers' converter
  drops exactly those keys by name (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`), which is why the tiny OpenCLIP-H
  has 24 layers).

Each single file is then loaded back by diffusers itself, offline, with the folder as config:
`<Model>.from_single_file(path, config=folder, subfolder=...)` for the denoiser, diffusers'
`create_diffusers_clip_model_from_ldm` (what the pipelines' from_single_file calls) for each text
encoder, and `StableDiffusion(XL)Pipeline.from_single_file` for the whole SD1/SD2/SDXL file; every
parameter must equal the folder's model bit for bit (for SD2 also: diffusers' OpenCLIP converter gives
exactly the text_encoder's keys, nothing left over). diffusers recognises SD2 only by a 1024-wide
context (`…input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`.shape[-1]), i.e. a real
OpenCLIP-H width, so the tiny SD2 file is inferred as `v1` and, like every tiny file, is loaded with
`config=` (no family detection). Flux cannot pass unmodified: diffusers'
converter hard-codes `inner_dim = 3072` for splitting `linear1`; the script shows that failure and
then runs diffusers' converter with only that line changed to read the config.
"""
import inspect
import json
import math
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # everything must work without the hub
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import diffusers as D  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from diffusers.loaders import single_file_model, single_file_utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
UNET = "model.diffusion_model."

# ---------------------------------------------------------------------------------------------
# Tiny models


def randomize(model, seed):
    """Every parameter redrawn: N(0, 0.05), norm weights 1 + N(0, 0.05) (diffusers and
    transformers start norms at 1 and some projections at 0, which would hide swaps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            v = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05
            if p.ndim == 1 and "norm" in name and (name.endswith("weight") or name.endswith("scale")):
                v += 1
            p.copy_(v)
    return model.eval()


def clip_l(seed, hidden=32):
    """CLIP-L stand-in (SD1 text_encoder, SDXL text_encoder): quick_gelu like openai/clip-vit-large-patch14."""
    torch.manual_seed(seed)
    c = T.CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         hidden_act="quick_gelu", projection_dim=hidden)
    return randomize(T.CLIPTextModel(c), seed)


def open_clip_g(seed):
    """OpenCLIP-G stand-in (SDXL text_encoder_2): gelu, a projection to a different width, and 10
    layers, because diffusers recognises SDXL by `…resblocks.9.mlp.c_proj.bias`."""
    torch.manual_seed(seed)
    c = T.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=10,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         hidden_act="gelu", projection_dim=24)
    return randomize(T.CLIPTextModelWithProjection(c), seed)


def open_clip_h(seed):
    """OpenCLIP-H stand-in (SD2): gelu, a square projection (OpenCLIP-H's width and embed_dim are both 1024) and 24
    layers, because diffusers' SD2 converter hard-codes the 24th (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE` is
    `resblocks.23.*` + `text_projection`). Returns the whole text tower (what the single file holds) and SD2's
    `text_encoder`: a 23-layer CLIPTextModel with the tower's first 23 layers and its ln_final (SD2 conditions on the
    penultimate layer, ln_final applied)."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=16, intermediate_size=48, num_attention_heads=2, vocab_size=64, max_position_embeddings=16,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu", projection_dim=16)
    tower = randomize(T.CLIPTextModelWithProjection(T.CLIPTextConfig(num_hidden_layers=24, **kw)), seed)
    te = T.CLIPTextModel(T.CLIPTextConfig(num_hidden_layers=23, **kw)).eval()
    sd = {k.removeprefix("text_model."): v for k, v in tower.state_dict().items()
          if not k.startswith(("text_projection.", "text_model.encoder.layers.23."))}
    te.load_state_dict(sd, strict=True)
    return tower, te


def flux(seed, guidance):
    torch.manual_seed(seed)
    m = D.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                 axes_dims_rope=[4, 4, 8], guidance_embeds=guidance)
    return randomize(m, seed).to(torch.bfloat16)


def sd3(seed, v35):
    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if v35 else {}
    m = D.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8, **extra)
    return randomize(m, seed).to(torch.bfloat16)


def unet_sd1(seed):
    """SD1-like: attention in the first level, plain last level, 1×1-conv proj_in/out."""
    torch.manual_seed(seed)
    m = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                               attention_head_dim=4, norm_num_groups=4)
    return randomize(m, seed).to(torch.bfloat16)


def unet_sdxl(seed, context, pooled):
    """SDXL-like (diffusers' SDXL test config): plain first level, linear proj_in/out,
    transformer_layers_per_block (1, 2), `text_time` added embedding (label_emb)."""
    torch.manual_seed(seed)
    m = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
                               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                               transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + pooled,
                               cross_attention_dim=context, norm_num_groups=4)
    return randomize(m, seed).to(torch.bfloat16)


def unet_sd2(seed, context):
    """SD2-like: attention in the first level, plain last level, linear proj_in/out (`use_linear_in_transformer`),
    attention_head_dim per level as SD2's [5, 10, 20, 20] (diffusers reads it as heads per level; the mid block
    takes the last), cross-attention to the OpenCLIP-H width."""
    torch.manual_seed(seed)
    m = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context,
                               attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4)
    return randomize(m, seed).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# diffusers → original layout (the inverse of diffusers' single_file_utils converters)


class Taker:
    """Hands out the diffusers tensors; at the end every one must have been taken once."""

    def __init__(self, sd):
        self.sd, self.left = sd, set(sd)

    def __call__(self, key):
        self.left.remove(key)
        return self.sd[key]

    def has(self, key):
        return key in self.sd

    def done(self, what):
        assert not self.left, (what, sorted(self.left))


def cat(*ts):
    return torch.cat(ts, dim=0).contiguous()


def swap_halves(t):
    """diffusers AdaLayerNormContinuous rows are [scale; shift]; the originals are [shift; scale]."""
    a, b = t.chunk(2, dim=0)
    return cat(b, a)


def flux_to_bfl(sd, cfg):
    """Inverse of convert_flux_transformer_checkpoint_to_diffusers."""
    t, out = Taker(sd), {}
    for wb in ("weight", "bias"):
        for src, dst in (("time_text_embed.timestep_embedder", "time_in"), ("time_text_embed.text_embedder", "vector_in"),
                         ("time_text_embed.guidance_embedder", "guidance_in")):
            if t.has(f"{src}.linear_1.{wb}"):
                out[f"{dst}.in_layer.{wb}"] = t(f"{src}.linear_1.{wb}")
                out[f"{dst}.out_layer.{wb}"] = t(f"{src}.linear_2.{wb}")
        out[f"txt_in.{wb}"] = t(f"context_embedder.{wb}")
        out[f"img_in.{wb}"] = t(f"x_embedder.{wb}")
        for i in range(cfg["num_layers"]):
            s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[f"{d}img_mod.lin.{wb}"] = t(f"{s}norm1.linear.{wb}")
            out[f"{d}txt_mod.lin.{wb}"] = t(f"{s}norm1_context.linear.{wb}")
            out[f"{d}img_attn.qkv.{wb}"] = cat(*(t(f"{s}attn.to_{x}.{wb}") for x in "qkv"))
            out[f"{d}txt_attn.qkv.{wb}"] = cat(*(t(f"{s}attn.add_{x}_proj.{wb}") for x in "qkv"))
            out[f"{d}img_attn.proj.{wb}"] = t(f"{s}attn.to_out.0.{wb}")
            out[f"{d}txt_attn.proj.{wb}"] = t(f"{s}attn.to_add_out.{wb}")
            out[f"{d}img_mlp.0.{wb}"] = t(f"{s}ff.net.0.proj.{wb}")
            out[f"{d}img_mlp.2.{wb}"] = t(f"{s}ff.net.2.{wb}")
            out[f"{d}txt_mlp.0.{wb}"] = t(f"{s}ff_context.net.0.proj.{wb}")
            out[f"{d}txt_mlp.2.{wb}"] = t(f"{s}ff_context.net.2.{wb}")
        for i in range(cfg["num_single_layers"]):
            s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{d}modulation.lin.{wb}"] = t(f"{s}norm.linear.{wb}")
            out[f"{d}linear1.{wb}"] = cat(*(t(f"{s}attn.to_{x}.{wb}") for x in "qkv"), t(f"{s}proj_mlp.{wb}"))
            out[f"{d}linear2.{wb}"] = t(f"{s}proj_out.{wb}")
        out[f"final_layer.linear.{wb}"] = t(f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = swap_halves(t(f"norm_out.linear.{wb}"))
    for i in range(cfg["num_layers"]):
        s, d = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out[f"{d}img_attn.norm.query_norm.scale"] = t(f"{s}norm_q.weight")
        out[f"{d}img_attn.norm.key_norm.scale"] = t(f"{s}norm_k.weight")
        out[f"{d}txt_attn.norm.query_norm.scale"] = t(f"{s}norm_added_q.weight")
        out[f"{d}txt_attn.norm.key_norm.scale"] = t(f"{s}norm_added_k.weight")
    for i in range(cfg["num_single_layers"]):
        s, d = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[f"{d}norm.query_norm.scale"] = t(f"{s}norm_q.weight")
        out[f"{d}norm.key_norm.scale"] = t(f"{s}norm_k.weight")
    t.done("flux")
    return out


def sd3_to_mmdit(sd, cfg):
    """Inverse of convert_sd3_transformer_checkpoint_to_diffusers."""
    t, out, n = Taker(sd), {}, cfg["num_layers"]
    out["pos_embed"] = t("pos_embed.pos_embed")
    for wb in ("weight", "bias"):
        out[f"x_embedder.proj.{wb}"] = t(f"pos_embed.proj.{wb}")
        out[f"context_embedder.{wb}"] = t(f"context_embedder.{wb}")
        for src, dst in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
            out[f"{dst}.mlp.0.{wb}"] = t(f"time_text_embed.{src}.linear_1.{wb}")
            out[f"{dst}.mlp.2.{wb}"] = t(f"time_text_embed.{src}.linear_2.{wb}")
        for i in range(n):
            s, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            last = i == n - 1  # diffusers' last block is context_pre_only
            out[f"{x}attn.qkv.{wb}"] = cat(*(t(f"{s}attn.to_{q}.{wb}") for q in "qkv"))
            out[f"{c}attn.qkv.{wb}"] = cat(*(t(f"{s}attn.add_{q}_proj.{wb}") for q in "qkv"))
            out[f"{x}attn.proj.{wb}"] = t(f"{s}attn.to_out.0.{wb}")
            out[f"{x}adaLN_modulation.1.{wb}"] = t(f"{s}norm1.linear.{wb}")
            out[f"{x}mlp.fc1.{wb}"] = t(f"{s}ff.net.0.proj.{wb}")
            out[f"{x}mlp.fc2.{wb}"] = t(f"{s}ff.net.2.{wb}")
            ctx_mod = t(f"{s}norm1_context.linear.{wb}")
            out[f"{c}adaLN_modulation.1.{wb}"] = swap_halves(ctx_mod) if last else ctx_mod
            if not last:
                out[f"{c}attn.proj.{wb}"] = t(f"{s}attn.to_add_out.{wb}")
                out[f"{c}mlp.fc1.{wb}"] = t(f"{s}ff_context.net.0.proj.{wb}")
                out[f"{c}mlp.fc2.{wb}"] = t(f"{s}ff_context.net.2.{wb}")
            if t.has(f"{s}attn2.to_q.{wb}"):
                out[f"{x}attn2.qkv.{wb}"] = cat(*(t(f"{s}attn2.to_{q}.{wb}") for q in "qkv"))
                out[f"{x}attn2.proj.{wb}"] = t(f"{s}attn2.to_out.0.{wb}")
        out[f"final_layer.linear.{wb}"] = t(f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = swap_halves(t(f"norm_out.linear.{wb}"))
    for i in range(n):
        s, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for src, dst in (("attn.norm_q", f"{x}attn.ln_q"), ("attn.norm_k", f"{x}attn.ln_k"),
                         ("attn.norm_added_q", f"{c}attn.ln_q"), ("attn.norm_added_k", f"{c}attn.ln_k"),
                         ("attn2.norm_q", f"{x}attn2.ln_q"), ("attn2.norm_k", f"{x}attn2.ln_k")):
            if t.has(f"{s}{src}.weight"):
                out[f"{dst}.weight"] = t(f"{s}{src}.weight")
    t.done("sd3")
    return out


RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def unet_to_ldm(sd, cfg):
    """Inverse of convert_ldm_unet_checkpoint. L = layers_per_block; level b's j-th resnet is
    input_blocks.(1 + b(L+1) + j) and its downsampler input_blocks.(1 + b(L+1) + L).0.op; up level b's
    j-th resnet (of L+1) is output_blocks.(b(L+1) + j), its upsampler in the last one, after the attention."""
    L, out = cfg["layers_per_block"], {}
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, v in sd.items():
        mod, _, wb = key.rpartition(".")
        parts = key.split(".")
        if mod in simple:
            new = f"{simple[mod]}.{wb}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                n = 1 + b * (L + 1) + (L if kind == "downsamplers" else j)
                where = {"resnets": f"input_blocks.{n}.0", "attentions": f"input_blocks.{n}.1",
                         "downsamplers": f"input_blocks.{n}.0.op"}[kind]
                if kind == "downsamplers":
                    rest = rest.removeprefix("conv.")
            else:
                n = b * (L + 1) + (L if kind == "upsamplers" else j)
                has_attn = f"up_blocks.{b}.attentions.{L}.proj_out.weight" in sd
                where = {"resnets": f"output_blocks.{n}.0", "attentions": f"output_blocks.{n}.1",
                         "upsamplers": f"output_blocks.{n}.{2 if has_attn else 1}"}[kind]
            if kind == "resnets":
                for d, o in RESNET:
                    rest = rest.replace(f"{d}.", f"{o}.", 1) if rest.startswith(f"{d}.") else rest
            new = f"{where}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                for d, o in RESNET:
                    rest = rest.replace(f"{d}.", f"{o}.", 1) if rest.startswith(f"{d}.") else rest
            new = f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
        else:
            raise KeyError(key)
        assert new not in out, new
        out[new] = v
    return out


def clip_to_ldm(sd, prefix, max_pos):
    """Inverse of convert_ldm_clip_checkpoint: HF CLIPTextModel → `<prefix>text_model.*` (SD1 cond_stage_model.transformer., SDXL
    conditioner.embedders.0.transformer.), plus the position_ids buffer the original files carry."""
    out = {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(max_pos, dtype=torch.int64)[None]
    return out


def openclip_to_ldm(sd, prefix, layers):
    """Inverse of convert_open_clip_checkpoint: HF CLIPTextModelWithProjection → OpenCLIP names."""
    t, out, m = Taker(sd), {}, "text_model."
    out[f"{prefix}token_embedding.weight"] = t(f"{m}embeddings.token_embedding.weight")
    out[f"{prefix}positional_embedding"] = t(f"{m}embeddings.position_embedding.weight")
    out[f"{prefix}ln_final.weight"] = t(f"{m}final_layer_norm.weight")
    out[f"{prefix}ln_final.bias"] = t(f"{m}final_layer_norm.bias")
    out[f"{prefix}text_projection"] = t("text_projection.weight").T.contiguous()  # (width, proj): x @ text_projection
    for i in range(layers):
        s, d = f"{m}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{d}attn.in_proj_{wb}"] = cat(*(t(f"{s}self_attn.{x}_proj.{wb}") for x in "qkv"))
            out[f"{d}attn.out_proj.{wb}"] = t(f"{s}self_attn.out_proj.{wb}")
            out[f"{d}ln_1.{wb}"] = t(f"{s}layer_norm1.{wb}")
            out[f"{d}ln_2.{wb}"] = t(f"{s}layer_norm2.{wb}")
            out[f"{d}mlp.c_fc.{wb}"] = t(f"{s}mlp.fc1.{wb}")
            out[f"{d}mlp.c_proj.{wb}"] = t(f"{s}mlp.fc2.{wb}")
    out[f"{prefix}logit_scale"] = torch.tensor(math.log(100), dtype=torch.float32)  # open_clip clamps the trained value at ln(100)
    t.done("openclip")
    return out


# ---------------------------------------------------------------------------------------------
# Writing and proving


def save_folder(name, components, pipeline):
    folder = os.path.join(MODELS, f"tiny-{name}-diffusers")
    shutil.rmtree(folder, ignore_errors=True)
    index = {"_class_name": pipeline, "_diffusers_version": D.__version__}
    for sub, model in components.items():
        model.save_pretrained(os.path.join(folder, sub))
        lib = "transformers" if isinstance(model, T.PreTrainedModel) else "diffusers"
        index[sub] = [lib, type(model).__name__]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def save_single(name, tensors):
    path = os.path.join(MODELS, f"tiny-{name}.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def same(what, got, want):
    """Every parameter and persistent buffer equal, bit for bit, same dtype, none missing."""
    g, w = got.state_dict(), want.state_dict()
    assert set(g) == set(w), (what, set(g) ^ set(w))
    for k in w:
        assert g[k].device.type != "meta", (what, k, "not loaded")
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, (what, k, g[k].dtype, w[k].dtype)
        assert torch.equal(g[k], w[k]), (what, k)
    print(f"  {what}: {len(w)} tensors equal")


def load_ckpt(path):
    return single_file_utils.load_single_file_checkpoint(path, local_files_only=True)


def prove_clip(what, cls, path, folder, sub):
    ref = cls.from_pretrained(folder, subfolder=sub)
    got = single_file_utils.create_diffusers_clip_model_from_ldm(cls, load_ckpt(path), subfolder=sub, config=folder,
                                                                 local_files_only=True, torch_dtype=torch.float32)
    same(what, got, ref)


def flux_converter_with_config_width():
    """diffusers' own converter with its one hard-coded size (`inner_dim = 3072`) read from the config."""
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    old = "    inner_dim = 3072\n"
    assert src.count(old) == 1
    src = src.replace(old, '    inner_dim = kwargs["config"]["num_attention_heads"] * kwargs["config"]["attention_head_dim"]\n')
    scope = dict(vars(single_file_utils))
    exec(compile(src, single_file_utils.__file__, "exec"), scope)
    return scope[fn.__name__]


def prove_flux(name, folder, paths):
    ref = D.FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, subfolder="transformer")
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    try:
        D.FluxTransformer2DModel.from_single_file(paths[0], config=folder, subfolder="transformer",
                                                  local_files_only=True, torch_dtype=torch.bfloat16)
        raise AssertionError("diffusers' Flux converter unexpectedly split linear1 of a non-3072 model")
    except RuntimeError as e:  # torch.split: the sizes (3072, 3072, 3072, 12288) do not add up
        print(f"  {name}: unmodified from_single_file fails as expected: {str(e).splitlines()[0][:90]}")
    original = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = flux_converter_with_config_width()
    try:
        for p in paths:
            got = D.FluxTransformer2DModel.from_single_file(p, config=folder, subfolder="transformer",
                                                            local_files_only=True, torch_dtype=torch.bfloat16)
            same(f"{os.path.basename(p)} transformer (converter with inner_dim from config)", got, ref)
    finally:
        entry["checkpoint_mapping_fn"] = original


def model_type(path):
    return single_file_utils.infer_diffusers_model_type(load_ckpt(path))


def make_flux(name, guidance, seed):
    m = flux(seed, guidance)
    folder = save_folder(name, {"transformer": m}, "FluxPipeline")
    bfl = flux_to_bfl(m.state_dict(), m.config)
    paths = [save_single(name, bfl)]
    if guidance:
        paths.append(save_single(f"{name}-comfy", {UNET + k: v for k, v in bfl.items()}))
    print(f"{name}: {len(bfl)} BFL tensors; diffusers infers {[model_type(p) for p in paths]}")
    prove_flux(name, folder, paths)


def make_sd3(name, v35, seed):
    m = sd3(seed, v35)
    folder = save_folder(name, {"transformer": m}, "StableDiffusion3Pipeline")
    mmdit = {UNET + k: v for k, v in sd3_to_mmdit(m.state_dict(), m.config).items()}
    path = save_single(name, mmdit)
    print(f"{name}: {len(mmdit)} MMDiT tensors; diffusers infers {model_type(path)!r} (it needs the real widths)")
    ref = D.SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, subfolder="transformer")
    got = D.SD3Transformer2DModel.from_single_file(path, config=folder, subfolder="transformer", local_files_only=True,
                                                   torch_dtype=torch.bfloat16)
    same(f"{name}.safetensors transformer", got, ref)


def make_sd1(seed):
    te = clip_l(seed + 1)
    unet = unet_sd1(seed)
    folder = save_folder("sd1", {"unet": unet, "text_encoder": te}, "StableDiffusionPipeline")
    ckpt = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ckpt.update(clip_to_ldm(te.state_dict(), "cond_stage_model.transformer.", te.config.max_position_embeddings))
    path = save_single("sd1", ckpt)
    print(f"sd1: {len(ckpt)} tensors; diffusers infers {model_type(path)!r}")
    prove_unet_and_pipeline("sd1", path, folder, D.StableDiffusionPipeline, {"text_encoder": T.CLIPTextModel},
                            dict(vae=None, tokenizer=None, scheduler=None, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False))


def make_sdxl(seed):
    te, te2 = clip_l(seed + 1), open_clip_g(seed + 2)
    unet = unet_sdxl(seed, context=te.config.hidden_size + te2.config.hidden_size, pooled=te2.config.projection_dim)
    folder = save_folder("sdxl", {"unet": unet, "text_encoder": te, "text_encoder_2": te2}, "StableDiffusionXLPipeline")
    ckpt = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ckpt.update(clip_to_ldm(te.state_dict(), "conditioner.embedders.0.transformer.", te.config.max_position_embeddings))
    ckpt.update(openclip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model.", te2.config.num_hidden_layers))
    path = save_single("sdxl", ckpt)
    print(f"sdxl: {len(ckpt)} tensors; diffusers infers {model_type(path)!r}")
    prove_unet_and_pipeline("sdxl", path, folder, D.StableDiffusionXLPipeline,
                            {"text_encoder": T.CLIPTextModel, "text_encoder_2": T.CLIPTextModelWithProjection},
                            dict(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None))


def make_sd2(seed):
    tower, te = open_clip_h(seed + 1)
    unet = unet_sd2(seed, context=te.config.hidden_size)
    folder = save_folder("sd2", {"unet": unet, "text_encoder": te}, "StableDiffusionPipeline")
    prefix = "cond_stage_model.model."
    ckpt = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ckpt.update(openclip_to_ldm(tower.state_dict(), prefix, tower.config.num_hidden_layers))
    path = save_single("sd2", ckpt)
    v2 = single_file_utils.CHECKPOINT_KEY_NAMES["v2"]
    print(f"sd2: {len(ckpt)} tensors; diffusers infers {model_type(path)!r} ({v2.removeprefix(UNET)} is "
          f"{list(ckpt[v2].shape)}: SD2 is recognised only by a context width of 1024, so config= is passed)")
    # What diffusers' OpenCLIP converter makes of the file is exactly SD2's text_encoder: resblocks.23,
    # text_projection (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and logit_scale are dropped, nothing else is left over
    # (load_model_dict_into_meta would skip a leftover key without a word).
    converted = single_file_utils.convert_open_clip_checkpoint(te, load_ckpt(path), prefix=prefix)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert set(converted) == set(te.state_dict()), sorted(set(converted) ^ set(te.state_dict()))[:6]
    dropped = sorted(k.removeprefix(prefix) for k in ckpt if k.startswith(prefix) and
                     (".resblocks.23." in k or k.endswith(("text_projection", "logit_scale"))))
    print(f"  convert_open_clip_checkpoint: {len(converted)} tensors = text_encoder's keys; drops {len(dropped)}: "
          f"transformer.resblocks.23.* ({len(dropped) - 2}), text_projection, logit_scale")
    prove_unet_and_pipeline("sd2", path, folder, D.StableDiffusionPipeline, {"text_encoder": T.CLIPTextModel},
                            dict(vae=None, tokenizer=None, scheduler=None, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False))


def prove_unet_and_pipeline(name, path, folder, pipeline, encoders, nones):
    ref = D.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16, subfolder="unet")
    got = D.UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet", local_files_only=True,
                                                  torch_dtype=torch.bfloat16)
    same(f"{name}.safetensors unet", got, ref)
    for sub, cls in encoders.items():
        prove_clip(f"{name}.safetensors {sub}", cls, path, folder, sub)
    # The whole file through the pipeline loader, which routes each component to its converter.
    pipe = pipeline.from_single_file(path, config=folder, local_files_only=True, **nones)
    same(f"{name}.safetensors via {pipeline.__name__}.from_single_file: unet (F32 there)",
         pipe.unet.to(torch.bfloat16), ref)
    for sub, cls in encoders.items():
        same(f"  … {sub}", getattr(pipe, sub), cls.from_pretrained(folder, subfolder=sub))


FAMILIES = {
    # family (the files' tiny-<family>… names): maker
    "flux-dev": lambda: make_flux("flux-dev", guidance=True, seed=31),
    "flux-schnell": lambda: make_flux("flux-schnell", guidance=False, seed=32),
    "sd3": lambda: make_sd3("sd3", v35=False, seed=33),
    "sd3.5": lambda: make_sd3("sd3.5", v35=True, seed=34),
    "sd1": lambda: make_sd1(seed=35),
    "sdxl": lambda: make_sdxl(seed=37),
    "sd2": lambda: make_sd2(seed=40),
}


def main(only):
    os.makedirs(MODELS, exist_ok=True)
    unknown = set(only) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    for family in only or FAMILIES:
        FAMILIES[family]()
    print("files:")
    for root, _, files in sorted(os.walk(MODELS)):
        for f in sorted(files):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, MODELS)
            top = rel.split(os.sep)[0].removesuffix(".safetensors").removesuffix("-diffusers").removesuffix("-comfy")
            if top.removeprefix("tiny-") in (only or FAMILIES):
                print(f"  {os.path.getsize(p):>8}  models/{rel}")


if __name__ == "__main__":
    main(sys.argv[1:])  # optional family names: make only those
