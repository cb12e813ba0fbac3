"""Merges into MXFP4 experts (gpt-oss layout) load in transformers 5.

Fixtures/models/tiny-gpt-oss-mxfp4 stores its experts as the released gpt-oss checkpoints do
(`…_blocks` + `…_scales`); Fixtures/adapters/mxfp4-lora is a PEFT adapter with q_proj / v_proj
modules and `target_parameters` on both expert parameters; Fixtures/expected/mxfp4 holds the
Float64 reference of Fixtures/make_fp4_fixtures.py.
"""
import numpy as np
import peft
import torch
import transformers as T
from safetensors import safe_open

from interop import ADAPTERS, MODELS, adapter, assert_logits_match

BASE = MODELS / "tiny-gpt-oss-mxfp4"
REFERENCE = MODELS.parent / "expected" / "mxfp4" / "tiny-gpt-oss-mxfp4+mxfp4-lora.safetensors"
EXPERTS = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def load(folder, **kwargs):
    model, info = T.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, local_files_only=True, **kwargs)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: from_pretrained reports {kind}: {sorted(info[kind])[:10]}"
    return model.eval()


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def decode(blocks, scales):
    """Our own reading of the format, in Float64, in the parameter layout [E, in, out]."""
    b = blocks.numpy()
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)
    v = GRID[codes & 7] * np.where(codes & 8, -1.0, 1.0) * np.exp2(scales.numpy().astype(np.float64) - 127)[..., None]
    return v.reshape(*b.shape[:-2], -1).transpose(0, 2, 1)


def ids():
    return torch.arange(32).reshape(2, 16) % 64


def test_requantized_mxfp4_loads_in_transformers_as_our_blocks_say(tmp_path):
    """transformers reads our MXFP4 output as the gpt-oss checkpoint it is (dequantizing it while
    loading): every expert parameter is exactly what our blocks and exponents decode to, and those
    are the Float64 reference's nearly everywhere."""
    out = tmp_path / "merged"
    adapter("merge", "--quiet", BASE, ADAPTERS / "mxfp4-lora", out)
    model = load(out, quantization_config=T.Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    ours, ref = tensors(out / "model.safetensors"), tensors(REFERENCE)
    sd = model.state_dict()
    for k in EXPERTS:
        got = sd[k].double().numpy()
        assert np.array_equal(got, decode(ours[k + "_blocks"], ours[k + "_scales"])), k
        want = decode(ref[k + "_blocks"], ref[k + "_scales"])
        assert (got == want).mean() >= 0.99, k
        # It holds part of the update: nearer the merged reference than the base was.
        merged = ref[k + ".merged"].numpy().transpose(0, 2, 1)
        base = ref[k + ".base"].numpy().transpose(0, 2, 1)
        assert np.linalg.norm(got - merged) < np.linalg.norm(base - merged), k


def test_dequantized_merge_loads_in_plain_transformers_with_the_logits_of_peft(tmp_path):
    """--dtype bf16: a plain bf16 gpt-oss (no quantization_config, experts as [E, in, out]
    parameters) whose logits are those of PEFT's own merge of the adapter into the dequantized
    base, rounded to bf16."""
    out = tmp_path / "bf16"
    adapter("merge", "--quiet", "--dtype", "bf16", BASE, ADAPTERS / "mxfp4-lora", out)
    assert "quantization_config" not in (out / "config.json").read_text()
    ours = load(out, dtype=torch.float32)
    base = load(BASE, quantization_config=T.Mxfp4Config(dequantize=True), dtype=torch.float32)
    before_sd = {k: v.to(torch.bfloat16).float() for k, v in base.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(base, str(ADAPTERS / "mxfp4-lora")).merge_and_unload()
    peft_sd = {k: v.to(torch.bfloat16).float() for k, v in merged.state_dict().items()}
    for k in EXPERTS:
        assert ours.state_dict()[k].shape == peft_sd[k].shape, k
    reference = load(out, dtype=torch.float32)
    reference.load_state_dict(peft_sd)
    before = load(out, dtype=torch.float32)
    before.load_state_dict(before_sd)
    with torch.no_grad():
        got = ours(input_ids=ids()).logits
        want = reference(input_ids=ids()).logits
        unmerged = before(input_ids=ids()).logits
    assert_logits_match(got, want, unmerged, "dequantized MXFP4 merge", rtol=1e-5, update_rtol=0.01)
