"""Shared helpers of the interoperability tier: paths, the CLI runner, model loading, comparisons.

Nothing here computes an expected value from our own output: references come from the real
clients (transformers, PEFT, diffusers, torch.load, safetensors) or from numpy in float64.
"""
import contextlib
import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "Fixtures"
MODELS = FIXTURES / "models"
ADAPTERS = FIXTURES / "adapters"
ADAPTER_BIN = Path(os.environ.get("ADAPTER_BIN") or REPO / ".build" / "release" / "adapter")


def adapter(*args, expect=0, timeout=300):
    """Run the adapter CLI; fail the test with its stderr unless it exits with `expect`."""
    import pytest

    cmd = [str(ADAPTER_BIN), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if expect is not None and r.returncode != expect:
        pytest.fail(f"`adapter {' '.join(map(str, args))}` exited {r.returncode} (expected {expect}):\n"
                    f"{r.stderr.strip()}", pytrace=False)
    return r


def strict_json(path):
    """json.load that refuses NaN / Infinity (not JSON; Python's json accepts them by default)."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------- tiny LLaMA

LLAMA_AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def make_f32_llama_folder(dst):
    """config.json + tokenizer of Fixtures/models/tiny-llama, weights = tiny-llama-f32.safetensors.

    The real-PEFT fixtures (Fixtures/make_real_peft_fixtures.py) were made against these weights.
    """
    dst = Path(dst)
    dst.mkdir(parents=True)
    for name in LLAMA_AUX_FILES:
        shutil.copy(MODELS / "tiny-llama" / name, dst / name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copy(MODELS / "tiny-llama-f32.safetensors", dst / "model.safetensors")
    return dst


def input_ids():
    """Two sequences that together hold every token of the 32-token vocabulary (so embedding
    LoRAs and every row of lm_head matter)."""
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.arange(32)[:16], torch.randperm(32, generator=g)[:16]])


def load_causal_lm(folder, dtype=None):
    """AutoModelForCausalLM.from_pretrained, asserting that every weight was found and used."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype or torch.float32, output_loading_info=True, local_files_only=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: from_pretrained reports {kind}: {sorted(info[kind])[:10]}"
    return model.eval()


def logits(model, ids=None):
    import torch
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits.float()


def assert_logits_match(got, want, base, what, rtol=1e-5, update_rtol=0.0):
    """|got − want| ≤ rtol · max|want| + update_rtol · max|want − base|, and the adapter visibly
    moves the logits (by ≥ 100 × rtol · max|want|), so agreement is not the trivial agreement of
    two unchanged models. update_rtol is for outputs whose factors were rounded into a narrow
    dtype: their error is a fraction of the update, not of the logits."""
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    effect = float((want - base).abs().max())
    assert effect > 100 * rtol * scale, (
        f"{what}: the adapter moves the logits by only {effect:.3g} (scale {scale:.3g}); the comparison proves nothing")
    allowed = rtol * scale + update_rtol * effect
    assert err <= allowed, (
        f"{what}: max |Δlogit| = {err:.3g} > {allowed:.3g} (logit scale {scale:.3g}; the adapter itself moves "
        f"them by {effect:.3g})")


def assert_dequantized_merge_matches_peft(tmp_path, base, model, targets, load, ids, what, seed=21):
    """A PEFT LoRA made on `model` (the quantized `base` as transformers dequantizes it, in float32;
    lora_B drawn so the update is not zero): `adapter merge --dtype bf16 base adapter` loads in
    plain transformers (`load`) with the logits of PEFT's own merge_and_unload, rounded to bf16."""
    import peft
    import torch
    before = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.to(torch.bfloat16).float() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "bf16"
    adapter("merge", "--quiet", "--dtype", "bf16", base, tmp_path / "adapter", out)

    def with_weights(sd):
        m = load(out, dtype=torch.float32)
        m.load_state_dict(sd)
        return m

    with torch.no_grad():
        got = load(out, dtype=torch.float32)(input_ids=ids).logits
        want = with_weights(merged)(input_ids=ids).logits
        unmerged = with_weights(before)(input_ids=ids).logits
    assert_logits_match(got, want, unmerged, what, rtol=1e-5, update_rtol=0.01)


# ---------------------------------------------------------------- warnings and logs

@contextlib.contextmanager
def captured_warnings():
    """Collect every warnings.warn and every WARNING+ log record (peft, transformers, diffusers)
    emitted inside the block, as strings."""
    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            messages.append(f"[log {record.name}] {record.getMessage()}")

    handler = Handler(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("peft", "transformers", "diffusers", "")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"[warn {w.category.__name__}] {w.message}" for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# Warnings that say an adapter was not loaded as written: keys or config fields dropped.
KEY_WARNING_WORDS = ("unexpected", "missing", "ignored", "not found", "could not", "mismatch")


def key_warnings(messages):
    return [m for m in messages if any(w in m.lower() for w in KEY_WARNING_WORDS)]


# ---------------------------------------------------------------- float comparisons

def ulp_distance(a, b):
    """Elementwise distance in units in the last place between two arrays of one float dtype:
    numpy float16 / float32 / float64, or uint16 holding bfloat16 bit patterns (see bf16_bits).
    Adjacent floats are 1 apart, +0 and −0 are 0 apart."""
    import numpy as np
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = 8 * a.dtype.itemsize
    signed = {16: np.int16, 32: np.int32, 64: np.int64}[bits]
    lowest = np.int64(-(1 << (bits - 1)))

    def key(x):
        i = x.view(signed).astype(np.int64)
        # Sign-magnitude patterns onto one monotonic line: negatives become −magnitude.
        return np.where(i < 0, lowest - i, i)

    return np.abs(key(a) - key(b))


def bf16_bits(t):
    """A torch bfloat16 tensor as numpy uint16 bit patterns (numpy has no bfloat16)."""
    import torch
    return t.contiguous().view(torch.int16).numpy().view("uint16")
