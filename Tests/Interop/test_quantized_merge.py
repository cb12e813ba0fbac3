"""Merges into block-scaled FP8 bases load in transformers 5.

Fixtures/models/tiny-fp8 is a DeepSeek-V3-style FP8 checkpoint (E4M3 codes, F32 4×8 block scales
in `weight_scale_inv`, some in another shard) and Fixtures/adapters/fp8-lora a LoRA with a MoSLoRA
module; Fixtures/expected/fp8 holds the reference merge computed in Float64 by
Fixtures/make_quantized_fixtures.py (codes by torch's float8_e4m3fn).
"""
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

from interop import ADAPTERS, MODELS, adapter, assert_dequantized_merge_matches_peft, assert_logits_match

REFERENCE = MODELS.parent / "expected" / "fp8" / "tiny-fp8+fp8-lora.safetensors"
TOUCHED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"]


def load(folder, **kwargs):
    model, info = T.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, local_files_only=True, **kwargs)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: from_pretrained reports {kind}: {sorted(info[kind])[:10]}"
    return model.eval()


def ids():
    return torch.arange(32).reshape(2, 16)


def reference_model(folder, weights):
    """The model at `folder` (loaded in float32) with `weights` put in."""
    model = load(folder, dtype=torch.float32)
    sd = model.state_dict()
    for k, v in weights.items():
        sd[k] = torch.from_numpy(np.asarray(v, dtype=np.float64)).to(sd[k].dtype)
    model.load_state_dict(sd)
    return model


def test_requantized_fp8_loads_in_transformers_and_holds_the_reference_codes(tmp_path):
    """transformers reads our FP8 output as the FP8 checkpoint it is (on a CPU it dequantizes it to
    bf16 while loading): every weight is there, and the merged ones are the reference's codes ×
    scales (one E4M3 step apart at most, where Float32 and Float64 accumulation round differently)."""
    out = tmp_path / "merged"
    adapter("merge", "--quiet", MODELS / "tiny-fp8", ADAPTERS / "fp8-lora", out)
    model = load(out)
    ref = load_file(str(REFERENCE))
    sd = model.state_dict()
    for k in TOUCHED:
        scales = np.repeat(np.repeat(ref[k + "_scale_inv"].astype(np.float64), 4, 0), 8, 1)[: ref[k].shape[0], : ref[k].shape[1]]
        want = torch.from_numpy(ref[k]).view(torch.float8_e4m3fn).double().numpy() * scales
        got = sd[k].double().numpy()
        # bf16 of the dequantized value, and one E4M3 step (1/8 relative) where codes differ.
        step = np.abs(want) / 8 + scales * 2.0 ** -9
        assert np.all(np.abs(got - want) <= step + np.abs(want) * 2.0 ** -8), k
        close = np.abs(got - want) <= np.abs(want) * 2.0 ** -8 + 1e-12
        assert close.mean() >= 0.99, f"{k}: only {close.mean():.3f} of the values are the reference's codes"


def test_dequantized_merge_loads_in_plain_transformers_with_the_reference_logits(tmp_path):
    """--dtype bf16: a plain bf16 model (no quantization_config) whose logits are those of the
    Float64 reference merge rounded once to bf16."""
    out = tmp_path / "bf16"
    adapter("merge", "--quiet", "--dtype", "bf16", MODELS / "tiny-fp8", ADAPTERS / "fp8-lora", out)
    ours = load(out, dtype=torch.float32)
    ref = load_file(str(REFERENCE))
    weights = {k[: -len(".base")]: ref[k] for k in ref if k.endswith(".base")}
    weights.update({k: ref[k + ".merged"] for k in TOUCHED})
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16).double().numpy() for k, v in weights.items()}
    base = {k[: -len(".base")]: torch.from_numpy(ref[k]).to(torch.bfloat16).double().numpy() for k in ref if k.endswith(".base")}
    with torch.no_grad():
        got = ours(input_ids=ids()).logits.float()
        want = reference_model(out, bf16)(input_ids=ids()).logits.float()
        before = reference_model(out, base)(input_ids=ids()).logits.float()
    assert_logits_match(got, want, before, "dequantized FP8 merge", rtol=1e-5, update_rtol=0.01)


def test_compressed_tensors_fp8_merge_is_decoded_by_compressed_tensors(tmp_path):
    """An llm-compressor FP8_DYNAMIC model (made by compressed-tensors itself): our requantized
    output loads through transformers' compressed-tensors integration (decompressed on a CPU with
    run_compressed=False), and every merged weight is the reference's codes × BF16 row scales as
    compressed-tensors decodes them, nearly everywhere exactly."""
    out = tmp_path / "merged"
    adapter("merge", "--quiet", MODELS / "tiny-fp8-channel", ADAPTERS / "fp8-lora", out)
    model = load(out, quantization_config=T.CompressedTensorsConfig(run_compressed=False))
    ref = load_file(str(MODELS.parent / "expected" / "fp8" / "tiny-fp8-channel+fp8-lora.safetensors"))
    sd = model.state_dict()
    for k in TOUCHED:
        codes = torch.from_numpy(ref[k]).view(torch.float8_e4m3fn)
        scale = torch.from_numpy(ref[k + "_scale"]).view(torch.bfloat16)
        want = codes.to(torch.bfloat16) * scale  # compressed-tensors' own dequantization
        got = sd[k]
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, k
        same = (got == want).double().mean().item()
        assert same >= 0.99, f"{k}: only {same:.3f} of the values are the reference's"
        assert torch.allclose(got.double(), want.double(), rtol=2 ** -3, atol=float(scale.double().max()) * 2 ** -9), k



def test_dequantized_fp8_merge_of_a_peft_adapter_gives_peft_merged_logits(tmp_path):
    """A PEFT LoRA made here on the dequantized FP8 model: `adapter merge --dtype bf16` gives the
    logits of PEFT's own merge_and_unload on that model. (transformers dequantizes FP8 on a CPU
    while loading, into bf16; asked for float32 it reads the codes without their scales.)"""
    model = load(MODELS / "tiny-fp8", dtype=torch.bfloat16).float()
    assert_dequantized_merge_matches_peft(tmp_path, MODELS / "tiny-fp8", model, ["q_proj", "v_proj", "down_proj"], load, ids(),
                                          "FP8 --dtype bf16 against PEFT's merge")
