"""`convert to-mlx` outputs, applied the way mlx-lm applies them, give the adapter's logits.

mlx does not run here (it is not in the pinned environment, and mlx-lm's LoRA needs mlx), so this
is the one place the tier re-implements a client, from mlx-lm's `mlx_lm/tuner`: `load_adapters`
reads adapter_config.json, wraps every linear whose name ends in one of
`lora_parameters.keys` in the last `num_layers` layers with LoRALinear (rank, scale from
`lora_parameters`), then loads adapters.safetensors with strict=False, so a wrapped module
without weights keeps its random init; LoRALinear computes
`linear(x) + scale · (x @ lora_a) @ lora_b` with lora_a (in, r) and lora_b (r, out).
The same forward is applied here to the transformers model with hooks; the reference is stock
PEFT's forward of the input adapter (real-lora), or our merge where PEFT cannot load the input.
"""
import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from interop import ADAPTERS, adapter, assert_logits_match, load_causal_lm, logits


def apply_like_mlx_lm(model, folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg.get("fine_tune_type", "lora") == "lora", cfg.get("fine_tune_type")
    params = cfg["lora_parameters"]
    rank, scale, keys = params["rank"], float(params["scale"]), params["keys"]
    weights = load_file(folder / "adapters.safetensors")
    n_layers = model.config.num_hidden_layers
    first = 0 if cfg["num_layers"] in (-1, None) else n_layers - cfg["num_layers"]
    wrapped = {}
    for name, module in model.named_modules():
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not (m and isinstance(module, torch.nn.Linear) and int(m.group(1)) >= first
                and any(m.group(2) == k or m.group(2).endswith("." + k) for k in keys)):
            continue
        a, b = weights.get(f"{name}.lora_a"), weights.get(f"{name}.lora_b")
        assert a is not None and b is not None, f"mlx-lm would wrap {name} but the file has no weights for it"
        assert a.shape == (module.in_features, rank) and b.shape == (rank, module.out_features), (name, a.shape, b.shape)
        a, b = a.float(), b.float()
        module.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scale * ((inp[0] @ a) @ b))
        wrapped[name] = True
    stray = {k.rsplit(".", 1)[0] for k in weights} - set(wrapped)
    assert not stray, f"weights for modules mlx-lm would not wrap: {sorted(stray)[:5]}"
    return model


@pytest.fixture(scope="module")
def base_logits(f32_llama_dir):
    return logits(load_causal_lm(f32_llama_dir))


def test_to_mlx_of_real_lora_gives_pefts_logits(tmp_path, f32_llama_dir, base_logits):
    adapter("convert", "to-mlx", ADAPTERS / "real-lora", tmp_path / "mlx")
    got = logits(apply_like_mlx_lm(load_causal_lm(f32_llama_dir), tmp_path / "mlx"))
    want = logits(PeftModel.from_pretrained(load_causal_lm(f32_llama_dir), str(ADAPTERS / "real-lora")).eval())
    assert_logits_match(got, want, base_logits, "to-mlx of real-lora, applied as mlx-lm does, vs stock PEFT")


def test_to_mlx_of_moslora_gives_the_logits_of_our_merge(tmp_path, f32_llama_dir, merged, base_logits):
    adapter("convert", "to-mlx", ADAPTERS / "moslora-original", tmp_path / "mlx")
    got = logits(apply_like_mlx_lm(load_causal_lm(f32_llama_dir), tmp_path / "mlx"))
    want = logits(load_causal_lm(merged(ADAPTERS / "moslora-original")))
    assert_logits_match(got, want, base_logits, "to-mlx of moslora-original (mixer folded), as mlx-lm applies it")
