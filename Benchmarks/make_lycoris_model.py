#!/usr/bin/env python3
"""An SDXL-shaped slice of a UNet (bf16, kohya/diffusers key names) and LyCORIS adapters on it,
for Benchmarks/lycoris.sh. Each block has attention q/k/v/out (1280×1280), the GEGLU
feed-forward (10240×1280, 1280×5120) and a 3×3 resnet conv (1280×1280×3×3), as SDXL's deepest
level has them. Adapters (kohya names, F16 factors, seeded):

  lora        r 16 (the reference cost: a rank-16 update)
  loha        LoHa dim 16 (the update as merged has rank 256)
  lokr        LoKr factor 8, w1 whole, w2 factored at dim 16 (rank 8·16 = 128)
  lokr-full   LoKr factor 8, w1 and w2 whole (full rank)
  full        full diffs (rank min(out, in))

    python3 Benchmarks/make_lycoris_model.py DIR [--blocks 4]
"""
import argparse
import os

import numpy as np
from safetensors.numpy import save_file

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--blocks", type=int, default=4)
args = p.parse_args()
rng = np.random.default_rng(0)
C = 1280


def bf16(x):
    u = x.astype(np.float32).view(np.uint32)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return u


layers = {}
for b in range(args.blocks):
    a = f"up_blocks.0.attentions.{b}.transformer_blocks.0."
    for n in ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]:
        layers[a + n] = (C, C)
    layers[a + "ff.net.0.proj"] = (8 * C, C)
    layers[a + "ff.net.2"] = (C, 4 * C)
    layers[f"up_blocks.0.resnets.{b}.conv1"] = (C, C, 3, 3)

os.makedirs(os.path.join(args.dir, "adapters"), exist_ok=True)
# The base: raw BF16 bytes, written with a hand-made header (numpy has no bfloat16).
import json
import struct

header, offset, blobs = {}, 0, []
for name, shape in layers.items():
    w = bf16(rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02)
    header[name + ".weight"] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + w.nbytes]}
    offset += w.nbytes
    blobs.append(w.tobytes())
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(args.dir, "base.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    for blob in blobs:
        f.write(blob)


def factor(n, f=8):
    return f, n // f


def write(kind):
    t = {}
    for name, shape in layers.items():
        k = "lora_unet_" + name.replace(".", "_")
        out, inp = shape[0], int(np.prod(shape[1:]))
        g = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float16)
        if kind == "lora":
            t[k + ".lora_down.weight"] = g(16, *shape[1:]) if len(shape) == 4 else g(16, inp)
            t[k + ".lora_up.weight"] = g(out, 16, 1, 1) if len(shape) == 4 else g(out, 16)
        elif kind == "loha":
            for s in ("1", "2"):
                t[k + f".hada_w{s}_a"] = g(out, 16)
                t[k + f".hada_w{s}_b"] = g(16, inp)
        elif kind.startswith("lokr"):
            a, b_ = factor(out)
            c, d = factor(shape[1])
            t[k + ".lokr_w1"] = g(a, c)
            tail = tuple(shape[2:])
            if kind == "lokr-full":
                t[k + ".lokr_w2"] = g(b_, d, *tail)
            else:
                t[k + ".lokr_w2_a"] = g(b_, 16)
                t[k + ".lokr_w2_b"] = g(16, d * int(np.prod(tail)) if tail else d)
        elif kind == "full":
            t[k + ".diff"] = g(*shape)
        if kind != "full":
            t[k + ".alpha"] = np.array(8.0, dtype=np.float32)
    save_file(t, os.path.join(args.dir, "adapters", kind + ".safetensors"))


for kind in ["lora", "loha", "lokr", "lokr-full", "full"]:
    write(kind)
print(os.path.join(args.dir, "base.safetensors"))
