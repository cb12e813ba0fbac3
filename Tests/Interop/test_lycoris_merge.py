"""LyCORIS adapters (LoHa, LoKr, full diff, DoRA `dora_scale`) merged by us give the layers
LyCORIS 4.1.3 itself runs.

The adapters are Fixtures/adapters/lycoris-<case>.safetensors, written by lycoris-lora 4.1.3
(Fixtures/make_lycoris_fixtures.py) on Fixtures/models/tiny-unet.safetensors (F16) and
tiny-text-encoder.safetensors (F32, the text-encoder half of `loha-te`). That script's
`build_tree` gives an nn.Module whose parameter names are the base keys and whose block classes
are the ones LyCORIS's kohya preset targets.

The reference is LyCORIS's own loader and forward: `lycoris.kohya.create_network_from_weights`
(what sd-scripts calls for a `lora_unet_…` / `lora_te_…` network file) reads the
file onto a fresh float64 tree of the base, the modules are held in float64 (dora_scale in the
file's F32, as in a float32 run: its ε is float32's), `apply_to` hooks them in at multiplier 1,
and every adapted layer's forward on a seeded random input must equal the plain layer
(F.linear / F.conv2d) with the weight and bias of `adapter merge --component …`, upcast, within
what rounding our result once to the base dtype allows (see `allowed`).

LyCORIS's own *merge* (`merge_to`, `get_merged_weight`, `lycoris.utils.merge`) is not the
reference: in 4.1.3 it applies LoHa's and LoKr's alpha/dim twice (`get_diff_weight` multiplies
`get_weight`, which already holds the scale, by the scale again), while its forward applies it
once; we follow the forward (Fixtures/README.md; the script checks it too).
`test_lycoris_merge_to_applies_the_scale_twice` pins that: its merge is base + s²·ΔW, ours
base + s·ΔW, and the two agree only where s = 1.

Four fixtures LyCORIS writes but its loader cannot read back (both `-wd-in` DoRA files,
`lokr-tucker`, `lokr-decomposed-w1`): the test asserts the loader still refuses them and that our
merge equals Fixtures/expected/lycoris/<case>.safetensors (the script's Float64 reference, which
it checked against LyCORIS's in-memory forward when it wrote the file).
"""
import importlib.util
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from interop import ADAPTERS, FIXTURES, MODELS, adapter


def _load_fixture_script():
    """Fixtures/make_lycoris_fixtures.py as a module (it puts Fixtures/ on sys.path for its
    numpy helpers; that is undone so Fixtures/safetensors, Fixtures/gguf, … shadow nothing)."""
    path = FIXTURES / "make_lycoris_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_lycoris_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


fx = _load_fixture_script()
from lycoris import kohya  # noqa: E402  (after the script, which imports lycoris the same way)
from lycoris.logging import logger as lycoris_logger  # noqa: E402

VERSION = "4.1.3"
STEMS = {"unet": "tiny-unet", "text_encoder": "tiny-text-encoder"}
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}

ALL_CASES = [c[0] for c in fx.CASES]
# What LyCORIS 4.1.3's loader cannot rebuild (its make_module_from_state_dict), and the error it raises.
UNREADABLE = {
    "loha-dora-wd-in": (RuntimeError, "doesn't match the broadcast shape"),  # builds an (out, 1) dora_scale
    "lokr-dora-wd-in": (RuntimeError, "doesn't match the broadcast shape"),
    "lokr-tucker": (AttributeError, "lokr_w2_a"),  # rank read as w2_a.size(1) = b under tucker
    "lokr-decomposed-w1": (AttributeError, "lokr_w1_a"),  # decompose_both re-derived as False
}
READABLE = [c for c in ALL_CASES if c not in UNREADABLE]
TEXT_ENCODER_CASES = {c[0] for c in fx.CASES if c[3]}

# Rounding our result once to the base dtype moves each weight by ≤ ½ ulp of the largest |W′|;
# the output then by ≤ ½ ulp(max|W′|) · Σ|x| over a receptive field (+ ½ ulp of the bias).
# Allowed: ULPS ulps. F32 bases (text encoder): we compute in Float32, so more ulps, as the
# other F32 comparisons of this tier (2⁻²⁰ = 8 ulps of the largest element).
ULPS = {torch.float16: 2, torch.float32: 8}
# The adapter must move every layer's output by far more than that.
EFFECT = 20


@pytest.fixture(scope="module", autouse=True)
def _lycoris_quiet_and_pinned():
    from importlib.metadata import version

    assert version("lycoris-lora") == VERSION, f"the tier is written against lycoris-lora {VERSION}"
    level = lycoris_logger.level
    lycoris_logger.setLevel(logging.ERROR)
    yield
    lycoris_logger.setLevel(level)


@pytest.fixture(scope="session")
def bases():
    return {stem: fx.load_base(stem) for stem in STEMS.values()}


def components(case):
    return ["unet", "text_encoder"] if case in TEXT_ENCODER_CASES else ["unet"]


@pytest.fixture(scope="session")
def ours(workdir):
    """`ours(case)`: {component: {key: tensor}} of `adapter merge --component …` (cached)."""
    cache = {}

    def get(case):
        if case not in cache:
            got = {}
            for component in components(case):
                out = workdir / f"lycoris-{case}-{component}.safetensors"
                adapter("merge", "--quiet", "--component", component, MODELS / f"{STEMS[component]}.safetensors",
                        ADAPTERS / f"lycoris-{case}.safetensors", out)
                got[component] = load_file(out)
            cache[case] = got
        return cache[case]

    return get


def lycoris_network(case, bases):
    """LyCORIS's loader on fresh float64 trees: (network, {component: tree}), modules not hooked."""
    trees = {c: fx.build_tree(bases[STEMS[c]]).double() for c in components(case)}
    net, _ = kohya.create_network_from_weights(
        1.0, str(ADAPTERS / f"lycoris-{case}.safetensors"), None, trees.get("text_encoder"), trees["unet"])
    for lora in net.unet_loras + net.text_encoder_loras:
        lora.double()
        if getattr(lora, "wd", False):
            lora.dora_scale.data = lora.dora_scale.data.float()  # the file's F32: float32's ε, as in a float32 run
    return net, trees


def file_modules(case):
    return sorted({k.split(".", 1)[0] for k in load_file(ADAPTERS / f"lycoris-{case}.safetensors")})


def layer_paths(trees):
    """lora name → (component, module path, layer) for every Linear / Conv2d of the trees."""
    out = {}
    for component, tree in trees.items():
        for path, module in tree.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                out[f"{PREFIXES[component]}_{path.replace('.', '_')}"] = (component, path, module)
    return out


def plain(layer, weight, bias, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=layer.padding)


def receptive_sum(layer, shape, x):
    """max over outputs of Σ|x| over the inputs each output reads (a weight of `shape`)."""
    return float(plain(layer, torch.ones(shape, dtype=x.dtype), None, x.abs()).max())


def random_input(layer, g):
    if isinstance(layer, nn.Linear):
        return torch.randn(4, layer.in_features, generator=g, dtype=torch.float64)
    return torch.randn(2, layer.in_channels, 5, 5, generator=g, dtype=torch.float64)


def ulp(t, dtype):
    """The spacing of `dtype` at max|t| (t upcast from dtype)."""
    m = float(t.abs().max())
    return float(np.spacing(np.array(m, dtype={torch.float16: np.float16, torch.float32: np.float32}[dtype])))


def test_every_lycoris_fixture_is_covered():
    """Every Fixtures/adapters/lycoris-*.safetensors is a case of the script, and is either read by
    LyCORIS's loader (compared with its forward) or listed as unreadable (compared with the
    reference file)."""
    files = sorted(p.name[len("lycoris-"):-len(".safetensors")] for p in ADAPTERS.glob("lycoris-*.safetensors"))
    assert files == sorted(ALL_CASES), f"fixtures {files} vs the script's cases {sorted(ALL_CASES)}"
    assert set(UNREADABLE) < set(ALL_CASES)


@pytest.mark.parametrize("case", READABLE)
def test_merge_gives_the_layers_lycoris_forward_runs(case, bases, ours):
    merged = ours(case)
    net, trees = lycoris_network(case, bases)
    loras = net.unet_loras + net.text_encoder_loras
    assert sorted(lora.lora_name for lora in loras) == file_modules(case), \
        f"{case}: LyCORIS's loader did not build every module of the file"
    assert {type(lora).__name__ for lora in loras} <= {"LohaModule", "LokrModule", "FullModule"}
    layers = layer_paths(trees)
    base_w = {name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
              for name, (_, _, layer) in layers.items()}
    net.apply_to(trees.get("text_encoder"), trees["unet"], apply_text_encoder="text_encoder" in trees,
                 apply_unet=True)
    net.eval()

    # We change the adapted layers' tensors only.
    adapted = {(layers[lora.lora_name][0], layers[lora.lora_name][1]) for lora in loras}
    for component, tensors in merged.items():
        base = bases[STEMS[component]]
        assert sorted(tensors) == sorted(base), f"{case} {component}: merged keys differ from the base"
        changed = {k for k in base if not torch.equal(tensors[k], base[k])}
        touched = {k.rsplit(".", 1)[0] for k in changed}
        assert {(component, p) for p in touched} <= adapted, f"{case}: we changed {sorted(touched)}"

    g = torch.Generator().manual_seed(0)
    report = []
    for lora in sorted(loras, key=lambda l: l.lora_name):
        component, path, layer = layers[lora.lora_name]
        assert not lora.bypass_mode, f"{lora.lora_name}: bypass mode on a plain layer"
        base = bases[STEMS[component]]
        dtype = base[path + ".weight"].dtype
        w = merged[component][path + ".weight"]
        b = merged[component].get(path + ".bias")
        assert w.dtype == dtype and not torch.equal(w, base[path + ".weight"]), f"{case} {path}: weight unchanged"
        x = random_input(layer, g)
        with torch.no_grad():
            want = layer(x)  # LyCORIS's hooked forward
            got = plain(layer, w.double(), None if b is None else b.double(), x)
            unmerged = plain(layer, *base_w[lora.lora_name], x)
        allowed = ULPS[dtype] * (ulp(w, dtype) * receptive_sum(layer, w.shape, x) + (0 if b is None else ulp(b, dtype)))
        err = float((got - want).abs().max())
        effect = float((want - unmerged).abs().max())
        report.append(f"{path}: err {err:.3g}, allowed {allowed:.3g}, effect {effect:.3g}")
        assert effect > EFFECT * allowed, (
            f"{case} {path}: LyCORIS's update moves the output by only {effect:.3g} (allowed error {allowed:.3g})")
        assert err <= allowed, (
            f"{case} {path}: our merged layer differs from LyCORIS's forward by {err:.3g} > {allowed:.3g} "
            f"(the update moves it by {effect:.3g})")
    print(f"{case}:\n  " + "\n  ".join(report))


# Cases of s ≠ 1 (LoHa linear/1×1 s 0.5, 3×3 s 1.5; LoKr linear/1×1 s 2, 3×3 s 0.5) and of s = 1.
MERGE_CASES = ["loha", "lokr", "lokr-full", "full"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_lycoris_merge_to_applies_the_scale_twice(case, bases, ours):
    """LyCORIS's merge (the kohya network's `merge_to`, sd-scripts' path; every module's `merge_to`
    → `get_merged_weight`) into a float64 tree gives base + s²·ΔW where its forward and our merge
    give base + s·ΔW, s = the module's alpha / dim as LyCORIS reads it (`lora.scale`). So
    merged_lycoris − base = s·(ours − base), which differs from ours − base unless s = 1."""
    merged = ours(case)
    net, trees = lycoris_network(case, bases)
    sd = load_file(ADAPTERS / f"lycoris-{case}.safetensors")
    net.merge_to(trees.get("text_encoder"), trees["unet"], sd, torch.float64, "cpu")
    layers = layer_paths(trees)
    scales, report = set(), []
    for lora in net.unet_loras + net.text_encoder_loras:
        component, path, layer = layers[lora.lora_name]
        s = float(getattr(lora, "scale", 1.0))
        scales.add(s)
        base = bases[STEMS[component]][path + ".weight"]
        dtype = base.dtype
        w = merged[component][path + ".weight"]
        theirs = layer.weight.detach()
        ours_delta = w.double() - base.double()
        # Our delta is s·ΔW rounded (≤ ½ ulp(max|W′|) per element); theirs is exact float64.
        allowed = ULPS[dtype] * ulp(w, dtype) * max(abs(s), 1.0)
        twice = float((theirs - base.double() - s * ours_delta).abs().max())
        assert twice <= allowed, f"{case} {path}: LyCORIS's merge is not base + s²·ΔW (s {s:g}): off by {twice:.3g}"
        off = float((theirs - w.double()).abs().max())
        report.append(f"{path}: s {s:g}, |theirs − (base + s²·ΔW)| {twice:.3g}, |theirs − ours| {off:.3g}, "
                      f"allowed {allowed:.3g}")
        if s == 1.0:
            assert off <= allowed, f"{case} {path}: s = 1, yet LyCORIS's merge differs from ours by {off:.3g}"
        else:
            assert off > EFFECT * allowed, f"{case} {path}: s {s:g}, yet LyCORIS's merge is within {off:.3g} of ours"
    print(f"{case}:\n  " + "\n  ".join(sorted(report)))
    if case in ("loha", "lokr"):
        assert scales - {1.0}, f"{case}: no module with s ≠ 1"
    else:
        assert scales == {1.0}, f"{case}: scales {scales}"


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_fixtures_merge_to_the_float64_reference(case, bases, ours):
    error, words = UNREADABLE[case]
    trees = {c: fx.build_tree(bases[STEMS[c]]).double() for c in components(case)}
    with pytest.raises(error, match=words):
        kohya.create_network_from_weights(
            1.0, str(ADAPTERS / f"lycoris-{case}.safetensors"), None, trees.get("text_encoder"), trees["unet"])
    expected = load_file(FIXTURES / "expected" / "lycoris" / f"{case}.safetensors")
    merged = ours(case)["unet"]
    base = bases["tiny-unet"]
    for key, want in expected.items():
        assert merged[key].dtype == want.dtype == base[key].dtype
        err = float((merged[key].double() - want.double()).abs().max())
        # As the Swift suite (expectMatches): 2⁻²⁰ of the largest element, i.e. below one F16 ulp.
        assert err <= 2**-20 * float(want.abs().max()), f"{case} {key}: {err:.3g} from the Float64 reference"
    changed = sorted(k for k in base if not torch.equal(merged[k], base[k]))
    assert changed == sorted(expected), f"{case}: we changed {changed}"
