"""(e) A corpus of safetensors files at every header size: each must inspect and merge.

The 8-byte little-endian header length N is the first thing in a safetensors file, so its low
bytes are the file's first bytes. A reader that sniffs those bytes (0x80 = a pickle, "PK" = a zip)
refuses valid files: issue 11, defect 1. The corpus has one file for every residue of N modulo
256, plus lengths whose first bytes are 0x80 (0x80, 0x180, 0x1080), a pickle's protocol prefix
0x80 0x02 / 0x80 0x04 (0x280, 0x480) and "PK" (0x4B50, 0x14B50), across layouts: F32, F16,
BF16, F64, I64, U8 (+ I32, BOOL, I8), 0-d tensors, empty tensors, many tensors.

- N a multiple of 8: written by the reference library itself (safetensors.numpy.save_file;
  safetensors.torch.save_file for BF16, which numpy lacks), which pads headers to 8. The length
  is steered with a metadata entry.
- Other N: the reference writer cannot produce them, so the header is written here (compact
  JSON, no padding); the reference reader accepts such files, and the test checks that it reads
  every one back before using it.

Every file must `adapter inspect --json` (exit 0, the tensors the reference reader sees), and
every file with a float weight must `adapter merge` with a small PEFT LoRA (r 2, alpha 3,
scale 1.5) and give W + 1.5·B·A, computed exactly (fractions) and rounded once into the
weight's dtype. Tolerance: ≤ 1 ulp of that dtype. We accumulate B·A in float32 (float64 for F64
bases) with fused multiply-adds, so for F32 the result can be the neighbour of the correctly
rounded value; for F16/BF16 only when the exact value lies within float32 noise of a rounding
boundary. Every other tensor must come out byte for byte.
"""
import json
import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from interop import adapter, bf16_bits, ulp_distance

WEIGHT = "layers.0.proj.weight"  # (6, 5): the tensor the corpus LoRA targets
OUT_F, IN_F, RANK, ALPHA = 6, 5, 2, 3
EXTRA_LENGTHS = [0x80, 0x180, 0x280, 0x480, 0x1080, 0x4B50, 0x14B50]

DTYPE_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _rand(g, shape, dtype):
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    hi = {torch.uint8: 256, torch.int8: 127}.get(dtype, 1 << 20)
    return torch.randint(-hi if dtype != torch.uint8 else 0, hi, shape, generator=g).to(dtype)


def layout_tensors(layout, seed):
    """name → torch tensor for one corpus layout."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    if layout in ("f32", "f16", "bf16", "f64"):
        dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}[layout]
        t[WEIGHT] = _rand(g, (OUT_F, IN_F), dt)
        t["layers.0.proj.bias"] = _rand(g, (OUT_F,), dt)
        t["norm.weight"] = _rand(g, (IN_F,), dt)
    elif layout.startswith("single-"):  # one tensor: fits the smallest headers (0x80)
        dt = {"single-f32": torch.float32, "single-f16": torch.float16, "single-bf16": torch.bfloat16}[layout]
        t[WEIGHT] = _rand(g, (OUT_F, IN_F), dt)
    elif layout == "mixed":
        t[WEIGHT] = _rand(g, (OUT_F, IN_F), torch.float32)
        t["position_ids"] = torch.arange(16, dtype=torch.int64).reshape(1, 16)
        t["attention_mask"] = _rand(g, (4, 4), torch.uint8)
        t["counts"] = _rand(g, (3,), torch.int32)
        t["flags"] = _rand(g, (5,), torch.bool)
        t["offsets"] = _rand(g, (2, 2), torch.int8)
        t["emb.weight"] = _rand(g, (3, 2), torch.float16)
        t["scale"] = _rand(g, (3,), torch.float64)
    elif layout == "zero-d-and-empty":
        t[WEIGHT] = _rand(g, (OUT_F, IN_F), torch.float16)
        t["logit_scale"] = torch.tensor(2.5, dtype=torch.float32)  # 0-d
        t["step"] = torch.tensor(7, dtype=torch.int64)  # 0-d
        t["empty.f32"] = torch.zeros((0, 4), dtype=torch.float32)
        t["empty.i64"] = torch.zeros((0,), dtype=torch.int64)
        t["empty.f16"] = torch.zeros((3, 0), dtype=torch.float16)
    elif layout == "many":
        t[WEIGHT] = _rand(g, (OUT_F, IN_F), torch.float32)
        for i in range(300):
            t[f"blocks.{i}.w"] = _rand(g, (2, 3), torch.float16 if i % 2 else torch.float32)
    elif layout == "ints":  # nothing to merge
        t["ids"] = _rand(g, (4, 3), torch.int64)
        t["bytes"] = _rand(g, (7,), torch.uint8)
        t["zero_d"] = torch.tensor(3, dtype=torch.uint8)
    else:
        raise ValueError(layout)
    return t


RESIDUE_LAYOUTS = ["f32", "f16", "bf16", "f64", "mixed", "zero-d-and-empty", "many", "ints"]
EXTRA_LAYOUTS = ["single-f32", "single-f16", "single-bf16"]
LAYOUTS = RESIDUE_LAYOUTS + EXTRA_LAYOUTS


@dataclass
class CorpusFile:
    path: Path
    layout: str
    header_len: int
    writer: str  # "reference" (safetensors' own writer) or "hand" (unpadded header written here)
    tensors: dict = field(repr=False)

    @property
    def label(self):
        return f"{self.path.name} (N = {self.header_len:#x}, {self.writer} writer)"


def _header_len(blob):
    return struct.unpack("<Q", blob[:8])[0]


def reference_bytes(tensors, metadata):
    """The reference writer's bytes: numpy unless a dtype needs torch (BF16)."""
    if any(v.dtype == torch.bfloat16 for v in tensors.values()):
        return safetensors.torch.save(tensors, metadata=metadata)
    return safetensors.numpy.save({k: v.numpy() for k, v in tensors.items()}, metadata=metadata)


def write_reference(path, tensors, n):
    """safetensors' own writer, with N steered exactly through a metadata entry (N % 8 == 0)."""
    meta = {"format": "pt", "pad": ""}
    blob = reference_bytes(tensors, meta)
    unpadded = len(blob[8:8 + _header_len(blob)].rstrip(b" "))
    if n < unpadded:
        return False
    meta["pad"] = "x" * (n - unpadded)
    blob = reference_bytes(tensors, meta)
    assert _header_len(blob) == n, (path, n, _header_len(blob))
    path.write_bytes(blob)
    return True


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_by_hand(path, tensors, n):
    """A header of exactly N bytes (compact JSON, no padding), then the data."""
    entries, data, offset = {}, [], 0
    for name, t in tensors.items():
        b = raw_bytes(t)
        entries[name] = {"dtype": DTYPE_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        data.append(b)
        offset += len(b)

    def header(pad):
        return json.dumps({"__metadata__": {"format": "pt", "pad": pad}, **entries}, separators=(",", ":")).encode()

    base = len(header(""))
    if n < base:
        return False
    h = header("x" * (n - base))
    assert len(h) == n
    path.write_bytes(struct.pack("<Q", n) + h + b"".join(data))
    return True


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = []
    # (N or its residue, layout, exact): residues grow by 256 until the layout fits; extras are exact.
    targets = [(r, RESIDUE_LAYOUTS[r % len(RESIDUE_LAYOUTS)], False) for r in range(256)]
    targets += [(n, EXTRA_LAYOUTS[i % len(EXTRA_LAYOUTS)], True) for i, n in enumerate(EXTRA_LENGTHS)]
    for i, (target, layout, exact) in enumerate(targets):
        tensors = layout_tensors(layout, seed=i)
        n = target
        while True:  # the smallest N ≥ target with N ≡ target (mod 256) that the layout fits in
            path = root / f"{i:03d}-{layout}-{n:#x}.safetensors"
            writer = "reference" if n % 8 == 0 else "hand"
            if (write_reference if writer == "reference" else write_by_hand)(path, tensors, n):
                break
            if exact:
                raise AssertionError(f"layout {layout} does not fit a {n:#x}-byte header")
            n += 256
        files.append(CorpusFile(path, layout, n, writer, tensors))
    return files


def test_corpus_is_valid_and_covers_every_header_residue(corpus):
    """The corpus itself: the reference reader opens every file and reads back what was meant."""
    residues = {f.header_len % 256 for f in corpus}
    assert residues == set(range(256))
    assert {f.header_len for f in corpus} >= set(EXTRA_LENGTHS)
    first_bytes = {f.path.read_bytes()[:2] for f in corpus}
    assert b"PK" in first_bytes and any(b[0] == 0x80 for b in first_bytes) and b"\x80\x02" in first_bytes
    for f in corpus:
        with safe_open(f.path, framework="pt") as r:
            assert sorted(r.keys()) == sorted(f.tensors), f.label
            for k, t in f.tensors.items():
                got = r.get_tensor(k)
                assert got.dtype == t.dtype and got.shape == t.shape and raw_bytes(got) == raw_bytes(t), (f.label, k)


def run_all(files, check):
    """Run CHECK on each file; report every failure at once (the first ten in full)."""
    failures = []
    for f in files:
        try:
            check(f)
        except AssertionError as e:
            failures.append(f"{f.label}: {str(e).strip().splitlines()[0][:300]}")
    assert not failures, f"{len(failures)} of {len(files)} files:\n  " + "\n  ".join(failures[:10])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inspect_opens_every_corpus_file(layout, corpus):
    files = [f for f in corpus if f.layout == layout]

    def check(f):
        r = adapter("inspect", "--json", f.path, expect=None)
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr.strip()}"
        info = json.loads(r.stdout)
        assert info["tensor_count"] == len(f.tensors), info["tensor_count"]
        got = {t["name"]: (t["dtype"], list(t["shape"])) for t in info["tensors"]}
        want = {k: (DTYPE_NAME[t.dtype], list(t.shape)) for k, t in f.tensors.items()}
        assert got == want, "inspect --json lists other tensors than the reference reader"
        assert info["metadata"]["pad"] == "x" * len(info["metadata"]["pad"])

    run_all(files, check)


# ---------------------------------------------------------------- merging the corpus

def lora_factors():
    g = torch.Generator().manual_seed(42)
    a = (torch.randn((RANK, IN_F), generator=g) * 0.5).float()
    b = (torch.randn((OUT_F, RANK), generator=g) * 0.5).float()
    return a, b


@pytest.fixture(scope="session")
def corpus_lora(tmp_path_factory):
    """A PEFT LoRA for WEIGHT: PEFT-named keys, adapter_config.json, F32 factors, r 2, alpha 3."""
    d = tmp_path_factory.mktemp("corpus-lora")
    a, b = lora_factors()
    prefix = "base_model.model." + WEIGHT[: -len(".weight")]
    safetensors.numpy.save_file({f"{prefix}.lora_A.weight": a.numpy(), f"{prefix}.lora_B.weight": b.numpy()},
                                str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj"], "lora_dropout": 0.0,
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "task_type": None,
        "base_model_name_or_path": None}, indent=2))
    return d


FORMATS = {  # significand bits (with the implicit one), minimum normal exponent
    torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126), torch.float64: (53, -1022),
}


def round_once(q, dtype):
    """The exact rational Q rounded to nearest, ties to even, into DTYPE (no overflow here)."""
    p, emin = FORMATS[dtype]
    if q == 0:
        return 0.0
    e = max(math.floor(math.log2(abs(q))), emin)
    # log2 of a Fraction can be off by one near powers of two: fix e so that 2^e ≤ |q| < 2^(e+1).
    while e > emin and abs(q) < Fraction(2) ** e:
        e -= 1
    while abs(q) >= Fraction(2) ** (e + 1):
        e += 1
    quantum = Fraction(2) ** (e - p + 1)
    return float(round(q / quantum) * quantum)  # round(Fraction) is ties-to-even


def expected_merge(w):
    """W + (alpha/r)·B·A exact in rationals: (that value rounded once into W's dtype, the exact
    values, and the magnitudes M = |W| + s·Σ_k |B_ik·A_kj| that bound the accumulation error)."""
    a, b = lora_factors()
    s = Fraction(ALPHA, RANK)
    wv, av, bv = w.double().tolist(), a.double().tolist(), b.double().tolist()
    exact, magnitude = [], []
    for i in range(OUT_F):
        for j in range(IN_F):
            terms = [Fraction(bv[i][k]) * Fraction(av[k][j]) for k in range(RANK)]
            exact.append(Fraction(wv[i][j]) + s * sum(terms))
            magnitude.append(abs(Fraction(wv[i][j])) + s * sum(abs(t) for t in terms))
    rounded = torch.tensor([round_once(q, w.dtype) for q in exact], dtype=torch.float64).to(w.dtype)
    return rounded.reshape(OUT_F, IN_F), exact, magnitude


def as_ulp_array(t):
    return bf16_bits(t) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "ints"])
def test_merge_every_float_corpus_file(layout, corpus, corpus_lora, tmp_path):
    files = [f for f in corpus if f.layout == layout]
    assert all(WEIGHT in f.tensors for f in files)
    worst = {"ulp1": 0, "cancelled": 0, "elements": 0}

    def check(f):
        out = tmp_path / f.path.name
        r = adapter("merge", "--quiet", "--no-sync", f.path, corpus_lora, out, expect=None)
        assert r.returncode == 0, f"merge exit {r.returncode}: {r.stderr.strip()}"
        with safe_open(out, framework="pt") as m:
            assert sorted(m.keys()) == sorted(f.tensors)
            for k, t in f.tensors.items():
                got = m.get_tensor(k)
                assert got.dtype == t.dtype and got.shape == t.shape, k
                if k != WEIGHT:
                    assert raw_bytes(got) == raw_bytes(t), f"{k} changed; only {WEIGHT} is targeted"
        w = f.tensors[WEIGHT]
        want, exact, magnitude = expected_merge(w)
        got = got_weight(out)
        d = ulp_distance(as_ulp_array(got), as_ulp_array(want)).reshape(-1)
        gamma = (RANK + 2) * Fraction(1, 2 ** (53 if w.dtype == torch.float64 else 24))
        bad = []
        for idx in np.flatnonzero(d > 1):
            err = abs(Fraction(float(got.reshape(-1)[idx].double())) - exact[idx])
            worst["cancelled"] += 1
            if err > gamma * magnitude[idx]:
                bad.append(f"[{idx // IN_F},{idx % IN_F}] {int(d[idx])} ulps, error {float(err):.3g} > "
                           f"bound {float(gamma * magnitude[idx]):.3g}")
        assert not bad, f"{WEIGHT}: {len(bad)} elements off W + 1.5·B·A: " + "; ".join(bad[:3])
        worst["ulp1"] += int((d == 1).sum())
        worst["elements"] += d.size

    run_all(files, check)
    print(f"{layout}: of {worst['elements']} merged elements, {worst['ulp1']} are 1 ulp from the correctly "
          f"rounded value and {worst['cancelled']} more (cancellation) within the accumulation bound")


def got_weight(path):
    with safe_open(path, framework="pt") as m:
        return m.get_tensor(WEIGHT)
