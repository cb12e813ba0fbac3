#!/usr/bin/env python3
"""The Python baseline for `adapter inspect --tensors MODEL_DIR`: list every tensor of a sharded
model folder (name, dtype, shape, file) from the safetensors headers, with safetensors.safe_open.

    python3 Benchmarks/inspect_listing.py MODEL_DIR

Reads model.safetensors.index.json (or the single model.safetensors), opens each shard once and
prints one line per tensor plus a total. run.sh times the whole process, start-up included.
"""
import json
import os
import sys

from safetensors import safe_open


def main(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    rows, params = [], 0
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = sl.get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
                rows.append((name, sl.get_dtype(), shape, fname))
    rows.sort()
    out = [f"{name}\t{dtype}\t{list(shape)}\t{fname}" for name, dtype, shape, fname in rows]
    out.append(f"{len(rows)} tensors in {len(files)} files, {params} parameters")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
