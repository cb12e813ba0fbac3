"""`adapter convert to-gguf`: llama.cpp LoRA adapters read back by gguf-py (llama.cpp's own Python
package) give, by llama.cpp's rule (every module scaled by adapter.lora.alpha / r, r = lora_b's
ne[0]), the update PEFT applies — rsLoRA, rank_pattern and alpha_pattern included — with q and k
rows in the order convert_hf_to_gguf.py writes LLaMA weights, and MoSLoRA mixers folded in.
"""
import json

import gguf
import numpy as np
import peft
import torch
import transformers as T
from safetensors.numpy import load_file

from interop import ADAPTERS, MODELS, adapter

BASE = MODELS / "tiny-llama"
LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute, on numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_updates(path):
    """{gguf weight name: alpha / r · B·A} by llama.cpp's rule, from the file as gguf-py reads it."""
    r = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    alpha = float(fields["adapter.lora.alpha"].contents())
    assert fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in r.tensors}
    out = {}
    for name in t:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            a, b = t[name], t[base + ".lora_b"]
            rank = b.shape[1]  # lora_b is GGML [r, out]: numpy [out, r]
            out[base] = (alpha / rank if alpha else 1.0) * (b @ a)
    return out


def gguf_name(module):
    parts = module.split(".")
    i = parts.index("layers")
    return f"blk.{parts[i + 1]}.{LEAVES[parts[i + 2] + '.' + parts[i + 3]]}.weight"


def expected_in_gguf_order(name, delta, config):
    if name.endswith("attn_q.weight"):
        return llama_permute(delta, config["num_attention_heads"], config["num_attention_heads"])
    if name.endswith("attn_k.weight"):
        return llama_permute(delta, config["num_attention_heads"], config["num_key_value_heads"])
    return delta


def test_rslora_and_patterns_give_the_update_peft_applies(tmp_path):
    config = json.loads((BASE / "config.json").read_text())
    model = T.AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 16},
                          init_lora_weights=False, target_modules=list(k.split(".")[1] for k in LEAVES))
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "lora"))
    out = tmp_path / "lora.gguf"
    adapter("convert", "to-gguf", "--quiet", tmp_path / "lora", out, "--base", BASE)
    ours = gguf_updates(out)
    checked = 0
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and hasattr(module, "get_delta_weight"):
            g = gguf_name(name)
            want = expected_in_gguf_order(g, module.get_delta_weight("default").detach().double().numpy(), config)
            # PEFT computes its delta in Float32: agreement to its rounding.
            assert np.allclose(ours[g], want, rtol=1e-6, atol=1e-6 * np.abs(want).max()), g
            checked += 1
    assert checked == len(ours) == 2 * 7


def test_moslora_mixer_is_folded_into_lora_a(tmp_path):
    """The original MoSLoRA code's adapter (lora_AB): each module's update s·B·M·A, computed here
    from its tensors, is what llama.cpp applies from our file."""
    config = json.loads((BASE / "config.json").read_text())
    source = ADAPTERS / "moslora-original"
    cfg = json.loads((source / "adapter_config.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(source / "adapter_model.safetensors")).items()}
    out = tmp_path / "moslora.gguf"
    adapter("convert", "to-gguf", "--quiet", source, out, "--base", BASE)
    ours = gguf_updates(out)
    assert ours
    for k in t:
        if not k.endswith(".lora_A.weight"):
            continue
        module = k[: -len(".lora_A.weight")]
        a, b = t[k], t[module + ".lora_B.weight"]
        m = t.get(module + ".lora_AB.weight", np.eye(a.shape[0]))
        delta = cfg["lora_alpha"] / cfg["r"] * (b @ m @ a)
        g = gguf_name(module)
        assert np.allclose(ours[g], expected_in_gguf_order(g, delta, config), rtol=1e-5, atol=1e-7), g


def f32_copy(source, target, add=None):
    """`source` (a GGUF model) rewritten by gguf-py with every tensor in F32, plus `add[name]`
    (numpy, in GGUF order) where given."""
    r = gguf.GGUFReader(str(source))
    w = gguf.GGUFWriter(str(target), arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        value = f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, value)
        else:
            w.add_key_value(f.name, value, f.types[0])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape([int(d) for d in reversed(t.shape)])
        if add and t.name in add:
            x = x + add[t.name]
        w.add_tensor(t.name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_applies_our_lora_as_the_merged_update(tmp_path):
    """llama.cpp itself (llama-cpp-python) runs the base with our LoRA GGUF and gives the logits of
    the same base with the update (s·B·A per PEFT's rules, rsLoRA and patterns included, q/k rows
    permuted) added to its weights by gguf-py."""
    import llama_cpp
    from safetensors.numpy import save_file

    source = MODELS.parent / "gguf" / "tiny-llama.gguf"
    reader = gguf.GGUFReader(str(source))
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    rng = np.random.default_rng(4)
    r, alpha = 4, 8.0
    ranks = {"v_proj": 2}
    tensors, updates = {}, {}
    for leaf, g in LEAVES.items():
        out, inp = shapes[f"blk.0.{g}.weight"]
        rank = ranks.get(leaf.split(".")[1], r)
        a = (rng.standard_normal((rank, inp)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((out, rank)) * 0.3).astype(np.float32)
        module = f"base_model.model.model.layers.0.{leaf}"
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = a, b
        s = alpha / np.sqrt(rank)  # use_rslora
        delta = s * (b.astype(np.float64) @ a.astype(np.float64))
        updates[f"blk.0.{g}.weight"] = llama_permute(delta, heads, heads if g == "attn_q" else kv) if g in ("attn_q", "attn_k") else delta
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": True,
                                                            "rank_pattern": ranks, "target_modules": [k.split(".")[1] for k in LEAVES]}))
    base, merged, lora = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    f32_copy(source, base)
    f32_copy(source, merged, add=updates)
    adapter("convert", "to-gguf", "--quiet", folder, lora, "--base", base)

    def logits(model, **kw):
        m = llama_cpp.Llama(model_path=str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **kw)
        m.eval([1, 5, 9, 13, 17, 21])
        return np.array(m.scores[:6], dtype=np.float64)

    got, want, before = logits(base, lora_path=str(lora)), logits(merged), logits(base)
    effect = np.abs(want - before).max()
    assert effect > 1e-2, f"the update moves the logits by only {effect}"
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-3 * effect, (np.abs(got - want).max(), effect)
