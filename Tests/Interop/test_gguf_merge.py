"""`adapter merge BASE.gguf ADAPTER OUT.gguf`: merged tensors keep their GGML type (requantized by
ggml's reference quantizer, as gguf-py reproduces it) or take --dtype's; llama.cpp runs the result
with the logits of the base with the update added.
"""
import json

import gguf
import numpy as np
from safetensors.numpy import save_file

from interop import MODELS, adapter
from test_gguf_adapter import LEAVES, f32_copy, llama_permute

SOURCE = MODELS.parent / "gguf" / "tiny-llama.gguf"


def make_adapter(folder, rng):
    """A PEFT LoRA (HF names) for the fixture's shapes, r 4, alpha 8; its updates in GGUF order."""
    r = gguf.GGUFReader(str(SOURCE))
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in r.tensors}
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv = int(r.fields["llama.attention.head_count_kv"].contents())
    tensors, updates = {}, {}
    for leaf, g in LEAVES.items():
        out, inp = shapes[f"blk.0.{g}.weight"]
        a = (rng.standard_normal((4, inp)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((out, 4)) * 0.3).astype(np.float32)
        tensors[f"base_model.model.model.layers.0.{leaf}.lora_A.weight"] = a
        tensors[f"base_model.model.model.layers.0.{leaf}.lora_B.weight"] = b
        delta = 2.0 * (b.astype(np.float64) @ a.astype(np.float64))
        if g in ("attn_q", "attn_k"):
            delta = llama_permute(delta, heads, heads if g == "attn_q" else kv)
        updates[f"blk.0.{g}.weight"] = delta
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": [k.split(".")[1] for k in LEAVES]}))
    return updates


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_merged_q8_0_tensors_are_the_reference_quantizers_bytes(tmp_path):
    updates = make_adapter(tmp_path / "lora", np.random.default_rng(5))
    out = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", SOURCE, tmp_path / "lora", out)
    base, ours = tensors(SOURCE), tensors(out)
    assert [t for t in base] == [t for t in ours]
    for name, t in ours.items():
        b = base[name]
        assert t.tensor_type == b.tensor_type, name
        if name not in updates:
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), name
            continue
        w = gguf.quants.dequantize(b.data, b.tensor_type).astype(np.float64)
        merged = (w + updates[name]).astype(np.float32)
        want = gguf.quants.quantize(merged, b.tensor_type)
        got = np.asarray(t.data).view(np.uint8)
        same = (got == want.view(np.uint8)).mean()
        # Float32 accumulation against numpy's Float64 sum may round a value across a step.
        assert same >= 0.99, (name, same)


def test_dequantized_merge_runs_in_llama_cpp_with_the_merged_logits(tmp_path):
    import llama_cpp
    updates = make_adapter(tmp_path / "lora", np.random.default_rng(6))
    out = tmp_path / "merged-f16.gguf"
    adapter("merge", "--quiet", "--dtype", "f16", SOURCE, tmp_path / "lora", out)
    ours = tensors(out)
    for name, delta in updates.items():
        assert ours[name].tensor_type == gguf.GGMLQuantizationType.F16, name
    reference = tmp_path / "reference.gguf"
    f32_copy(SOURCE, reference, add=updates)
    unmerged = tmp_path / "base.gguf"
    f32_copy(SOURCE, unmerged)

    def logits(model):
        m = llama_cpp.Llama(model_path=str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        m.eval([1, 5, 9, 13, 17, 21])
        return np.array(m.scores[:6], dtype=np.float64)

    got, want, before = logits(out), logits(reference), logits(unmerged)
    effect = np.abs(want - before).max()
    assert effect > 1e-2
    # F16 weights against F32 ones: the difference is F16 rounding of W + Δ, a small part of the update.
    assert np.abs(got - want).max() <= 0.02 * effect, (np.abs(got - want).max(), effect)
