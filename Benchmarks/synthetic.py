"""What the synthetic-model generators share: bf16 weights drawn from a seeded generator, shards cut
by size, and the shards written with their index as transformers writes them."""
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
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return total
