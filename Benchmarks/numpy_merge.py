#!/usr/bin/env python3
"""The numpy baseline: the merge a user would write with numpy and safetensors.

    python3 Benchmarks/numpy_merge.py BASE_DIR ADAPTER_DIR OUT_DIR
    python3 Benchmarks/numpy_merge.py --compare DIR_A DIR_B [DIR_C ...]

Merge: for every shard of BASE_DIR (model.safetensors.index.json or one model.safetensors), read its
tensors, add scale·B·M·A (PEFT / MoSLoRA keys lora_A, lora_AB, lora_B; plain LoRA has no lora_AB) in
float32, round back to bf16 (round to nearest even, by uint32 bit operations: numpy has no bfloat16),
write the shard with safetensors, and copy the index, config and every other small file.
safetensors' numpy loader refuses BF16 ("data type 'bfloat16' not understood"), so BF16 tensors are
read as uint16 from the offsets in the file's JSON header; the adapter (F32) loads with
safetensors.numpy.load_file; shards are written with safetensors.serialize_file.

--compare: for every BF16 tensor that the first folder has, the largest difference, in bf16 units
in the last place, between the first folder and each other one (run.sh uses it once per size to
check that all tools computed the same merge before it times them). Exit 1 above 1 ulp.
"""
import json
import os
import shutil
import sys

import numpy as np
import safetensors
from safetensors.numpy import load_file


def read_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def read_shard(path, mmap=False):
    """name -> (dtype string, numpy array); BF16 comes back as uint16."""
    header, start = read_header(path)
    metadata = header.pop("__metadata__", None)
    kinds = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
             "I64": np.int64, "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        arr = raw[start + b:start + e].view(kinds[info["dtype"]]).reshape(info["shape"])
        tensors[name] = (info["dtype"], arr)
    return tensors, metadata


def write_shard(path, tensors, metadata):
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "U8": "uint8", "I8": "int8", "BOOL": "bool"}
    specs = {}
    for name, (dtype, arr) in tensors.items():
        arr = np.ascontiguousarray(arr)
        tensors[name] = (dtype, arr)  # keep the buffer alive while serialising
        specs[name] = safetensors.TensorSpec(dtype=names[dtype], shape=list(arr.shape),
                                             data_ptr=arr.ctypes.data, data_len=arr.nbytes)
    safetensors.serialize_file(specs, path, metadata)


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def load_adapter(adapter_dir):
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    updates = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            base_key = module[len("base_model.model."):] + ".weight"
            updates[base_key] = (weights[key], weights.get(module + ".lora_AB.weight"),
                                 weights[module + ".lora_B.weight"])
    return updates, scale


def shard_files(base_dir):
    index = os.path.join(base_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def merge(base_dir, adapter_dir, out_dir):
    updates, scale = load_adapter(adapter_dir)
    os.makedirs(out_dir, exist_ok=True)
    shards = shard_files(base_dir)
    for fname in os.listdir(base_dir):  # index, config, tokenizer...
        if fname not in shards:
            shutil.copy(os.path.join(base_dir, fname), out_dir)
    used = 0
    for fname in shards:
        tensors, metadata = read_shard(os.path.join(base_dir, fname))
        for name, (dtype, w) in tensors.items():
            if name not in updates:
                continue
            assert dtype == "BF16", f"{name}: this script merges bf16 bases only"
            a, m, b = updates[name]
            ma = a if m is None else m @ a
            merged = bf16_to_f32(w) + scale * (b @ ma)
            tensors[name] = (dtype, f32_to_bf16(merged))
            used += 1
        write_shard(os.path.join(out_dir, fname), tensors, metadata)
    assert used == len(updates), f"merged {used} of {len(updates)} modules"


def differences(w, o):
    """(largest difference in bf16 ulps of the larger value, count of elements off by more than one
    ulp and by more than 2^-24 of the tensor's largest magnitude: float32 rounding in the update near
    a zero weight is allowed)."""
    a, b = bf16_to_f32(w), bf16_to_f32(o)
    d = np.abs(a - b)
    big = np.maximum(np.abs(a), np.abs(b))
    ulp = np.spacing(big.astype(np.float32)) * 65536.0  # bf16 keeps 7 of float32's 23 fraction bits
    ulp = np.maximum(ulp, np.float32(2.0 ** -133))
    worst = float((d / ulp).max())
    bad = int(np.count_nonzero((d > ulp) & (d > np.abs(a).max() * 2.0 ** -24)))
    return worst, bad


def compare(dirs):
    def tensor_map(d):
        found = {}
        for fname in shard_files(d):
            for name, t in read_shard(os.path.join(d, fname), mmap=True)[0].items():
                found[name] = t
        return found

    ref = tensor_map(dirs[0])
    worst, count, bad = 0.0, 0, 0
    for other_dir in dirs[1:]:
        other = tensor_map(other_dir)
        missing = set(ref) ^ set(other)
        if missing:
            print(f"{other_dir}: tensor names differ from {dirs[0]}: {sorted(missing)[:5]}")
            return 1
        for name, (dtype, w) in ref.items():
            if dtype != "BF16" or w.size == 0:
                continue
            d, n = differences(w, other[name][1].view(np.uint16))
            worst, count, bad = max(worst, d), count + 1, bad + n
            if n:
                print(f"{other_dir}: {name}: {n} elements differ from {dirs[0]} by more than 1 bf16 ulp")
    print(f"{'same merge' if bad == 0 else 'DIFFERENT'}: {count} tensor comparisons over {len(dirs)} folders, "
          f"largest difference {worst:.3g} bf16 ulp, {bad} elements beyond 1 ulp and float32 rounding")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2:]))
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    merge(*sys.argv[1:])
