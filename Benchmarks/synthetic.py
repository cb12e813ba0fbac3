"""What the synthetic-model generators share: bf16 weights drawn from a seeded generator, shards cut
by size, the shards written with their index as transformers writes them, and the attention LoRA
the quantized benchmarks merge."""
import json
import os

import numpy as np
from safetensors import _safetensors_rust as st


def bf16(rng, shape, scale=0.02):
    """N(0, scale) values rounded to bf16 (nearest even on the float32 bits), as uint16."""
    x = (rng.standard_normal(shape, dtype=np.float32) * scale).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def shards_by_size(names, shard_gb):
    """(name, shape) pairs cut into shards of at most shard_gb of bf16 (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for n, s in names:
        b = int(np.prod(s)) * 2
        if current and size + b > shard_gb * 1e9:
            shards.append(current)
            current, size = [], 0
        current.append((n, s))
        size += b
    shards.append(current)
    return shards


def write_bf16_shards(model, shards, rng):
    """model-0000k-of-0000n.safetensors of random bf16 tensors and model.safetensors.index.json;
    returns the tensor bytes written."""
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        keep, specs = [], {}
        for n, s in shard:
            a = bf16(rng, s)
            keep.append(a)
            specs[n] = st.TensorSpec(dtype="bfloat16", shape=list(s), data_ptr=a.ctypes.data, data_len=a.nbytes)
        st.serialize_file(specs, os.path.join(model, fname), {"format": "pt"})
        for n, s in shard:
            weight_map[n] = fname
            total += int(np.prod(s)) * 2
    write_index(model, weight_map, total)
    return total


def write_layer_shards(model, layers, layer_tensors, save):
    """model-0000l-of-0000n.safetensors, one per layer (`layer_tensors(l)` gives its tensors,
    `save` is the framework's safetensors save_file), and the index; returns the tensor bytes."""
    weight_map, total = {}, 0
    for l in range(layers):
        tensors = layer_tensors(l)
        fname = f"model-{l + 1:05d}-of-{layers:05d}.safetensors"
        save(tensors, os.path.join(model, fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()
    write_index(model, weight_map, total)
    return total


def write_index(model, weight_map, total):
    """model.safetensors.index.json as transformers writes it."""
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


def attention_lora(adapter, layers, hidden, rank, update, norms, generator):
    """A PEFT LoRA on q_proj and v_proj of every layer (scale 1: alpha = r) with
    ‖B·A‖_F = update · norms[module] for each module, drawn from a torch generator."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(adapter, exist_ok=True)
    factors = {}
    for l in range(layers):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{l}.self_attn.{proj}"
            a = torch.randn(rank, hidden, generator=generator)
            b = torch.randn(hidden, rank, generator=generator)
            c = (update * norms[name] / float((b @ a).norm())) ** 0.5
            factors[f"base_model.model.{name}.lora_A.weight"] = (a * c).contiguous()
            factors[f"base_model.model.{name}.lora_B.weight"] = (b * c).contiguous()
    save_file(factors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"]}, f, indent=2)
