"""Hostile PyTorch .bin files for item 10 (benchmarks only; the tests build their own)."""
import collections, pickle, struct, sys, zlib
import torch

class StorageRef:
    def __init__(self, key, numel): self.key, self.numel = key, numel

class T:
    def __init__(self, s, offset, size, stride): self.s, self.o, self.size, self.stride = s, offset, size, stride
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.s, self.o, tuple(self.size), tuple(self.stride), False, collections.OrderedDict()))

class P(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef): return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None

def pkl(d):
    import io
    b = io.BytesIO(); P(b, protocol=2).dump(d); return b.getvalue()

def zero_deflate(n_bytes):
    """A raw deflate stream of n_bytes zeros, n_bytes a multiple of 1 MiB, built by repeating a full-flushed segment."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    a = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    b = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert a == b
    end = c.flush(zlib.Z_FINISH)
    n = n_bytes >> 20
    crc = 0
    for _ in range(n): crc = zlib.crc32(chunk, crc)
    return a * n + end, crc

def raw_zip(members):
    out = bytearray(); central = bytearray()
    for name, payload, method, crc, declared in members:
        n = name.encode(); offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), declared, len(n), 0)
        out += n + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload), declared, len(n), 0, 0, 0, 0, 0, offset)
        central += n
    cd = len(out); out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd, 0)
    return bytes(out)

def stored(name, data): return (name, data, 0, zlib.crc32(data), len(data))

def write(path, tensors, storage_bytes):
    s = StorageRef("0", storage_bytes // 4)
    d = collections.OrderedDict((k, T(s, o, [1, 1], [1, 1])) for k, o in tensors)
    payload, crc = zero_deflate(storage_bytes)
    members = [stored("archive/data.pkl", pkl(d)), stored("archive/byteorder", b"little"),
               ("archive/data/0", payload, 8, crc, storage_bytes), stored("archive/version", b"3\n")]
    open(path, "wb").write(raw_zip(members))

GiB = 1 << 30
n = (2 * GiB) // 4
write("bomb_start.bin", [("w", 0)], 2 * GiB)
write("bomb_end.bin", [("w", n - 1)], 2 * GiB)
m = (256 << 20) // 4
# 20 one-element views: 10 LoRA modules (A [1,1] and B [1,1]) spread over the storage.
views = []
for i in range(10):
    views.append((f"base_model.model.layers.{i}.q_proj.lora_A.weight", (2 * i) * (m // 20)))
    views.append((f"base_model.model.layers.{i}.q_proj.lora_B.weight", (2 * i + 1) * (m // 20)))
write("views20.bin", views, 256 << 20)
