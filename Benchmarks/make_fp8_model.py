#!/usr/bin/env python3
"""A DeepSeek-V3-style block-scaled FP8 model folder and a LoRA whose update is a given fraction of
‖W‖, for measuring what requantization keeps and how fast the merge is.

    python3 Benchmarks/make_fp8_model.py OUT_DIR [--layers 4] [--hidden 4096] [--rank 16]
        [--update 0.01] [--e8m0]

Each layer holds q/k/v/o projections [hidden, hidden] of E4M3 codes with F32 (or UE8M0) 128×128
block scales, weights drawn N(0, 0.02) and quantized with amax/448 per block; the adapter (PEFT,
q_proj and v_proj) is scaled so that ‖s·B·A‖_F = update · ‖W‖_F for every module. Needs numpy,
torch (for the E4M3 codes) and safetensors; written at run time, never committed.
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
p.add_argument("--e8m0", action="store_true")
args = p.parse_args()
h, r, B = args.hidden, args.rank, 128
g = torch.Generator().manual_seed(0)
model = os.path.join(args.out, "model")
os.makedirs(model, exist_ok=True)
norms = {}


def layer(l):
    tensors = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.{l}.self_attn.{proj}.weight"
        w = torch.randn(h, h, generator=g) * 0.02
        blocks = w.reshape(h // B, B, h // B, B).abs().amax(dim=(1, 3))
        s = blocks / 448
        if args.e8m0:
            s = torch.exp2(torch.ceil(torch.log2(s)))
        codes = (w / s.repeat_interleave(B, 0).repeat_interleave(B, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name] = codes
        tensors[name + "_scale_inv"] = s.to(torch.float8_e8m0fnu) if args.e8m0 else s.float()
        norms[name[: -len(".weight")]] = float((codes.float() * s.repeat_interleave(B, 0).repeat_interleave(B, 1)).norm())
    return tensors


total = write_layer_shards(model, args.layers, layer, save_file)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "num_hidden_layers": args.layers,
               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [B, B]}}, f, indent=2)
adapter = os.path.join(args.out, "adapter")
attention_lora(adapter, args.layers, h, r, args.update, norms, g)
print(f"{args.layers} layers, {total / 1e9:.2f} GB of FP8 weights and scales in {model}; adapter (‖ΔW‖ = {args.update:g}·‖W‖) in {adapter}")
