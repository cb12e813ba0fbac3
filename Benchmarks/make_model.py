#!/usr/bin/env python3
"""Generate a synthetic LLaMA-shaped bf16 model folder (sharded as transformers writes it) and a
rank-r MoSLoRA adapter (original layout: lora_A / lora_AB / lora_B) on all seven projections.

    python3 Benchmarks/make_model.py OUT_DIR [--size-gb 2] [--rank 16] [--hidden 2048] [--intermediate 5504]
        [--vocab 32000] [--shard-gb 0.5 | --shards N] [--layers N]

Written at run time for benchmarks; never committed. Needs numpy and safetensors.
"""
import argparse
import json
import os

import numpy as np
from safetensors import _safetensors_rust as st

from synthetic import shards_by_size, write_bf16_shards

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--size-gb", type=float, default=2.0)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--intermediate", type=int, default=5504)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--shard-gb", type=float, default=0.5)
p.add_argument("--layers", type=int, default=0, help="override the layer count derived from --size-gb")
p.add_argument("--shards", type=int, default=0,
               help="split the tensors into exactly this many shards of near-equal tensor counts (instead of --shard-gb)")
args = p.parse_args()

h, i, v, r = args.hidden, args.intermediate, args.vocab, args.rank
rng = np.random.default_rng(0)
per_layer = 4 * h * h + 3 * h * i + 2 * h
fixed = 2 * v * h + h
layers = args.layers or max(1, round((args.size_gb * 1e9 / 2 - fixed) / per_layer))

def spec(name, arr, dtype, keep):
    keep.append(arr)
    return name, st.TensorSpec(dtype=dtype, shape=list(arr.shape), data_ptr=arr.ctypes.data, data_len=arr.nbytes)

model = os.path.join(args.out, "model")
os.makedirs(model, exist_ok=True)
names = [("model.embed_tokens.weight", (v, h))]
for l in range(layers):
    pre = f"model.layers.{l}."
    names += [(pre + "self_attn.q_proj.weight", (h, h)), (pre + "self_attn.k_proj.weight", (h, h)),
              (pre + "self_attn.v_proj.weight", (h, h)), (pre + "self_attn.o_proj.weight", (h, h)),
              (pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h)),
              (pre + "mlp.down_proj.weight", (h, i)),
              (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]

if args.shards:
    if args.shards > len(names):
        p.error(f"--shards {args.shards}: only {len(names)} tensors")
    shards = []
    q, extra = divmod(len(names), args.shards)
    for k in range(args.shards):
        start = k * q + min(k, extra)
        shards.append(names[start:start + q + (k < extra)])
else:
    shards = shards_by_size(names, args.shard_gb)
total = write_bf16_shards(model, shards, rng)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
               "vocab_size": v, "model_type": "llama", "torch_dtype": "bfloat16"}, f, indent=2)

adapter = os.path.join(args.out, "adapter")
os.makedirs(adapter, exist_ok=True)
keep, specs = [], {}
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for l in range(layers):
    for t in targets:
        mod = f"base_model.model.model.layers.{l}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
        fan_in = i if t == "down_proj" else h
        fan_out = i if t in ("gate_proj", "up_proj") else h
        for suffix, shape in ((".lora_A.weight", (r, fan_in)), (".lora_AB.weight", (r, r)), (".lora_B.weight", (fan_out, r))):
            n, s = spec(mod + suffix, (rng.standard_normal(shape, dtype=np.float32) * 0.02), "float32", keep)
            specs[n] = s
st.serialize_file(specs, os.path.join(adapter, "adapter_model.safetensors"), {"format": "pt"})
with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_use_mixer": True, "target_modules": targets,
               "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, f, indent=2)
print(f"{layers} layers, {len(shards)} shards, {total / 1e9:.2f} GB of weights in {model}; adapter in {adapter}")
