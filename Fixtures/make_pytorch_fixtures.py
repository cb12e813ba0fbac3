#!/usr/bin/env python3
"""Makes the PyTorch checkpoint fixtures in Fixtures/pytorch/.

Needs torch (CPU) and safetensors; the tests never do. Each readable fixture <name>.pt has a
<name>.expected.safetensors holding the same tensors (made contiguous) as torch itself sees them, so
the Swift reader is compared with torch's values, not with a second reading of our own.

Hostile fixtures are built by hand from pickle opcodes and raw zip records; nothing here unpickles
or runs them.
"""
import io
import os
import struct
import zipfile
import zlib
from collections import OrderedDict

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch")
# The path the os.system payload would create if a reader executed it; the tests check it is absent.
MARKER = "/tmp/adapter-pytorch-fixture-pwned"


def path(name):
    return os.path.join(OUT, name)


def save(name, obj, expected=None, **kwargs):
    torch.save(obj, path(name), **kwargs)
    if expected is not None:
        save_file({k: v.contiguous().clone() for k, v in expected.items()}, path(name.rsplit(".", 1)[0] + ".expected.safetensors"))


def rezip(src, dst, method=zipfile.ZIP_STORED, replace=None):
    """Copies a torch zip member by member, optionally compressing or replacing members."""
    replace = replace or {}
    with zipfile.ZipFile(path(src)) as zin, zipfile.ZipFile(path(dst), "w", method) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data, compress_type=method)


def raw_zip(members):
    """A zip written record by record: members are (name, payload, method, crc, declared_size)."""
    out = bytearray()
    central = bytearray()
    for name, payload, method, crc, declared in members:
        n = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), declared, len(n), 0)
        out += n + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload), declared,
                               len(n), 0, 0, 0, 0, 0, offset)
        central += n
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0)
    return bytes(out)


def stored(name, data):
    return (name, data, 0, zlib.crc32(data), len(data))


def pickle_archive(name, pickle_bytes):
    with open(path(name), "wb") as f:
        f.write(raw_zip([stored("archive/data.pkl", pickle_bytes), stored("archive/byteorder", b"little")]))


def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    # Every dtype torch.save writes with a legacy typed storage (protocol 2, _rebuild_tensor_v2).
    dtypes = OrderedDict()
    dtypes["f32"] = torch.randn(2, 3)
    dtypes["f64"] = torch.randn(3, dtype=torch.float64)
    dtypes["f16"] = torch.randn(2, 2).half()
    dtypes["bf16"] = torch.tensor([1.0, -2.5, 3.140625, 1e-3, 65504.0, -0.0], dtype=torch.bfloat16).reshape(2, 3)
    dtypes["i64"] = torch.tensor([-(2**62), -1, 0, 2**62], dtype=torch.int64)
    dtypes["i32"] = torch.tensor([[-(2**31), 7], [2**31 - 1, 0]], dtype=torch.int32)
    dtypes["i16"] = torch.tensor([-32768, 12, 32767], dtype=torch.int16)
    dtypes["i8"] = torch.tensor([-128, 5, 127], dtype=torch.int8)
    dtypes["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
    dtypes["bool"] = torch.tensor([True, False, True])
    dtypes["scalar"] = torch.tensor(2.5)
    dtypes["empty"] = torch.zeros(0, 3)
    save("dtypes.pt", dtypes, dtypes)

    # Newer dtypes go through torch.storage.UntypedStorage and _rebuild_tensor_v3 with a dtype global.
    v3 = OrderedDict()
    v3["u16"] = torch.tensor([0, 1, 65535], dtype=torch.uint16)
    v3["f8_e4m3"] = torch.tensor([0.5, -1.0, 448.0], dtype=torch.float8_e4m3fn)
    v3["f8_e5m2"] = torch.tensor([0.25, -2.0, 57344.0], dtype=torch.float8_e5m2)
    save("dtypes_v3.pt", v3, v3)

    # Two views of one storage, one with a storage offset.
    base = torch.arange(12, dtype=torch.float32)
    save("shared.pt", {"whole": base, "window": base[2:8].view(2, 3), "tail": base[9:]},
         {"whole": base, "window": base[2:8].view(2, 3), "tail": base[9:]})

    # Non-contiguous views saved as they are: a transpose and a step-2 slice.
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    nc = {"transposed": x[0].t(), "stepped": x[:, :, ::2], "permuted": x.permute(2, 0, 1)}
    save("noncontig.pt", nc, nc)

    # The same checkpoint with every member deflated, and with ZIP64 records everywhere.
    rezip("dtypes.pt", "deflated.pt", zipfile.ZIP_DEFLATED)
    limit, count_limit = zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT
    zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = 0, 0
    try:
        with zipfile.ZipFile(path("dtypes.pt")) as zin, zipfile.ZipFile(path("zip64.pt"), "w", allowZip64=True) as zout:
            for info in zin.infolist():
                with zout.open(info.filename, "w", force_zip64=True) as f:
                    f.write(zin.read(info.filename))
    finally:
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = limit, count_limit

    # A training checkpoint: a module state dict (an OrderedDict with _metadata, set by BUILD) under
    # "state_dict", next to plain values; protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE).
    lin = torch.nn.Linear(4, 2)
    save("nested.pt", {"state_dict": lin.state_dict(), "epoch": 3, "lr": 0.125, "name": "run"}, dict(lin.state_dict()),
         pickle_protocol=4)
    # A parameter saved directly goes through _rebuild_parameter; protocol 5.
    params = {"p": torch.nn.Parameter(torch.randn(2, 2)), "b": torch.randn(2).to(torch.bfloat16)}
    save("parameter.pt", params, {k: v.detach() for k, v in params.items()}, pickle_protocol=5)

    # A PEFT LoRA state dict as adapter_model.bin (saved through a buffer: archive name "archive").
    peft = OrderedDict()
    for module in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        peft[f"{key}.lora_A.weight"] = torch.randn(4, 16)
        peft[f"{key}.lora_B.weight"] = torch.randn(16, 4)
    buffer = io.BytesIO()
    torch.save(peft, buffer)
    with open(path("adapter_model.bin"), "wb") as f:
        f.write(buffer.getvalue())
    save_file(dict(peft), path("adapter_model.expected.safetensors"))

    make_hostile()
    for name in os.listdir(OUT):
        os.chmod(path(name), 0o644)


def make_hostile():
    # os.system through GLOBAL + REDUCE: what a malicious "model" does. Built by hand, never unpickled.
    pickle_archive("hostile_os_system.pt",
                   b"\x80\x02cos\nsystem\n" + unicode(f"touch {MARKER}") + b"\x85R.")
    # builtins.eval through STACK_GLOBAL (protocol 4).
    pickle_archive("hostile_builtins_eval.pt",
                   b"\x80\x04" + b"\x8c\x08builtins" + b"\x8c\x04eval" + b"\x93" + unicode(f"open('{MARKER}', 'w')") + b"\x85R.")
    # INST imports and calls in one opcode.
    pickle_archive("hostile_inst.pt", b"\x80\x02(" + unicode(f"touch {MARKER}") + b"iposix\nsystem\n.")
    # A global real checkpoints sometimes carry (numpy arrays in training state): still refused.
    pickle_archive("hostile_unknown_global.pt",
                   b"\x80\x02}(X\x01\x00\x00\x00acnumpy.core.multiarray\n_reconstruct\n)Ru.")
    # Nesting that would exhaust a naive interpreter.
    pickle_archive("hostile_deep_marks.pt", b"\x80\x02" + b"(" * 20000 + b".")

    # Damaged containers.
    with open(path("dtypes.pt"), "rb") as f:
        good = f.read()
    with open(path("hostile_truncated.pt"), "wb") as f:
        f.write(good[: len(good) // 2])
    with zipfile.ZipFile(path("dtypes.pt")) as z:
        info = z.getinfo("dtypes/data/0")
        local = info.header_offset
        name_length, extra_length = struct.unpack("<HH", good[local + 26: local + 30])
        start = local + 30 + name_length + extra_length
    corrupt = bytearray(good)
    corrupt[start] ^= 0xFF
    with open(path("hostile_crc.pt"), "wb") as f:
        f.write(corrupt)
    # The data descriptor's CRC (torch sets flag bit 3) disagrees with the central directory's.
    descriptor = start + info.compress_size
    if good[descriptor: descriptor + 4] == b"PK\x07\x08":
        descriptor += 4
    lying = bytearray(good)
    lying[descriptor] ^= 0xFF
    with open(path("hostile_local_header.pt"), "wb") as f:
        f.write(lying)
    # The central directory offset points past the end record.
    eocd = good.rfind(b"PK\x05\x06")
    bad = bytearray(good)
    bad[eocd + 16: eocd + 20] = struct.pack("<I", len(good) + 100)
    with open(path("hostile_cd_offset.pt"), "wb") as f:
        f.write(bad)

    # Zip bombs: a member declaring 1000 bytes that inflates to 1 MiB, and one claiming 4 GiB.
    def deflate(data):
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    bomb = b"\x80\x02" + b"N" * (1 << 20)
    packed = deflate(bomb)
    with open(path("hostile_bomb.pt"), "wb") as f:
        f.write(raw_zip([("archive/data.pkl", packed, 8, zlib.crc32(bomb), 1000), stored("archive/byteorder", b"little")]))
    small = b"\x80\x02}."
    packed = deflate(small)
    with open(path("hostile_bomb_claim.pt"), "wb") as f:
        f.write(raw_zip([("archive/data.pkl", packed, 8, zlib.crc32(small), 0xFFFFFFF0), stored("archive/byteorder", b"little")]))

    # Storage and byte-order lies in an otherwise valid checkpoint.
    rezip("shared.pt", "hostile_short_storage.pt", replace={"/data/0": lambda d: d[:-8]})
    rezip("shared.pt", "hostile_big_endian.pt", replace={"/byteorder": b"big"})

    # Formats we refuse on purpose.
    torch.save({"w": torch.ones(2)}, path("legacy.pt"), _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path("torchscript.pt"))


if __name__ == "__main__":
    main()
