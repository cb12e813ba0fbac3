"""A PEFT adapter (64 modules, rank 4) whose config has a rank_pattern of ~300k keys (~8 MB)."""
import json, os
import numpy as np
from safetensors.numpy import save_file
os.makedirs("pattern300k", exist_ok=True)
t = {}
for l in range(32):
    for m in ("q_proj", "v_proj"):
        t[f"base_model.model.model.layers.{l}.self_attn.{m}.lora_A.weight"] = np.zeros((4, 16), np.float32)
        t[f"base_model.model.model.layers.{l}.self_attn.{m}.lora_B.weight"] = np.zeros((16, 4), np.float32)
save_file(t, "pattern300k/adapter_model.safetensors")
rp = {f"layers.{i}.mlp.up": 2 for i in range(100, 300_098)}
rp["q_proj"] = 4
rp["v_proj"] = 4
cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": rp}
json.dump(cfg, open("pattern300k/adapter_config.json", "w"), indent=None)
print(os.path.getsize("pattern300k/adapter_config.json"), len(rp))
