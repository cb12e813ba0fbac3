#!/usr/bin/env python3
"""The relative Frobenius error ‖D − ΔW‖_F / ‖D‖_F of an extracted PEFT adapter, per module and over
all of them, where D = TUNED − BASE (Float64) and ΔW = scale·B·A (·M for MoSLoRA's lora_AB) as
PEFT applies it (lora_alpha / r, rank_pattern, alpha_pattern, use_rslora).

    python3 Benchmarks/extract_error.py BASE TUNED ADAPTER
"""
import json
import math
import os
import re
import sys

import numpy as np
from safetensors import safe_open


def tensors(folder):
    """name → (file, key) over a model folder's shards."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "np") as h:
                for k in h.keys():
                    out[k] = os.path.join(folder, f)
    return out


def load(index, name):
    import torch
    with safe_open(index[name], "pt") as h:
        return h.get_tensor(name).to(torch.float64).numpy()


def main(base, tuned, adapter):
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    weights = {}
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as h:
        import torch
        for k in h.keys():
            weights[k] = h.get_tensor(k).to(torch.float64).numpy()
    b_index, t_index = tensors(base), tensors(tuned)
    total_d = total_e = 0.0
    worst = 0.0
    modules = sorted({k[:-len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")})
    for m in modules:
        name = m[len("base_model.model."):] if m.startswith("base_model.model.") else m
        a, b = weights[m + ".lora_A.weight"], weights[m + ".lora_B.weight"]
        r = a.shape[0]
        alpha = cfg.get("lora_alpha", r)
        for k, v in (cfg.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({k})$", name):
                r = v
        for k, v in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({k})$", name):
                alpha = v
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        mixer = weights.get(m + ".lora_AB.weight")
        delta = scale * (b @ (mixer @ a if mixer is not None else a))
        d = load(t_index, name + ".weight") - load(b_index, name + ".weight")
        e = float(np.sum((d - delta) ** 2))
        total_d += float(np.sum(d ** 2))
        total_e += e
        worst = max(worst, math.sqrt(e / float(np.sum(d ** 2))))
    print(f"{len(modules)} modules: relative Frobenius error {math.sqrt(total_e / total_d):.8f} overall, worst module {worst:.8f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
