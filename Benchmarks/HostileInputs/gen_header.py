"""Safetensors files with ~100 MB headers.

A: 1.77 M zero-size I8 tensors with short names (the issue's 100 MB / 1.77 M tensors).
B: 1.2 M one-element F16 tensors named like a MoE model's.
"""
import struct, sys

def write(out, entries, data_bytes):
    header = ("{" + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    assert len(header) <= 100_000_000, len(header)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(bytes(data_bytes))
    print(out, len(header), len(entries))

n = 1_770_000
write("header_a.safetensors", [f'"{i:x}":{{"dtype":"I8","shape":[0],"data_offsets":[0,0]}}' for i in range(n)], 0)
n = 1_050_000
write("header_b.safetensors", [f'"model.layers.{i // 4096}.experts.{i % 4096}.w":{{"dtype":"F16","shape":[1],"data_offsets":[{2 * i},{2 * i + 2}]}}' for i in range(n)], 2 * n)
