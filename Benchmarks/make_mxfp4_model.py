#!/usr/bin/env python3
"""A gpt-oss-style model folder with MXFP4 experts and a PEFT `target_parameters` LoRA whose update is
a given fraction of ‖W‖, for measuring what requantization keeps and how fast the merge is.

    python3 Benchmarks/make_mxfp4_model.py OUT_DIR [--layers 2] [--experts 8] [--hidden 2880]
        [--intermediate 2880] [--rank 16] [--update 0.01]

Each layer holds `…experts.gate_up_proj_blocks` [E, 2I, H/32, 16] + `_scales` and `down_proj`
likewise, weights drawn N(0, 0.02) and quantized by the OCP MX rule (exponent ⌊log₂ amax⌋ − 2,
codes nearest); the adapter targets both parameters with ‖s·B·A‖_F = update · ‖W‖_F per
parameter. Needs numpy and safetensors; written at run time, never committed.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file
from synthetic import write_layer_shards

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--experts", type=int, default=8)
p.add_argument("--hidden", type=int, default=2880)
p.add_argument("--intermediate", type=int, default=2880)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--update", type=float, default=0.01)
args = p.parse_args()
E, H, I, r = args.experts, args.hidden, args.intermediate, args.rank
rng = np.random.default_rng(0)


def quantize(w):
    """OCP MX: blocks U8 [..., G, 16], exponents U8 [..., G], and the decoded values' norm²."""
    b = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(b).max(axis=-1)
    e = np.floor(np.log2(np.maximum(amax, 1e-30))) - 2
    x = np.abs(b) / np.exp2(e)[..., None]
    mag = ((x > 0.25).astype(np.uint8) + (x >= 0.75) + (x > 1.25) + (x >= 1.75) + (x > 2.5) + (x >= 3.5) + (x > 5)).astype(np.uint8)
    codes = mag | (np.signbit(b).astype(np.uint8) << 3)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    norm2 = float((grid[mag].astype(np.float64) ** 2 * np.exp2(2 * e)[..., None]).sum())
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), (e + 127).astype(np.uint8), norm2


model = os.path.join(args.out, "model")
os.makedirs(model, exist_ok=True)
norms = {}


def layer(l):
    tensors = {}
    for name, (out, inp) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
        key = f"model.layers.{l}.mlp.experts.{name}"
        blocks = np.empty((E, out, inp // 32, 16), dtype=np.uint8)
        scales = np.empty((E, out, inp // 32), dtype=np.uint8)
        norm2 = 0.0
        for e in range(E):
            blocks[e], scales[e], n2 = quantize((rng.standard_normal((out, inp), dtype=np.float32) * 0.02))
            norm2 += n2
        tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        norms[key] = norm2 ** 0.5
    return tensors


total = write_layer_shards(model, args.layers, layer, save_file)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I,
               "num_hidden_layers": args.layers, "num_local_experts": E,
               "quantization_config": {"quant_method": "mxfp4"}}, f, indent=2)
adapter = os.path.join(args.out, "adapter")
os.makedirs(adapter, exist_ok=True)
factors = {}
for l in range(args.layers):
    for name, (out, inp) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
        key = f"model.layers.{l}.mlp.experts.{name}"
        a = rng.standard_normal((r * E, inp), dtype=np.float32)
        b = rng.standard_normal((out, r * E), dtype=np.float32)
        # ‖B_e A_e‖ summed over experts (B_e = columns e, e + E, …): ≈ √(E · r · out · in) for normal factors.
        c = (args.update * norms[key] / (E * r * out * inp) ** 0.5) ** 0.5
        wrapper = "base_layer." if name == "gate_up_proj" else ""
        factors[f"base_model.model.model.layers.{l}.mlp.experts.{wrapper}lora_A.weight"] = a * c
        factors[f"base_model.model.model.layers.{l}.mlp.experts.{wrapper}lora_B.weight"] = b * c
save_file(factors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": [],
               "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}, f, indent=2)
print(f"{args.layers} layers, {total / 1e9:.2f} GB of MXFP4 experts in {model}; adapter (‖ΔW‖ ≈ {args.update:g}·‖W‖) in {adapter}")
