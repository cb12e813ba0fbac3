"""A base of N one-element tensors and a PEFT adapter of N modules none of which names a base tensor (item 13)."""
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
one = np.zeros((1, 1), dtype=np.float32)
save_file({f"model.layers.{i}.mlp.proj{i % 7}.weight": one for i in range(n)}, f"base{n}.safetensors")
os.makedirs(f"unmatched{n}", exist_ok=True)
t = {}
for i in range(n):
    t[f"base_model.model.foo.layers.{i}.attn.x.lora_A.weight"] = one
    t[f"base_model.model.foo.layers.{i}.attn.x.lora_B.weight"] = one
save_file(t, f"unmatched{n}/adapter_model.safetensors")
json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["x"]}, open(f"unmatched{n}/adapter_config.json", "w"))
