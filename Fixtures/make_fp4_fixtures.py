#!/usr/bin/env python3
"""FP4 bases and their references: MXFP4 experts (gpt-oss layout) and NVFP4 (compressed-tensors).

    pip install torch numpy safetensors transformers peft compressed-tensors   # only to regenerate
    python3 Fixtures/make_fp4_fixtures.py

Writes
- models/tiny-gpt-oss-mxfp4/: a gpt-oss model (hidden 64, intermediate 32, 4 experts, one layer)
  whose experts are stored as the released gpt-oss checkpoints store them:
  `…experts.gate_up_proj_blocks` U8 [E, 2I, H/32, 16] + `…_scales` U8 [E, 2I, H/32] (likewise
  `down_proj`), the decoded blocks being the transpose of the parameter ([E, H, 2I]); quantized
  here by the OCP rule (exponent ⌊log₂ amax⌋ − 2, codes nearest with ties to even). Attention,
  router, embeddings and biases are BF16; config.json carries gpt-oss's quantization_config.
- adapters/mxfp4-lora/: a PEFT LoRA made by PEFT on the dequantized model: q_proj and v_proj
  modules and `target_parameters` on both expert parameters (r 2, alpha 4).
- expected/mxfp4/tiny-gpt-oss-mxfp4+mxfp4-lora.safetensors: for both expert tensors, the
  reference merge computed here, independently, in Float64: W = E2M1[code] · 2^(s − 127) on the
  blocks layout, W' = W + (the update, in that layout), then per 32 values the exponent
  e₀ = ⌊log₂ amax⌋ − 2 or e₀ + 1, whichever decodes nearer W' in squared error (ties: e₀), codes
  nearest with ties to the even code (saturating at ±6); saved as `<name>_blocks`, `<name>_scales`,
  `<name>.merged` (W', F64, blocks layout), `<name>.base` (W, F64, blocks layout) and
  `<name>.bf16` (W' in the parameter layout rounded once to BF16, as U16 bits: the `--dtype bf16`
  reference). The update is checked against PEFT's own merge of the same adapter.
- models/tiny-nvfp4/: a LLaMA-shaped model (hidden 32, intermediate 64, one layer) quantized by
  compressed-tensors itself with its NVFP4 preset (`nvfp4-pack-quantized`: `X.weight_packed`,
  `X.weight_scale` E4M3 per 16 values, `X.weight_global_scale`, `X.input_global_scale`; lm_head
  ignored), with the quantization_config it writes.
- adapters/nvfp4-lora/: a PEFT LoRA (q_proj, v_proj, down_proj; r 2, alpha 4) with a MoSLoRA mixer
  on down_proj.
- expected/nvfp4/tiny-nvfp4+nvfp4-lora.safetensors: W = compressed-tensors' own decompression of
  each weight, W' = W + s·B·M·A in Float64, and the requantization by the rule of docs/formats.md
  §9d emulated in numpy Float32 (the kept global scale gs; per 16 values the scale
  E4M3(amax / 6 · gs), 0 → 0.125; codes of W' / (scale / gs) nearest with ties to even): saved as
  `X.weight_packed`, `X.weight_scale`, `X.merged` (F64), `X.base` (F64) and `X.bf16` (W' rounded
  once to BF16, U16 bits).
- expected/mxfp4/decode.safetensors: every byte value under exponents 0 … 252, and the values
  transformers' `convert_moe_packed_tensors` decodes them to (Float32).
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
import peft
import torch
import transformers as T
from safetensors import safe_open
from safetensors.numpy import save_file

from make_quantized_fixtures import moslora_adapter, patch_dtypes

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "mxfp4")
NV_EXPECTED = os.path.join(HERE, "expected", "nvfp4")
H, I, E = 64, 32, 4
NH, NI = 32, 64
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_codes(x):
    """Codes of x (already divided by the block's scale): nearest on the grid, ties to the even
    code, saturating at 6; the sign bit kept (−0.0 for small negatives)."""
    a = np.abs(x)
    mag = ((a > 0.25).astype(np.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)).astype(np.uint8)
    return mag | (np.signbit(x).astype(np.uint8) << 3)


def decode_codes(codes, exps):
    """codes [..., n] (0…15), exps [..., n/32] (unbiased) → float64."""
    v = GRID[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    return v * np.repeat(np.exp2(exps.astype(np.float64)), 32, axis=-1)


def quantize(w, try_next):
    """Blocks (U8 [..., G, 16]) and exponent bytes (U8 [..., G]) of w [..., 32·G] (float64)."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1)
    e0 = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, 0).astype(np.int64)
    e0 = np.clip(e0, -127, 127)

    def attempt(e):
        c = e2m1_codes(blocks / np.exp2(e.astype(np.float64))[..., None])
        err = ((decode_codes(c, e[..., None].repeat(1, -1)) - blocks) ** 2).sum(axis=-1)
        return c, err

    codes, err = attempt(e0)
    exps = e0
    if try_next:
        e1 = np.clip(e0 + 1, -127, 127)
        c1, err1 = attempt(e1)
        better = (err1 < err) & (amax > 0)
        codes = np.where(better[..., None], c1, codes)
        exps = np.where(better, e1, e0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, (exps + 127).astype(np.uint8)


def decode(blocks, scales):
    lo, hi = blocks & 15, blocks >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    return decode_codes(codes, scales.astype(np.int64)[..., None] - 127).reshape(*blocks.shape[:-2], -1)


def bf16_bits(x):
    """Round-to-nearest-even of float64 values into bfloat16, exactly (no pass through float32)."""
    out = np.zeros(x.shape, dtype=np.uint16)
    flat = x.reshape(-1)
    res = out.reshape(-1)
    for i, v in enumerate(flat):
        v = float(v)
        if v == 0:
            r = 0.0 if math.copysign(1, v) > 0 else -0.0
        else:
            m, e = math.frexp(v)
            r = math.ldexp(round(m * 256), e - 8)  # round() of an exact float: ties to even
        res[i] = np.array([r], dtype=np.float32).view(np.uint32)[0] >> 16
    return out


def build():
    torch.manual_seed(5)
    config = T.GptOssConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=32, num_local_experts=E,
                            num_experts_per_tok=2, layer_types=["full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = T.GptOssForCausalLM(config)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.to(torch.bfloat16).eval()


def save_base():
    folder = os.path.join(MODELS, "tiny-gpt-oss-mxfp4")
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        build().save_pretrained(tmp)
        tensors = {}
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        config = json.load(open(os.path.join(tmp, "config.json")))
    decoded = {}
    out = {}
    rng = np.random.default_rng(3)
    for k, t in tensors.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            w = t.double().numpy().transpose(0, 2, 1).copy()  # the blocks layout [E, out, in]
            # Blocks of every kind: tiny ones (low exponents), one all zero, some just under a power of two.
            w[0, 0, :32] *= 1e-6
            w[0, 1, :32] = 0
            w[1, 2, :32] = np.linspace(-3.9, 3.9, 32) * 0.01
            blocks, scales = quantize(w, try_next=False)
            out[k + "_blocks"] = blocks
            out[k + "_scales"] = scales
            decoded[k] = decode(blocks, scales)
        else:
            out[k] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    os.makedirs(folder)
    path = os.path.join(folder, "model.safetensors")
    save_file(out, path, metadata={"format": "pt"})
    patch_dtypes(path, {k: "BF16" for k, t in tensors.items() if t.dtype == torch.bfloat16 and k in out})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config["dtype"] = "bfloat16"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return folder, decoded


def dequantized_model(folder):
    m = T.AutoModelForCausalLM.from_pretrained(folder, quantization_config=T.Mxfp4Config(dequantize=True), dtype=torch.float32,
                                               local_files_only=True)
    return m.eval()


def make_adapter(folder, decoded):
    m = dequantized_model(folder)
    sd = m.state_dict()
    for k, d in decoded.items():  # transformers decodes exactly what we do
        assert np.array_equal(sd[k].double().numpy(), d.transpose(0, 2, 1)), k
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(12)
    pm = peft.get_peft_model(m, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            elif "lora_A" in n:
                p.normal_(0, 0.05)
    out = os.path.join(ADAPTERS, "mxfp4-lora")
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    config_path = os.path.join(out, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = "tiny-gpt-oss-mxfp4"
    config["target_modules"] = sorted(config["target_modules"])  # PEFT keeps a set: its order is the hash seed's
    json.dump(config, open(config_path, "w"), indent=2, sort_keys=True)
    merged = pm.merge_and_unload().state_dict()
    return out, {k: merged[k].double().numpy() for k in decoded}


def expert_deltas(adapter):
    """Each expert parameter's update in the blocks layout [E, out, in], from the adapter's tensors
    by the rules of docs/formats.md (expert e: rows e·r … e·r + r − 1 of A, columns e, e + E, … of B
    (PEFT reshapes B to [out, r, E]); B·A lands on the
    decoded blocks as it is)."""
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "np") as f:
        t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    r, s = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{name}"
        # PEFT nests one wrapper per parameter, the first in the class's order innermost:
        # `experts.base_layer.lora_A` is gate_up_proj's, `experts.lora_A` down_proj's.
        prefix = "base_model.model.model.layers.0.mlp.experts." + ("base_layer." if name == "gate_up_proj" else "")
        a, b = t[prefix + "lora_A.weight"], t[prefix + "lora_B.weight"]
        out[key] = np.stack([s * b[:, e::E] @ a[e * r:(e + 1) * r] for e in range(E)])
    return out


def decode_cases():
    rng = np.random.default_rng(4)
    blocks = np.tile(np.arange(256, dtype=np.uint8), 64 * 16 // 256 * 16).reshape(64, 16, 16)
    rng.shuffle(blocks.reshape(-1))
    # Exponents 0 … 252: above, 6 · 2^(s − 127) overflows Float32 (as it does in transformers).
    scales = np.concatenate([np.array([0, 1, 2, 125, 126, 127, 128, 129, 250, 251, 252], dtype=np.uint8),
                             rng.integers(0, 253, 64 * 16 - 11).astype(np.uint8)]).reshape(64, 16)
    # transformers' layout: [E, rows, G, 16] blocks, decoded and transposed to [E, 32·G, rows].
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    got = convert_moe_packed_tensors(torch.from_numpy(blocks.reshape(1, 64, 16, 16)), torch.from_numpy(scales.reshape(1, 64, 16)),
                                     dtype=torch.float32)
    values = got[0].transpose(0, 1).contiguous().numpy()  # back to [rows, 32·G]
    assert np.array_equal(values.astype(np.float64), decode(blocks, scales))
    save_file({"blocks": blocks, "scales": scales, "values": values}, os.path.join(EXPECTED, "decode.safetensors"),
              metadata={"reference": f"transformers {T.__version__} convert_moe_packed_tensors, float32"})


def nvfp4_model():
    """models/tiny-nvfp4, quantized and compressed by compressed-tensors; returns each quantized
    weight as compressed-tensors decompresses it (Float64 of its BF16 values)."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    torch.manual_seed(6)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=NH, intermediate_size=NI, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(torch.bfloat16).eval()
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for _, m in model.named_modules():
            if not hasattr(m, "quantization_scheme"):
                continue
            w, args = m.weight, m.quantization_scheme.weights
            gs = generate_gparam(w.amin(), w.amax())
            g = w.unflatten(-1, (-1, args.group_size))
            s, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
            m.weight_global_scale.copy_(gs)
            m.weight_scale.copy_(s)
            m.input_global_scale.copy_(generate_gparam(torch.tensor(-4.0, dtype=torch.bfloat16), torch.tensor(4.0, dtype=torch.bfloat16)))
            m.quantization_status = QuantizationStatus.FROZEN
    folder = os.path.join(MODELS, "tiny-nvfp4")
    shutil.rmtree(folder, ignore_errors=True)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    decompressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    decoded = {}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            if k.endswith(".weight_packed"):
                module = k[: -len(".weight_packed")]
                parts = {x: f.get_tensor(f"{module}.{x}") for x in ("weight_packed", "weight_scale", "weight_global_scale")}
                decoded[module + ".weight"] = (decompressor.decompress(parts, scheme)["weight"].double().numpy(), parts)
    return decoded


def e4m3_code(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def e4m3_value(codes):
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()


def nvfp4_requantize(merged, gs):
    """Packed codes and E4M3 scale bytes of merged [N, K] (float64) under the global scale gs, by
    §9d's rule in numpy Float32."""
    w = merged.astype(np.float32).reshape(merged.shape[0], -1, 16)
    amax = np.abs(w).max(axis=-1)
    scale = e4m3_code((amax / np.float32(6)).astype(np.float32) * np.float32(gs))
    scale = np.where(scale & 0x7F == 0, e4m3_code(np.float32(0.125)), scale).astype(np.uint8)
    eff = (e4m3_value(scale) / np.float32(gs)).astype(np.float32)
    y = (w / eff[..., None]).astype(np.float32)
    codes = e2m1_codes(np.clip(y, -6, 6))
    codes = np.where(y < 0, codes | 8, codes & 7).astype(np.uint8)  # compressed-tensors: the sign of y, +0 for ±0
    codes = codes.reshape(merged.shape)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scale


def nvfp4_case():
    decoded = nvfp4_model()
    rng = np.random.default_rng(10)
    mods = {"model.layers.0.self_attn.q_proj": (32, NH), "model.layers.0.self_attn.v_proj": (16, NH), "model.layers.0.mlp.down_proj": (NH, NI)}
    deltas = moslora_adapter("nvfp4-lora", "tiny-nvfp4", mods, rng, b_scale=0.1)
    out = {}
    for m in mods:
        delta = deltas[m + ".weight"]
        w, parts = decoded[m + ".weight"]
        merged = w + delta
        packed, scale = nvfp4_requantize(merged, float(parts["weight_global_scale"][0]))
        out[m + ".weight_packed"] = packed
        out[m + ".weight_scale"] = scale
        out[m + ".merged"] = merged
        out[m + ".bf16"] = bf16_bits(merged)
    for k, (w, _) in decoded.items():
        out[k[: -len(".weight")] + ".base"] = w
    os.makedirs(NV_EXPECTED, exist_ok=True)
    save_file(out, os.path.join(NV_EXPECTED, "tiny-nvfp4+nvfp4-lora.safetensors"),
              metadata={"reference": "compressed-tensors decompression, numpy float64 merge, float32 requantization"})


def main():
    os.makedirs(EXPECTED, exist_ok=True)
    nvfp4_case()
    folder, decoded = save_base()
    adapter, peft_merged = make_adapter(folder, decoded)
    deltas = expert_deltas(adapter)
    out = {}
    for k, w in decoded.items():
        merged = w + deltas[k]
        # PEFT's merge (Float32, in the parameter layout) agrees with ours in Float64.
        assert np.allclose(peft_merged[k], merged.transpose(0, 2, 1), rtol=1e-5, atol=1e-6), k
        blocks, scales = quantize(merged, try_next=True)
        out[k + "_blocks"] = blocks
        out[k + "_scales"] = scales
        out[k + ".merged"] = merged
        out[k + ".base"] = w
        out[k + ".bf16"] = bf16_bits(merged.transpose(0, 2, 1).copy())
    save_file(out, os.path.join(EXPECTED, "tiny-gpt-oss-mxfp4+mxfp4-lora.safetensors"),
              # One metadata key: safetensors writes several in a hash order that changes per run.
              metadata={"reference": f"numpy float64 (checked against peft {peft.__version__}, transformers {T.__version__})"})
    decode_cases()
    print(f"tiny-gpt-oss-mxfp4, mxfp4-lora, {len(decoded)} expert references, decode cases; tiny-nvfp4, nvfp4-lora")


if __name__ == "__main__":
    main()
