#!/usr/bin/env python3
"""Golden safetensors files written by the reference implementation (the Python `safetensors`
package, which calls the Rust crate), for the byte-identity tests of the Swift writer, plus
hand-made malformed headers for the reader's refusal tests.

Run from anywhere: python3 Fixtures/make_safetensors_fixtures.py  (needs numpy and safetensors)
"""
import json
import os
import struct

import numpy as np
from safetensors import _safetensors_rust as st

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "safetensors")
os.makedirs(HERE, exist_ok=True)
rng = np.random.default_rng(20241129)


KEEP_ALIVE = []


def raw(dtype, shape, data):
    return {"dtype": dtype, "shape": list(shape), "data": bytes(data)}


def spec(t):
    """The reference binding takes raw pointers (safetensors >= 0.7); keep the buffers alive."""
    buf = np.frombuffer(t["data"], dtype=np.uint8).copy() if t["data"] else np.zeros(1, np.uint8)
    KEEP_ALIVE.append(buf)
    return st.TensorSpec(dtype=t["dtype"], shape=t["shape"], data_ptr=buf.ctypes.data, data_len=len(t["data"]))


def f32_to_bf16_bytes(a):
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def write(name, tensors, metadata):
    st.serialize_file({k: spec(v) for k, v in tensors.items()}, os.path.join(HERE, name), metadata)


# Every byte-sized dtype, names chosen so that the dtype order and the byte order of names matter.
mixed = {
    "b.f32": raw("float32", (2, 3), rng.standard_normal(6).astype(np.float32).tobytes()),
    "a.f32": raw("float32", (3,), rng.standard_normal(3).astype(np.float32).tobytes()),
    "Z.f64": raw("float64", (2,), rng.standard_normal(2).tobytes()),
    "bf16": raw("bfloat16", (4, 2), f32_to_bf16_bytes(rng.standard_normal(8))),
    "f16": raw("float16", (5,), rng.standard_normal(5).astype(np.float16).tobytes()),
    "i64": raw("int64", (2,), np.array([-1, 1 << 40], dtype=np.int64).tobytes()),
    "u64": raw("uint64", (1,), np.array([1 << 63], dtype=np.uint64).tobytes()),
    "i32": raw("int32", (3,), np.array([1, -2, 3], dtype=np.int32).tobytes()),
    "u32": raw("uint32", (1,), np.array([7], dtype=np.uint32).tobytes()),
    "i16": raw("int16", (1,), np.array([-5], dtype=np.int16).tobytes()),
    "u16": raw("uint16", (1,), np.array([5], dtype=np.uint16).tobytes()),
    "i8": raw("int8", (3,), np.array([-1, 0, 1], dtype=np.int8).tobytes()),
    "u8": raw("uint8", (3,), bytes([0, 128, 255])),
    "bool": raw("bool", (2,), bytes([1, 0])),
    "e4m3": raw("float8_e4m3fn", (4,), bytes([0x38, 0xB8, 0x7E, 0x01])),
    "e5m2": raw("float8_e5m2", (4,), bytes([0x3C, 0xBC, 0x7B, 0x7C])),
}
write("golden-mixed.safetensors", mixed, {"format": "pt"})
write("golden-empty.safetensors", {}, None)
write("golden-only-metadata.safetensors", {}, {"format": "pt"})
# safetensors 0.8.0 writes `{},"__metadata__":{}}` here: invalid JSON that it cannot read back
# itself. Kept to prove our reader refuses it and our writer does not repeat it.
write("reference-bug-empty-metadata.safetensors", {}, {})
write("golden-scalar-zero.safetensors", {
    "scalar": raw("float32", (), struct.pack("<f", 1.5)),
    "zero": raw("float32", (0, 4), b""),
    "after": raw("float32", (1,), struct.pack("<f", -2.0)),
}, {"format": "pt"})
# Names that need JSON escapes, and non-ASCII (serde_json keeps UTF-8, escapes controls).
write("golden-names.safetensors", {
    'quote"name': raw("float32", (1,), struct.pack("<f", 1.0)),
    "back\\slash": raw("float32", (1,), struct.pack("<f", 2.0)),
    "tab\tnl\n": raw("float32", (1,), struct.pack("<f", 3.0)),
    "ctrl\x01": raw("float32", (1,), struct.pack("<f", 4.0)),
    "caf\u00e9.\u4e2d": raw("float32", (1,), struct.pack("<f", 5.0)),
}, {"note": "m\u00e9ta \"quoted\""})

# Expected values of golden-mixed, as the reference reads them, for the reader tests.
with open(os.path.join(HERE, "golden-mixed.json"), "w") as f:
    json.dump({k: {"dtype": v["dtype"], "shape": v["shape"], "hex": v["data"].hex()} for k, v in sorted(mixed.items())},
              f, indent=1, sort_keys=True)
    f.write("\n")
