#!/usr/bin/env python3
"""Quantized bases and their references: block-scaled FP8 (DeepSeek-V3 / Qwen3-FP8 layout).

    pip install torch numpy safetensors compressed-tensors     # only to regenerate
    python3 Fixtures/make_quantized_fixtures.py

Writes
- models/tiny-fp8/: a LLaMA-shaped model (hidden 16, intermediate 24, one layer) whose linear
  weights are F8_E4M3 codes made by torch (`float8_e4m3fn`) with one F32 scale per 4×8 block in
  `X.weight_scale_inv`, sharded so that some scales sit in another shard than their weight;
  config.json carries `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
  "weight_block_size": [4, 8]} as DeepSeek-V3's does (with 128×128 there).
- models/tiny-fp8-e8m0/: the same with UE8M0 (F8_E8M0) power-of-two scales.
- adapters/fp8-lora/: a PEFT LoRA (q_proj, v_proj, down_proj; r 2, alpha 4) with a MoSLoRA mixer
  on down_proj (`lora_AB`, `lora_use_mixer_pattern`).
- expected/fp8/<base>+fp8-lora.safetensors: for every weight the adapter touches, the reference
  merge computed here, independently, in Float64 with the rules of docs/formats.md: W = code ×
  scale, W' = W + s·B·M·A, per block s' = amax|W'| / 448 (F32; UE8M0: the power of two at or
  above), codes = torch's float8_e4m3fn of clamp(W' / s', ±448); saved as the codes (U8), the
  scales, and W' itself (F64) for measuring what requantization kept; `.base`: every quantized
  weight of the base decoded in Float64 (the dequantized model's reference).
- expected/fp8/e4m3-codes.safetensors: random Float32 values (normal, subnormal, ties, beyond
  ±448) and torch's E4M3 code of each (clamped to ±448 first, as quantizers do).
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "fp8")
BLOCK = (4, 8)
H, I, V = 16, 24, 32


def e4m3_codes(x):
    """torch's E4M3 codes of float32 values, clamped to ±448 first."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return t.view(torch.uint8).numpy()


def e4m3_values(codes):
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float64).numpy()


def e8m0_ceil(s):
    e = np.ceil(np.log2(s))
    return np.clip(e + 127, 0, 254).astype(np.uint8)


def block_reduce(x, fn):
    n, k = x.shape
    out = np.zeros(((n + BLOCK[0] - 1) // BLOCK[0], (k + BLOCK[1] - 1) // BLOCK[1]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = fn(x[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]])
    return out


def expand(s, shape):
    return np.repeat(np.repeat(s, BLOCK[0], axis=0), BLOCK[1], axis=1)[:shape[0], :shape[1]]


def quantize(w, e8m0):
    """Codes and scales of w (float64) by the rules above."""
    amax = block_reduce(np.abs(w), np.max)
    s = np.where(amax > 0, amax / 448.0, 1.0)
    if e8m0:
        sb = e8m0_ceil(s)
        s = np.exp2(sb.astype(np.float64) - 127)
        stored = sb
    else:
        s = s.astype(np.float32).astype(np.float64)
        stored = s.astype(np.float32)
    codes = e4m3_codes((w / expand(s, w.shape)).astype(np.float32))
    return codes, s, stored


def make_base(name, e8m0, rng):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (H, H), "model.layers.0.self_attn.k_proj.weight": (8, H),
              "model.layers.0.self_attn.v_proj.weight": (8, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
              "model.layers.0.mlp.gate_proj.weight": (I, H), "model.layers.0.mlp.up_proj.weight": (I, H),
              "model.layers.0.mlp.down_proj.weight": (H, I)}
    shard1, shard2, decoded = {}, {}, {}
    shard1["model.embed_tokens.weight"] = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    for k, shape in shapes.items():
        w = rng.standard_normal(shape) * 0.05
        codes, s, stored = quantize(w, e8m0)
        decoded[k] = e4m3_values(codes) * expand(s, shape)
        # Weights in shard 1; the scales of attention in shard 2 (away from their weights).
        shard1[k] = codes
        (shard2 if "self_attn" in k else shard1)[k + "_scale_inv"] = stored
    shard2["model.norm.weight"] = np.ones(H, dtype=np.float32)
    shard2["model.layers.0.input_layernorm.weight"] = (1 + rng.standard_normal(H) * 0.05).astype(np.float32)
    shard2["model.layers.0.post_attention_layernorm.weight"] = (1 + rng.standard_normal(H) * 0.05).astype(np.float32)
    shard2["lm_head.weight"] = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    folder = os.path.join(MODELS, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map, total = {}, 0
    for fname, tensors in files.items():
        # numpy has no float8: the codes are written as U8 and the header patched to F8_E4M3 / F8_E8M0.
        path = os.path.join(folder, fname)
        save_file(tensors, path, metadata={"format": "pt"})
        patch_dtypes(path, {k: "F8_E4M3" for k in tensors if k in shapes} | ({k: "F8_E8M0" for k in tensors if k.endswith("_scale_inv")} if e8m0 else {}))
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": V, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}}
    if e8m0:
        config["quantization_config"]["scale_fmt"] = "ue8m0"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return decoded


def patch_dtypes(path, dtypes):
    """Rewrites header dtypes in place (same length: "U8" → "F8_E4M3" changes the header size, so
    the header is re-serialised and padded, and the data copied after it)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for k, d in dtypes.items():
        header[k]["dtype"] = d
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def moslora_adapter(name, base, mods, rng, b_scale=0.3):
    """adapters/<name>: a PEFT LoRA (r 2, alpha 4: s = 2) on `mods` ({module: (out, in)}) with a
    MoSLoRA mixer (`lora_AB`, `lora_use_mixer_pattern`) on down_proj; returns each weight's update
    s·B·M·A in Float64."""
    r, alpha = 2, 4.0
    tensors, deltas = {}, {}
    for m, (out, inp) in mods.items():
        a = (rng.standard_normal((r, inp)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((out, r)) * b_scale).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.weight"] = b
        mixer = np.eye(r)
        if m.endswith("down_proj"):
            mixer = (rng.standard_normal((r, r)) * 0.5 + np.eye(r)).astype(np.float32)
            tensors[f"base_model.model.{m}.lora_AB.weight"] = mixer
        deltas[m + ".weight"] = (alpha / r) * (b.astype(np.float64) @ mixer.astype(np.float64) @ a.astype(np.float64))
    folder = os.path.join(ADAPTERS, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(dict.fromkeys(m.rsplit(".", 1)[1] for m in mods)),
               "lora_use_mixer": False, "lora_use_mixer_pattern": {"model.layers.0.mlp.down_proj": True}, "base_model_name_or_path": base},
              open(os.path.join(folder, "adapter_config.json"), "w"), indent=2, sort_keys=True)
    return deltas


def main():
    rng = np.random.default_rng(8)
    os.makedirs(EXPECTED, exist_ok=True)
    bases = {"tiny-fp8": make_base("tiny-fp8", False, rng)}
    bases["tiny-fp8-e8m0"] = make_base("tiny-fp8-e8m0", True, np.random.default_rng(8))

    mods = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.self_attn.v_proj": (8, H), "model.layers.0.mlp.down_proj": (H, I)}
    deltas = moslora_adapter("fp8-lora", "tiny-fp8", mods, rng)

    compressed_reference(compressed_tensors_fp8(), deltas)
    for base, decoded in bases.items():
        out = {}
        for k, d in deltas.items():
            merged = decoded[k] + d
            codes, s, stored = quantize(merged, base.endswith("e8m0"))
            out[k] = codes
            out[k + "_scale_inv"] = stored
            out[k + ".merged"] = merged
        for k, d in decoded.items():
            out[k + ".base"] = d  # every quantized weight, decoded in Float64
        save_file(out, os.path.join(EXPECTED, f"{base}+fp8-lora.safetensors"), metadata={"reference": "numpy float64 + torch float8_e4m3fn"})

    # E4M3 rounding: every code's value, random normals and subnormals, exact ties, beyond ±448.
    values = [e4m3_values(np.arange(256, dtype=np.uint8)).astype(np.float32)]
    values.append((np.random.default_rng(1).standard_normal(4000) * np.exp2(np.random.default_rng(2).integers(-12, 10, 4000))).astype(np.float32))
    grid = e4m3_values(np.arange(0, 0x7E, dtype=np.uint8))
    values.append(((grid[:-1] + grid[1:]) / 2).astype(np.float32))  # midpoints: ties to even
    values.append(np.array([448, 449, 460, 464, 465, 1e6, -1e6, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32))
    v = np.concatenate(values)
    v = v[~np.isnan(v)]
    save_file({"values": v, "codes": e4m3_codes(v)}, os.path.join(EXPECTED, "e4m3-codes.safetensors"))
    print(f"tiny-fp8, tiny-fp8-e8m0, fp8-lora, {len(deltas)} reference tensors each, {len(v)} E4M3 cases")


def compressed_tensors_fp8():
    """models/tiny-fp8-channel/: the same shapes quantized by compressed-tensors itself with
    llm-compressor's FP8_DYNAMIC scheme (E4M3 weights, one BF16 scale per output row in
    `X.weight_scale`, lm_head ignored), with the quantization_config it writes; and the reference
    merge of fp8-lora into it (expected/fp8/tiny-fp8-channel+fp8-lora.safetensors): per row
    s' = amax / 448 rounded once to BF16, codes = E4M3 of clamp(W' / s', ±448)."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    rng = np.random.default_rng(9)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (H, H), "model.layers.0.self_attn.k_proj.weight": (8, H),
              "model.layers.0.self_attn.v_proj.weight": (8, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
              "model.layers.0.mlp.gate_proj.weight": (I, H), "model.layers.0.mlp.up_proj.weight": (I, H),
              "model.layers.0.mlp.down_proj.weight": (H, I)}
    tensors, decoded = {}, {}
    for k, shape in shapes.items():
        w = torch.from_numpy(rng.standard_normal(shape) * 0.05).to(torch.bfloat16)
        amax = w.abs().amax(dim=1, keepdim=True)
        scale, zero = calculate_qparams(-amax, amax, scheme.weights)
        q = quantize(w, scale, zero, scheme.weights, dtype=torch.float8_e4m3fn)
        tensors[k] = q.view(torch.uint8).numpy()
        tensors[k + "_scale"] = scale.to(torch.bfloat16).view(torch.int16).numpy()
        decoded[k] = q.double().numpy() * scale.double().numpy()
    tensors["model.embed_tokens.weight"] = torch.from_numpy(rng.standard_normal((V, H)) * 0.05).to(torch.bfloat16).view(torch.int16).numpy()
    tensors["lm_head.weight"] = torch.from_numpy(rng.standard_normal((V, H)) * 0.05).to(torch.bfloat16).view(torch.int16).numpy()
    for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        tensors[n] = torch.ones(H, dtype=torch.bfloat16).view(torch.int16).numpy()
    folder = os.path.join(MODELS, "tiny-fp8-channel")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    path = os.path.join(folder, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    patch_dtypes(path, {k: ("F8_E4M3" if k in shapes else "BF16") for k in tensors})
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized", ignore=["lm_head"],
                            quantization_status="compressed").model_dump(exclude_none=True)
    qc["quant_method"] = "compressed-tensors"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": V, "torch_dtype": "bfloat16",
              "quantization_config": json.loads(json.dumps(qc, default=str))}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return decoded


def compressed_reference(decoded, deltas):
    out = {}
    for k, d in deltas.items():
        merged = decoded[k] + d
        amax = np.abs(merged).max(axis=1, keepdims=True)
        s = torch.from_numpy(amax / 448.0).to(torch.bfloat16)
        codes = e4m3_codes((merged / s.double().numpy()).astype(np.float32))
        out[k] = codes
        out[k + "_scale"] = s.view(torch.int16).numpy()
        out[k + ".merged"] = merged
    for k, d in decoded.items():
        out[k + ".base"] = d
    save_file(out, os.path.join(EXPECTED, "tiny-fp8-channel+fp8-lora.safetensors"),
              metadata={"reference": "numpy float64 + torch float8_e4m3fn; base quantized by compressed-tensors"})


if __name__ == "__main__":
    main()
