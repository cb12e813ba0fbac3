#!/usr/bin/env python3
"""LyCORIS fixtures (LoHa, LoKr, full diff, DoRA `dora_scale`), written by the real library.

    pip install lycoris-lora==4.1.3 torch safetensors numpy    # only to regenerate
    python3 Fixtures/make_lycoris_fixtures.py

The bases are the committed Fixtures/models/tiny-unet.safetensors (F16, diffusers UNet names)
and tiny-text-encoder.safetensors (F32, CLIP text names). For them this script builds a torch
module tree whose module paths are the base keys and whose block classes carry the names
LyCORIS's kohya preset looks for (Transformer2DModel, ResnetBlock2D, CLIPAttention), loads
the base weights, wraps it with `lycoris.kohya.create_network` (the sd-scripts entry point,
so modules are named `lora_unet_<path, . → _>` / `lora_te_<path>` exactly like
adapters/kohya-unet.safetensors), overwrites every factor with seeded random values (LyCORIS
zero-inits one factor per module), and saves with the network's own `save_weights` into
Fixtures/adapters/lycoris-<case>.safetensors. The only change made to LyCORIS's output is
the order of the metadata keys, which are rewritten sorted (safetensors keeps metadata in a
Rust HashMap and writes it in a different order on every run); the tensor bytes are LyCORIS's.

For each case Fixtures/expected/lycoris/<case>.safetensors holds every base tensor the
adapter changes, merged at multiplier 1: computed in numpy Float64 from the tensors read
back from the written adapter, by the rules summarized in Fixtures/README.md (scale applied
once, as LyCORIS's forward applies it), rounded once to the base dtype. A case touching the
text encoder too gets <case>.unet.safetensors and <case>.text-encoder.safetensors.

Cross-checks (asserted for every case):
  1. LyCORIS's forward: the in-memory network, cast to float64 (dora_scale kept float32, so
     its epsilon is float32's, as in a float32 run), is probed with unit inputs and the
     effective weight it applies must equal the Float64 reference within 2e-6.
  2. LyCORIS's merge (`get_merged_weight`, what `merge_to` and tools/merge.py use) applies
     LoHa's and LoKr's alpha/dim scale twice in 4.1.3 (`get_weight` already includes it and
     `get_diff_weight` multiplies again). The script checks that it equals the reference
     recomputed with scale² (and, for full and scale-1 LoKr, the reference itself).
  3. LyCORIS's loader (`lycoris.utils.merge`, i.e. tools/merge.py: get_module →
     make_module_from_state_dict → merge_to) on a fresh float64 base, from the written file:
     checked against the scale² reference where it loads; the cases it cannot load are listed.
"""
import json
import logging
import os
import struct
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # lycoris.utils.merge's progress bars

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

import lycoris
from lycoris import kohya
from lycoris.logging import logger as lycoris_logger
from lycoris.utils import merge as lycoris_merge

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import round_to, write_st  # noqa: E402  (numpy-only helpers)

MODELS = os.path.join(HERE, "models")
ADAPTERS = os.path.join(HERE, "adapters")
EXPECTED = os.path.join(HERE, "expected", "lycoris")
VERSION = "4.1.3"
F32_EPS = float(np.finfo(np.float32).eps)  # LyCORIS: torch.finfo(dora_scale.dtype).eps

# Block classes LyCORIS's kohya preset targets, keyed by the module path that gets them.
BLOCK_CLASSES = {
    "down_blocks.0.attentions.0": "Transformer2DModel",
    "down_blocks.0.resnets.0": "ResnetBlock2D",
    "text_model.encoder.layers.0.self_attn": "CLIPAttention",
}
ST_DTYPE = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


# --------------------------------------------------------------------------------------
# MARK: - Base trees
# --------------------------------------------------------------------------------------


def load_base(stem):
    with safe_open(os.path.join(MODELS, f"{stem}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def build_tree(base):
    """An nn.Module whose parameter names are exactly the base keys (float32)."""
    classes = {}
    root = nn.Module()
    weights = sorted(k[: -len(".weight")] for k in base if k.endswith(".weight"))
    for path in weights:
        w = base[path + ".weight"]
        has_bias = path + ".bias" in base
        if w.dim() == 2:
            leaf = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        else:
            k = w.shape[2]
            leaf = nn.Conv2d(w.shape[1], w.shape[0], k, padding=k // 2, bias=has_bias)
        parent, parts = root, path.split(".")
        for i, part in enumerate(parts[:-1]):
            if not hasattr(parent, part):
                at = ".".join(parts[: i + 1])
                name = BLOCK_CLASSES.get(at)
                cls = classes.setdefault(name, type(name, (nn.Module,), {})) if name else nn.Module
                parent.add_module(part, cls())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], leaf)
    root.load_state_dict({k: v.float() for k, v in base.items()}, strict=True)
    assert set(dict(root.named_parameters())) == set(base), "tree does not reproduce the base keys"
    return root.float()


# --------------------------------------------------------------------------------------
# MARK: - Float64 reference (independent of LyCORIS)
# --------------------------------------------------------------------------------------


def read_adapter(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).to(torch.float64).numpy() for k in f.keys()}, f.metadata()


def lora_names(base, prefix):
    """kohya name → base module path, for every weight of the base."""
    return {f"{prefix}_{k[:-7].replace('.', '_')}": k[:-7] for k in base if k.endswith(".weight")}


def module_delta(t, shape, scale_power=1):
    """(ΔW, Δbias or None, dora_scale or None) of one module's stored tensors `t`."""
    alpha = t.get("alpha")
    if "diff" in t:  # full: no alpha, no scale
        return t["diff"].reshape(shape), t.get("diff_b"), None
    if "hada_w1_a" in t:  # LoHa
        dim = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            w1 = np.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = np.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        raw = (w1 * w2).reshape(shape)
    else:  # LoKr
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        a, c = w1.shape
        b, d = shape[0] // a, shape[1] // c
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = np.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        w2 = w2.reshape(b, d, *shape[2:])
        raw = np.kron(w1.reshape(a, c, *[1] * (len(shape) - 2)), w2)
        # dim: the rank of the decomposed side; both sides full → scale 1.
        dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        if dim is None:
            alpha = None
    scale = 1.0 if alpha is None else float(alpha) / dim
    return raw * scale**scale_power, None, t.get("dora_scale")


def dora(v, m):
    """W' = V · m / (‖V‖ + ε); the norm over every axis but the one dora_scale keeps."""
    keep = 0 if m.shape[0] == v.shape[0] and m.size == v.shape[0] else 1
    axes = tuple(i for i in range(v.ndim) if i != keep)
    norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True)) + F32_EPS
    return v * (m / norm)


def reference(adapter, base, prefix, scale_power=1):
    """{base key: merged float64} for the modules of `adapter` under `prefix`."""
    names = lora_names(base, prefix)
    groups = {}
    for key, value in adapter.items():
        name, field = key.split(".", 1)
        if name.startswith(prefix + "_"):
            assert name in names, f"{name}: no such base module"
            groups.setdefault(name, {})[field] = value
    out = {}
    for name, t in sorted(groups.items()):
        path = names[name]
        w = base[path + ".weight"].to(torch.float64).numpy()
        dw, db, m = module_delta(t, w.shape, scale_power)
        out[path + ".weight"] = dora(w + dw, m) if m is not None else w + dw
        if db is not None:
            out[path + ".bias"] = base[path + ".bias"].to(torch.float64).numpy() + db
    return out


# --------------------------------------------------------------------------------------
# MARK: - LyCORIS cross-checks
# --------------------------------------------------------------------------------------


def probe(module):
    """The weight (and bias) a float64 layer applies, read off its forward with unit inputs."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            n = module.in_features
            y0 = module(torch.zeros(1, n, dtype=torch.float64))[0]
            w = (module(torch.eye(n, dtype=torch.float64)) - y0).T
            return w, y0
        c, k = module.in_channels, module.kernel_size[0]
        p = k // 2
        x = torch.zeros(c, c, k, k, dtype=torch.float64)
        x[torch.arange(c), torch.arange(c), p, p] = 1.0  # sample i: a unit impulse on channel i
        y0 = module(torch.zeros(1, c, k, k, dtype=torch.float64))[0, :, p, p]
        y = module(x) - y0[None, :, None, None]
        # y[i, o, r, s] = w[o, i, 2p - r, 2p - s]
        return y.flip(2, 3).transpose(0, 1), y0


def close(a, b, tol=2e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= tol


def to_float64(net, roots):
    for r in roots:
        r.double()
    net.double()
    for lora in net.loras:
        if getattr(lora, "wd", False):  # keep the float32 epsilon of a float32 run
            lora.dora_scale.data = lora.dora_scale.data.float()


def check_forward(net, trees, bases, refs, case):
    for stem, root in trees.items():
        modules = dict(root.named_modules())
        for key, want in refs[stem].items():
            path, field = key.rsplit(".", 1)
            w, b = probe(modules[path])
            got = w if field == "weight" else b
            assert close(got.numpy(), want), f"{case}: LyCORIS forward differs on {key}"


def check_merge(net, trees, bases, refs, refs_sq, case):
    """LyCORIS's get_merged_weight against the reference with scale applied twice."""
    by_name = {lora.lora_name: lora for lora in net.loras}
    kinds = set()
    for stem, root in trees.items():
        prefix = "lora_unet" if stem == "tiny-unet" else "lora_te"
        for name, path in lora_names(bases[stem], prefix).items():
            if name not in by_name:
                continue
            lora = by_name[name]
            with torch.no_grad():
                w, b = lora.get_merged_weight(1.0, tuple(lora.shape), None)
            key = path + ".weight"
            once = close(w.detach().numpy(), refs[stem][key])
            twice = close(w.detach().numpy(), refs_sq[stem][key])
            assert twice, f"{case}: LyCORIS get_merged_weight on {key} is neither once nor twice scaled"
            kinds.add("= reference" if once else "= scale² (not the reference)")
            if b is not None and path + ".bias" in refs[stem]:
                assert close(b.detach().numpy(), refs[stem][path + ".bias"]), f"{case}: merged bias {path}"
    return ", ".join(sorted(kinds))


def check_loader(adapter_path, bases, refs, refs_sq, case):
    """tools/merge.py's path (lycoris.utils.merge) on fresh float64 bases, from the file."""
    from safetensors.torch import load_file

    sd = load_file(adapter_path)
    trees = {stem: build_tree(bases[stem]).double() for stem in refs_sq}
    unet = trees["tiny-unet"]
    tes = [trees["tiny-text-encoder"]] if "tiny-text-encoder" in trees else []
    try:
        with open(os.devnull, "w") as null:
            old, sys.stdout = sys.stdout, null
            try:
                lycoris_merge(tes, unet, sd, scale=1.0)
            finally:
                sys.stdout = old
    except Exception as e:  # noqa: BLE001 - the report says which cases LyCORIS cannot load
        return f"LyCORIS cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    kinds = set()
    for stem, root in trees.items():
        params = dict(root.named_parameters())
        for key, want in refs_sq[stem].items():
            got = params[key].detach().numpy()
            assert close(got, want), f"{case}: lycoris.utils.merge differs on {key}"
            kinds.add("= reference" if close(got, refs[stem][key]) else "= scale² (not the reference)")
    return "lycoris.utils.merge " + ", ".join(sorted(kinds))


# --------------------------------------------------------------------------------------
# MARK: - Cases
# --------------------------------------------------------------------------------------


def randomize(net, seed, std, round_dtype=None):
    """Seeded non-zero values for every factor; dora_scale perturbed by up to ~10 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            field = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if field == "dora_scale":
                p.mul_(1 + 0.1 * noise)
            elif field in ("weight", "bias"):  # full: the module holds W + diff after apply_to
                p.add_(0.02 * noise)
            else:
                p.copy_(std.get(field, std["*"]) * noise)
            if round_dtype is not None:  # what the file will hold, so the forward check sees it
                p.copy_(p.to(round_dtype).float())


def sort_metadata(path):
    """Rewrite the header with metadata keys sorted; tensor entries and bytes untouched."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    new = {"__metadata__": {k: meta[k] for k in sorted(meta)}} if meta else {}
    new.update(header)
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    assert len(text) == n, "header length changed"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + blob[8 + n :])


CASES = [
    # case, network args, (dim, alpha), text encoder too, save dtype, seed, note
    ("loha", dict(algo="loha", conv_dim=2, conv_alpha=3.0), (4, 2.0), False, torch.float32, 101,
     "LoHa, no tucker: linear and 1x1 conv r 4 alpha 2 (s 0.5), 3x3 conv r 2 alpha 3 (s 1.5)"),
    ("loha-tucker", dict(algo="loha", conv_dim=2, conv_alpha=3.0, use_tucker=True), (4, 2.0), False, torch.float32, 102,
     "LoHa with use_tucker: 3x3 conv has hada_t1/hada_t2 (r 2, s 1.5); linear and 1x1 conv stay plain (r 4, s 0.5)"),
    ("lokr", dict(algo="lokr", conv_dim=1, conv_alpha=0.5), (1, 2.0), False, torch.float32, 103,
     "LoKr, factor -1: full lokr_w1 (2,2), decomposed lokr_w2_a/_b, r 1; linear and 1x1 alpha 2 (s 2), 3x3 conv alpha 0.5 (s 0.5)"),
    ("lokr-full", dict(algo="lokr", conv_dim=4, conv_alpha=2.0), (4, 2.0), False, torch.float32, 104,
     "LoKr with lokr_w1 and lokr_w2 both full (dim 4 too large for the 4-wide w2): scale forced to 1, saved alpha = dim = 4"),
    ("lokr-decomposed-w1", dict(algo="lokr", conv_dim=1, conv_alpha=0.5, decompose_both=True, unbalanced_factorization=True),
     (1, 3.0), False, torch.float32, 105,
     "LoKr decompose_both + unbalanced_factorization: lokr_w1_a/_b everywhere; linear and 1x1 w2 decomposed (s 3); "
     "3x3 conv w2 full (4-D) with w1 decomposed (s 0.5)"),
    ("lokr-tucker", dict(algo="lokr", conv_dim=2, conv_alpha=3.0, use_tucker=True, factor=8), (2, 1.0), False, torch.float32, 106,
     "LoKr factor 8, use_tucker: 3x3 conv lokr_w1 (1,2), lokr_t2 (2,2,3,3), lokr_w2_a (2,8), lokr_w2_b (2,2), s 1.5; "
     "linear and 1x1 w1 (1,1), w2_a/_b r 2, s 0.5"),
    ("loha-dora", dict(algo="loha", conv_dim=2, conv_alpha=3.0, dora_wd=True, wd_on_output=True), (4, 2.0), False, torch.float32, 107,
     "LoHa + dora_wd, wd_on_output true: dora_scale (out,1[,1,1]), W' = V·m/(‖V‖_row + eps), V = W + s·ΔW"),
    ("loha-dora-wd-in", dict(algo="loha", conv_dim=2, conv_alpha=3.0, dora_wd=True, wd_on_output=False), (4, 2.0), False, torch.float32, 108,
     "LoHa + dora_wd, wd_on_output false: dora_scale (1,in[,1,1]), norm per input column (over out and kernel)"),
    ("lokr-dora", dict(algo="lokr", conv_dim=1, conv_alpha=0.5, dora_wd=True, wd_on_output=True), (1, 2.0), False, torch.float32, 109,
     "LoKr + dora_wd, wd_on_output true"),
    ("lokr-dora-wd-in", dict(algo="lokr", conv_dim=1, conv_alpha=0.5, dora_wd=True, wd_on_output=False), (1, 2.0), False, torch.float32, 110,
     "LoKr + dora_wd, wd_on_output false"),
    ("full", dict(algo="full"), (4, 1.0), False, torch.float32, 111,
     "full: diff (= W_new − W) on every module, diff_b on to_out.0 (the only biased layer); no alpha, no scale"),
    ("loha-te", dict(algo="loha", conv_dim=2, conv_alpha=3.0), (4, 2.0), True, torch.bfloat16, 112,
     "LoHa on UNet and text encoder (lora_te_), saved in bf16 (alpha too)"),
]

STD = {
    "loha": {"hada_t1": 0.5, "hada_t2": 0.5, "*": 0.35},
    "lokr": {"lokr_w1": 0.5, "lokr_w1_a": 0.6, "lokr_w1_b": 0.6, "lokr_t2": 0.5, "*": 0.25},
    "full": {"*": 0.0},
}


def make_case(case, args, dim_alpha, with_te, save_dtype, seed, note, bases):
    torch.manual_seed(seed)
    dim, alpha = dim_alpha
    unet = build_tree(bases["tiny-unet"])
    te = build_tree(bases["tiny-text-encoder"]) if with_te else None
    net = kohya.create_network(1.0, dim, alpha, None, te, unet, **args)
    net.apply_to(te, unet, apply_text_encoder=with_te, apply_unet=True)
    net.eval()
    randomize(net, seed, STD[args["algo"]], None if save_dtype == torch.float32 else save_dtype)

    path = os.path.join(ADAPTERS, f"lycoris-{case}.safetensors")
    network_args = {k: str(v) for k, v in args.items()}
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps(network_args, sort_keys=True), "ss_output_name": f"lycoris-{case}"}
    net.save_weights(path, save_dtype, metadata)
    sort_metadata(path)

    adapter, _ = read_adapter(path)
    stems = ["tiny-unet"] + (["tiny-text-encoder"] if with_te else [])
    prefixes = {"tiny-unet": "lora_unet", "tiny-text-encoder": "lora_te"}
    refs = {s: reference(adapter, bases[s], prefixes[s]) for s in stems}
    refs_sq = {s: reference(adapter, bases[s], prefixes[s], scale_power=2) for s in stems}
    names = {n for s in stems for n in lora_names(bases[s], prefixes[s])}
    assert {k.split(".")[0] for k in adapter} <= names, f"{case}: a module that is not in the base"

    # Cross-checks against LyCORIS itself.
    to_float64(net, [unet] + ([te] if te is not None else []))
    trees = {"tiny-unet": unet, **({"tiny-text-encoder": te} if te is not None else {})}
    check_forward(net, trees, bases, refs, case)
    merge_kind = check_merge(net, trees, bases, refs, refs_sq, case)
    loader = check_loader(path, bases, refs, refs_sq, case)

    os.makedirs(EXPECTED, exist_ok=True)
    for s in stems:
        out = {}
        for key, value in sorted(refs[s].items()):
            dtype = ST_DTYPE[bases[s][key].dtype]
            rounded = round_to(value, dtype)
            assert not np.array_equal(rounded, bases[s][key].to(torch.float64).numpy()), f"{case}: {key} unchanged"
            out[key] = (dtype, rounded)
        suffix = "" if not with_te else (".unet" if s == "tiny-unet" else ".text-encoder")
        write_st(os.path.join(EXPECTED, f"{case}{suffix}.safetensors"), out,
                 {"base": s, "lycoris": lycoris_version(), "note": note})
    print(f"{case}: {len(adapter)} adapter tensors; forward = reference; get_merged_weight {merge_kind}; {loader}")


def lycoris_version():
    from importlib.metadata import version

    return version("lycoris-lora")


def main(only):
    torch.set_num_threads(1)
    lycoris_logger.setLevel(logging.ERROR)
    assert lycoris_version() == VERSION, f"made with lycoris-lora {VERSION}, found {lycoris_version()}"
    bases = {s: load_base(s) for s in ("tiny-unet", "tiny-text-encoder")}
    for case in CASES:
        if not only or case[0] in only:
            make_case(*case, bases)


if __name__ == "__main__":
    main(sys.argv[1:])  # optional case names: make only those
