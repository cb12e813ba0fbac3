"""End to end with llama.cpp: a Hugging Face LLaMA (Fixtures/models/tiny-llama-64) and its GGUF
conversions by llama.cpp's own convert_hf_to_gguf.py. A PEFT adapter made here on the HF model
(rsLoRA, rank_pattern, alpha_pattern) is merged into the GGUF by `adapter merge`, and written as a
llama.cpp LoRA by `adapter convert to-gguf`; llama.cpp (llama-cpp-python) runs both and gives the
logits transformers gives for PEFT's own merge_and_unload of the HF model.
"""
import numpy as np
import peft
import pytest
import torch
import transformers as T

from interop import MODELS, adapter

HF = MODELS / "tiny-llama-64"
GGUF = MODELS.parent / "gguf"
IDS = [1, 9, 42, 32, 17, 5, 23, 11]


def peft_adapter(folder, hf=HF):
    model = T.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        before = model(torch.tensor([IDS])).logits[0].double().numpy()
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 16}, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(folder))
    with torch.no_grad():
        merged = pm.merge_and_unload()(torch.tensor([IDS])).logits[0].double().numpy()
    return before, merged


def llama_logits(path, **kw):
    import llama_cpp
    m = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **kw)
    m.eval(IDS)
    return np.array(m.scores[:len(IDS)], dtype=np.float64)


def test_merge_and_lora_in_llama_cpp_give_transformers_logits_of_the_peft_merge(tmp_path):
    before, want = peft_adapter(tmp_path / "lora")
    effect = np.abs(want - before).max()
    assert effect > 0.1
    base = GGUF / "tiny-llama-64-f32.gguf"
    # llama.cpp and transformers agree on the base itself to this much: the yardstick.
    floor = np.abs(llama_logits(base) - before).max()
    assert floor < 1e-3
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    lora = tmp_path / "lora.gguf"
    adapter("convert", "to-gguf", "--quiet", tmp_path / "lora", lora, "--base", HF)
    for what, got in (("merged GGUF", llama_logits(merged)), ("base + LoRA GGUF", llama_logits(base, lora_path=str(lora)))):
        err = np.abs(got - want).max()
        # Float32 kernels of two libraries: their difference grows with the activations, so the
        # bound is the base's own difference plus a thousandth of what the update moves.
        assert err <= 3 * floor + 1e-3 * effect, f"{what}: max |Δlogit| {err:.3g} (llama.cpp vs transformers on the base: {floor:.3g}; update {effect:.3g})"


def test_merge_into_the_q8_0_conversion_keeps_q8_0_and_the_update(tmp_path):
    before, want = peft_adapter(tmp_path / "lora")
    base = GGUF / "tiny-llama-64-q8_0.gguf"
    merged = tmp_path / "merged-q8_0.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    got, unmerged = llama_logits(merged), llama_logits(base)
    # Q8_0 rounds the weights: what remains is the base's own quantization error, not the update.
    quantization = np.abs(unmerged - before).max()
    err = np.abs(got - want).max()
    # The merged weights are requantized: their Q8_0 error is of the base's size, not the update's.
    assert err <= 3 * quantization + 1e-3 * np.abs(want - before).max(), (err, quantization)
    assert np.abs(got - unmerged).max() > 10 * err


def quantize_q4_k_m(source, target):
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


def test_merge_into_a_file_llama_cpp_quantized_itself(tmp_path):
    """llama.cpp's own quantizer (llama_model_quantize, Q4_K_M; at hidden 64 it falls back to Q5_0 and
    Q8_0, as it says) makes the base: the merge keeps every tensor's type, and llama.cpp runs the
    result with the logits of transformers on PEFT's merge, within the quantization's own error."""
    import gguf
    before, want = peft_adapter(tmp_path / "lora")
    base = tmp_path / "q4_k_m.gguf"
    quantize_q4_k_m(GGUF / "tiny-llama-64-f32.gguf", base)
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    ours = {t.name: t for t in gguf.GGUFReader(str(merged)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    assert {k: v.tensor_type for k, v in ours.items()} == {k: v.tensor_type for k, v in theirs.items()}
    got, unmerged = llama_logits(merged), llama_logits(base)
    quantization = np.abs(unmerged - before).max()
    err = np.abs(got - want).max()
    assert err <= 3 * quantization + 1e-3 * np.abs(want - before).max(), (err, quantization)
    assert np.abs(got - unmerged).max() > 10 * err


def test_expert_merge_in_llama_cpp_gives_transformers_logits_of_the_peft_merge(tmp_path):
    """A Mixtral converted by convert_hf_to_gguf.py (experts stacked into blk.0.ffn_*_exps): a PEFT
    adapter with target_parameters on both expert parameters, made here on the HF model, merged
    into the GGUF — and written as a llama.cpp LoRA with 3-D expert pairs — runs in llama.cpp with
    the logits transformers gives for PEFT's merge."""
    hf = MODELS / "tiny-mixtral-gguf"
    model = T.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        before = model(torch.tensor([IDS])).logits[0].double().numpy()
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "lora"))
    with torch.no_grad():
        want = pm.merge_and_unload()(torch.tensor([IDS])).logits[0].double().numpy()
    base = GGUF / "tiny-mixtral-gguf-f32.gguf"
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    floor = np.abs(llama_logits(base) - before).max()
    effect = np.abs(want - before).max()
    lora = tmp_path / "lora.gguf"
    adapter("convert", "to-gguf", "--quiet", tmp_path / "lora", lora, "--base", base)
    assert effect > 0.1 and floor < 1e-3
    for what, got in (("merged", llama_logits(merged)), ("LoRA", llama_logits(base, lora_path=str(lora)))):
        err = np.abs(got - want).max()
        assert err <= 3 * floor + 1e-3 * effect, (what, err, floor, effect)


def test_k_quant_base_at_width_256_merged_and_with_the_lora_in_llama_cpp(tmp_path):
    """tiny-llama-256 (rows of 256: llama.cpp's Q4_K_M really quantizes it in Q4_K and Q6_K): the
    merge keeps every K-quant type, and llama.cpp runs it, and the F16 base with our LoRA GGUF, and
    the Q4_K_M base with it, with transformers' logits of PEFT's merge within each file's own error."""
    import gguf
    hf = MODELS / "tiny-llama-256"
    before, want = peft_adapter(tmp_path / "lora", hf=hf)
    effect = np.abs(want - before).max()
    f16 = GGUF / "tiny-llama-256-f16.gguf"
    base = tmp_path / "q4_k_m.gguf"
    quantize_q4_k_m(f16, base)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(base)).tensors}
    Q = gguf.GGMLQuantizationType
    assert {types[f"blk.0.{g}.weight"] for g in ("attn_q", "attn_k", "ffn_gate", "ffn_up")} == {Q.Q4_K}, types
    assert Q.Q6_K in types.values(), types
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(str(merged)).tensors} == types
    lora = tmp_path / "lora.gguf"
    adapter("convert", "to-gguf", "--quiet", tmp_path / "lora", lora, "--base", f16)
    floor = np.abs(llama_logits(f16) - before).max()
    quantization = np.abs(llama_logits(base) - before).max()
    assert effect > 0.1 and floor < 0.02 and quantization > floor
    for what, got, error in (("merged Q4_K_M", llama_logits(merged), quantization),
                             ("F16 + LoRA", llama_logits(f16, lora_path=str(lora)), floor),
                             ("Q4_K_M + LoRA", llama_logits(base, lora_path=str(lora)), quantization)):
        err = np.abs(got - want).max()
        # What remains is the base's own rounding (F16, or Q4_K of W + ΔW), not the update.
        assert err <= 3 * error + 1e-3 * effect, f"{what}: max |Δlogit| {err:.3g} (the base's own error {error:.3g}; update {effect:.3g})"


@pytest.mark.parametrize("name", ["tiny-qwen2-gguf", "tiny-qwen3-gguf"])
def test_qwen_conversions_merged_and_with_the_lora_in_llama_cpp(tmp_path, name):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim apart from hidden / heads) converted by
    convert_hf_to_gguf.py, which keeps their q and k rows in HF order: our names and (no)
    permutation give llama.cpp the logits of PEFT's merge, merged and as a LoRA (with the GGUF and
    with the HF folder as --base)."""
    hf = MODELS / name
    before, want = peft_adapter(tmp_path / "lora", hf=hf)
    effect = np.abs(want - before).max()
    base = GGUF / f"{name}-f32.gguf"
    floor = np.abs(llama_logits(base) - before).max()
    assert effect > 0.1 and floor < 1e-3
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, tmp_path / "lora", merged)
    runs = [("merged", llama_logits(merged))]
    for which, b in (("gguf", base), ("hf", hf)):
        lora = tmp_path / f"lora-{which}.gguf"
        adapter("convert", "to-gguf", "--quiet", tmp_path / "lora", lora, "--base", b)
        runs.append((f"LoRA (--base {which})", llama_logits(base, lora_path=str(lora))))
    for what, got in runs:
        err = np.abs(got - want).max()
        assert err <= 3 * floor + 1e-3 * effect, f"{what}: max |Δlogit| {err:.3g} (base {floor:.3g}; update {effect:.3g})"


def test_per_expert_modules_stacked_for_llama_cpp(tmp_path):
    """A per-expert Mixtral adapter (`block_sparse_moe.experts.N.w1/w2/w3`, as PEFT made them before
    transformers fused the experts; written here by numpy, with a rank_pattern, an alpha_pattern and
    an expert left out): `convert to-gguf` stacks it into llama.cpp's 3-D expert pairs (with the
    GGUF and with the HF folder as --base) and `merge` adds it to the stacked tensors; llama.cpp
    gives the logits transformers gives with each update added to its expert's rows by hand."""
    import json

    from safetensors.numpy import save_file
    hf = MODELS / "tiny-mixtral-gguf"
    model = T.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        before = model(torch.tensor([IDS])).logits[0].double().numpy()
    rng = np.random.default_rng(11)
    experts = model.model.layers[0].mlp.experts
    ffn = experts.down_proj.shape[2]
    tensors = {}
    ranks = {"experts.1.w1": 3}
    alphas = {"experts.2.w2": 8.0}
    with torch.no_grad():
        for e in (0, 1, 2):
            for leaf in ("w1", "w2", "w3"):
                key = f"experts.{e}.{leaf}"
                r = ranks.get(key, 2)
                param = experts.down_proj if leaf == "w2" else experts.gate_up_proj
                out, inp = (param.shape[1], param.shape[2]) if leaf == "w2" else (ffn, param.shape[2])
                a = (rng.standard_normal((r, inp)) * 0.3).astype(np.float32)
                b = (rng.standard_normal((out, r)) * 0.3).astype(np.float32)
                stem = f"base_model.model.model.layers.0.block_sparse_moe.{key}"
                tensors[stem + ".lora_A.weight"], tensors[stem + ".lora_B.weight"] = a, b
                delta = alphas.get(key, 4.0) / r * (b.astype(np.float64) @ a.astype(np.float64))
                rows = {"w1": slice(0, ffn), "w3": slice(ffn, 2 * ffn), "w2": slice(None)}[leaf]
                w = param[e][rows].double().numpy() + delta
                param[e][rows] = torch.from_numpy(w.astype(np.float32))
        want = model(torch.tensor([IDS])).logits[0].double().numpy()
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": ranks,
                                                            "alpha_pattern": alphas, "target_modules": ["w1", "w2", "w3"]}))
    base = GGUF / "tiny-mixtral-gguf-f32.gguf"
    floor = np.abs(llama_logits(base) - before).max()
    effect = np.abs(want - before).max()
    assert effect > 0.1 and floor < 1e-3
    merged = tmp_path / "merged.gguf"
    adapter("merge", "--quiet", base, folder, merged)
    runs = [("merged", llama_logits(merged))]
    for which, b in (("gguf", base), ("hf", hf)):
        lora = tmp_path / f"lora-{which}.gguf"
        adapter("convert", "to-gguf", "--quiet", folder, lora, "--base", b)
        runs.append((f"LoRA (--base {which})", llama_logits(base, lora_path=str(lora))))
    for what, got in runs:
        err = np.abs(got - want).max()
        assert err <= 3 * floor + 1e-3 * effect, f"{what}: max |Δlogit| {err:.3g} (base {floor:.3g}; update {effect:.3g})"
