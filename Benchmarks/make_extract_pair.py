#!/usr/bin/env python3
"""A LLaMA-shaped bf16 base model and a "fine-tuned" copy for timing `adapter extract` against
mergekit-extract-lora.

    python3 Benchmarks/make_extract_pair.py OUT_DIR [--layers 9] [--hidden 2048] [--intermediate 5632] [--vocab 32000]

Writes OUT_DIR/base and OUT_DIR/tuned (config.json, one shard per layer, index). Every projection of
the tuned model is W + Δ rounded to bf16, where Δ has 64 singular values decaying as 0.9^i (the
largest 0.5, so Δ is about 2 % of W) in random directions: not exactly low rank, so a rank-16
extraction has an error to compare. Embeddings and norms are the same in both. Written at run
time, never committed.
"""
import argparse
import json
import os

import numpy as np

from synthetic import bf16, write_layer_shards

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=9)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--intermediate", type=int, default=5632)
p.add_argument("--vocab", type=int, default=32000)
args = p.parse_args()
h, f, v, L = args.hidden, args.intermediate, args.vocab, args.layers


def to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def round_bf16(x):
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def update(rng, out, inp, rank=64):
    u = np.linalg.qr(rng.standard_normal((out, rank), dtype=np.float32))[0]
    w = np.linalg.qr(rng.standard_normal((inp, rank), dtype=np.float32))[0]
    s = (0.5 * 0.9 ** np.arange(rank)).astype(np.float32)
    return (u * s) @ w.T


rng = np.random.default_rng(0)
embed, head = bf16(rng, (v, h)), bf16(rng, (v, h))
shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h), "self_attn.o_proj": (h, h),
          "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f, "num_hidden_layers": L,
          "num_attention_heads": h // 64, "num_key_value_heads": h // 64, "vocab_size": v, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def save(tensors, path, metadata):
    """bf16 arrays (uint16 bits) through safetensors' serializer with dtype bfloat16."""
    from safetensors import _safetensors_rust as st
    specs = {k: st.TensorSpec(dtype="bfloat16", shape=list(x.shape), data_ptr=x.ctypes.data, data_len=x.nbytes) for k, x in tensors.items()}
    st.serialize_file(specs, path, metadata)


for which in ("base", "tuned"):
    os.makedirs(os.path.join(args.out, which), exist_ok=True)
    with open(os.path.join(args.out, which, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)

layers = {}
for l in range(L):
    base, tuned = {}, {}
    for name, shape in shapes.items():
        w = bf16(rng, shape)
        base[f"model.layers.{l}.{name}.weight"] = w
        tuned[f"model.layers.{l}.{name}.weight"] = round_bf16(to_f32(w) + update(rng, *shape))
    ones = round_bf16(np.ones(h, dtype=np.float32))
    for n in ("input_layernorm", "post_attention_layernorm"):
        base[f"model.layers.{l}.{n}.weight"] = ones
        tuned[f"model.layers.{l}.{n}.weight"] = ones
    if l == 0:
        base["model.embed_tokens.weight"] = tuned["model.embed_tokens.weight"] = embed
    if l == L - 1:
        base["lm_head.weight"] = tuned["lm_head.weight"] = head
        base["model.norm.weight"] = tuned["model.norm.weight"] = ones
    layers[l] = (base, tuned)

for i, which in enumerate(("base", "tuned")):
    write_layer_shards(os.path.join(args.out, which), L, lambda l: layers[l][i], save)
print(f"{args.out}/base and {args.out}/tuned: {L} layers of hidden {h}")
