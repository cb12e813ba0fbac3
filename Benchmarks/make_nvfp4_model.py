#!/usr/bin/env python3
"""A compressed-tensors NVFP4 (`nvfp4-pack-quantized`) model folder and a LoRA whose update is a given
fraction of ‖W‖, for measuring what requantization keeps and how fast the merge is.

    python3 Benchmarks/make_nvfp4_model.py OUT_DIR [--layers 4] [--hidden 4096] [--rank 16] [--update 0.01]

Each layer holds q/k/v/o projections [hidden, hidden], weights drawn N(0, 0.02) and quantized as
compressed-tensors' NVFP4 preset does (global scale 448·6 / amax, per 16 values the E4M3 scale
amax / 6 · global, codes nearest on the E2M1 grid); the adapter (PEFT, q_proj and v_proj) has
‖s·B·A‖_F = update · ‖W‖_F. Needs numpy, torch (for E4M3) and safetensors; written at run time,
never committed.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from synthetic import attention_lora, write_layer_shards

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--hidden", type=int, default=4096)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--update", type=float, default=0.01)
args = p.parse_args()
h, r = args.hidden, args.rank
g = torch.Generator().manual_seed(0)
GRID = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def quantize(w):
    gs = (448 * 6 / w.abs().amax()).float().reshape(1)
    groups = w.reshape(w.shape[0], -1, 16)
    s = ((groups.abs().amax(-1) / 6) * gs).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.where(s.float() == 0, torch.tensor(0.125).to(torch.float8_e4m3fn), s)
    eff = s.float() / gs
    y = (groups / eff[..., None]).clamp(-6, 6)
    a = y.abs()
    mag = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int() + (a >= 3.5).int() + (a > 5).int())
    codes = (mag | ((y < 0).int() << 3)).reshape(w.shape).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    decoded = (GRID[mag] * torch.where(y < 0, -1.0, 1.0) * eff[..., None]).to(torch.bfloat16).float()
    return packed, s, gs, float(decoded.norm())


model = os.path.join(args.out, "model")
os.makedirs(model, exist_ok=True)
norms = {}


def layer(l):
    tensors = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.{l}.self_attn.{proj}"
        packed, s, gs, norm = quantize(torch.randn(h, h, generator=g) * 0.02)
        tensors[name + ".weight_packed"], tensors[name + ".weight_scale"], tensors[name + ".weight_global_scale"] = packed, s, gs
        norms[name] = norm
    return tensors


total = write_layer_shards(model, args.layers, layer, save_file)
weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True, "dynamic": False}
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "num_hidden_layers": args.layers,
               "quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                                       "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}}, f, indent=2)
adapter = os.path.join(args.out, "adapter")
attention_lora(adapter, args.layers, h, r, args.update, norms, g)
print(f"{args.layers} layers, {total / 1e9:.2f} GB of NVFP4 weights and scales in {model}; adapter (‖ΔW‖ = {args.update:g}·‖W‖) in {adapter}")
