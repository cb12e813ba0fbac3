#!/usr/bin/env python3
"""Mixture-of-Experts, fused and multimodal fixtures, written by real transformers and PEFT.

    pip install torch==2.* transformers==5.24.* peft==0.21.*    # only to regenerate
    python3 Fixtures/make_moe_fixtures.py

For each family a tiny random model (one layer, four experts, hidden size 16) is saved with
`save_pretrained` into Fixtures/models/tiny-<family>/ (so its tensor names are the ones
transformers 5 writes to disk: per-expert 2-D for Qwen and Mixtral, fused [E, in, out] for
gpt-oss, `language_model.model.` for LLaVA, `model.` / `visual.` for Qwen2-VL). An adapter is made
with peft.get_peft_model (random non-zero factors, seeded) and saved into
Fixtures/adapters/moe-<case>/; PEFT's merge_and_unload() is saved with save_pretrained too, and
every tensor it changed goes into Fixtures/expected/moe/<case>.safetensors: the reference the
Swift tests compare `adapter merge` with. Adapters PEFT 0.21 cannot make any more (per-expert
modules of older PEFT, q/k/v modules onto Phi-3's fused qkv_proj) are written here key by key,
and their references computed independently in Float64 with numpy.
"""
import glob
import json
import os
import shutil
import tempfile

import numpy as np
import peft
import torch
import transformers as T
from safetensors import safe_open
from safetensors.numpy import save_file

MULTIMODAL = ("llava", "qwen2-vl", "qwen2.5-vl", "gemma3")
HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "moe")

TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, max_position_embeddings=32, intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def text(**kw):
    d = dict(TEXT)
    d.update(kw)
    return d


def build(family):
    """A tiny random model of `family` in float32."""
    torch.manual_seed(7)
    if family == "qwen3-moe":
        m = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**text(moe_intermediate_size=6, num_experts=4, num_experts_per_tok=2)))
    elif family == "qwen2-moe":
        t = text(moe_intermediate_size=6, shared_expert_intermediate_size=10, num_experts=4, num_experts_per_tok=2)
        t.pop("head_dim")
        m = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**t))
    elif family == "mixtral":
        m = T.MixtralForCausalLM(T.MixtralConfig(**text(intermediate_size=6, num_local_experts=4, num_experts_per_tok=2)))
    elif family == "gpt-oss":
        m = T.GptOssForCausalLM(T.GptOssConfig(**text(intermediate_size=6, num_local_experts=4, num_experts_per_tok=2,
                                                      layer_types=["full_attention"])))
    elif family == "deepseek-v3":
        t = text(num_hidden_layers=2, num_key_value_heads=2, moe_intermediate_size=6, n_routed_experts=4, n_shared_experts=1,
                 num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                 qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
        t.pop("head_dim")
        m = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**t))
    elif family == "llama4":
        m = T.Llama4ForCausalLM(T.Llama4TextConfig(**text(intermediate_size=6, intermediate_size_mlp=24, num_local_experts=4,
                                                         num_experts_per_tok=1, moe_layers=[0])))
    elif family == "phi3":
        t = text(num_key_value_heads=2)
        t.pop("head_dim")
        m = T.Phi3ForCausalLM(T.Phi3Config(**t))
    elif family == "llava":
        vision = T.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=16, patch_size=8)
        m = T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=T.LlamaConfig(**text()).to_dict(),
                                                          vision_config=vision.to_dict(), image_token_index=63))
    elif family == "gemma3":
        m = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
            text_config=text(), vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=16, patch_size=8), mm_tokens_per_image=4, image_token_index=63))
    elif family == "qwen2.5-vl":
        t = text(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        t.pop("head_dim")
        m = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
            text_config=t, vision_config=dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=24, num_heads=2,
                                              patch_size=2, spatial_merge_size=1, temporal_patch_size=1, in_channels=3,
                                              fullatt_block_indexes=[0], window_size=4),
            image_token_id=63, video_token_id=62, vision_start_token_id=61))
    elif family == "qwen2-vl":
        t = text(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        t.pop("head_dim")
        m = T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
            text_config=t, vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                                              spatial_merge_size=1, temporal_patch_size=1, in_channels=3),
            image_token_id=63, video_token_id=62, vision_start_token_id=61))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for p in m.parameters():  # routers and experts of random models start at zero in places
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return m.to(torch.float32).eval()


def disk_tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, "np") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def save_base(family):
    folder = os.path.join(MODELS, f"tiny-{family}")
    shutil.rmtree(folder, ignore_errors=True)
    build(family).save_pretrained(folder)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    return folder


def peft_case(case, family, config, seed=11):
    """An adapter made by PEFT on `family`, and every tensor its merge changes on disk."""
    base = disk_tensors(os.path.join(MODELS, f"tiny-{family}"))
    model = T.AutoModelForImageTextToText if family in MULTIMODAL else T.AutoModelForCausalLM
    m = model.from_pretrained(os.path.join(MODELS, f"tiny-{family}"), dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(m, config)
    for n, p in pm.named_parameters():
        if "modules_to_save" in n:  # a replacement equal to the base would prove nothing
            with torch.no_grad():
                p.add_(0.01 * torch.randn_like(p))
    folder = os.path.join(ADAPTERS, f"moe-{case}")
    shutil.rmtree(folder, ignore_errors=True)
    pm.save_pretrained(folder)
    os.remove(os.path.join(folder, "README.md"))
    # The config names the base by the path it was loaded from: keep the fixture's name only.
    config_path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = f"tiny-{family}"
    json.dump(config, open(config_path, "w"), indent=2, sort_keys=True)
    merged = pm.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        after = disk_tensors(tmp)
    assert set(after) == set(base), (case, set(after) ^ set(base))
    changed = {k: v.astype(np.float32) for k, v in after.items() if not np.array_equal(v, base[k])}
    assert changed, case
    os.makedirs(EXPECTED, exist_ok=True)
    save_file(changed, os.path.join(EXPECTED, f"{case}.safetensors"),
              metadata={"peft": peft.__version__, "transformers": T.__version__, "base": f"tiny-{family}"})
    print(f"{case}: {len(changed)} tensors changed by PEFT {peft.__version__}")


def handmade_case(case, family, modules, r=2, alpha=4.0, fused_base=None):
    """A per-module PEFT adapter written key by key; the reference is numpy Float64.

    `modules`: module name (model terms) → (base tensor, rows or None, columns or None, out, in,
    transposed): where in the base the update lands. With
    `fused_base`, the base is that folder instead of the family's."""
    rng = np.random.default_rng(5)
    folder = os.path.join(ADAPTERS, f"moe-{case}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    base_folder = fused_base or os.path.join(MODELS, f"tiny-{family}")
    base = disk_tensors(base_folder)
    tensors, delta = {}, {}
    for name, (target, rows, cols_of, out, inp, transposed) in modules.items():
        a = rng.standard_normal((r, inp)).astype(np.float32) * 0.5
        b = rng.standard_normal((out, r)).astype(np.float32) * 0.5
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        d = (alpha / r) * (b.astype(np.float64) @ a.astype(np.float64))
        w = delta.setdefault(target, base[target].astype(np.float64).copy())
        view = w.reshape(-1, w.shape[-1])
        if transposed:
            d = d.T
        sel = view[rows] if rows is not None else view
        if cols_of is not None:
            sel[:, cols_of] += d
        else:
            sel += d
        if rows is not None:
            view[rows] = sel
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    targets = sorted({n.split(".")[-1] for n in modules})
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "task_type": "CAUSAL_LM",
               "base_model_name_or_path": None}, open(os.path.join(folder, "adapter_config.json"), "w"), indent=2)
    save_file({k: v.astype(np.float32) for k, v in delta.items()}, os.path.join(EXPECTED, f"{case}.safetensors"),
              metadata={"reference": "numpy float64", "base": os.path.basename(base_folder)})
    print(f"{case}: {len(delta)} tensors changed (numpy reference)")


def fused(family, disk_prefix, names):
    """tiny-<family> with its experts fused as transformers holds them in memory ([E, 2I, H] with
    gate first, [E, H, I]) under `model.layers.0.mlp.experts`; `names` = (gate, up, down) on disk."""
    src = disk_tensors(os.path.join(MODELS, f"tiny-{family}"))
    out = {k: v for k, v in src.items() if ".experts." not in k}
    gate, up, down = names
    prefix = "model.layers.0.mlp.experts"
    out[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([src[f"{disk_prefix}.{e}.{gate}.weight"], src[f"{disk_prefix}.{e}.{up}.weight"]])
                                             for e in range(4)])
    out[f"{prefix}.down_proj"] = np.stack([src[f"{disk_prefix}.{e}.{down}.weight"] for e in range(4)])
    # Mixtral's router is renamed with its experts (block_sparse_moe.gate → mlp.gate).
    out = {k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in out.items()}
    folder = os.path.join(MODELS, f"tiny-{family}-fused")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(MODELS, f"tiny-{family}", "config.json"), folder)
    return folder


def main():
    for family in ("qwen3-moe", "qwen2-moe", "mixtral", "gpt-oss", "deepseek-v3", "llama4", "phi3", "llava", "qwen2-vl", "qwen2.5-vl", "gemma3"):
        save_base(family)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_case("qwen3-moe-params", "qwen3-moe", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=experts,
                                                               init_lora_weights=False))
    peft_case("mixtral-gate-up", "mixtral", peft.LoraConfig(r=3, lora_alpha=3, target_modules=[],
                                                            target_parameters=["mlp.experts.gate_up_proj"], init_lora_weights=False))
    peft_case("gpt-oss-params", "gpt-oss", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=experts,
                                                           init_lora_weights=False))
    peft_case("qwen2-moe-shared", "qwen2-moe", peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["shared_expert.gate_proj", "shared_expert.down_proj"], target_parameters=["mlp.experts.down_proj"],
        use_rslora=True, init_lora_weights=False))
    peft_case("deepseek-v3-shared", "deepseek-v3", peft.LoraConfig(
        # PEFT 0.21 reads gate_proj / up_proj as the experts' fused gate_up_proj too (and refuses one without the other).
        r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "q_b_proj"], target_parameters=experts,
        init_lora_weights=False))
    peft_case("llama4-params", "llama4", peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "shared_expert.gate_proj"],
        target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"], init_lora_weights=False))
    peft_case("qwen2.5-vl", "qwen2.5-vl", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "qkv", "mlp.0", "up_proj"],
                                                          init_lora_weights=False))
    peft_case("gemma3", "gemma3", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "fc1"], init_lora_weights=False))
    peft_case("phi3-fused", "phi3", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights=False))
    peft_case("llava", "llava", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "linear_1"], init_lora_weights=False))
    peft_case("llava-lm-head", "llava", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                        init_lora_weights=False))
    peft_case("qwen2-vl", "qwen2-vl", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "qkv", "mlp.0"], init_lora_weights=False))

    # Older per-expert adapters (PEFT before target_parameters, trained on unfused experts).
    p, I, H = "model.layers.0.mlp.experts", 6, 16
    per_expert = {}
    for e in (0, 2):
        per_expert[f"{p}.{e}.gate_proj"] = (f"{p}.{e}.gate_proj.weight", None, None, I, H, False)
        per_expert[f"{p}.{e}.up_proj"] = (f"{p}.{e}.up_proj.weight", None, None, I, H, False)
        per_expert[f"{p}.{e}.down_proj"] = (f"{p}.{e}.down_proj.weight", None, None, H, I, False)
    handmade_case("qwen3-moe-per-expert", "qwen3-moe", per_expert)
    qwen_fused = fused("qwen3-moe", "model.layers.0.mlp.experts", ("gate_proj", "up_proj", "down_proj"))
    onto_fused = {}
    for e in (0, 2):
        onto_fused[f"{p}.{e}.gate_proj"] = (f"{p}.gate_up_proj", slice(e * 2 * I, e * 2 * I + I), None, I, H, False)
        onto_fused[f"{p}.{e}.up_proj"] = (f"{p}.gate_up_proj", slice(e * 2 * I + I, (e + 1) * 2 * I), None, I, H, False)
        onto_fused[f"{p}.{e}.down_proj"] = (f"{p}.down_proj", slice(e * H, (e + 1) * H), None, H, I, False)
    handmade_case("qwen3-moe-per-expert-fused", "qwen3-moe", onto_fused, fused_base=qwen_fused)
    # Per-expert modules onto gpt-oss's fused, transposed, interleaved experts: [E, H, 2I], gate = [..., ::2].
    onto_oss = {}
    for e in (1, 3):
        onto_oss[f"{p}.{e}.gate_proj"] = (f"{p}.gate_up_proj", slice(e * H, (e + 1) * H), slice(0, 2 * I, 2), I, H, True)
        onto_oss[f"{p}.{e}.up_proj"] = (f"{p}.gate_up_proj", slice(e * H, (e + 1) * H), slice(1, 2 * I, 2), I, H, True)
        onto_oss[f"{p}.{e}.down_proj"] = (f"{p}.down_proj", slice(e * I, (e + 1) * I), None, H, I, True)
    handmade_case("gpt-oss-per-expert", "gpt-oss", onto_oss)
    # Mixtral's own per-expert names (block_sparse_moe.experts.E.w1/w3/w2) from older adapters.
    m = "model.layers.0.block_sparse_moe.experts"
    handmade_case("mixtral-per-expert", "mixtral", {
        f"{m}.1.w1": (f"{m}.1.w1.weight", None, None, I, H, False),
        f"{m}.1.w2": (f"{m}.1.w2.weight", None, None, H, I, False),
        f"{m}.3.w3": (f"{m}.3.w3.weight", None, None, I, H, False),
    })
    # The same Mixtral names onto Mixtral experts fused as in memory (mlp.experts.gate_up_proj: w1 rows first).
    mixtral_fused = fused("mixtral", m, ("w1", "w3", "w2"))
    f = "model.layers.0.mlp.experts"
    handmade_case("mixtral-per-expert-fused", "mixtral", {
        f"{m}.1.w1": (f"{f}.gate_up_proj", slice(1 * 2 * I, 1 * 2 * I + I), None, I, H, False),
        f"{m}.1.w2": (f"{f}.down_proj", slice(1 * H, 2 * H), None, H, I, False),
        f"{m}.3.w3": (f"{f}.gate_up_proj", slice(3 * 2 * I + I, 4 * 2 * I), None, I, H, False),
    }, fused_base=mixtral_fused)
    # q, k, v modules onto Phi-3's fused qkv_proj (rows 0..15 q, 16..31 k, 32..47 v).
    a = "model.layers.0.self_attn"
    handmade_case("phi3-split-qkv", "phi3", {
        f"{a}.q_proj": (f"{a}.qkv_proj.weight", slice(0, 16), None, 16, 16, False),
        f"{a}.v_proj": (f"{a}.qkv_proj.weight", slice(32, 48), None, 16, 16, False),
    })


if __name__ == "__main__":
    main()
