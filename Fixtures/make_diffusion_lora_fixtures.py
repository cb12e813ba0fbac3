#!/usr/bin/env python3
"""LoRAs for the tiny diffusion models, written by the trainers' own libraries, with Float64 references.

    pip install torch==2.* diffusers==0.42.* transformers==5.24.* peft==0.21.* safetensors numpy einops   # only to regenerate
    SD_SCRIPTS_DIR=<kohya-ss/sd-scripts checkout> python3 Fixtures/make_diffusion_lora_fixtures.py [case …]

The bases are the diffusers folders of make_diffusion_fixtures.py (Fixtures/models/tiny-<family>-diffusers/:
BF16 denoisers, F32 text encoders). Each LoRA is made on those modules and written the way its trainer
writes it, into Fixtures/adapters/<case>-lora.safetensors:

- PEFT LoRAs (flux-diffusers, sdxl-diffusers, sd3-diffusers): `add_adapter(LoraConfig(init_lora_weights=False,
  r=4, lora_alpha=8, …))` on the diffusers model (seeded; PEFT then leaves nn.Linear's default init on both
  factors, so B is not zero), `inject_adapter_in_model` on the transformers text encoders (transformers'
  own add_adapter wants PEFT ≥ 0.22), and the pipeline's own `save_lora_weights` with
  `<component>_lora_adapter_metadata` (the PEFT configs), as diffusers' training scripts save them. The
  names are whatever the libraries give: `transformer.…`, `unet.…`, and, because transformers 5.24's
  CLIPTextModel has no `text_model.` level, `text_encoder.encoder.layers.N…` (but
  `text_encoder_2.text_model.encoder…` for CLIPTextModelWithProjection). Factors: F32 (flux, sdxl; made on
  a float32 copy of the model), BF16 (sd3; made on the BF16 model).
- kohya LoRAs (flux-kohya, flux-kohya-split-qkv, sdxl-kohya, sd1-kohya, sd2-kohya): kohya-ss/sd-scripts' own
  `networks/lora_flux.py` / `networks/lora.py` `LoRANetwork` (checked at commit 48d368fa, 2026-02-16;
  only its networks/ and library/ folders are needed), whose `save_weights` writes the file
  (`lora_down.weight` / `lora_up.weight` / `alpha`, the save dtype applied to every tensor, `sshs_*`
  hashes by sd-scripts' own `precalculate_safetensors_hashes`). What sd-scripts wraps is what it trains:
    Flux: sd-scripts' own `library/flux_models.Flux` at the tiny size (its state dict is, key for key
      and shape for shape, Fixtures/models/tiny-flux-dev.safetensors, which it loads strictly), so the
      names are BFL's (`lora_unet_double_blocks_0_img_attn_qkv`, `…_single_blocks_0_linear1`, …);
      flux-kohya also has `in_dims` (img_in, time_in, vector_in, guidance_in, txt_in); flux-kohya-split-qkv
      is the same network with `split_qkv`, at the tiny model's split dims.
    SDXL: sd-scripts trains its own ldm-named `SdxlUNet2DConditionModel`, which has SDXL's real sizes
      hard-coded; a module tree is built here from the `model.diffusion_model.` keys of
      Fixtures/models/tiny-sdxl.safetensors, with the block classes sd-scripts looks for
      (ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D) and the base weights loaded, so the
      names are `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `…_in_layers_2`, ….
    SD1 / SD2: sd-scripts trains a UNet with diffusers' module names; the diffusers UNet itself is wrapped.
      SD2's proj_in / proj_out are Linear there, as sd-scripts builds them from a diffusers SD2 folder
      (`use_linear_projection` from its config). From an SD2 single file train_network.py builds them as 1×1
      convolutions instead (`load_target_model(…, unet_use_linear_projection_in_v2=False)` →
      `linear_transformer_to_conv`), so such LoRAs have (r, C, 1, 1) / (C, r, 1, 1) factors on those modules;
      diffusers 0.42.1's load_lora_weights refuses them (size mismatch against its Linear proj_in), so that
      variant has no fixture here.
    Text encoders: the HF CLIP models, under a `text_model` attribute as transformers 4 (which sd-scripts
      pins) has it, so the names are `lora_te_text_model_encoder_layers_0_self_attn_q_proj`
      (`lora_te1_` / `lora_te2_` for SDXL's two).
  sd-scripts zero-initialises lora_up; it is redrawn here like lora_down (kaiming uniform, seeded).
  Two sd-scripts imports are replaced because they only serve training (`library.utils`, which needs
  torchvision and cv2, gets a `setup_logging` stub; `library.train_util` is reduced to its three hash
  functions, whose source is taken from the checkout). `lora_flux.py`'s split-qkv path has had a bug
  since 2025-09-11 (commit 7f983c55: `(split_dims,) = self.get_qkv_mlp_split_dims()[:3]` unpacks a
  3-element list into one name, so creating a split_qkv network raises); that one line is corrected
  before use, and `get_qkv_mlp_split_dims` returns the tiny widths (it hard-codes 3072 / 12288).
  `lora.py`'s LoRANetwork extends its class-level target list in place when conv_dim is given, so each
  network here starts from the pristine lists. Note on split_qkv: sd-scripts trains each of the q/k/v(/mlp)
  parts with scale alpha / r, but saves them fused as lora_down [3r, in] (4r for linear1) and a
  block-diagonal lora_up with the same alpha, and every reader of the file (sd-scripts' own
  create_network_from_weights and flux_merge_lora.py, diffusers) takes alpha / rows(lora_down) = alpha / 3r:
  the file means a third (a quarter) of what was trained. The reference follows the readers.

Every safetensors metadata block is rewritten with its keys sorted, and in diffusers'
`lora_adapter_metadata` JSON the lists that were Python sets (`target_modules`) are sorted: safetensors
keeps metadata in a Rust HashMap and PEFT keeps target_modules in a set, both in a different order on
every run. Tensor bytes are the libraries'.

For each case and each component it changes, Fixtures/expected/diffusion/<case>-lora.<component>.safetensors
holds every tensor of the DIFFUSERS-FOLDER component that the LoRA changes, under the folder's names, merged
at weight 1 and computed independently here in numpy Float64 from the tensors read back from the written
LoRA: W + scale·(B·A) (convolutions: B·A of the flattened kernels), scale = lora_alpha / r from
`lora_adapter_metadata` for PEFT files (diffusers' rule: no metadata → scale 1) and alpha / (rows of
lora_down) for kohya files (no `.alpha` → 1), rounded once (to nearest even, on the Float64 value) into
the component's dtype; metadata {"base", "component", "note"}. kohya names are mapped onto the diffusers
modules by this script's own rules (the layouts of docs/formats.md §15): BFL fused qkv /
linear1 are split into row blocks [q; k; v(; mlp)], ldm UNet blocks are renumbered.

Each reference is then checked against diffusers itself: the pipeline class (FluxPipeline,
StableDiffusionXLPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline, with the folder's
components and None for the rest) loads the LoRA file with `load_lora_weights`; the modules that carry a
PEFT layer must be the reference's modules (any the reference has and diffusers lacks are reported as
dropped); after `fuse_lora` + `unload_lora_weights` every reference tensor must agree within 4 ulps of
the dtype (diffusers rounds the factors, the delta and the sum) and every other tensor must be bit-equal
to the folder's. Two limits of diffusers 0.42.1's kohya-Flux converter: it splits `linear1` with
hard-coded (3072, 3072, 3072, 12288), so it runs with that literal set to the tiny widths; and it gives
the embedder modules (`lora_unet_img_in`, `_txt_in`, `_time_in_*`, `_vector_in_*`, `_guidance_in_*`; by its
source also `final_layer_*`, which sd-scripts does not train) no `transformer.` prefix, so `load_lora_weights` ignores them without a word: for
flux-kohya the check is repeated on diffusers' own converted state dict with the prefix put back, which
then covers every module. What diffusers logs while loading (INFO and up: it drops some kinds of key at
INFO level) is printed.
"""
import ast
import contextlib
import io
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import types

os.environ["HF_HUB_OFFLINE"] = "1"  # everything must work without the hub
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers as D  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from diffusers.loaders import lora_conversion_utils, lora_pipeline  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

T.utils.logging.disable_progress_bar()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import round_to  # noqa: E402  (numpy-only: one rounding from float64)

MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "diffusion")
UNET = "model.diffusion_model."

PEFT_TARGETS = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
             "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out", "ff.net.0.proj", "ff.net.2",
             "norm1.linear"],
    "sdxl-unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "sd3": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
DTYPE_NAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}  # ulp of 1

# ---------------------------------------------------------------------------------------------
# Files


def folder(family):
    return os.path.join(MODELS, f"tiny-{family}-diffusers")


def load_component(family, component, dtype=None):
    """A component of the diffusers folder, in the dtype it is saved in (BF16 denoisers, F32 encoders)."""
    path = folder(family)
    cls_lib, cls_name = json.load(open(os.path.join(path, "model_index.json")))[component]
    cls = getattr(D if cls_lib == "diffusers" else T, cls_name)
    if dtype is None:
        with safe_open(weights_file(family, component), "pt") as f:
            dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    if cls_lib == "transformers":
        return cls.from_pretrained(path, subfolder=component, dtype=dtype).eval()
    return cls.from_pretrained(path, subfolder=component, torch_dtype=dtype).eval()


def weights_file(family, component):
    sub = os.path.join(folder(family), component)
    (name,) = [f for f in os.listdir(sub) if f.endswith(".safetensors")]
    return os.path.join(sub, name)


def sort_metadata(path):
    """Rewrite the header with metadata keys sorted; tensor entries and bytes untouched. In diffusers'
    `lora_adapter_metadata` (json.dumps(…, indent=2, sort_keys=True) of the PEFT configs) the lists that were
    Python sets (`target_modules`, in hash order, so different on every run) are sorted too: same JSON, same length."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta and "lora_adapter_metadata" in meta:
        cfg = json.loads(meta["lora_adapter_metadata"])
        for k, v in cfg.items():
            if k.endswith((".target_modules", ".exclude_modules")) and isinstance(v, list):
                cfg[k] = sorted(v)
        text = json.dumps(cfg, indent=2, sort_keys=True)
        assert len(text) == len(meta["lora_adapter_metadata"])
        meta["lora_adapter_metadata"] = text
    new = {"__metadata__": {k: meta[k] for k in sorted(meta)}} if meta else {}
    new.update(header)
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (n - len(text))
    assert len(text) == n, "header length changed"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + blob[8 + n :])


def read_lora(path):
    """{key: float64 array} (exact: every stored float converts exactly) and the metadata."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k).to(torch.float64).numpy() for k in f.keys()}, meta


# ---------------------------------------------------------------------------------------------
# Making the LoRAs: PEFT + diffusers' save_lora_weights


def peft_layers(model, targets, seed, r=4, alpha=8):
    """PEFT LoRA with random non-zero factors (init_lora_weights=False, seeded); returns (state dict, config)."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(seed)
    if isinstance(model, T.PreTrainedModel):
        inject_adapter_in_model(cfg, model)
    else:
        model.add_adapter(cfg)
    return get_peft_model_state_dict(model), cfg.to_dict()


def save_diffusers_lora(mixin, name, layers, metadata):
    """`<Pipeline>.save_lora_weights(dir, <component>_lora_layers=…, <component>_lora_adapter_metadata=…)`,
    moved to adapters/<name>.safetensors."""
    with tempfile.TemporaryDirectory() as d:
        kwargs = {f"{c}_lora_layers": sd for c, sd in layers.items()}
        kwargs.update({f"{c}_lora_adapter_metadata": m for c, m in metadata.items()})
        mixin.save_lora_weights(d, **kwargs)
        path = os.path.join(ADAPTERS, f"{name}.safetensors")
        shutil.move(os.path.join(d, "pytorch_lora_weights.safetensors"), path)
    sort_metadata(path)
    return path


def make_flux_diffusers(seed):
    tr = load_component("flux-dev", "transformer", torch.float32)
    layers, cfg = peft_layers(tr, PEFT_TARGETS["flux"], seed)
    return save_diffusers_lora(D.FluxPipeline, "flux-diffusers-lora", {"transformer": layers}, {"transformer": cfg})


def make_sdxl_diffusers(seed):
    unet = load_component("sdxl", "unet", torch.float32)
    te, te2 = load_component("sdxl", "text_encoder"), load_component("sdxl", "text_encoder_2")
    layers, cfgs = {}, {}
    for i, (c, m, targets) in enumerate((("unet", unet, PEFT_TARGETS["sdxl-unet"]), ("text_encoder", te, PEFT_TARGETS["clip"]),
                                         ("text_encoder_2", te2, PEFT_TARGETS["clip"]))):
        layers[c], cfgs[c] = peft_layers(m, targets, seed + i)
    return save_diffusers_lora(D.StableDiffusionXLPipeline, "sdxl-diffusers-lora", layers, cfgs)


def make_sd3_diffusers(seed):
    tr = load_component("sd3", "transformer")  # BF16: this one is saved in the model's dtype
    layers, cfg = peft_layers(tr, PEFT_TARGETS["sd3"], seed)
    return save_diffusers_lora(D.StableDiffusion3Pipeline, "sd3-diffusers-lora", {"transformer": layers},
                               {"transformer": cfg})


# ---------------------------------------------------------------------------------------------
# Making the LoRAs: kohya-ss/sd-scripts


SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
SPLIT_QKV_BUG = "(split_dims,) = self.get_qkv_mlp_split_dims()[:3]  # qkv only"


def sd_scripts():
    """sd-scripts' networks.lora and networks.lora_flux, and library.flux_models, imported from SD_SCRIPTS_DIR."""
    root = os.environ.get("SD_SCRIPTS_DIR")
    if not root or not os.path.isfile(os.path.join(root, "networks", "lora_flux.py")):
        raise SystemExit("make_diffusion_lora_fixtures.py: set SD_SCRIPTS_DIR to a kohya-ss/sd-scripts checkout "
                         f"(checked at {SD_SCRIPTS_COMMIT[:8]}) for the kohya cases")
    if "networks.lora_flux" in sys.modules:
        return sys.modules["networks.lora"], sys.modules["networks.lora_flux"], sys.modules["library.flux_models"]
    sys.path.insert(0, root)
    import library  # noqa: F401  (the package; its utils module is replaced before anything imports it)

    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    sys.modules["library.utils"] = library.utils = utils
    # library.train_util: only the three functions save_weights calls, from the checkout's own source.
    src = open(os.path.join(root, "library", "train_util.py")).read()
    wanted = {"precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"}
    fns = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in fns} == wanted
    train_util = types.ModuleType("library.train_util")
    import hashlib
    import safetensors.torch
    train_util.__dict__.update(hashlib=hashlib, BytesIO=io.BytesIO, safetensors=safetensors)
    exec(compile(ast.Module(body=fns, type_ignores=[]), os.path.join(root, "library", "train_util.py"), "exec"),
         train_util.__dict__)
    sys.modules["library.train_util"] = library.train_util = train_util
    # networks.lora_flux with its split-qkv line corrected.
    path = os.path.join(root, "networks", "lora_flux.py")
    src = open(path).read()
    assert src.count(SPLIT_QKV_BUG) == 1, "sd-scripts' lora_flux.py changed: re-check the split_qkv fix"
    src = src.replace(SPLIT_QKV_BUG, SPLIT_QKV_BUG.replace("(split_dims,) =", "split_dims ="))
    lora_flux = types.ModuleType("networks.lora_flux")
    lora_flux.__file__ = path
    import networks  # noqa: F401
    sys.modules["networks.lora_flux"] = lora_flux
    exec(compile(src, path, "exec"), lora_flux.__dict__)
    from library import flux_models
    from networks import lora
    # LoRANetwork.__init__ extends its class-level UNET_TARGET_REPLACE_MODULE list in place (`target_modules +=
    # …CONV2D_3X3`) when conv_dim is given, so a later network in the same process would target convolutions
    # too; every network here starts from the pristine lists (fresh_lora_targets).
    lora._PRISTINE = {n: list(getattr(lora.LoRANetwork, n)) for n in dir(lora.LoRANetwork) if n.endswith("_MODULE")
                      or n.endswith("_3X3")}
    for name in ("networks", "library", "lora", "lora_flux", "flux_models"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lora, lora_flux, flux_models


def fresh_lora_targets(lora):
    for n, v in lora._PRISTINE.items():
        setattr(lora.LoRANetwork, n, list(v))


def randomize_lora_up(net, seed):
    """sd-scripts zero-inits lora_up; redraw it like lora_down (kaiming uniform, a = √5), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if ".lora_up." in name:
                p.copy_(torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=g))


def save_kohya(net, name, dtype, metadata):
    path = os.path.join(ADAPTERS, f"{name}.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):  # the split-qkv state_dict prints every key it merges
        net.save_weights(path, dtype, dict(metadata))
    sort_metadata(path)
    return path


def kohya_metadata(name, module, dim, alpha, args, base_version):
    return {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": json.dumps(args), "ss_base_model_version": base_version, "ss_output_name": name,
            "ss_training_comment": "tiny fixture: made by Fixtures/make_diffusion_lora_fixtures.py"}


def bfl_flux(flux_models, family):
    """sd-scripts' own Flux (library/flux_models.py) at the tiny size, loaded strictly from the BFL single file."""
    cfg = json.load(open(os.path.join(folder(family), "transformer", "config.json")))
    params = flux_models.FluxParams(
        in_channels=cfg["in_channels"], vec_in_dim=cfg["pooled_projection_dim"], context_in_dim=cfg["joint_attention_dim"],
        hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"], mlp_ratio=4.0,
        num_heads=cfg["num_attention_heads"], depth=cfg["num_layers"], depth_single_blocks=cfg["num_single_layers"],
        axes_dim=cfg["axes_dims_rope"], theta=10000, qkv_bias=True, guidance_embed=cfg["guidance_embeds"])
    m = flux_models.Flux(params)
    m.load_state_dict(load_file(os.path.join(MODELS, f"tiny-{family}.safetensors")), strict=True)
    return m.eval(), params


def make_flux_kohya(seed, split_qkv):
    lora, lora_flux, flux_models = sd_scripts()
    flux, p = bfl_flux(flux_models, "flux-dev")
    D_, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)

    class TinyFluxLoRANetwork(lora_flux.LoRANetwork):
        @classmethod
        def get_qkv_mlp_split_dims(cls):
            return [D_] * 3 + [mlp]  # sd-scripts: [3072] * 3 + [12288]

    dim, alpha = 4, 8.0
    args = {"split_qkv": "True"} if split_qkv else {"in_dims": "[4,4,4,4,4]"}
    torch.manual_seed(seed)
    # create_network(...) parses network_args into these keyword arguments.
    net = TinyFluxLoRANetwork([None], flux, lora_dim=dim, alpha=alpha, split_qkv=split_qkv,
                              in_dims=None if split_qkv else [4, 4, 4, 4, 4])
    net.apply_to([None], flux, apply_text_encoder=False, apply_unet=True)
    randomize_lora_up(net, seed)
    name = "flux-kohya-split-qkv-lora" if split_qkv else "flux-kohya-lora"
    return save_kohya(net, name, torch.bfloat16, kohya_metadata(name, "networks.lora_flux", dim, alpha, args, "flux1"))


def ldm_unet_tree(lora, family):
    """A module tree with the paths of the single file's `model.diffusion_model.` keys and the block classes
    sd-scripts' SDXL UNet has there, holding the base weights."""
    sd = {k[len(UNET):]: v for k, v in load_file(os.path.join(MODELS, f"tiny-{family}.safetensors")).items()
          if k.startswith(UNET)}
    classes = {n: type(n, (torch.nn.Module,), {}) for n in ("ResnetBlock2D", "Transformer2DModel", "Downsample2D",
                                                              "Upsample2D", "Block", "Norm")}
    leaves = {}
    for key, v in sd.items():
        leaves.setdefault(key.rpartition(".")[0], {})[key.rpartition(".")[2]] = v

    def kind(path, children):
        if {"in_layers", "out_layers"} <= children:
            return "ResnetBlock2D"
        if "proj_in" in children:
            return "Transformer2DModel"
        if children == {"op"}:
            return "Downsample2D"
        if children == {"conv"} and path.startswith("output_blocks."):
            return "Upsample2D"
        return "Block"

    def children_of(path):
        pre = path + "." if path else ""
        return {k[len(pre):].split(".")[0] for k in leaves if k.startswith(pre) and k != path}

    def build(path):
        if path in leaves:
            w = leaves[path]["weight"]
            if w.ndim == 2:
                m = torch.nn.Linear(w.shape[1], w.shape[0], bias="bias" in leaves[path])
            elif w.ndim == 4:
                m = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias="bias" in leaves[path])
            else:
                m = classes["Norm"]()
                for n, t in leaves[path].items():
                    m.register_parameter(n, torch.nn.Parameter(t.clone()))
                return m
            with torch.no_grad():
                for n, t in leaves[path].items():
                    getattr(m, n).copy_(t)
            return m.to(w.dtype)
        kids = children_of(path)
        m = classes[kind(path, kids)]()
        for c in sorted(kids):
            m.add_module(c, build(f"{path}.{c}" if path else c))
        return m

    root = build("")
    got = root.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    return root


class TextModel(torch.nn.Module):
    """transformers 4's module layout of a CLIPTextModel (`text_model.encoder…`), which sd-scripts names after."""

    def __init__(self, te):
        super().__init__()
        self.text_model = te


def make_sdxl_kohya(seed):
    lora, _, _ = sd_scripts()
    unet = ldm_unet_tree(lora, "sdxl")
    te = TextModel(load_component("sdxl", "text_encoder"))
    te2 = load_component("sdxl", "text_encoder_2")  # CLIPTextModelWithProjection: text_model.* already
    dim, alpha, conv_dim, conv_alpha = 4, 1.0, 2, 3.0
    fresh_lora_targets(lora)
    torch.manual_seed(seed)
    net = lora.LoRANetwork([te, te2], unet, lora_dim=dim, alpha=alpha, conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
                           is_sdxl=True)
    net.apply_to([te, te2], unet, apply_text_encoder=True, apply_unet=True)
    randomize_lora_up(net, seed)
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    name = "sdxl-kohya-lora"
    return save_kohya(net, name, torch.float16, kohya_metadata(name, "networks.lora", dim, alpha, args, "sdxl_base_v1-0"))


def make_sd1_kohya(seed):
    lora, _, _ = sd_scripts()
    unet = load_component("sd1", "unet")
    te = TextModel(load_component("sd1", "text_encoder"))
    dim, alpha = 4, 2.0
    fresh_lora_targets(lora)
    torch.manual_seed(seed)
    net = lora.LoRANetwork(te, unet, lora_dim=dim, alpha=alpha)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    randomize_lora_up(net, seed)
    name = "sd1-kohya-lora"
    return save_kohya(net, name, torch.float32, kohya_metadata(name, "networks.lora", dim, alpha, {}, "sd_v1"))


def make_sd2_kohya(seed):
    """As sd1-kohya on the SD2 folder: the diffusers UNet (linear proj_in/proj_out, as sd-scripts builds it from a
    diffusers SD2 folder: its `use_linear_projection` comes from the folder's config) and the 23-layer CLIPTextModel
    under `text_model`, so `lora_te_text_model_encoder_layers_0…22_…`."""
    lora, _, _ = sd_scripts()
    unet = load_component("sd2", "unet")
    te = TextModel(load_component("sd2", "text_encoder"))
    dim, alpha = 4, 3.0
    fresh_lora_targets(lora)
    torch.manual_seed(seed)
    net = lora.LoRANetwork(te, unet, lora_dim=dim, alpha=alpha)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    randomize_lora_up(net, seed)
    name = "sd2-kohya-lora"
    meta = kohya_metadata(name, "networks.lora", dim, alpha, {}, "sd_v2")
    meta["ss_v2"] = "True"  # train_network.py writes str(args.v2)
    return save_kohya(net, name, torch.float16, meta)


# ---------------------------------------------------------------------------------------------
# Mapping LoRA modules onto the diffusers folder's weights (this script's own rules)


class Target:
    """One diffusers weight a LoRA module updates: component, weight key, and the output rows [a, b) of the
    module's ΔW that go to it (None: all of them; a fused BFL module gives each of its targets a row block)."""

    def __init__(self, component, key, rows=None):
        self.component, self.key, self.rows = component, key, rows


def flux_bfl_to_diffusers(cfg):
    """BFL module path → [(diffusers module, rows)] for the tiny Flux (D = heads·head_dim, MLP 4D)."""
    d, mlp = cfg["num_attention_heads"] * cfg["attention_head_dim"], 4 * cfg["num_attention_heads"] * cfg["attention_head_dim"]
    q, k, v = (0, d), (d, 2 * d), (2 * d, 3 * d)
    out = {"img_in": [("x_embedder", None)], "txt_in": [("context_embedder", None)]}
    for src, dst in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        out[f"{src}.in_layer"] = [(f"time_text_embed.{dst}.linear_1", None)]
        out[f"{src}.out_layer"] = [(f"time_text_embed.{dst}.linear_2", None)]
    for i in range(cfg["num_layers"]):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "img_attn.qkv"] = [(t + "attn.to_q", q), (t + "attn.to_k", k), (t + "attn.to_v", v)]
        out[b + "txt_attn.qkv"] = [(t + "attn.add_q_proj", q), (t + "attn.add_k_proj", k), (t + "attn.add_v_proj", v)]
        out[b + "img_attn.proj"] = [(t + "attn.to_out.0", None)]
        out[b + "txt_attn.proj"] = [(t + "attn.to_add_out", None)]
        out[b + "img_mlp.0"] = [(t + "ff.net.0.proj", None)]
        out[b + "img_mlp.2"] = [(t + "ff.net.2", None)]
        out[b + "txt_mlp.0"] = [(t + "ff_context.net.0.proj", None)]
        out[b + "txt_mlp.2"] = [(t + "ff_context.net.2", None)]
        out[b + "img_mod.lin"] = [(t + "norm1.linear", None)]
        out[b + "txt_mod.lin"] = [(t + "norm1_context.linear", None)]
    for i in range(cfg["num_single_layers"]):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out[b + "linear1"] = [(t + "attn.to_q", q), (t + "attn.to_k", k), (t + "attn.to_v", v),
                              (t + "proj_mlp", (3 * d, 3 * d + mlp))]
        out[b + "linear2"] = [(t + "proj_out", None)]
        out[b + "modulation.lin"] = [(t + "norm.linear", None)]
    return out


RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
              "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_unet_to_diffusers(path, L, attention_ups):
    """ldm UNet module path (after `model.diffusion_model.`) → diffusers UNet2DConditionModel module path.

    Input block i ≥ 1 is level b = (i−1) // (L+1), slot j = (i−1) % (L+1): j < L holds resnet j (`.0`) and
    attention j (`.1`), j = L the downsampler (`.0.op`). Output block i is level b = i // (L+1), resnet and
    attention j = i % (L+1); the upsampler sits after the last resnet, at `.1` or, on a level with attention, `.2`.
    Middle block 0, 1, 2 = resnet 0, attention 0, resnet 1. Inside resnets the names change (RESNET_LDM),
    inside attentions they do not."""
    p = path.split(".")
    simple = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if path in simple:
        return simple[path]

    def resnet(prefix, rest):
        inner = ".".join(rest)
        for ldm, dif in RESNET_LDM.items():
            if inner == ldm:
                return f"{prefix}.{dif}"
        raise KeyError(path)

    if p[0] == "input_blocks":
        i, slot = int(p[1]), int(p[2])
        b, j = (i - 1) // (L + 1), (i - 1) % (L + 1)
        if j == L:
            assert slot == 0 and p[3:] == ["op"], path
            return f"down_blocks.{b}.downsamplers.0.conv"
        if slot == 0:
            return resnet(f"down_blocks.{b}.resnets.{j}", p[3:])
        return ".".join([f"down_blocks.{b}.attentions.{j}"] + p[3:])
    if p[0] == "middle_block":
        k = int(p[1])
        if k == 1:
            return ".".join(["mid_block.attentions.0"] + p[2:])
        return resnet(f"mid_block.resnets.{k // 2}", p[2:])
    if p[0] == "output_blocks":
        i, slot = int(p[1]), int(p[2])
        b, j = i // (L + 1), i % (L + 1)
        if slot == 0:
            return resnet(f"up_blocks.{b}.resnets.{j}", p[3:])
        up_slot = 2 if b in attention_ups else 1
        if slot == up_slot and j == L and p[3:] == ["conv"]:
            return f"up_blocks.{b}.upsamplers.0.conv"
        assert slot == 1 and b in attention_ups, path
        return ".".join([f"up_blocks.{b}.attentions.{j}"] + p[3:])
    raise KeyError(path)


def kohya_name(prefix, path):
    return prefix + path.replace(".", "_")


def modules_of(weights_path, prefix=""):
    """Module paths of the weights (keys ending in .weight) under `prefix`, prefix removed."""
    with safe_open(weights_path, "pt") as f:
        return sorted(k[len(prefix):-len(".weight")] for k in f.keys() if k.startswith(prefix) and k.endswith(".weight"))


def kohya_module_table(case):
    """kohya module name → [Target] for the case's family, from the modules the bases actually have."""
    table = {}
    if case.startswith("flux"):
        cfg = json.load(open(os.path.join(folder("flux-dev"), "transformer", "config.json")))
        for bfl, targets in flux_bfl_to_diffusers(cfg).items():
            table[kohya_name("lora_unet_", bfl)] = [Target("transformer", f"{m}.weight", rows) for m, rows in targets]
        return table
    family = case.split("-")[0]
    if family == "sdxl":
        cfg = json.load(open(os.path.join(folder("sdxl"), "unet", "config.json")))
        L = cfg["layers_per_block"]
        attention_ups = {b for b, t in enumerate(cfg["up_block_types"]) if "CrossAttn" in t}
        for path in modules_of(os.path.join(MODELS, "tiny-sdxl.safetensors"), UNET):
            table[kohya_name("lora_unet_", path)] = [Target("unet", ldm_unet_to_diffusers(path, L, attention_ups) + ".weight")]
        encoders = (("lora_te1_", "text_encoder", "text_model."), ("lora_te2_", "text_encoder_2", ""))
    else:
        for path in modules_of(weights_file(family, "unet")):
            table[kohya_name("lora_unet_", path)] = [Target("unet", path + ".weight")]
        encoders = (("lora_te_", "text_encoder", "text_model."),)
    for prefix, component, missing in encoders:  # transformers 4 names: text_model.encoder…
        for path in modules_of(weights_file(family, component)):
            table[kohya_name(prefix, missing + path)] = [Target(component, path + ".weight")]
    return table


# ---------------------------------------------------------------------------------------------
# References


def delta(up, down):
    """B·A in float64; convolutions: B (out, r, 1, 1) · A (r, in, kh, kw) flattened."""
    out = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return out.reshape((up.shape[0],) + down.shape[1:])


def peft_updates(path):
    """[(Target, scaled ΔW)] of a diffusers-saved PEFT LoRA: scale lora_alpha / r from the metadata."""
    t, meta = read_lora(path)
    cfgs = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    updates, used = [], set()
    for key in sorted(t):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        component, _, name = module.partition(".")
        r, alpha = cfgs.get(f"{component}.r"), cfgs.get(f"{component}.lora_alpha")
        assert not cfgs.get(f"{component}.rank_pattern") and not cfgs.get(f"{component}.alpha_pattern")
        assert not cfgs.get(f"{component}.use_rslora") and not cfgs.get(f"{component}.use_dora")
        scale = alpha / r if cfgs else 1.0  # diffusers: no metadata → alpha = r
        a, b = t[key], t[module + ".lora_B.weight"]
        assert a.shape[0] == (r or a.shape[0]), key
        updates.append((Target(component, name + ".weight"), scale * delta(b, a)))
        used |= {key, module + ".lora_B.weight"}
    assert used == set(t), sorted(set(t) - used)
    return updates


def kohya_updates(path, case):
    """[(Target, scaled ΔW row block)] of a kohya LoRA: scale alpha / rows(lora_down), fused modules split by rows."""
    t, _ = read_lora(path)
    table = kohya_module_table(case)
    updates, used = [], set()
    for key in sorted(t):
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[: -len(".lora_down.weight")]
        down, up = t[key], t[module + ".lora_up.weight"]
        alpha = float(t[module + ".alpha"]) if module + ".alpha" in t else down.shape[0]
        full = (alpha / down.shape[0]) * delta(up, down)
        assert module in table, f"{path}: no diffusers module for {module}"
        for target in table[module]:
            a, b = target.rows or (0, full.shape[0])
            updates.append((target, full[a:b]))
        assert sum((tg.rows[1] - tg.rows[0]) if tg.rows else full.shape[0] for tg in table[module]) == full.shape[0], module
        used |= {key, module + ".lora_up.weight", module + ".alpha"} & set(t)
    assert used == set(t), sorted(set(t) - used)
    return updates


def write_references(case, family, updates):
    """expected/diffusion/<case>-lora.<component>.safetensors: W + Σ ΔW in float64, rounded once."""
    refs = {}
    for component in sorted({tg.component for tg, _ in updates}):
        base = load_file(weights_file(family, component))
        acc = {}
        for tg, dw in updates:
            if tg.component != component:
                continue
            w = acc.setdefault(tg.key, base[tg.key].to(torch.float64).numpy().copy())
            assert w.shape == dw.shape, (tg.key, w.shape, tg.rows, dw.shape)
            w += dw
        dtype = base[next(iter(acc))].dtype
        assert all(base[k].dtype == dtype for k in acc)
        out = {k: torch.from_numpy(round_to(v, DTYPE_NAME[dtype])).to(dtype) for k, v in sorted(acc.items())}
        for k, v in out.items():  # every value was on the dtype's grid already: the cast is exact
            assert np.array_equal(v.to(torch.float64).numpy(), round_to(acc[k], DTYPE_NAME[dtype])), k
        path = os.path.join(EXPECTED, f"{case}-lora.{component}.safetensors")
        save_file(out, path, metadata={
            "base": os.path.basename(folder(family)), "component": component,
            "note": f"every {component} tensor {case}-lora changes, merged at weight 1: W + scale·(B·A) in float64 "
                    f"({'lora_alpha / r from lora_adapter_metadata' if 'diffusers' in case else 'alpha / rows of lora_down'}"
                    f"{'; BFL fused modules split into row blocks' if 'flux-kohya' in case else ''}), "
                    f"rounded once to {DTYPE_NAME[dtype]}"})
        sort_metadata(path)
        refs[component] = out
    return refs


# ---------------------------------------------------------------------------------------------
# Checking the references with diffusers


def flux_kohya_converter_with_tiny_dims(dims):
    """diffusers' kohya-Flux converter with its one hard-coded split of linear1 set to the tiny widths."""
    fn = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    import inspect
    src = inspect.getsource(fn)
    old = "dims=[3072, 3072, 3072, 12288],"
    assert src.count(old) == 1
    src = src.replace(old, f"dims={list(dims)},")
    scope = dict(vars(lora_conversion_utils))
    exec(compile(src, lora_conversion_utils.__file__, "exec"), scope)
    return scope[fn.__name__]


@contextlib.contextmanager
def diffusers_log():
    """Every diffusers / peft / transformers log record of level INFO and up inside the block."""
    records = []

    class H(logging.Handler):
        def emit(self, r):
            records.append(f"{r.levelname} {r.name}: {r.getMessage()}")

    h = H(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    old = [(lg.level, [(x, x.level) for x in lg.handlers]) for lg in loggers]
    for lg in loggers:
        for x in lg.handlers:  # the libraries' own stderr handlers stay at their level
            x.setLevel(max(x.level, logging.WARNING + 10))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, (lv, handlers) in zip(loggers, old):
            lg.removeHandler(h)
            lg.setLevel(lv)
            for x, hl in handlers:
                x.setLevel(hl)


PIPELINES = {"flux-dev": (D.FluxPipeline, ["transformer"]),
             "sdxl": (D.StableDiffusionXLPipeline, ["unet", "text_encoder", "text_encoder_2"]),
             "sd1": (D.StableDiffusionPipeline, ["unet", "text_encoder"]),
             "sd2": (D.StableDiffusionPipeline, ["unet", "text_encoder"]),
             "sd3": (D.StableDiffusion3Pipeline, ["transformer"])}


def pipeline(family):
    cls, comps = PIPELINES[family]
    import inspect
    kwargs = {p: None for p in inspect.signature(cls.__init__).parameters if p != "self"}
    if "requires_safety_checker" in kwargs:
        kwargs["requires_safety_checker"] = False
    kwargs.update({c: load_component(family, c) for c in comps})
    return cls(**kwargs), comps


def tolerance(dtype, ref, base):
    """diffusers/PEFT fuses a LoRA held in the model's dtype: B·A computed in float32 from factors rounded to the
    dtype, the delta rounded to the dtype, then added (one more rounding). Allowed: 2 ulps of the dtype at the
    largest |W'| plus 2 ulps at the largest |ΔW|·rank-ish growth, i.e. 4 ulps of max(|W'|, |W|, |ΔW|)."""
    r, b = ref.to(torch.float64), base.to(torch.float64)
    return 4 * EPS[dtype] * max(float(r.abs().max()), float(b.abs().max()), float((r - b).abs().max()))


def wrapped_modules(pipe, comps):
    return {c: {n + ".weight" for n, m in getattr(pipe, c).named_modules() if isinstance(m, BaseTunerLayer)} for c in comps}


def load_into_pipeline(family, lora, patch_flux_dims):
    """A fresh pipeline with the LoRA loaded by `load_lora_weights`; also what diffusers logged."""
    pipe, comps = pipeline(family)
    restore = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    if patch_flux_dims:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = flux_kohya_converter_with_tiny_dims(patch_flux_dims)
    try:
        with diffusers_log() as log:
            if callable(lora):
                lora = lora(pipe)
            pipe.load_lora_weights(lora)
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = restore
    notes = [m for m in log if not m.startswith("INFO diffusers.loaders.lora_pipeline: Loading")
             and "associated to NoneType" not in m]  # the pipeline's absent text encoders
    return pipe, comps, notes


def with_transformer_prefix(path, patch_flux_dims):
    """diffusers' own conversion of the file (`lora_state_dict`), with `transformer.` put back on the keys its
    kohya-Flux converter leaves without it (embedders, final layer), which load_lora_weights then ignores."""
    def convert(pipe):
        sd = type(pipe).lora_state_dict(path)
        return {k if k.startswith(("transformer.", "text_encoder.")) else "transformer." + k: v for k, v in sd.items()}
    return convert


def check_with_diffusers(case, family, lora, refs, patch_flux_dims=None):
    """diffusers loads the file into the pipeline: the wrapped modules are the reference's (or a subset, reported as
    dropped); fused, every reference tensor agrees and nothing else changes."""
    pipe, comps, notes = load_into_pipeline(family, lora, patch_flux_dims)
    wrapped, dropped = wrapped_modules(pipe, comps), {}
    for c in comps:
        want = set(refs.get(c, {}))
        extra = wrapped[c] - want
        assert not extra, f"{case} {c}: diffusers wraps modules the reference leaves alone: {sorted(extra)[:6]}"
        if want - wrapped[c]:
            dropped[c] = sorted(want - wrapped[c])
    for m in notes:
        print(f"  diffusers log: {m[:300]}")
    if dropped:
        for c, mods in dropped.items():
            print(f"  diffusers load_lora_weights SILENTLY DROPS {len(mods)} {c} modules of the file "
                  f"(no warning): {', '.join(m[:-len('.weight')] for m in mods)}")
        assert family == "flux-dev", "only the kohya-Flux converter is known to drop modules"
        pipe, comps, _ = load_into_pipeline(family, with_transformer_prefix(lora, patch_flux_dims), patch_flux_dims)
        wrapped = wrapped_modules(pipe, comps)
        assert all(wrapped[c] == set(refs.get(c, {})) for c in comps), "prefix restored: still not every module"
        print("  … with `transformer.` restored on diffusers' own converted keys it wraps every module; that is checked:")
    base = {c: load_file(weights_file(family, c)) for c in comps}
    pipe.fuse_lora(components=[c for c in comps if c in refs])
    pipe.unload_lora_weights()
    worst = {}
    for c in comps:
        got = getattr(pipe, c).state_dict()
        assert set(got) == set(base[c]), (c, sorted(set(got) ^ set(base[c]))[:4])
        for k, v in got.items():
            if k in refs.get(c, {}):
                ref = refs[c][k]
                assert v.dtype == ref.dtype and v.shape == ref.shape, (c, k)
                err = float((v.to(torch.float64) - ref.to(torch.float64)).abs().max())
                tol = tolerance(v.dtype, ref, base[c][k])
                assert err <= tol, f"{case} {c} {k}: |diffusers − reference| {err:.3g} > {tol:.3g}"
                worst[c] = max(worst.get(c, 0.0), err / (EPS[v.dtype] * float(ref.to(torch.float64).abs().max())))
            else:
                assert torch.equal(v, base[c][k]), f"{case} {c} {k}: diffusers changed a tensor the reference does not"
    print(f"  diffusers {type(pipe).__name__}.load_lora_weights + fuse_lora agrees: " +
          ", ".join(f"{c} {len(refs[c])} tensors (worst {worst[c]:.2f} ulp of max|W'|)" for c in refs))


# ---------------------------------------------------------------------------------------------


CASES = {
    # case: (family, maker, seed, kind)
    "flux-diffusers": ("flux-dev", make_flux_diffusers, 201, "peft"),
    "flux-kohya": ("flux-dev", lambda s: make_flux_kohya(s, split_qkv=False), 202, "kohya"),
    "flux-kohya-split-qkv": ("flux-dev", lambda s: make_flux_kohya(s, split_qkv=True), 203, "kohya"),
    "sdxl-diffusers": ("sdxl", make_sdxl_diffusers, 204, "peft"),
    "sdxl-kohya": ("sdxl", make_sdxl_kohya, 205, "kohya"),
    "sd1-kohya": ("sd1", make_sd1_kohya, 206, "kohya"),
    "sd3-diffusers": ("sd3", make_sd3_diffusers, 207, "peft"),
    "sd2-kohya": ("sd2", make_sd2_kohya, 208, "kohya"),
}


def make(case):
    family, maker, seed, kind = CASES[case]
    path = maker(seed)
    updates = peft_updates(path) if kind == "peft" else kohya_updates(path, case)
    refs = write_references(case, family, updates)
    print(f"{case}: {os.path.relpath(path, HERE)} ({len(load_file(path))} tensors); reference for "
          + ", ".join(f"{c} ({len(r)} tensors)" for c, r in refs.items()))
    dims = None
    if case.startswith("flux-kohya"):
        cfg = json.load(open(os.path.join(folder(family), "transformer", "config.json")))
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        dims = [d, d, d, 4 * d]
    check_with_diffusers(case, family, path, refs, dims)


def main(only):
    os.makedirs(ADAPTERS, exist_ok=True)
    os.makedirs(EXPECTED, exist_ok=True)
    torch.set_num_threads(1)
    for case in only or CASES:
        make(case)
    print("files:")
    for d, pat in ((ADAPTERS, "-lora.safetensors"), (EXPECTED, ".safetensors")):
        for f in sorted(os.listdir(d)):
            if f.endswith(pat) and (d == EXPECTED or any(f.startswith(c + "-lora") for c in CASES)):
                p = os.path.join(d, f)
                print(f"  {os.path.getsize(p):>8}  {os.path.relpath(p, HERE)}")


if __name__ == "__main__":
    main(sys.argv[1:])  # optional case names: make only those
