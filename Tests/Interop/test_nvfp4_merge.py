"""Merges into NVFP4 bases (compressed-tensors `nvfp4-pack-quantized`) load in transformers 5.

Fixtures/models/tiny-nvfp4 was quantized and compressed by compressed-tensors itself;
Fixtures/adapters/nvfp4-lora is a LoRA with a MoSLoRA module; Fixtures/expected/nvfp4 holds the
reference of Fixtures/make_fp4_fixtures.py.
"""
import numpy as np
import torch
import transformers as T
from safetensors import safe_open

from interop import ADAPTERS, MODELS, adapter, assert_dequantized_merge_matches_peft, assert_logits_match

BASE = MODELS / "tiny-nvfp4"
REFERENCE = MODELS.parent / "expected" / "nvfp4" / "tiny-nvfp4+nvfp4-lora.safetensors"
TOUCHED = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]


def load(folder, **kwargs):
    model, info = T.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, local_files_only=True, **kwargs)
    # compressed-tensors' dequantized load has no use for the activation scales it reads.
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("input_global_scale")]
    assert not unexpected and not info.get("missing_keys") and not info.get("mismatched_keys"), f"{folder}: {info}"
    return model.eval()


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def decompress(parts):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    c = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    return c.decompress(parts, preset_name_to_scheme("NVFP4", ["Linear"]))["weight"]


def ids():
    return torch.arange(32).reshape(2, 16) % 64


def test_requantized_nvfp4_is_decompressed_by_compressed_tensors_as_the_reference(tmp_path):
    """transformers (through compressed-tensors, decompressing on a CPU) loads our NVFP4 output;
    each merged weight is compressed-tensors' decompression of our codes and scales, which are
    the reference's nearly everywhere, and nearer the exact merge than the base was."""
    out = tmp_path / "merged"
    adapter("merge", "--quiet", BASE, ADAPTERS / "nvfp4-lora", out)
    model = load(out, quantization_config=T.CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16)
    ours, ref = tensors(out / "model.safetensors"), tensors(REFERENCE)
    sd = model.state_dict()
    for m in TOUCHED:
        got = sd[m + ".weight"]
        parts = {x: ours[f"{m}.{x}"] for x in ("weight_packed", "weight_scale", "weight_global_scale")}
        assert torch.equal(got.view(torch.int16), decompress(parts).view(torch.int16)), m
        want = decompress({"weight_packed": ref[m + ".weight_packed"], "weight_scale": ref[m + ".weight_scale"].view(torch.float8_e4m3fn),
                           "weight_global_scale": ours[m + ".weight_global_scale"]})
        assert (got == want).double().mean() >= 0.99, m
        merged, base = ref[m + ".merged"].double(), ref[m + ".base"].double()
        assert (got.double() - merged).norm() < (base - merged).norm(), m


def test_dequantized_merge_loads_in_plain_transformers_with_the_reference_logits(tmp_path):
    """--dtype bf16: a plain bf16 model (no quantization_config, `X.weight` where the base had
    `X.weight_packed`) whose logits are those of the Float64 reference merge rounded once to bf16."""
    out = tmp_path / "bf16"
    adapter("merge", "--quiet", "--dtype", "bf16", BASE, ADAPTERS / "nvfp4-lora", out)
    assert "quantization_config" not in (out / "config.json").read_text()
    ours = load(out, dtype=torch.float32)
    ref = tensors(REFERENCE)
    base = {k[: -len(".base")] + ".weight": v.to(torch.bfloat16).float() for k, v in ref.items() if k.endswith(".base")}
    merged = dict(base)
    merged.update({m + ".weight": ref[m + ".merged"].to(torch.bfloat16).float() for m in TOUCHED})

    def model_with(weights):
        m = load(out, dtype=torch.float32)
        sd = m.state_dict()
        sd.update(weights)
        m.load_state_dict(sd)
        return m

    with torch.no_grad():
        got = ours(input_ids=ids()).logits
        want = model_with(merged)(input_ids=ids()).logits
        before = model_with(base)(input_ids=ids()).logits
    assert_logits_match(got, want, before, "dequantized NVFP4 merge", rtol=1e-5, update_rtol=0.01)



def test_dequantized_nvfp4_merge_of_a_peft_adapter_gives_peft_merged_logits(tmp_path):
    """A PEFT LoRA made here on the dequantized NVFP4 model: `adapter merge --dtype bf16` gives the
    logits of PEFT's own merge_and_unload on that model."""
    model = load(BASE, quantization_config=T.CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    assert_dequantized_merge_matches_peft(tmp_path, BASE, model, ["q_proj", "v_proj", "down_proj"], load, ids(),
                                          "NVFP4 --dtype bf16 against PEFT's merge")
