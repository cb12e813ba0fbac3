#!/usr/bin/env python3
"""A base model and a "fine-tuned" copy for `adapter extract`, with numpy's full SVD of every
difference as the expected values.

    pip install numpy torch transformers safetensors    # only to regenerate
    python3 Fixtures/make_extract_fixtures.py

Writes
- models/extract-base/: a transformers LLaMA (hidden 64, MLP 96, 2 layers, 4 heads, 2 KV heads,
  vocabulary 32), F32, saved in two shards.
- models/extract-tuned/: the same model with every attention and MLP projection W + B·A (an exact
  rank-8 update, entries about 0.02) + noise N(0, 1e-5); layer 1's post_attention_layernorm and
  lm_head changed too (a norm and a head the adapter leaves out unless --save-full); embed_tokens
  unchanged. One file.
- expected/extract/svd.json: per projection, numpy's singular values of D = tuned − base (Float64
  from the stored F32) and ‖D‖²_F; the ranks --keep-energy 0.999 and 0.9999999 give.
"""
import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    base = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    folder = os.path.join(HERE, "models", "extract-base")
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="150KB")
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    rng = np.random.default_rng(1)
    tuned = dict(base)
    expected = {}
    for name in sorted(base):
        if not any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            continue
        out, inp = base[name].shape
        b = rng.standard_normal((out, 8)) * 0.05
        a = rng.standard_normal((8, inp)) * 0.05
        w = base[name].astype(np.float64) + b @ a + rng.standard_normal((out, inp)) * 1e-5
        tuned[name] = w.astype(np.float32)
        d = tuned[name].astype(np.float64) - base[name].astype(np.float64)
        s = np.linalg.svd(d, compute_uv=False)
        e = np.cumsum(s ** 2) / np.sum(d ** 2)
        expected[name[:-len(".weight")]] = {"singular_values": s.tolist(), "norm_squared": float(np.sum(d ** 2)),
                                            "rank_for_0.999": int(np.searchsorted(e, 0.999 * (1 - 1e-12)) + 1),
                                            "rank_for_0.9999999": int(np.searchsorted(e, 0.9999999 * (1 - 1e-12)) + 1)}
    tuned["model.layers.1.post_attention_layernorm.weight"] = (base["model.layers.1.post_attention_layernorm.weight"] * 1.01).astype(np.float32)
    tuned["lm_head.weight"] = (base["lm_head.weight"] + rng.standard_normal(base["lm_head.weight"].shape) * 0.01).astype(np.float32)
    folder = os.path.join(HERE, "models", "extract-tuned")
    os.makedirs(folder, exist_ok=True)
    save_file(tuned, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    with open(os.path.join(HERE, "expected", "extract", "svd.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
