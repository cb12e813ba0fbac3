#!/usr/bin/env python3
"""Adapters written by the real PEFT library, and PEFT's own merge of each, as references.

    pip install torch peft transformers     # only to regenerate; tests never need them
    python3 Fixtures/make_real_peft_fixtures.py

For each case it loads a tiny base model from Fixtures/models in float32 with transformers, wraps
it with peft.get_peft_model (random non-zero A and B: init_lora_weights=False, seeded), saves the
adapter with save_pretrained into Fixtures/adapters/real-*/, then calls merge_and_unload() and
saves every tensor PEFT changed into Fixtures/expected/real/<base>+<adapter>.safetensors. The
Swift tests merge the saved adapter themselves and compare against PEFT's numbers (Float32, so
within a few units in the last place).
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import peft
import torch
import transformers
from safetensors.numpy import save_file
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "real")


def load_f32(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def llama_base():
    """transformers LlamaForCausalLM with the tiny-llama-f32 fixture's weights."""
    cfg = json.load(open(os.path.join(MODELS, "tiny-llama", "config.json")))
    for k in ("architectures", "model_type", "transformers_version", "torch_dtype"):
        cfg.pop(k, None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.float32)
    weights = {k: torch.from_numpy(v.copy()) for k, v in load_f32(os.path.join(MODELS, "tiny-llama-f32.safetensors")).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model, "tiny-llama-f32"


def gpt2_base():
    """transformers GPT2Model (Conv1D layers) with the tiny-gpt2 fixture's weights."""
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2Model(cfg).to(torch.float32)
    state = model.state_dict()
    for k, v in load_f32(os.path.join(MODELS, "tiny-gpt2.safetensors")).items():
        assert state[k].shape == v.shape, (k, state[k].shape, v.shape)
        state[k] = torch.from_numpy(v.copy())
    model.load_state_dict(state)
    return model, "tiny-gpt2"


def make(name, base, config):
    torch.manual_seed(1234)
    model, base_name = base()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, config)
    if getattr(config, "use_dora", False):
        # Move the magnitudes away from ‖W‖ so DoRA's rescaling is visible in the merge.
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                with torch.no_grad():
                    p.mul_(1 + 0.1 * torch.rand_like(p))
    for n, p in pm.named_parameters():
        if "modules_to_save" in n:
            with torch.no_grad():
                p.add_(0.01 * torch.randn_like(p))
    folder = os.path.join(ADAPTERS, name)
    shutil.rmtree(folder, ignore_errors=True)
    pm.save_pretrained(folder)
    merged = pm.merge_and_unload()
    after = merged.state_dict()
    changed = {k: v.detach().numpy().astype(np.float32) for k, v in after.items()
               if k in before and not torch.equal(before[k], v)}
    os.makedirs(EXPECTED, exist_ok=True)
    save_file(changed, os.path.join(EXPECTED, f"{base_name}+{name}.safetensors"), metadata={"peft": peft.__version__})
    print(f"{name}: {len(changed)} tensors changed by PEFT {peft.__version__}")


def main():
    make("real-lora", llama_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    make("real-lora-rslora-patterns", llama_base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 16},
        modules_to_save=["lm_head"], task_type="CAUSAL_LM", init_lora_weights=False))
    make("real-dora", llama_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    make("real-gpt2-conv1d", gpt2_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                       lora_bias=True, init_lora_weights=False))
    make("real-gpt2-embedding", gpt2_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wte"], init_lora_weights=False))


if __name__ == "__main__":
    main()
