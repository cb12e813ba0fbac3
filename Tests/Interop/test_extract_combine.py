"""`adapter extract` and `adapter combine`, read back by stock PEFT and checked against numpy.

- extract: the adapter of Fixtures/models/extract-{base,tuned} (every projection W + an exact rank-8
  update + N(0, 1e-5) noise; a norm and lm_head changed too) loads in stock PEFT onto the base and
  gives the tuned model's logits.
- combine cat: the combined adapter of four inputs in four layouts (rsLoRA and patterns, MoSLoRA
  with a negative weight, mlx-lm, plain PEFT) loads in stock PEFT with the logits of transformers
  on our one-pass merge of the four inputs.
- combine svd / ties / dare: the update PEFT computes from our output (`get_delta_weight`) equals
  a numpy reference built from the updates PEFT computes from each input: the SVD of the exact sum
  truncated to K, and the TIES / DARE algorithms of the papers (DARE's uniforms from SplitMix64,
  reimplemented here) followed by the same truncation.
"""
import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from interop import ADAPTERS, MODELS, adapter, assert_logits_match, load_causal_lm, logits
from test_peft_loads_converted import peft_load

INPUTS = [("real-lora-rslora-patterns", 1.0), ("moslora-original", -0.5), ("mlx", 0.75), ("peft-lora", 2.0)]
# Inputs stock PEFT loads itself (it cannot apply MoSLoRA's mixer or read mlx-lm), for the references.
PEFT_INPUTS = [("real-lora-rslora-patterns", 1.0), ("real-lora", -0.5), ("peft-lora", 0.75)]


def test_extracted_adapter_gives_the_tuned_model_in_stock_peft(tmp_path):
    base, tuned = MODELS / "extract-base", MODELS / "extract-tuned"
    out = tmp_path / "extracted"
    adapter("extract", "--quiet", "--rank", "8", "--save-full", "lm_head,post_attention_layernorm", base, tuned, out)
    got, warnings_, missing, unexpected = peft_load(base, out)
    assert not warnings_ and not missing and not unexpected, (warnings_, missing[:5], unexpected[:5])
    want, before = logits(load_causal_lm(tuned)), logits(load_causal_lm(base))
    effect, err = float((want - before).abs().max()), float((got - want).abs().max())
    # What rank 8 leaves out is the noise (‖noise‖ / ‖D‖ ≈ 1e-3): its effect on the logits is a
    # thousandth of the fine-tune's.
    assert effect > 0.05 and err <= 1e-2 * effect, (err, effect)


def test_combined_adapter_loads_in_stock_peft_with_the_logits_of_merging_its_inputs(tmp_path, f32_llama_dir):
    out = tmp_path / "combined"
    adapter("combine", "--quiet", "--form", "lora", *[f"{ADAPTERS / n}:{w}" for n, w in INPUTS], "-o", out)
    got, warnings_, missing, unexpected = peft_load(f32_llama_dir, out)
    assert not warnings_ and not missing and not unexpected, (warnings_, missing[:5], unexpected[:5])
    merged = tmp_path / "merged"
    (first, w0), *rest = INPUTS
    assert w0 == 1.0
    adapter("merge", "--quiet", f32_llama_dir, ADAPTERS / first, merged, *sum([["--add", f"{ADAPTERS / n}:{w}"] for n, w in rest], []))
    assert_logits_match(got, logits(load_causal_lm(merged)), logits(load_causal_lm(f32_llama_dir)), "combine cat in stock PEFT vs our merge of the inputs")


def peft_deltas(base_dir, folder):
    """module name → the update stock PEFT applies for the adapter at `folder` (get_delta_weight),
    float64; embeddings transposed to [out, in] like every other module."""
    pm = PeftModel.from_pretrained(load_causal_lm(base_dir), str(folder))
    out = {}
    for name, module in pm.named_modules():
        if hasattr(module, "get_delta_weight") and ("default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {})):
            d = module.get_delta_weight("default").double().numpy()
            key = name.replace("base_model.model.", "")
            out[key] = d.T if "embed" in key else d
    return out


def splitmix64(seed):
    """The same stream as the tool's SplitMix64, as uniforms in [0, 1) of 53 bits."""
    mask = (1 << 64) - 1
    state = seed & mask
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        yield (z >> 11) * 2.0 ** -53


def fnv1a(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def reference(method, deltas, weights, density, seed, name):
    """The combined update of one module: TIES (Yadav et al. 2023: trim to the top-d magnitudes,
    elect the sign of the sum, disjoint mean), DARE (Yu et al. 2023: drop with probability 1 − d,
    rescale by 1/d) then the weighted sum, or DARE then TIES' election and disjoint sum."""
    taus = []
    for i, (d, w) in enumerate(zip(deltas, weights)):
        flat = d.ravel()
        if method == "ties":
            keep = int(np.floor(density * flat.size))
            order = np.argsort(-np.abs(flat), kind="stable")
            t = np.zeros_like(flat)
            t[order[:keep]] = flat[order[:keep]]
        else:
            rng = splitmix64((seed ^ fnv1a(name)) + i)
            u = np.array([next(rng) for _ in range(flat.size)])
            t = np.where(u < density, flat / density, 0.0)
        taus.append(w * t)
    taus = np.array(taus)
    if method == "dare-linear":
        out = taus.sum(0)
    else:
        gamma = np.sign(taus.sum(0))
        agree = (np.sign(taus) == gamma) & (taus != 0) & (gamma != 0)
        total = (taus * agree).sum(0)
        if method == "ties":
            weight = (np.array(weights)[:, None] * agree).sum(0)
            out = np.where(weight != 0, total / np.where(weight != 0, weight, 1), 0.0)
        else:
            out = total
    return out.reshape(deltas[0].shape)


def truncate(d, k):
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("method", ["svd", "ties", "dare-linear", "dare-ties"])
def test_combine_at_rank_k_equals_the_numpy_reference(tmp_path, f32_llama_dir, method):
    k, density, seed = 3, 0.6, 11
    inputs = [peft_deltas(f32_llama_dir, ADAPTERS / n) for n, _ in PEFT_INPUTS]
    weights = [w for _, w in PEFT_INPUTS]
    out = tmp_path / "combined"
    adapter("combine", "--quiet", "--method", method, "--rank", k, "--density", density, "--seed", seed,
            *[f"{ADAPTERS / n}:{w}" for n, w in PEFT_INPUTS], "-o", out, "--dtype", "f32")
    got = peft_deltas(f32_llama_dir, out)
    names = sorted(set().union(*inputs))
    assert sorted(got) == names
    for name in names:
        deltas = [d.get(name, np.zeros_like(next(x[name] for x in inputs if name in x))) for d in inputs]
        if method == "svd":
            want = truncate(sum(w * d for w, d in zip(weights, deltas)), k)
        else:
            want = truncate(reference(method, deltas, weights, density, seed, name), k)
        scale = np.abs(want).max()
        assert np.abs(got[name] - want).max() <= 1e-5 * scale, f"{method} {name}: {np.abs(got[name] - want).max():.3g} (scale {scale:.3g})"


def test_extract_from_pytorch_checkpoints_equals_extract_from_safetensors(tmp_path):
    """torch.save'd .bin checkpoints (read through the zip reader, never by region) give the same
    adapter, byte for byte, as the same weights in safetensors."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    w = {"model.layers.0.mlp.down_proj.weight": torch.randn(96, 64) * 0.05, "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64) * 0.05}
    t = {k: v + (torch.randn(v.shape[0], 4) @ torch.randn(4, v.shape[1])) * 0.01 for k, v in w.items()}
    for name, sd in (("base", w), ("tuned", t)):
        torch.save(sd, tmp_path / f"{name}.bin")
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    for ext in ("bin", "safetensors"):
        adapter("extract", "--quiet", "--no-sync", "--rank", "4", tmp_path / f"base.{ext}", tmp_path / f"tuned.{ext}", tmp_path / f"out-{ext}")
    a = (tmp_path / "out-bin" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "out-safetensors" / "adapter_model.safetensors").read_bytes()
    assert a == b
