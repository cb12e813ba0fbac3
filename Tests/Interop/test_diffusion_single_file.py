"""Diffusion LoRAs merged into single-file checkpoints and into diffusers pipeline folders load in
diffusers with the outputs of diffusers' own load_lora_weights + fuse_lora.

The bases are the tiny models of Fixtures/make_diffusion_fixtures.py, each twice: a diffusers folder
(Fixtures/models/tiny-<family>-diffusers: BF16 denoiser, F32 text encoders) and one file in the original
layout (Fixtures/models/tiny-<family>.safetensors: BFL Flux, also under ComfyUI's
`model.diffusion_model.` prefix; MMDiT SD3; ldm UNet + CLIP-L / OpenCLIP-G for SD1 and SDXL, + OpenCLIP-H
`cond_stage_model.model.` for SD2, whose 24th layer and text_projection diffusers drops). The LoRAs
are Fixtures/adapters/<case>-lora.safetensors (Fixtures/make_diffusion_lora_fixtures.py: PEFT saved by
the pipelines' save_lora_weights, and kohya-ss/sd-scripts' own LoRANetwork).

- Single file: `adapter merge tiny-<family>.safetensors LORA out.safetensors` keeps every key, dtype and
  shape of the input (and the keys diffusers drops, `position_ids`, `logit_scale`, byte for byte);
  diffusers reads the result with `from_single_file(out, config=<folder>)` (the denoiser) and
  `create_diffusers_clip_model_from_ldm` (what the pipelines' from_single_file calls for each text
  encoder), offline, every parameter loaded (none left on `meta`).
- Pipeline folder: `adapter merge tiny-<family>-diffusers LORA outdir` writes the folder's files, no
  more and no fewer; model_index.json, every config and every component the LoRA does not touch are
  byte-identical copies; the merged components load with `from_pretrained`.

Each loaded component is then compared with the folder's component after diffusers' own
`load_lora_weights` + `fuse_lora` (the pipeline class with the folder's components): the denoiser's
output on a fixed seeded input and each text encoder's (last hidden state, and text_embeds for
CLIPTextModelWithProjection) agree within the dtype's tolerance, the LoRA visibly moves them, and every
parameter agrees with diffusers' fused one (4 ulps of the tensor's largest magnitude: diffusers rounds
the factors, the delta and the sum into BF16) and with the Float64 reference of
Fixtures/expected/diffusion (each element ≤ 1 ulp, or, where W and ΔW cancel, within 2⁻²⁰ of the
tensor's largest magnitude: a Float32 accumulation rounded once); parameters the LoRA does not touch are
bit-identical to the base.

Two things diffusers 0.42.1 cannot do unaided, done here as in make_diffusion_lora_fixtures.py (and
documented there): its Flux single-file converter and its kohya-Flux LoRA converter hard-code FLUX.1's
widths (inner_dim 3072; linear1 split 3072/3072/3072/12288), so they run with those literals set to the
tiny model's; and its kohya-Flux converter leaves the embedder modules (`lora_unet_img_in`, `_txt_in`,
`_time_in_*`, `_vector_in_*`, `_guidance_in_*`) without the `transformer.` prefix, so load_lora_weights
drops them without a word: the reference for flux-kohya is diffusers' own conversion with the prefix
put back.

All tests here need `adapter merge` of diffusion single files and pipeline folders; they carry the
`diffusion_merge` marker (`-m diffusion_merge` runs only them, `-m "not diffusion_merge"` leaves them
out) and fail, not skip, when the binary cannot do it.
"""
import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import lora_conversion_utils, lora_pipeline, single_file_model, single_file_utils
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from interop import ADAPTERS, FIXTURES, MODELS, adapter, bf16_bits, ulp_distance

pytestmark = pytest.mark.diffusion_merge

EXPECTED = FIXTURES / "expected" / "diffusion"

# case → family (folder tiny-<family>-diffusers), LoRA file stem, single files, components the LoRA touches
CASES = {
    "flux-diffusers": ("flux-dev", "flux-diffusers-lora", ["tiny-flux-dev.safetensors", "tiny-flux-dev-comfy.safetensors"],
                       ["transformer"]),
    "flux-diffusers@schnell": ("flux-schnell", "flux-diffusers-lora", ["tiny-flux-schnell.safetensors"], ["transformer"]),
    "flux-kohya": ("flux-dev", "flux-kohya-lora", ["tiny-flux-dev.safetensors", "tiny-flux-dev-comfy.safetensors"],
                   ["transformer"]),
    "flux-kohya-split-qkv": ("flux-dev", "flux-kohya-split-qkv-lora", ["tiny-flux-dev.safetensors"], ["transformer"]),
    "sdxl-diffusers": ("sdxl", "sdxl-diffusers-lora", ["tiny-sdxl.safetensors"], ["unet", "text_encoder", "text_encoder_2"]),
    "sdxl-kohya": ("sdxl", "sdxl-kohya-lora", ["tiny-sdxl.safetensors"], ["unet", "text_encoder", "text_encoder_2"]),
    "sd1-kohya": ("sd1", "sd1-kohya-lora", ["tiny-sd1.safetensors"], ["unet", "text_encoder"]),
    "sd2-kohya": ("sd2", "sd2-kohya-lora", ["tiny-sd2.safetensors"], ["unet", "text_encoder"]),
    "sd3-diffusers": ("sd3", "sd3-diffusers-lora", ["tiny-sd3.safetensors"], ["transformer"]),
}
SINGLE_FILE_CASES = [(case, f) for case, (_, _, files, _) in CASES.items() for f in files]

PIPELINES = {"flux-dev": FluxPipeline, "flux-schnell": FluxPipeline, "sdxl": StableDiffusionXLPipeline,
             "sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sd3": StableDiffusion3Pipeline}
ENCODER_CLASSES = {"text_encoder": T.CLIPTextModel, "text_encoder_2": T.CLIPTextModelWithProjection}
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}  # ulp of 1


def folder(family):
    return MODELS / f"tiny-{family}-diffusers"


def lora_file(case):
    return ADAPTERS / f"{CASES[case][1]}.safetensors"


def index(path):
    return json.loads((Path(path) / "model_index.json").read_text())


def component_class(family, component):
    lib, name = index(folder(family))[component]
    import diffusers
    return getattr(diffusers if lib == "diffusers" else T, name)


def saved_dtype(path, component):
    weights = sorted((Path(path) / component).glob("*.safetensors"))[0]  # one file, or the first shard
    with safe_open(weights, "pt") as f:
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[
            f.get_slice(next(iter(f.keys()))).get_dtype()]


def from_pretrained(path, component, family):
    """A component of a diffusers folder, in the dtype it is saved in, every weight found and used."""
    cls = component_class(family, component)
    dtype = saved_dtype(path, component)
    if issubclass(cls, T.PreTrainedModel):
        m, info = cls.from_pretrained(str(path), subfolder=component, dtype=dtype, output_loading_info=True,
                                      local_files_only=True)
    else:
        m, info = cls.from_pretrained(str(path), subfolder=component, torch_dtype=dtype, output_loading_info=True,
                                      local_files_only=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{path}/{component}: from_pretrained reports {kind}: {sorted(info[kind])[:6]}"
    return m.eval()


# ---------------------------------------------------------------- diffusers with the tiny widths

def flux_single_file_converter_with_config_width():
    """diffusers' Flux single-file converter with its one hard-coded size (`inner_dim = 3072`) read from the config."""
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    old = "    inner_dim = 3072\n"
    assert src.count(old) == 1
    src = src.replace(old, '    inner_dim = kwargs["config"]["num_attention_heads"] * kwargs["config"]["attention_head_dim"]\n')
    scope = dict(vars(single_file_utils))
    exec(compile(src, single_file_utils.__file__, "exec"), scope)
    return scope[fn.__name__]


def kohya_flux_converter_with_tiny_dims(dims):
    """diffusers' kohya-Flux LoRA converter with its split of linear1 (3072, 3072, 3072, 12288) set to `dims`."""
    fn = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    src = inspect.getsource(fn)
    old = "dims=[3072, 3072, 3072, 12288],"
    assert src.count(old) == 1
    src = src.replace(old, f"dims={list(dims)},")
    scope = dict(vars(lora_conversion_utils))
    exec(compile(src, lora_conversion_utils.__file__, "exec"), scope)
    return scope[fn.__name__]


def flux_width(family):
    cfg = json.loads((folder(family) / "transformer" / "config.json").read_text())
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


def load_single_file(path, family, components):
    """{component: model} read by diffusers from a single file, with the folder as config, offline."""
    out = {}
    cfg = str(folder(family))
    for c in components:
        if c in ("transformer", "unet"):
            cls = component_class(family, c)
            entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]
            original = entry["checkpoint_mapping_fn"]
            if family.startswith("flux"):
                entry["checkpoint_mapping_fn"] = flux_single_file_converter_with_config_width()
            try:
                m = cls.from_single_file(str(path), config=cfg, subfolder=c, local_files_only=True,
                                         torch_dtype=saved_dtype(cfg, c))
            finally:
                entry["checkpoint_mapping_fn"] = original
        else:
            ckpt = single_file_utils.load_single_file_checkpoint(str(path), local_files_only=True)
            m = single_file_utils.create_diffusers_clip_model_from_ldm(
                ENCODER_CLASSES[c], ckpt, subfolder=c, config=cfg, local_files_only=True, torch_dtype=torch.float32)
        for k, v in m.state_dict().items():
            assert v.device.type != "meta", f"{path}: diffusers left {c} {k} unloaded (on meta)"
        out[c] = m.eval()
    return out


# ---------------------------------------------------------------- diffusers' own fuse (the reference)

def diffusers_pipeline(family):
    cls = PIPELINES[family]
    kwargs = {p: None for p in inspect.signature(cls.__init__).parameters if p != "self"}
    if "requires_safety_checker" in kwargs:
        kwargs["requires_safety_checker"] = False
    comps = [c for c in index(folder(family)) if not c.startswith("_")]
    kwargs.update({c: from_pretrained(folder(family), c, family) for c in comps})
    return cls(**kwargs), comps


def diffusers_fused(case, lora=None, kohya_flux=None):
    """The folder's components after diffusers' load_lora_weights + fuse_lora + unload_lora_weights; asserts
    that diffusers wrapped a module for every module the LoRA has (the components the case names).
    `lora`: another file for the case's model (a conversion of its LoRA); `kohya_flux`: whether it is a
    kohya Flux file (the case's own kind when not given)."""
    family, _, _, touched = CASES[case]
    pipe, comps = diffusers_pipeline(family)
    converted = lora is not None
    lora = str(lora or lora_file(case))
    restore = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    if case.startswith("flux-kohya") if kohya_flux is None else kohya_flux:
        d = flux_width(family)
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = kohya_flux_converter_with_tiny_dims([d, d, d, 4 * d])
    try:
        if case == "flux-kohya" and not converted:  # diffusers drops the embedder modules it leaves without `transformer.`
            sd = FluxPipeline.lora_state_dict(lora)
            lora = {k if k.startswith(("transformer.", "text_encoder.")) else "transformer." + k: v for k, v in sd.items()}
        pipe.load_lora_weights(lora)
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = restore
    wrapped = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules()) for c in comps}
    assert {c for c, n in wrapped.items() if n} == set(touched), wrapped
    pipe.fuse_lora(components=touched)
    pipe.unload_lora_weights()
    return {c: getattr(pipe, c).eval() for c in comps}


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = diffusers_fused(case)
        return cache[case]

    return get


# ---------------------------------------------------------------- inputs and outputs

def denoiser_inputs(family, model):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    c = model.config
    if family.startswith("flux"):
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        kw = dict(hidden_states=r(1, 16, c.in_channels), encoder_hidden_states=r(1, 8, c.joint_attention_dim),
                  pooled_projections=r(1, c.pooled_projection_dim), timestep=torch.tensor([0.5]),
                  img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3))
        if c.guidance_embeds:
            kw["guidance"] = torch.tensor([3.5])
        return kw
    if family == "sd3":
        return dict(hidden_states=r(1, c.in_channels, c.sample_size, c.sample_size),
                    encoder_hidden_states=r(1, 8, c.joint_attention_dim), pooled_projections=r(1, c.pooled_projection_dim),
                    timestep=torch.tensor([500.0]))
    kw = dict(sample=r(1, c.in_channels, c.sample_size, c.sample_size), timestep=torch.tensor([500.0]),
              encoder_hidden_states=r(1, 8, c.cross_attention_dim))
    if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 time ids
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": r(1, pooled), "time_ids": r(1, 6)}
    return kw


def text_input_ids(model):
    n, vocab = model.config.max_position_embeddings, model.config.vocab_size
    return torch.stack([torch.arange(n) % vocab, torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:n]])


def output(component, model, family):
    """The component's output, run in float32 on a float32 copy of its weights (exact: only the weights differ
    between the models compared, not the arithmetic)."""
    twin = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        if component.startswith("text_encoder"):
            o = twin(input_ids=text_input_ids(twin))
            parts = [o.last_hidden_state.flatten()] + ([o.text_embeds.flatten()] if hasattr(o, "text_embeds") else [])
            return torch.cat(parts)
        o = twin(**denoiser_inputs(family, twin))
        return (o.sample if hasattr(o, "sample") else o[0]).float()


def assert_outputs_match(got, want, base, dtype, what):
    """|got − want| ≤ rtol·max|want| + update_rtol·max|want − base| with rtol one ulp of the weights' dtype;
    diffusers' fuse rounds the LoRA factors and the delta into that dtype, so a part of the error is a
    fraction of the update (update_rtol 3 % for BF16, observed ≤ 1 %). The LoRA must move the output by at
    least 5× what is allowed, so the agreement is not that of two unchanged models."""
    rtol, update_rtol = (EPS[dtype], 0.03) if dtype != torch.float32 else (1e-5, 0.0)
    scale = float(want.abs().max())
    effect = float((want - base).abs().max())
    allowed = rtol * scale + update_rtol * effect
    err = float((got - want).abs().max())
    assert effect > 5 * allowed, f"{what}: the LoRA moves the output by only {effect:.3g} (scale {scale:.3g})"
    assert err <= allowed, (f"{what}: max |Δoutput| = {err:.3g} > {allowed:.3g} (scale {scale:.3g}; the LoRA moves it "
                            f"by {effect:.3g})")


def assert_parameters_match(case, component, got, fused, base, what):
    """Every parameter: untouched ones bit-equal to the base; touched ones within 4 ulps (of the tensor's largest
    magnitude) of diffusers' fused value and, where the fixture has one, within one rounding of the Float64
    reference (see below)."""
    g, f, b = got.state_dict(), fused.state_dict(), base.state_dict()
    assert set(g) == set(f) == set(b), sorted(set(g) ^ set(b))[:6]
    changed = {k for k in b if not torch.equal(f[k], b[k])}
    assert changed, f"{what}: diffusers' fuse changed nothing; the comparison would prove nothing"
    ref_path = EXPECTED / f"{CASES[case][1]}.{component}.safetensors"
    ref = {}
    with safe_open(ref_path, "pt") as fh:
        if fh.metadata()["base"] == folder(CASES[case][0]).name:  # not for flux-diffusers@schnell
            ref = load_file(ref_path)
    if ref:
        assert set(ref) == changed, (f"{what}: the Float64 reference changes {sorted(set(ref) - changed)[:4]}, "
                                     f"diffusers {sorted(changed - set(ref))[:4]}")
    problems = []
    for k in sorted(b):
        if k not in changed:
            if not torch.equal(g[k], b[k]):
                problems.append(f"{k}: changed, but the LoRA does not touch it")
            continue
        assert g[k].dtype == b[k].dtype and g[k].shape == b[k].shape, (k, g[k].dtype, b[k].dtype)
        wd, wf = g[k].to(torch.float64), f[k].to(torch.float64)
        top = max(float(wf.abs().max()), float(b[k].double().abs().max()), float((wf - b[k].double()).abs().max()))
        err = float((wd - wf).abs().max())
        if err > 4 * EPS[g[k].dtype] * top:
            problems.append(f"{k}: |ours − diffusers' fuse| {err:.3g} > 4 ulps of {top:.3g}")
        if ref:
            # One rounding of a Float32 accumulation: ≤ 1 ulp of the element, or, where W and ΔW cancel, within the
            # accumulation error, 2^-20 of the tensor's largest magnitude (8 Float32 ulps).
            e = (wd - ref[k].double()).abs()
            close = e <= 2.0 ** -20 * max(float(ref[k].double().abs().max()), float(b[k].double().abs().max()))
            if g[k].dtype in (torch.bfloat16, torch.float16):
                bits = bf16_bits if g[k].dtype == torch.bfloat16 else (lambda t: t.numpy())
                far = torch.from_numpy(ulp_distance(bits(g[k]), bits(ref[k])) > 1) & ~close
            else:
                far = ~close
            if far.any():
                problems.append(f"{k}: {int(far.sum())} of {far.numel()} elements off the Float64 reference "
                                f"(> 1 ulp and > 2^-20 of the largest magnitude; max |Δ| {float(e.max()):.3g})")
    assert not problems, f"{what}: {len(problems)} tensors:\n  " + "\n  ".join(problems[:8])


def compare(case, got, reference, what):
    family, _, _, touched = CASES[case]
    fused = reference(case)
    for c in touched:
        base = from_pretrained(folder(family), c, family)
        dtype = next(iter(base.state_dict().values())).dtype
        assert_parameters_match(case, c, got[c], fused[c], base, f"{what} {c}")
        assert_outputs_match(output(c, got[c], family), output(c, fused[c], family), output(c, base, family), dtype,
                             f"{what} {c}")


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("case,single", SINGLE_FILE_CASES,
                         ids=[f"{c}-{s.removesuffix('.safetensors')}" for c, s in SINGLE_FILE_CASES])
def test_single_file_merge_loads_in_diffusers_like_its_fuse(case, single, reference, tmp_path):
    family, _, _, touched = CASES[case]
    base = MODELS / single
    out = tmp_path / "merged.safetensors"
    adapter("merge", "--quiet", base, lora_file(case), out)
    with safe_open(base, "pt") as a, safe_open(out, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()), sorted(set(a.keys()) ^ set(b.keys()))[:6]
        for k in a.keys():
            sa, sb = a.get_slice(k), b.get_slice(k)
            assert (sa.get_dtype(), sa.get_shape()) == (sb.get_dtype(), sb.get_shape()), k
            if "position_ids" in k or "logit_scale" in k:  # keys diffusers drops: copied as they are
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    got = load_single_file(out, family, touched)
    compare(case, got, reference, f"{case} merged into {single}")


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_folder_merge_loads_in_diffusers_like_its_fuse(case, reference, tmp_path):
    family, _, _, touched = CASES[case]
    src, out = folder(family), tmp_path / "merged"
    adapter("merge", "--quiet", src, lora_file(case), out)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == files
    for rel in files:
        component = rel.split("/")[0] if "/" in rel else None
        if component not in touched or not rel.endswith(".safetensors"):
            assert (src / rel).read_bytes() == (out / rel).read_bytes(), f"{rel} is not a byte-identical copy"
    got = {c: from_pretrained(out, c, family) for c in touched}
    compare(case, got, reference, f"{case} merged into {src.name}/")


def with_extra_module(case, tmp_path):
    """The case's LoRA plus one module the model does not have: a copy of a real one renamed `…to_qq`."""
    t = load_file(lora_file(case))
    with safe_open(lora_file(case), "pt") as f:
        meta = f.metadata()
    if "kohya" in case:
        module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_qq"
        real = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        for s in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            t[module + s] = t[real + s].clone()
    else:
        module = "transformer.transformer_blocks.0.attn.to_qq"
        real = "transformer.transformer_blocks.0.attn.to_q"
        for s in (".lora_A.weight", ".lora_B.weight"):
            t[module + s] = t[real + s].clone()
    path = tmp_path / "extra.safetensors"
    save_file(t, path, metadata=meta)
    return path, "to_qq"


@pytest.mark.parametrize("into", ["single-file", "pipeline-folder"])
@pytest.mark.parametrize("case", ["flux-diffusers", "sdxl-kohya"])
def test_merge_refuses_a_module_the_model_does_not_have(case, into, tmp_path):
    family, _, singles, _ = CASES[case]
    lora, name = with_extra_module(case, tmp_path)
    base = MODELS / singles[0] if into == "single-file" else folder(family)
    out = tmp_path / ("out.safetensors" if into == "single-file" else "out")
    r = adapter("merge", "--quiet", base, lora, out, expect=None)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"`adapter merge` accepted a LoRA with a module {base.name} does not have:\n{r.stderr}"
    assert len(lines) == 1 and name in lines[0], f"expected one line naming the unknown module ({name}), got:\n{r.stderr}"
    assert not out.exists() and not any(p.name.startswith(out.name) for p in tmp_path.iterdir() if p != lora), \
        f"a refused merge left output behind: {sorted(p.name for p in tmp_path.iterdir())}"


# ---------------------------------------------------------------- conversions between the dialects

CONVERSIONS = [
    # (case, subcommand, --base): the converted file must load in diffusers and fuse to the original's weights.
    ("sdxl-kohya", "to-diffusers", "tiny-sdxl-diffusers"),
    ("sd1-kohya", "to-diffusers", "tiny-sd1.safetensors"),
    ("flux-kohya", "to-diffusers", "tiny-flux-dev-diffusers"),
    ("flux-diffusers", "to-kohya", "tiny-flux-dev.safetensors"),
    ("sdxl-diffusers", "to-kohya", "tiny-sdxl.safetensors"),
]


@pytest.mark.parametrize("case,command,base", CONVERSIONS)
def test_converted_lora_loads_in_diffusers_and_fuses_like_the_original(case, command, base, reference, tmp_path):
    """`convert to-diffusers` / `to-kohya --base MODEL` of a case's LoRA: diffusers loads the converted file
    (kohya's SDXL ldm and Flux BFL names for to-kohya, with q/k/v fused into qkv and linear1) and, fused,
    gives the weights and outputs of the original LoRA fused (the same update, its factors rounded once
    into their dtype)."""
    family, _, _, touched = CASES[case]
    out = tmp_path / "converted.safetensors"
    adapter("convert", command, "--quiet", lora_file(case), out, "--base", MODELS / base)
    got = diffusers_fused(case, lora=out, kohya_flux=command == "to-kohya" and family.startswith("flux"))
    fused = reference(case)
    for c in touched:
        base_model = from_pretrained(folder(family), c, family)
        dtype = next(iter(base_model.state_dict().values())).dtype
        want, have, orig = fused[c].state_dict(), got[c].state_dict(), base_model.state_dict()
        moved = 0
        for k, w in want.items():
            if not w.is_floating_point():
                continue
            scale = float(w.abs().max()) or 1.0
            err = float((have[k].double() - w.double()).abs().max())
            assert err <= 8 * EPS[dtype] * scale, f"{case} {command} {c}.{k}: off by {err:.3g} (max |W| {scale:.3g})"
            moved += not torch.equal(w, orig[k])
        assert moved > 0, f"{case}: the LoRA changes nothing in {c}"
        assert_outputs_match(output(c, got[c], family), output(c, fused[c], family), output(c, base_model, family), dtype,
                             f"{case} {command} {c}")



def test_sharded_component_of_a_pipeline_folder_merges_and_loads(reference, tmp_path):
    """A pipeline whose transformer diffusers saved in shards (diffusion_pytorch_model-0000N-of-…
    with its index): the merge keeps the shard names and the index, and the merged transformer loads
    with from_pretrained and equals diffusers' own fuse of the LoRA."""
    import shutil
    family, case = "flux-dev", "flux-diffusers"
    src = tmp_path / "sharded"
    shutil.copytree(folder(family), src)
    model = from_pretrained(src, "transformer", family)
    shutil.rmtree(src / "transformer")
    model.save_pretrained(src / "transformer", max_shard_size="64KB")
    shards = sorted(p.name for p in (src / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    out = tmp_path / "merged"
    adapter("merge", "--quiet", src, lora_file(case), out)
    assert sorted(p.name for p in (out / "transformer").glob("*.safetensors")) == shards
    got = {"transformer": from_pretrained(out, "transformer", family)}
    compare(case, got, reference, "flux-diffusers merged into a sharded transformer/")


def test_to_lora_of_a_lycoris_lokr_loads_in_diffusers_with_the_lokr_update(tmp_path):
    """`convert to-lora --keep-energy 1` of a LyCORIS LoKr (kohya SD1 names, w1 and w2 whole, alpha
    ignored as LyCORIS ignores it) on the SD1 UNet: diffusers loads the LoRA and, fused, its weights are
    W + kron(w1, w2), computed here in numpy Float64."""
    import numpy as np
    family = "sd1"
    unet = from_pretrained(folder(family), "unet", family)
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    g = np.random.default_rng(5)
    tensors, deltas = {}, {}
    for n in names:
        out, inp = unet.state_dict()[n + ".weight"].shape
        w1 = g.standard_normal((2, 2)).astype(np.float32) * 0.3
        w2 = g.standard_normal((out // 2, inp // 2)).astype(np.float32) * 0.3
        key = "lora_unet_" + n.replace(".", "_")
        tensors[key + ".lokr_w1"], tensors[key + ".lokr_w2"] = torch.from_numpy(w1), torch.from_numpy(w2)
        tensors[key + ".alpha"] = torch.tensor(1.0)
        deltas[n] = np.kron(w1.astype(np.float64), w2.astype(np.float64))
    lokr, lora = tmp_path / "lokr.safetensors", tmp_path / "lora.safetensors"
    save_file(tensors, str(lokr))
    adapter("convert", "to-lora", "--quiet", "--keep-energy", "1", "--dtype", "F32", lokr, lora, "--base", folder(family))
    pipe, _ = diffusers_pipeline(family)
    pipe.load_lora_weights(str(lora))
    wrapped = sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert wrapped == len(names), wrapped
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for n in names:
        base = unet.state_dict()[n + ".weight"].double().numpy()
        want = base + deltas[n]
        got = fused[n + ".weight"].double().numpy()
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 8 * EPS[torch.bfloat16] * scale, n
        assert np.abs(got - base).max() > 0.01 * np.abs(deltas[n]).max(), f"{n}: the update did not land"
