"""(f) `convert to-mlx` outputs load in the real mlx-lm and give the adapter's logits and weights.

mlx 0.32.4 (CPU backend, the `mlx[cpu]` wheel) and mlx-lm 0.32.2 run the tiny LLaMA themselves:
`mlx_lm.utils.load(model_dir, adapter_path=OUT)` builds mlx-lm's own Llama from the F32 model
folder, and its `load_adapters` reads OUT/adapter_config.json, wraps the modules named by
`lora_parameters.keys` in the last `num_layers` layers with LoRALinear (DoRALinear for
`fine_tune_type` dora) and loads OUT/adapters.safetensors, refusing any tensor that is not an
adapter parameter of the model or has the wrong shape. Nothing of mlx-lm is re-implemented here.

References are independent of our converter: stock PEFT's forward pass of the adapter written by
PEFT (real-lora, real-dora, and a rank/alpha-pattern rsLoRA adapter PEFT writes at test time), or
transformers running our `adapter merge` of the input where PEFT cannot load it (moslora-original:
stock PEFT has no mixer; our merge is itself checked against PEFT in test_causal_lm_merge.py).
`mlx_lm.fuse` (its CLI entry point, run in-process) of each output must give our merge's weights.

Tolerances. Both sides compute in float32 and differ only in the order of operations (mlx: x·Wᵀ +
s·((x·A)·B) per layer, or W + (s·Bᵀ)·Aᵀ when fusing; PEFT: the same unmerged sum in torch's op
order; our merge: one fused accumulation rounded once). Logits: 1e-5 of the logit scale (observed
≤ 7.8e-7 of it); weights: 2⁻²⁰·max(|W|, |W′|) per tensor, 8 ulps of the largest element (observed
≤ 0.23 of that). Every comparison also asserts that the adapter moves the logits (or the weights)
by ≥ 100× the tolerance, so it cannot pass with an adapter mlx-lm did not apply; a scale off by
1 % in the written adapter_config.json fails every case by 200× or more.
"""
import json
import sys

import mlx.core as mx
import mlx_lm.fuse
import numpy as np
import peft
import pytest
import torch
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import load as mlx_lm_load
from peft import PeftModel
from safetensors.numpy import load_file

from interop import ADAPTERS, adapter, assert_logits_match, input_ids, load_causal_lm, logits

LOGIT_RTOL = 1e-5
WEIGHT_RTOL = 2.0 ** -20


def to_mlx(src, out):
    """`adapter convert to-mlx SRC OUT`; returns OUT."""
    adapter("convert", "to-mlx", src, out)
    return out


def mlx_lm_model(model_dir, adapter_dir=None):
    """mlx-lm's own loader (model, tokenizer; with `adapter_path`, its load_adapters). Asserts that
    the modules mlx-lm wrapped are exactly those the file holds, and hold the file's tensors (a
    wrapped module without weights would keep mlx-lm's random lora_a and zero lora_b)."""
    model, _tokenizer = mlx_lm_load(str(model_dir), adapter_path=None if adapter_dir is None else str(adapter_dir))
    if adapter_dir is not None:
        weights = load_file(adapter_dir / "adapters.safetensors")
        wrapped = {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}
        held = {k.rsplit(".", 1)[0] for k in weights}
        assert held <= set(wrapped), f"mlx-lm wrapped {sorted(wrapped)}, the file holds {sorted(held)}"
        # mlx-lm wraps the last num_layers layers; an adapter that does not reach the last layer
        # makes it wrap more. Those extra modules must add nothing: mlx-lm starts lora_b at zero.
        for name in set(wrapped) - held:
            assert not np.any(np.array(wrapped[name].lora_b)), f"{name}: wrapped without weights, but lora_b is not zero"
        wrapped = {name: m for name, m in wrapped.items() if name in held}
        for name, m in wrapped.items():
            for leaf in ("lora_a", "lora_b") + (("m",) if isinstance(m, DoRALinear) else ()):
                assert np.array_equal(np.array(getattr(m, leaf)), weights[f"{name}.{leaf}"]), f"{name}.{leaf} not loaded"
    return model


def mlx_logits(model):
    """mlx-lm's forward pass on the tier's token ids, as a float32 torch tensor."""
    out = model(mx.array(input_ids().numpy()))
    return torch.from_numpy(np.array(out.astype(mx.float32)))


@pytest.fixture(scope="module")
def base_logits(f32_llama_dir):
    return logits(load_causal_lm(f32_llama_dir))


@pytest.fixture(scope="module")
def peft_patterns(workdir, f32_llama_dir):
    """An adapter with per-module ranks and scales that mlx-lm can hold (linear layers only),
    written by PEFT itself: rsLoRA (scale alpha/√r), r 4 and alpha 8 (scale 4), v_proj at r 2
    (scale 8/√2), layers.1.self_attn.o_proj at alpha 16 (scale 8). real-lora-rslora-patterns has
    the same patterns but also an embedding LoRA and lm_head in modules_to_save, which to-mlx
    refuses (test_to_mlx_refuses_full_tensors_in_one_line)."""
    torch.manual_seed(1234)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 16},
        task_type="CAUSAL_LM", init_lora_weights=False)
    out = workdir / "peft-rslora-patterns-linear"
    peft.get_peft_model(load_causal_lm(f32_llama_dir), config).save_pretrained(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["rank_pattern"] and saved["alpha_pattern"], saved
    return out


# id -> (the adapter converted, how the reference logits are computed)
CASES = {
    "real-lora": (lambda request: ADAPTERS / "real-lora", "peft"),
    # fine_tune_type "dora": mlx-lm's DoRALinear, rows rescaled to the magnitude vector `m`.
    "real-dora": (lambda request: ADAPTERS / "real-dora", "peft"),
    # Stock PEFT has no mixer: the reference is transformers running our merge (scale·B·M·A).
    "moslora-original": (lambda request: ADAPTERS / "moslora-original", "our merge"),
    # One rank and one scale in mlx-lm: to-mlx pads v_proj to r 4 with zeros and folds each
    # module's scale / the common scale into B.
    "peft-rslora-patterns-linear": (lambda request: request.getfixturevalue("peft_patterns"), "peft"),
}


@pytest.fixture(params=list(CASES))
def case(request):
    source, reference = CASES[request.param]
    return request.param, source(request), reference


def test_mlx_lm_runs_the_base_model_with_transformers_logits(f32_llama_dir, base_logits):
    # The comparisons below rest on mlx-lm's Llama being transformers' Llama on these weights.
    got = mlx_logits(mlx_lm_model(f32_llama_dir))
    err, scale = float((got - base_logits).abs().max()), float(base_logits.abs().max())
    assert err <= LOGIT_RTOL * scale, f"mlx-lm vs transformers on the F32 base: max |Δlogit| = {err:.3g}"


def test_mlx_lm_loads_to_mlx_output_with_the_reference_logits(case, tmp_path, f32_llama_dir, merged, base_logits):
    name, src, reference = case
    out = to_mlx(src, tmp_path / "mlx")
    if name == "peft-rslora-patterns-linear":
        # One rank (the largest, 4) and one scale (the most common, rsLoRA 8/√4 = 4) for mlx-lm.
        params = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]
        assert (params["rank"], params["scale"]) == (4, 4.0), params
    got = mlx_logits(mlx_lm_model(f32_llama_dir, out))
    if reference == "peft":
        want = logits(PeftModel.from_pretrained(load_causal_lm(f32_llama_dir), str(src)).eval())
    else:
        want = logits(load_causal_lm(merged(src)))
    assert_logits_match(got, want, base_logits, f"mlx-lm running to-mlx of {name} vs {reference}", rtol=LOGIT_RTOL)


def test_mlx_lm_fuse_of_to_mlx_output_gives_the_weights_of_our_merge(case, tmp_path, f32_llama_dir, merged, monkeypatch):
    name, src, _ = case
    out = to_mlx(src, tmp_path / "mlx")
    # mlx-lm's own fuse command: load(model, adapter_path) → fuse() every LoRA/DoRA layer → save.
    monkeypatch.setattr(sys, "argv", ["mlx_lm.fuse", "--model", str(f32_llama_dir), "--adapter-path", str(out),
                                      "--save-path", str(tmp_path / "fused")])
    mlx_lm.fuse.main()
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    ours = load_file(merged(src) / "model.safetensors")
    base = load_file(f32_llama_dir / "model.safetensors")
    assert sorted(fused) == sorted(ours) == sorted(base)
    changed = 0
    for k, w in base.items():
        assert fused[k].dtype == ours[k].dtype == np.float32, (k, fused[k].dtype, ours[k].dtype)
        if np.array_equal(ours[k], w):
            assert np.array_equal(fused[k], w), f"{k}: our merge leaves it unchanged, mlx-lm's fuse changed it"
            continue
        changed += 1
        tol = WEIGHT_RTOL * max(float(np.abs(w).max()), float(np.abs(ours[k]).max()))
        update = float(np.abs(ours[k] - w).max())
        assert update > 100 * tol, f"{k}: the update ({update:.3g}) is too small for the comparison to prove anything"
        err = float(np.abs(fused[k] - ours[k]).max())
        assert err <= tol, f"{name}: {k}: max |mlx-lm fuse − our merge| = {err:.3g} > 2^-20·max|W| = {tol:.3g}"
    assert changed == len(load_file(out / "adapters.safetensors")) // (3 if name == "real-dora" else 2)


def test_mlx_lm_loads_the_mlx_fixture_as_our_merge_reads_it(f32_llama_dir, merged, base_logits):
    # The other direction: Fixtures/adapters/mlx is in mlx-lm's own layout (scale 20, lora_a
    # (in, r), lora_b (r, out)); mlx-lm's forward of it must be transformers running our merge.
    src = ADAPTERS / "mlx"
    got = mlx_logits(mlx_lm_model(f32_llama_dir, src))
    want = logits(load_causal_lm(merged(src)))
    assert_logits_match(got, want, base_logits, "mlx-lm running Fixtures/adapters/mlx vs our merge of it", rtol=LOGIT_RTOL)


def test_to_mlx_refuses_full_tensors_in_one_line(tmp_path):
    # real-lora-rslora-patterns keeps lm_head in modules_to_save (a full weight): an mlx-lm
    # "lora" adapter holds only lora_a / lora_b / m leaves (load_adapters raises on anything
    # else), so to-mlx must refuse, in one line, writing nothing.
    src = ADAPTERS / "real-lora-rslora-patterns"
    r = adapter("convert", "to-mlx", src, tmp_path / "mlx", expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("adapter: error: ") and str(src) in lines[0] and "modules_to_save" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("layers,with_base", [([0], False), ([1], False), ([1], True)])
def test_to_mlx_of_an_adapter_on_some_layers_loads_in_mlx_lm(layers, with_base, tmp_path, f32_llama_dir, base_logits):
    """mlx-lm wraps the LAST num_layers layers: an adapter on layer 0 only (or from layer 1, with or
    without the base model to count layers) must still have every adapted module wrapped."""
    torch.manual_seed(1234)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=layers,
                             task_type="CAUSAL_LM", init_lora_weights=False)
    peft.get_peft_model(load_causal_lm(f32_llama_dir), config).save_pretrained(str(tmp_path / "peft"))
    if with_base:
        adapter("convert", "to-mlx", "--base", f32_llama_dir, tmp_path / "peft", tmp_path / "mlx")
        out = tmp_path / "mlx"
    else:
        out = to_mlx(tmp_path / "peft", tmp_path / "mlx")
    got = mlx_logits(mlx_lm_model(f32_llama_dir, out))
    want = logits(PeftModel.from_pretrained(load_causal_lm(f32_llama_dir), str(tmp_path / "peft")).eval())
    assert_logits_match(got, want, base_logits, "mlx-lm running to-mlx of a layer-0-only adapter vs PEFT",
                        rtol=LOGIT_RTOL)
