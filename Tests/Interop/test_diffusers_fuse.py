"""(d) diffusers LoRAs, with and without `lora_adapter_metadata`, merged by us match diffusers'
own `load_lora_weights` + `fuse_lora`.

A tiny UNet2DConditionModel and CLIPTextModel are built from configs (seeded) and saved with
their libraries' save_pretrained (diffusion_pytorch_model.safetensors / model.safetensors).
LoRAs are added with PEFT (init_lora_weights=False, seeded, r 4, lora_alpha 8 ≠ r; one variant
with rank_pattern / alpha_pattern) and saved with StableDiffusionPipeline.save_lora_weights:

- with `*_lora_adapter_metadata` (the PEFT configs): diffusers rebuilds each LoraConfig from the
  metadata, so the scale is lora_alpha / r per module (2 here, other values in the patterns);
- without it: diffusers can only read ranks from the shapes and uses alpha = r, scale 1. That is
  what the file means to diffusers, and our merge must match it.

The reference is diffusers itself: a minimal pipeline object (the two loader mixins need only
`unet`, `text_encoder` and `hf_device_map`) loads the file with `load_lora_weights`, fuses with
`fuse_lora` and drops the LoRA layers with `unload_lora_weights`; every tensor of both models is
then compared with `adapter merge --component unet|text_encoder`.
"""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from interop import adapter

UNET_CONFIG = dict(
    block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2)
TEXT_CONFIG = dict(
    hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=64,
    max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)

# Linear attention projections, the 1×1 proj_in convolution and the 3×3 resnet convolutions.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "v_proj", "out_proj"]

LORAS = {
    "plain": dict(
        unet=dict(r=4, lora_alpha=8),
        text_encoder=dict(r=4, lora_alpha=8)),
    "patterns": dict(
        unet=dict(r=4, lora_alpha=8, rank_pattern={"to_k": 2, "conv1": 3},
                  alpha_pattern={"to_v": 2, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 16}),
        text_encoder=dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                          alpha_pattern={"layers.1.self_attn.q_proj": 3})),
}


class TinyPipeline(StableDiffusionLoraLoaderMixin):
    """What StableDiffusionPipeline's LoRA loader uses of a pipeline, without a VAE, scheduler,
    tokenizer or safety checker (none of which are LoRA-loadable)."""
    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers-models")
    torch.manual_seed(0)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(root / "unet")
    CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).save_pretrained(root / "text_encoder")
    return {"unet": root / "unet" / "diffusion_pytorch_model.safetensors",
            "text_encoder": root / "text_encoder" / "model.safetensors",
            "unet_dir": root / "unet", "text_encoder_dir": root / "text_encoder"}


def fresh(models):
    unet = UNet2DConditionModel.from_pretrained(str(models["unet_dir"])).eval()
    text = CLIPTextModel.from_pretrained(str(models["text_encoder_dir"])).eval()
    return unet, text


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory):
    """name → {"metadata": file, "no-metadata": file}: the same LoRA factors saved both ways."""
    root = tmp_path_factory.mktemp("diffusers-loras")
    out = {}
    for i, (name, spec) in enumerate(LORAS.items()):
        unet, text = fresh(models)
        torch.manual_seed(100 + i)
        ucfg = LoraConfig(init_lora_weights=False, target_modules=UNET_TARGETS, **spec["unet"])
        tcfg = LoraConfig(init_lora_weights=False, target_modules=TEXT_TARGETS, **spec["text_encoder"])
        unet.add_adapter(ucfg)
        # transformers' own add_adapter wants PEFT ≥ 0.22 (not released); inject with PEFT directly.
        inject_adapter_in_model(tcfg, text)
        layers = dict(unet_lora_layers=get_peft_model_state_dict(unet),
                      text_encoder_lora_layers=get_peft_model_state_dict(text))
        files = {}
        for kind, extra in (("metadata", dict(unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                              text_encoder_lora_adapter_metadata=tcfg.to_dict())),
                            ("no-metadata", {})):
            d = root / f"{name}-{kind}"
            StableDiffusionLoraLoaderMixin.save_lora_weights(str(d), **layers, **extra)
            files[kind] = d / "pytorch_lora_weights.safetensors"
        out[name] = files
    # The two saves differ exactly in the metadata entry.
    with safe_open(out["plain"]["metadata"], "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4 and meta["text_encoder.lora_alpha"] == 8
    with safe_open(out["plain"]["no-metadata"], "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    return out


def diffusers_fused(models, lora_file):
    unet, text = fresh(models)
    pipe = TinyPipeline(unet, text)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    return {"unet": unet.state_dict(), "text_encoder": text.state_dict()}


def compare_component(component, base_file, ours_file, ref_sd):
    """Every tensor: unchanged ones bit-equal, changed ones within 2^-20 · max(|W|, |W'|).

    Both are float32 W + s·B·A (convolutions: B·A of the flattened kernels). diffusers/PEFT
    rounds B·A, then ·s, then + W; we round once after a fused accumulation; a few ulps of the
    tensor's largest magnitude apart (observed ≤ 1.1e-7 relative), 2^-20 allows 8.
    """
    base = load_file(base_file)
    ours = load_file(ours_file)
    assert sorted(ours) == sorted(ref_sd) == sorted(base), (
        sorted(set(ours) ^ set(ref_sd))[:5], sorted(set(base) ^ set(ref_sd))[:5])
    changed_ref = {k for k in ref_sd if not torch.equal(ref_sd[k], base[k])}
    changed_ours = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed_ref, f"{component}: diffusers changed nothing; the comparison would prove nothing"
    assert changed_ours == changed_ref, (
        f"{component}: only diffusers changed {sorted(changed_ref - changed_ours)[:5]}; "
        f"only we changed {sorted(changed_ours - changed_ref)[:5]}")
    worst = []
    for k in sorted(changed_ref):
        want, got = ref_sd[k], ours[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        scale = max(float(want.abs().max()), float(base[k].abs().max()))
        err = float((got - want).abs().max())
        moved = float((want - base[k]).abs().max())
        if err > 2.0 ** -20 * scale:
            worst.append(f"{k}: max |ours − diffusers| {err:.3g}, diffusers moved it by {moved:.3g}")
    assert not worst, f"{component}: {len(worst)} of {len(changed_ref)} merged tensors differ from diffusers' " \
                      f"fuse_lora:\n  " + "\n  ".join(worst[:6])


@pytest.mark.parametrize("kind", ["metadata", "no-metadata"])
@pytest.mark.parametrize("name", list(LORAS))
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_merge_matches_diffusers_fuse_lora(component, name, kind, models, loras, tmp_path):
    lora = loras[name][kind]
    ref = diffusers_fused(models, lora)[component]
    out = tmp_path / f"{component}.safetensors"
    adapter("merge", "--quiet", "--component", component, models[component], lora, out)
    compare_component(component, models[component], out, ref)


@pytest.mark.parametrize("kind", ["metadata", "no-metadata"])
def test_to_kohya_output_fuses_like_the_original_in_diffusers(kind, models, loras, tmp_path):
    """`convert to-kohya` of a diffusers LoRA, loaded by diffusers' own kohya converter
    (lora_state_dict → _convert_non_diffusers_lora_to_diffusers, `.alpha` as network_alphas),
    fuses to the weights diffusers fuses from the original file."""
    lora = loras["plain"][kind]
    kohya = tmp_path / "kohya.safetensors"
    adapter("convert", "to-kohya", lora, kohya)
    want = diffusers_fused(models, lora)
    got = diffusers_fused(models, kohya)
    for component in ("unet", "text_encoder"):
        base = load_file(models[component])
        assert any(not torch.equal(want[component][k], base[k]) for k in base)
        for k in want[component]:
            w, g = want[component][k], got[component][k]
            scale = max(float(w.abs().max()), float(base[k].abs().max()))
            err = float((g - w).abs().max())
            assert err <= 2.0 ** -20 * scale, (
                f"{component} {k}: diffusers fuses the to-kohya output {err:.3g} away from the original "
                f"(which moves it by {float((w - base[k]).abs().max()):.3g})")


@pytest.mark.parametrize("kind", ["metadata", "no-metadata"])
def test_to_kohya_alphas_are_the_scales_diffusers_uses(kind, models, loras, tmp_path):
    """With per-module ranks and alphas, each kohya module's alpha / rank must be the scale
    diffusers gives that module when it loads the original file (PEFT layer `.scaling`).

    Fusing the kohya file in diffusers is not the check here: diffusers 0.42.1 misreads
    non-uniform kohya alphas on attention projections (its alpha_pattern keeps the old
    `….processor.to_k_lora.down.weight` names, which match no module, so those modules fall back
    to the most common alpha), a diffusers limitation unrelated to the file.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = loras["patterns"][kind]
    kohya = tmp_path / "kohya.safetensors"
    adapter("convert", "to-kohya", lora, kohya)
    unet, text = fresh(models)
    TinyPipeline(unet, text).load_lora_weights(str(lora))
    want = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", text)):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                (scale,) = module.scaling.values()
                want[prefix + name.replace(".", "_")] = scale
    if kind == "metadata":
        assert len(set(want.values())) > 1, "the metadata should give modules different scales"
    else:
        assert set(want.values()) == {1.0}, "without metadata diffusers takes alpha = r"
    got = {}
    with safe_open(kohya, "pt") as f:
        for k in f.keys():
            if k.endswith(".alpha"):
                module = k[: -len(".alpha")]
                rank = f.get_slice(module + ".lora_down.weight").get_shape()[0]
                got[module.replace("lora_te_text_model_", "lora_te_")] = float(f.get_tensor(k)) / rank
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:6]
    wrong = [f"{m}: alpha/rank {got[m]:g}, diffusers' scale {want[m]:g}" for m in sorted(want)
             if abs(got[m] - want[m]) > 1e-6 * abs(want[m])]
    assert not wrong, f"{len(wrong)} of {len(want)} modules:\n  " + "\n  ".join(wrong[:6])
