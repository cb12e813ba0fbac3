#!/usr/bin/env python3
"""A LLaMA-shaped GGUF model (llama.cpp names and metadata) and a PEFT LoRA for it, for timing
`adapter merge` into GGUF bases.

    python3 Benchmarks/make_gguf_model.py OUT_DIR [--layers 18] [--hidden 2048] [--ffn 5632]
        [--type Q8_0|Q4_K] [--rank 16] [--experts E]

Weights N(0, 0.02), quantized by gguf-py (Q8_0) or by llama.cpp's own ggml through ctypes
(Q4_K; needs llama-cpp-python); the adapter adapts q_proj and v_proj of every layer. With
--experts E the model is a qwen3moe whose MLPs are E experts in llama.cpp's fused 3-D
`ffn_{gate,up,down}_exps` tensors, and the adapter adapts every expert's down_proj too (per-expert
modules): tensors of hundreds of megabytes that the merge streams in bands. Written at run time,
never committed.
"""
import argparse
import ctypes
import glob
import json
import os

import gguf
import numpy as np
from safetensors.numpy import save_file

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=18)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--ffn", type=int, default=5632)
p.add_argument("--type", default="Q8_0", choices=["Q8_0", "Q4_K"])
p.add_argument("--rank", type=int, default=16)
p.add_argument("--experts", type=int, default=0)
args = p.parse_args()
T = gguf.GGMLQuantizationType
qtype = T[args.type]
rng = np.random.default_rng(0)
h, ffn, vocab = args.hidden, args.ffn, 32000


def quantize(x):
    if qtype == T.Q8_0:
        return gguf.quants.quantize(x, qtype)
    import llama_cpp
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))[0])
    f = lib.quantize_row_q4_K_ref
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    q = np.zeros(x.size // 256 * 144, dtype=np.uint8)
    f(np.ascontiguousarray(x).ctypes.data, q.ctypes.data, x.size)
    return q.reshape(x.shape[0], -1)


os.makedirs(args.out, exist_ok=True)
E = args.experts
w = gguf.GGUFWriter(os.path.join(args.out, "model.gguf"), arch="qwen3moe" if E else "llama")
w.add_block_count(args.layers)
w.add_context_length(4096)
w.add_embedding_length(h)
w.add_feed_forward_length(ffn)
w.add_head_count(h // 64)
w.add_head_count_kv(h // 64)
w.add_layer_norm_rms_eps(1e-5)
if E:
    w.add_expert_count(E)
    w.add_expert_used_count(min(E, 8))
    w.add_expert_feed_forward_length(ffn)
w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == T.Q8_0 else gguf.LlamaFileType.MOSTLY_Q4_K_M)


def weight(name, shape):
    x = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    w.add_tensor(name, quantize(x), raw_dtype=qtype)


weight("token_embd.weight", (vocab, h))
for l in range(args.layers):
    w.add_tensor(f"blk.{l}.attn_norm.weight", np.ones(h, dtype=np.float32))
    for name, shape in (("attn_q", (h, h)), ("attn_k", (h, h)), ("attn_v", (h, h)), ("attn_output", (h, h))):
        weight(f"blk.{l}.{name}.weight", shape)
    if E:
        w.add_tensor(f"blk.{l}.ffn_gate_inp.weight", rng.standard_normal((E, h), dtype=np.float32) * 0.02)
        for name, shape in (("ffn_gate_exps", (ffn, h)), ("ffn_up_exps", (ffn, h)), ("ffn_down_exps", (h, ffn))):
            x = rng.standard_normal((E,) + shape, dtype=np.float32) * 0.02
            w.add_tensor(f"blk.{l}.{name}.weight", quantize(x.reshape(E * shape[0], shape[1])).reshape(E, shape[0], -1), raw_dtype=qtype)
    else:
        for name, shape in (("ffn_gate", (ffn, h)), ("ffn_up", (ffn, h)), ("ffn_down", (h, ffn))):
            weight(f"blk.{l}.{name}.weight", shape)
    w.add_tensor(f"blk.{l}.ffn_norm.weight", np.ones(h, dtype=np.float32))
w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
weight("output.weight", (vocab, h))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

adapter = os.path.join(args.out, "adapter")
os.makedirs(adapter, exist_ok=True)
r = args.rank
tensors = {}
for l in range(args.layers):
    for proj in ("q_proj", "v_proj"):
        m = f"base_model.model.model.layers.{l}.self_attn.{proj}"
        tensors[m + ".lora_A.weight"] = (rng.standard_normal((r, h), dtype=np.float32) * 0.01)
        tensors[m + ".lora_B.weight"] = (rng.standard_normal((h, r), dtype=np.float32) * 0.01)
    for e in range(E):
        m = f"base_model.model.model.layers.{l}.mlp.experts.{e}.down_proj"
        tensors[m + ".lora_A.weight"] = (rng.standard_normal((r, ffn), dtype=np.float32) * 0.01)
        tensors[m + ".lora_B.weight"] = (rng.standard_normal((h, r), dtype=np.float32) * 0.01)
save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"] + (["down_proj"] if E else [])}, f, indent=2)
print(f"{os.path.getsize(os.path.join(args.out, 'model.gguf')) / 1e9:.2f} GB {args.type} GGUF in {args.out}")
