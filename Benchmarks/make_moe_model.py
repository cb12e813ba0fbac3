#!/usr/bin/env python3
"""Generate a synthetic Qwen3-MoE-shaped bf16 model folder and a PEFT target_parameters adapter.

    python3 Benchmarks/make_moe_model.py OUT_DIR [--layers 2] [--experts 128] [--hidden 2048]
        [--intermediate 768] [--rank 16] [--shard-gb 0.5] [--fused]

The experts are stored as transformers 5 saves Qwen3-MoE (one 2-D tensor per expert and
projection), or with --fused as it holds them in memory ([E, 2I, H] and [E, H, I]). The adapter is
what PEFT writes for target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
plus q_proj: A [r·E, in], B [out, r·E]. The default shape is Qwen3-30B-A3B's (hidden 2048, 128
experts of intermediate 768), two layers. Written at run time; never committed.
"""
import argparse
import json
import os

import numpy as np
from safetensors import _safetensors_rust as st

from synthetic import shards_by_size, write_bf16_shards

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--experts", type=int, default=128)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--intermediate", type=int, default=768)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--shard-gb", type=float, default=0.5)
p.add_argument("--fused", action="store_true")
args = p.parse_args()
h, i, e, r, L = args.hidden, args.intermediate, args.experts, args.rank, args.layers
rng = np.random.default_rng(0)


names = [("model.embed_tokens.weight", (1024, h))]
for l in range(L):
    pre = f"model.layers.{l}."
    names += [(pre + "self_attn.q_proj.weight", (h, h)), (pre + "self_attn.k_proj.weight", (h // 8, h)),
              (pre + "self_attn.v_proj.weight", (h // 8, h)), (pre + "self_attn.o_proj.weight", (h, h)),
              (pre + "mlp.gate.weight", (e, h)), (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    if args.fused:
        names += [(pre + "mlp.experts.gate_up_proj", (e, 2 * i, h)), (pre + "mlp.experts.down_proj", (e, h, i))]
    else:
        for x in range(e):
            names += [(pre + f"mlp.experts.{x}.gate_proj.weight", (i, h)), (pre + f"mlp.experts.{x}.up_proj.weight", (i, h)),
                      (pre + f"mlp.experts.{x}.down_proj.weight", (h, i))]
names += [("model.norm.weight", (h,)), ("lm_head.weight", (1024, h))]

model = os.path.join(args.out, "model")
os.makedirs(model, exist_ok=True)
shards = shards_by_size(names, args.shard_gb)
total = write_bf16_shards(model, shards, rng)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h, "moe_intermediate_size": i,
               "num_experts": e, "num_experts_per_tok": 8, "num_hidden_layers": L, "num_attention_heads": 16,
               "num_key_value_heads": 2, "head_dim": 128, "torch_dtype": "bfloat16"}, f, indent=2)

adapter = os.path.join(args.out, "adapter")
os.makedirs(adapter, exist_ok=True)
keep, specs = [], {}


def put(name, shape):
    a = rng.standard_normal(shape, dtype=np.float32) * 0.02
    keep.append(a)
    specs[name] = st.TensorSpec(dtype="float32", shape=list(shape), data_ptr=a.ctypes.data, data_len=a.nbytes)


for l in range(L):
    pre = f"base_model.model.model.layers.{l}."
    put(pre + "self_attn.q_proj.lora_A.weight", (r, h))
    put(pre + "self_attn.q_proj.lora_B.weight", (h, r))
    put(pre + "mlp.experts.base_layer.lora_A.weight", (r * e, h))      # gate_up_proj: in H
    put(pre + "mlp.experts.base_layer.lora_B.weight", (2 * i, r * e))  # out 2I
    put(pre + "mlp.experts.lora_A.weight", (r * e, i))                 # down_proj: in I
    put(pre + "mlp.experts.lora_B.weight", (h, r * e))                 # out H
st.serialize_file(specs, os.path.join(adapter, "adapter_model.safetensors"), {"format": "pt"})
with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"],
               "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}, f, indent=2)
largest = max(int(np.prod(s)) * 2 for _, s in names)
print(f"{L} layers × {e} experts, {len(shards)} shards, {total / 1e9:.2f} GB of weights in {model} "
      f"(largest tensor {largest / 1e6:.1f} MB); adapter in {adapter}")
