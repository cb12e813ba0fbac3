"""PEFT MoSLoRA adapters with one q_proj module of rank r (mixer lora_AB), and plain LoRA ones."""
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(0)
for r in [100, 500, 1000, 5000]:
    d = 512
    for kind in ("moslora", "lora"):
        folder = f"{kind}{r}"
        os.makedirs(folder, exist_ok=True)
        t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((r, d), dtype=np.float32) * 0.01,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((d, r), dtype=np.float32) * 0.01}
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"]}
        if kind == "moslora":
            t["base_model.model.model.layers.0.self_attn.q_proj.lora_AB.weight"] = (rng.uniform(-1, 1, (r, r)) / np.sqrt(r)).astype(np.float32)
            cfg["lora_use_mixer"] = True
        save_file(t, f"{folder}/adapter_model.safetensors")
        json.dump(cfg, open(f"{folder}/adapter_config.json", "w"))
