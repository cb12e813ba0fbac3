"""Mixture-of-Experts, fused and multimodal merges load in transformers 5 and match PEFT's merge.

The adapters are Fixtures/adapters/moe-*, written by PEFT 0.21.2 (Fixtures/make_moe_fixtures.py)
against the tiny models in Fixtures/models/tiny-<family>. Here, at test time, each base is saved
again by transformers in float32 or bfloat16, in one file or sharded; `adapter merge` merges into
it; transformers loads the result (every weight found and used) and its logits are compared with
PEFT's own merge_and_unload (float32) or with a float64 merge by PEFT rounded once to bfloat16
(PEFT's bfloat16 merge rounds the update before adding it, so it is not the reference there).
"""
import pytest
import torch
import transformers as T
from peft import PeftModel

from interop import ADAPTERS, MODELS, adapter, assert_logits_match

# case → (base family, model class)
CASES = {
    "qwen3-moe-params": "qwen3-moe",
    "mixtral-gate-up": "mixtral",
    "gpt-oss-params": "gpt-oss",
    "qwen2-moe-shared": "qwen2-moe",
    "phi3-fused": "phi3",
    "llava": "llava",
    "qwen2-vl": "qwen2-vl",
    "deepseek-v3-shared": "deepseek-v3",
    "llama4-params": "llama4",
    "qwen2.5-vl": "qwen2.5-vl",
    "gemma3": "gemma3",
    "llava-lm-head": "llava",
}
MULTIMODAL = {"llava", "qwen2-vl", "qwen2.5-vl", "gemma3"}


def load(folder, dtype, family):
    cls = T.AutoModelForImageTextToText if family in MULTIMODAL else T.AutoModelForCausalLM
    kwargs = {}
    if family in ("qwen3-moe", "mixtral", "gpt-oss", "qwen2-moe", "deepseek-v3", "llama4"):
        kwargs["experts_implementation"] = "eager"
    model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True, local_files_only=True, **kwargs)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: from_pretrained reports {kind}: {sorted(info[kind])[:10]}"
    return model.eval()


def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 60, (2, 12), generator=g)


def run(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits.float()


def base_folder(tmp_path, family, dtype, sharded):
    """The fixture model saved again by transformers in `dtype`, sharded into several files or not."""
    folder = tmp_path / f"base-{family}"
    model = load(MODELS / f"tiny-{family}", dtype, family)
    model.save_pretrained(folder, max_shard_size="8KB" if sharded else "10GB")
    assert (len(list(folder.glob("*.safetensors"))) > 1) == sharded
    return folder


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_merge_loads_and_matches_peft(case, sharded, tmp_path):
    family = CASES[case]
    base = base_folder(tmp_path, family, torch.float32, sharded)
    out = tmp_path / "merged"
    adapter("merge", "--quiet", base, ADAPTERS / f"moe-{case}", out)
    ours = run(load(out, torch.float32, family))
    ref_model = PeftModel.from_pretrained(load(base, torch.float32, family), str(ADAPTERS / f"moe-{case}")).merge_and_unload()
    assert_logits_match(ours, run(ref_model), run(load(base, torch.float32, family)), f"{case} ({'sharded' if sharded else 'one file'})")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_merge_is_the_float64_merge_rounded_once(case, tmp_path):
    family = CASES[case]
    base = base_folder(tmp_path, family, torch.bfloat16, sharded=True)
    out = tmp_path / "merged"
    adapter("merge", "--quiet", base, ADAPTERS / f"moe-{case}", out)
    ours_model = load(out, torch.bfloat16, family)
    # The reference: the bf16 base's values in float64, PEFT's merge in float64, rounded once.
    ref64 = PeftModel.from_pretrained(load(base, torch.float64, family), str(ADAPTERS / f"moe-{case}")).merge_and_unload()
    ref = ref64.state_dict()
    base_sd = load(base, torch.bfloat16, family).state_dict()
    changed = exact = total = 0
    for k, got in ours_model.state_dict().items():
        want = ref[k].to(got.dtype)  # a few tensors stay float32 in a bf16 model (DeepSeek's router bias)
        assert got.dtype in (torch.bfloat16, torch.float32), k
        if torch.equal(want, base_sd[k]) and torch.equal(got, base_sd[k]):
            continue
        changed += 1
        # Both round once from (nearly) the same real number: ours accumulates in float32, so a
        # value within float32 rounding of a bf16 tie may land one bf16 step away, never more.
        bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
        g = got.view(bits).to(torch.int64)
        w = want.view(bits).to(torch.int64)
        assert int((g - w).abs().max()) <= 1, f"{case}: {k} differs from the float64 merge rounded once by more than one bf16 step"
        exact += int((g == w).sum())
        total += g.numel()
    assert changed > 0
    assert exact >= 0.99 * total, f"{case}: only {exact} of {total} merged values are the float64 merge rounded once"
    # Logits computed in float32 from the bf16 weights (upcast exactly), so that they compare the
    # weights, not bf16 arithmetic: the few values one step apart move them by a sliver of the update.
    ours_sd = ours_model.state_dict()
    ref_model = load(out, torch.float32, family)
    ref_model.load_state_dict({k: ref[k].to(ours_sd[k].dtype).to(torch.float32) for k in ours_sd})
    assert_logits_match(run(load(out, torch.float32, family)), run(ref_model), run(load(base, torch.float32, family)), f"{case} bf16",
                        rtol=1e-6, update_rtol=0.02)


@pytest.mark.parametrize("family,case", [("qwen3-moe", "qwen3-moe-per-expert"), ("mixtral", "mixtral-per-expert")])
def test_per_expert_adapter_gives_one_model_on_fused_and_per_expert_bases(family, case, tmp_path):
    """An older per-expert adapter merged into the per-expert checkpoint and into the same model
    with its experts fused ([E, 2I, H], as transformers holds them): transformers loads both into
    the same weights. (The two fixture adapters hold the same factors under the names of each
    base; Mixtral's are w1/w3/w2 under block_sparse_moe for both.)"""
    a = tmp_path / "per-expert"
    b = tmp_path / "fused"
    adapter("merge", "--quiet", MODELS / f"tiny-{family}", ADAPTERS / f"moe-{case}", a)
    adapter("merge", "--quiet", MODELS / f"tiny-{family}-fused", ADAPTERS / f"moe-{case}-fused", b)
    base = load(MODELS / f"tiny-{family}", torch.float32, family)
    ma, mb = load(a, torch.float32, family), load(b, torch.float32, family)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["model.layers.0.mlp.experts.gate_up_proj"], base.state_dict()["model.layers.0.mlp.experts.gate_up_proj"])
    assert_logits_match(run(ma), run(mb), run(base), "per-expert adapter, two base layouts")


@pytest.mark.parametrize("case,family", [("qwen3-moe-per-expert", "qwen3-moe"), ("mixtral-per-expert", "mixtral")])
def test_fused_conversion_loads_in_stock_peft(case, family, tmp_path):
    """`convert to-peft --experts fused` of an older per-expert adapter: stock PEFT loads it into
    the transformers 5 model (fused experts) and its merge equals the numpy float64 merge of the
    per-expert adapter (Fixtures/expected/moe)."""
    from safetensors.numpy import load_file

    out = tmp_path / "fused"
    adapter("convert", "to-peft", "--quiet", "--experts", "fused", "--base", MODELS / f"tiny-{family}", ADAPTERS / f"moe-{case}", out)
    model = PeftModel.from_pretrained(load(MODELS / f"tiny-{family}", torch.float32, family), str(out)).merge_and_unload()
    merged = tmp_path / "merged"
    model.save_pretrained(merged)
    got = load_file(str(merged / "model.safetensors"))
    want = load_file(str(MODELS.parent / "expected" / "moe" / f"{case}.safetensors"))
    for k, v in want.items():
        scale = float(abs(v).max())
        assert float(abs(got[k] - v).max()) <= 2 ** -20 * scale, k
