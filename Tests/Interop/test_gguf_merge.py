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


def make_adapter(folder, rng, source=SOURCE, scale=0.3):
    """A PEFT LoRA (HF names) for the shapes of the GGUF `source`, r 4, alpha 8, factors
    N(0, scale); its updates in GGUF order (q/k rows permuted as the base's)."""
    r = gguf.GGUFReader(str(source))
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in r.tensors}
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv = int(r.fields["llama.attention.head_count_kv"].contents())
    tensors, updates = {}, {}
    for leaf, g in LEAVES.items():
        out, inp = shapes[f"blk.0.{g}.weight"]
        a = (rng.standard_normal((4, inp)) * scale).astype(np.float32)
        b = (rng.standard_normal((out, 4)) * scale).astype(np.float32)
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


def test_merges_into_k_quant_tensors_requantize_as_llama_cpp_does(tmp_path):
    """A Q4_K_M-style base (Q4_K projections, Q6_K ffn_down, quantized by llama.cpp's own ggml):
    the merged tensors keep their types and are, block for block, what ggml's reference quantizer
    makes of W + ΔW."""
    import ctypes
    import glob
    import os

    import llama_cpp
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))[0])

    def ggml_quantize(x, qtype):
        name = qtype.name.lower().replace("_k", "_K")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        x = np.ascontiguousarray(x, dtype=np.float32)
        q = np.zeros(x.size // block * size, dtype=np.uint8)
        f = getattr(lib, f"quantize_row_{name}_ref")
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        f(x.ctypes.data, q.ctypes.data, x.size)
        return q.reshape(x.shape[0], -1)

    rng = np.random.default_rng(9)
    h, ffn = 256, 512
    types = {"attn_q": gguf.GGMLQuantizationType.Q4_K, "attn_k": gguf.GGMLQuantizationType.Q4_K,
             "attn_v": gguf.GGMLQuantizationType.Q5_K, "attn_output": gguf.GGMLQuantizationType.Q4_K,
             "ffn_gate": gguf.GGMLQuantizationType.Q4_K, "ffn_up": gguf.GGMLQuantizationType.Q4_K, "ffn_down": gguf.GGMLQuantizationType.Q6_K}
    shapes = {"attn_q": (h, h), "attn_k": (128, h), "attn_v": (128, h), "attn_output": (h, h), "ffn_gate": (ffn, h), "ffn_up": (ffn, h),
              "ffn_down": (h, ffn)}
    base = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(base), arch="llama")
    w.add_block_count(1)
    w.add_embedding_length(h)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    decoded = {}
    for g, shape in shapes.items():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        q = ggml_quantize(x, types[g])
        w.add_tensor(f"blk.0.{g}.weight", q, raw_dtype=types[g])
        decoded[f"blk.0.{g}.weight"] = gguf.quants.dequantize(q, types[g])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    folder = tmp_path / "lora"
    updates = make_adapter(folder, rng, source=base, scale=0.2)
    out = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, folder, out)
    ours = tensors(out)
    for name, delta in updates.items():
        t = ours[name]
        qtype = types[name.split(".")[2]]
        assert t.tensor_type == qtype, name
        merged = (decoded[name].astype(np.float64) + delta).astype(np.float32)
        want = ggml_quantize(merged, qtype)
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        got = np.asarray(t.data).view(np.uint8).reshape(-1, size)
        same = (got == want.reshape(-1, size)).all(axis=1).mean()
        # Float32 accumulation against numpy's correctly rounded sum: an ulp can move a block's scale search.
        print(name, qtype.name, f"{same:.3f} of the blocks are ggml's")
        assert same >= 0.95, (name, same)
