"""(b) Merged folders load with AutoModelForCausalLM and match PEFT's own merge_and_unload.

The adapters are Fixtures/adapters/real-*, written by PEFT 0.21.2 itself against the tiny LLaMA
(Fixtures/make_real_peft_fixtures.py). The reference is computed here, at test time, by
PeftModel.from_pretrained(base, adapter).merge_and_unload() on the same base weights.
"""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from interop import ADAPTERS, MODELS, adapter, assert_logits_match, bf16_bits, load_causal_lm, logits, ulp_distance

REAL_ADAPTERS = ["real-lora", "real-dora", "real-lora-rslora-patterns"]


def peft_merged(base_folder, adapter_dir):
    """PEFT's merge, in float32, of ADAPTER into the model in BASE_FOLDER (loaded as float32)."""
    model = PeftModel.from_pretrained(load_causal_lm(base_folder), str(adapter_dir)).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def f32_base_logits(f32_llama_dir):
    return logits(load_causal_lm(f32_llama_dir))


@pytest.mark.parametrize("name", REAL_ADAPTERS)
def test_f32_merge_matches_peft_merge_and_unload(name, tmp_path, f32_llama_dir, f32_base_logits):
    out = tmp_path / "merged"
    adapter("merge", "--quiet", f32_llama_dir, ADAPTERS / name, out)
    ours = load_causal_lm(out)
    ref = peft_merged(f32_llama_dir, ADAPTERS / name)

    # Weights. Both sides compute W + s·B·A (DoRA: the rescaled rows) in float32: PEFT rounds
    # B·A, then ·s, then + W (three roundings, each up to half an ulp of an intermediate that can
    # exceed |W|; for DoRA also the row norms), we round once after a fused accumulation. So the
    # two agree to a few ulps of the tensor's largest magnitude, not bit for bit: allow
    # 2^-20 · max(|W|, |W'|) per tensor (8 ulps of the largest element).
    base_sd = load_causal_lm(f32_llama_dir).state_dict()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    changed = 0
    for k, want in ref_sd.items():
        got = ours_sd[k]
        if torch.equal(want, base_sd[k]):
            assert torch.equal(got, want), f"{k}: PEFT leaves it unchanged, our merge changed it"
            continue
        changed += 1
        scale = max(float(want.abs().max()), float(base_sd[k].abs().max()))
        err = float((got - want).abs().max())
        assert err <= 2.0 ** -20 * scale, f"{k}: max |ours − PEFT| = {err:.3g} > 2^-20 × {scale:.3g}"
    assert changed > 0

    # Logits on every token of the vocabulary: within 1e-5 of the logit scale (observed ≤ 1.8e-7
    # against a scale of 0.6–0.75; the adapters move the logits by ≈ 1).
    assert_logits_match(logits(ours), logits(ref), f32_base_logits, f"{name} on the F32 base")


@pytest.fixture(scope="module")
def bf16_dir():
    return MODELS / "tiny-llama"


@pytest.mark.parametrize("name", REAL_ADAPTERS)
def test_bf16_sharded_merge_matches_peft_rounded_once(name, tmp_path, bf16_dir):
    out = tmp_path / "merged"
    adapter("merge", "--quiet", bf16_dir, ADAPTERS / name, out)

    # The folder keeps the layout transformers wrote: same shard names, same tensor-to-shard
    # assignment, the config and tokenizer files; the tokenizer loads and encodes alike.
    want_index = json.loads((bf16_dir / "model.safetensors.index.json").read_text())
    got_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert got_index["weight_map"] == want_index["weight_map"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (bf16_dir / f).read_bytes(), f
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(bf16_dir))(text)["input_ids"]

    # Our output loads as a BF16 model (the dtype its config and files say) ...
    ours_bf16 = load_causal_lm(out, dtype=torch.bfloat16)
    # ... and as float32 (an exact upcast) for the comparison.
    ours = load_causal_lm(out)

    # The reference: the BF16 base upcast exactly to float32, PEFT's float32 merge, then rounded
    # once to BF16 (torch rounds to nearest even). PEFT's float32 value is itself rounded, so
    # where W + s·B·A lies within float32 noise (~2^-24 relative) of a BF16 rounding boundary the
    # two single-rounded results can differ by one BF16 ulp (rare: none of the ~6,400 changed
    # elements of these three adapters do). Allow ≤ 1 BF16 ulp on at most 0.5 % of the changed
    # elements, exact elsewhere.
    ref = peft_merged(bf16_dir, ADAPTERS / name)
    base_sd = load_causal_lm(bf16_dir).state_dict()
    ref_sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    ours_sd = ours_bf16.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in ours_sd.values())
    off, total = 0, 0
    for k, want in ref_sd.items():
        got = ours_sd[k]
        if torch.equal(want.float(), base_sd[k]):
            assert torch.equal(got, want), f"{k}: PEFT leaves it unchanged, our merge changed it"
            continue
        d = ulp_distance(bf16_bits(got), bf16_bits(want))
        assert d.max() <= 1, f"{k}: {int((d > 1).sum())} elements more than one BF16 ulp from PEFT's result"
        off += int((d == 1).sum())
        total += d.size
    assert total > 0 and off <= max(2, 0.005 * total), f"{off} of {total} changed elements one BF16 ulp off"

    # Logits, run in float32 on the BF16 values of both: the only differences are the one-ulp
    # disagreements above, each ≤ 2^-8 relative in one weight; allow 1e-3 of the logit scale
    # (observed: 0, as no element disagrees).
    ref_model = load_causal_lm(bf16_dir)
    ref_model.load_state_dict({k: v.float() for k, v in ref_sd.items()}, strict=True)
    base_logits = logits(load_causal_lm(bf16_dir))
    assert_logits_match(logits(ours), logits(ref_model), base_logits, f"{name} on the BF16 sharded base", rtol=1e-3)
    # The BF16 model itself runs and gives finite logits.
    assert torch.isfinite(logits(ours_bf16)).all()
