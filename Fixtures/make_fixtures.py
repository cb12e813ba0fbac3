#!/usr/bin/env python3
"""Build the tiny, deterministic fixture files under Fixtures/.

Run from anywhere: `python3 Fixtures/make_fixtures.py`. Needs only numpy and the
`safetensors` package. Every run rewrites the same bytes: seeds are fixed, JSON is
written with fixed key order, and safetensors files come from the reference writer.

Layout produced (see Fixtures/README.md for what each file imitates):
  models/    tiny base checkpoints (LLaMA-shaped folder, GPT-2, UNet, text encoder)
  adapters/  one adapter per real tool layout (PEFT, MoSLoRA forks, kohya, diffusers,
             mlx-lm, PaddleNLP, MyTransformers)
  expected/  merged tensors (base dtype, rounded once) and float64 deltas per pair

Expected merges are computed in float64 from the values read back from the adapter
files (so they reflect the stored dtype exactly) and rounded once, round-to-nearest-even,
into the base dtype.

`--real-peft` additionally writes adapters/peft-real-lora/ with real torch + PEFT +
transformers when all three import; the default path never imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import zlib

import numpy as np
from safetensors import TensorSpec, serialize

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(ROOT, "models")
ADAPTERS = os.path.join(ROOT, "adapters")
EXPECTED = os.path.join(ROOT, "expected")

PT = {"format": "pt"}

# --------------------------------------------------------------------------------------
# MARK: - Number formats
# --------------------------------------------------------------------------------------

# (significand bits incl. the implicit one, exponent of the smallest subnormal quantum,
#  largest finite value)
FORMATS = {
    "BF16": (8, -133, float.fromhex("0x1.fep127")),
    "F16": (11, -24, 65504.0),
    "F32": (24, -149, float.fromhex("0x1.fffffep127")),
}

NUMPY_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ST_NAME = {v: k for k, v in NUMPY_NAME.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def round_to(x, dtype):
    """Round float64 values once, to nearest-even, onto the grid of `dtype`.

    Works on the float64 value directly (frexp + rint are exact here), so there is no
    float64 -> float32 -> bfloat16 double rounding. Returns float64 values that are exactly
    representable in `dtype`.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "F64":
        return x.copy()
    bits, min_q, max_finite = FORMATS[dtype]
    _, e = np.frexp(x)
    q = np.maximum(e - bits, min_q)  # exponent of one unit in the last place
    r = np.ldexp(np.rint(np.ldexp(x, -q)), q)
    r = np.where(np.abs(r) > max_finite, np.copysign(np.inf, x), r)
    return np.where(x == 0, x, r)


def bf16_bits_from_f32(a):
    """float32 -> bfloat16 bit patterns, round-to-nearest-even (uint32 bit trick)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def encode(values, dtype):
    """float64 values already on the dtype grid -> little-endian raw numpy array."""
    v = np.asarray(values, dtype=np.float64)
    if dtype == "F64":
        raw = v.astype("<f8")
    elif dtype == "F32":
        raw = v.astype("<f4")
    elif dtype == "F16":
        raw = v.astype("<f2")
    elif dtype == "BF16":
        f32 = v.astype(np.float32)
        u = f32.view(np.uint32)
        assert not np.any(u & 0xFFFF), "value not on the bfloat16 grid"
        raw = (u >> 16).astype("<u2")
    else:
        raise ValueError(dtype)
    back = decode(raw.tobytes(), dtype, v.shape)
    assert np.array_equal(back, v, equal_nan=True), f"value not exactly representable in {dtype}"
    return raw.copy(order="C")  # np.ascontiguousarray would turn a scalar into shape (1,)


def decode(data, dtype, shape):
    """Raw little-endian bytes -> float64, exactly."""
    if dtype == "F64":
        a = np.frombuffer(data, dtype="<f8").astype(np.float64)
    elif dtype == "F32":
        a = np.frombuffer(data, dtype="<f4").astype(np.float64)
    elif dtype == "F16":
        a = np.frombuffer(data, dtype="<f2").astype(np.float64)
    elif dtype == "BF16":
        u = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        a = u.view(np.float32).astype(np.float64)
    else:
        raise ValueError(f"unsupported dtype {dtype}")
    return a.reshape(shape)


# --------------------------------------------------------------------------------------
# MARK: - safetensors I/O
# --------------------------------------------------------------------------------------


# Writer order of the reference (huggingface/safetensors): by dtype alignment, descending,
# then by name. Only the dtypes used here are listed.
DTYPE_RANK = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}


def st_bytes(tensors, metadata=None):
    """tensors: {name: (dtype, float64 values on the dtype grid)} -> file bytes.

    Lays the file out exactly as the reference writer does (compact JSON, `__metadata__`
    first, fields dtype/shape/data_offsets, header padded with spaces to a multiple of 8),
    except that metadata keys are sorted: the reference keeps metadata in a Rust HashMap,
    whose order changes from run to run, which would make the fixtures non-reproducible.
    """
    raws = {name: encode(v, dtype) for name, (dtype, v) in tensors.items()}
    order = sorted(tensors, key=lambda n: (DTYPE_RANK[tensors[n][0]], n.encode("utf-8")))
    header = {}
    if metadata is not None:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        raw = raws[name]
        header[name] = {"dtype": tensors[name][0], "shape": list(raw.shape), "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    out = struct.pack("<Q", len(text)) + text + b"".join(raws[n].tobytes() for n in order)
    if metadata is None or len(metadata) <= 1:
        assert out == reference_bytes(raws, tensors, metadata), "layout differs from the reference writer"
    return out


def reference_bytes(raws, tensors, metadata):
    """The reference writer's bytes (deterministic only with at most one metadata key)."""
    specs = {
        name: TensorSpec(dtype=NUMPY_NAME[dtype], shape=list(raws[name].shape),
                         data_ptr=raws[name].ctypes.data, data_len=raws[name].nbytes)
        for name, (dtype, _) in tensors.items()
    }
    return bytes(serialize(specs, metadata=metadata))


def write_st(path, tensors, metadata=None):
    write_bytes(path, st_bytes(tensors, metadata))


def read_st(path):
    """Minimal strict reader: returns ({name: (dtype, float64 array)}, metadata)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", None)
    data = blob[8 + n :]
    out = {}
    end_max = 0
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = info["dtype"]
        shape = tuple(info["shape"])
        assert end - begin == int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        out[name] = (dtype, decode(data[begin:end], dtype, shape))
        end_max = max(end_max, end)
    assert end_max == len(data), f"{path}: trailing or missing bytes"
    return out, metadata


def values(tensors):
    return {k: v for k, (_, v) in tensors.items()}


# --------------------------------------------------------------------------------------
# MARK: - Small file helpers
# --------------------------------------------------------------------------------------


def write_bytes(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_json(path, obj, *, indent=2, sort_keys=True, newline=False):
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys)
    write_bytes(path, (text + ("\n" if newline else "")).encode("utf-8"))


def rng_for(name):
    """One independent, fixed random stream per fixture."""
    return np.random.default_rng(zlib.crc32(name.encode("utf-8")))


def q(x, dtype):
    return round_to(x, dtype)


# --------------------------------------------------------------------------------------
# MARK: - Base models
# --------------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 16, 24, 2, 4, 2, 32
HEAD_DIM = HIDDEN // HEADS
KV_DIM = KV_HEADS * HEAD_DIM

LLAMA_PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV_DIM, HIDDEN),
    "self_attn.v_proj": (KV_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def bf16_normal(rng, shape, std=0.05, mean=0.0):
    """Random normal values rounded to bfloat16 through the uint32 RNE bit trick.

    Values too small for a float16 normal are flushed to zero so that the f16 copy of
    the model holds exactly the same numbers as the bf16 one.
    """
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)
    bits = bf16_bits_from_f32(x)
    v = decode(bits.tobytes(), "BF16", shape)
    v = np.where(np.abs(v) < 2.0**-14, 0.0, v)
    # Cross-check the bit trick against the exact single rounding.
    assert np.array_equal(round_to(x.astype(np.float64), "BF16")[np.abs(v) > 0], v[np.abs(v) > 0])
    return v


def llama_tensors():
    rng = rng_for("tiny-llama")
    t = {}
    t["model.embed_tokens.weight"] = bf16_normal(rng, (VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in LLAMA_PROJ.items():
            t[p + name + ".weight"] = bf16_normal(rng, shape)
        t[p + "input_layernorm.weight"] = bf16_normal(rng, (HIDDEN,), std=0.05, mean=1.0)
        t[p + "post_attention_layernorm.weight"] = bf16_normal(rng, (HIDDEN,), std=0.05, mean=1.0)
    t["model.norm.weight"] = bf16_normal(rng, (HIDDEN,), std=0.05, mean=1.0)
    t["lm_head.weight"] = bf16_normal(rng, (VOCAB, HIDDEN))
    for v in t.values():
        assert np.array_equal(round_to(v, "F16"), v)
    return t


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": HEAD_DIM,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTER,
    "max_position_embeddings": 64,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.1",
    "use_cache": True,
    "vocab_size": VOCAB,
}

TOKENS = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]


def write_tiny_llama(t):
    folder = os.path.join(MODELS, "tiny-llama")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    # transformers: json.dumps(indent=2, sort_keys=True) + "\n"
    write_json(os.path.join(folder, "config.json"), LLAMA_CONFIG, newline=True)
    write_json(
        os.path.join(folder, "generation_config.json"),
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46.1"},
        newline=True,
    )
    write_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "model_max_length": 64,
            "pad_token": None,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "<unk>",
        },
        newline=True,
    )
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, tok in enumerate(TOKENS[:3])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {tok: i for i, tok in enumerate(TOKENS)}, "unk_token": "<unk>"},
    }
    write_json(os.path.join(folder, "tokenizer.json"), tokenizer, sort_keys=False, newline=True)

    # Shard 1: embeddings and layer 0; shard 2: layer 1, final norm, lm_head.
    shard1 = [k for k in t if k.startswith("model.embed_tokens") or k.startswith("model.layers.0.")]
    shard2 = [k for k in t if k not in shard1]
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map = {}
    total = 0
    for fname, keys in files.items():
        write_st(os.path.join(folder, fname), {k: ("BF16", t[k]) for k in keys}, PT)
        for k in keys:
            weight_map[k] = fname
            total += t[k].size * 2
    write_json(
        os.path.join(folder, "model.safetensors.index.json"),
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        newline=True,
    )


def gpt2_tensors():
    rng = rng_for("tiny-gpt2")
    f = lambda shape: q(rng.standard_normal(shape) * 0.05, "F32")
    return {
        "h.0.attn.c_attn.weight": f((HIDDEN, 3 * HIDDEN)),
        "h.0.attn.c_attn.bias": f((3 * HIDDEN,)),
        "h.0.attn.c_proj.weight": f((HIDDEN, HIDDEN)),
        "h.0.attn.c_proj.bias": f((HIDDEN,)),
        "wte.weight": f((VOCAB, HIDDEN)),
    }


UNET_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
UNET_PROJ_IN = "down_blocks.0.attentions.0.proj_in"
UNET_CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TE_V = "text_model.encoder.layers.0.self_attn.v_proj"


def unet_tensors():
    rng = rng_for("tiny-unet")
    f = lambda shape: q(rng.standard_normal(shape) * 0.05, "F16")
    return {
        UNET_PROJ_IN + ".weight": f((8, 8, 1, 1)),
        UNET_CONV + ".weight": f((8, 4, 3, 3)),
        UNET_ATTN + "to_q.weight": f((8, 8)),
        UNET_ATTN + "to_k.weight": f((8, 8)),
        UNET_ATTN + "to_v.weight": f((8, 8)),
        UNET_ATTN + "to_out.0.weight": f((8, 8)),
        UNET_ATTN + "to_out.0.bias": f((8,)),
    }


def text_encoder_tensors():
    rng = rng_for("tiny-text-encoder")
    f = lambda shape: q(rng.standard_normal(shape) * 0.05, "F32")
    return {TE_Q + ".weight": f((8, 8)), TE_V + ".weight": f((8, 8))}


# --------------------------------------------------------------------------------------
# MARK: - Update bookkeeping
# --------------------------------------------------------------------------------------


class Updates:
    """Collects, per base tensor, the exact float64 change an adapter asks for."""

    def __init__(self):
        self.deltas = {}  # base name -> float64 delta added to W
        self.dora = {}  # base name -> (delta, magnitude)
        self.replace = {}  # base name -> float64 replacement value

    def add(self, name, delta):
        delta = np.asarray(delta, dtype=np.float64)
        self.deltas[name] = self.deltas.get(name, 0.0) + delta

    def apply(self, base, base_dtype):
        """Returns ({name: merged float64 before rounding}, {name: merged on the dtype grid})."""
        exact = {}
        for name, value in self.replace.items():
            exact[name] = value.copy()
        for name, delta in self.deltas.items():
            w = exact.get(name, base[name])
            assert w.shape == delta.shape, (name, w.shape, delta.shape)
            exact[name] = w + delta
        for name, (delta, m) in self.dora.items():
            v = base[name] + delta
            n = np.sqrt(np.sum(v * v, axis=1))
            exact[name] = (m / n)[:, None] * v
        rounded = {k: round_to(v, base_dtype) for k, v in exact.items()}
        return exact, rounded


def write_expected(pair, base, base_dtype, updates, note):
    exact, rounded = updates.apply(base, base_dtype)
    merged = {}
    deltas = {}
    for name in sorted(exact):
        assert not np.array_equal(rounded[name], base[name]), f"{pair}: {name} did not change"
        merged[name] = (base_dtype, rounded[name])
        deltas[name] = ("F64", exact[name] - base[name])
    write_st(os.path.join(EXPECTED, pair + ".safetensors"), merged, PT)
    write_st(
        os.path.join(EXPECTED, pair + ".delta.safetensors"),
        deltas,
        {"pair": pair, "base_dtype": base_dtype, "note": note},
    )
    return sorted(exact)


# --------------------------------------------------------------------------------------
# MARK: - Adapter configs
# --------------------------------------------------------------------------------------


def peft_config(**over):
    """adapter_config.json as PEFT 0.14 writes it (json.dumps(indent=2, sort_keys=True))."""
    c = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    c.update(over)
    return c


def moslora_fork_config(**over):
    """adapter_config.json of the wutaiqiang/MoSLoRA PEFT fork (PEFT 0.10.0 + mixer fields)."""
    c = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "lora_use_mixer": True,
        "lora_use_mixer_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    c.update(over)
    return c


def pattern_match(pattern_dict, module):
    """PEFT's rank_pattern / alpha_pattern rule: key K matches module N by `(.*\\.)?K$`."""
    import re

    for key, value in pattern_dict.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return None


# --------------------------------------------------------------------------------------
# MARK: - Factor generators
# --------------------------------------------------------------------------------------


def kaiming_uniform(rng, shape, fan_in):
    """torch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    b = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-b, b, size=shape)


def lora_pair(rng, out_f, in_f, r, dtype, a_scale=None, b_std=0.05):
    A = q(kaiming_uniform(rng, (r, in_f), in_f) if a_scale is None else rng.standard_normal((r, in_f)) * a_scale, dtype)
    B = q(rng.standard_normal((out_f, r)) * b_std, dtype)
    return A, B


def mixer(rng, r, dtype, kind="kaiming"):
    if kind == "orth":
        m, _ = np.linalg.qr(rng.standard_normal((r, r)))
    else:
        m = kaiming_uniform(rng, (r, r), r)
    m = q(m, dtype)
    assert not np.allclose(m, np.eye(r))
    return m


def llama_modules(projs, layers=range(LAYERS)):
    for i in layers:
        for p in projs:
            yield f"model.layers.{i}.{p}", LLAMA_PROJ[p]


def proj_of(short):
    return next(k for k in LLAMA_PROJ if k.endswith(short))


# --------------------------------------------------------------------------------------
# MARK: - PEFT-family adapters on tiny-llama
# --------------------------------------------------------------------------------------


def peft_lora_merge(path, cfg, base, *, mixer_suffix=None):
    """Reads a PEFT-layout adapter back and returns its Updates (linear + embedding + mts)."""
    tensors = values(read_st(path)[0])
    up = Updates()
    prefix = "base_model.model."
    seen = set()
    for key in sorted(tensors):
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix) : -len(".lora_A.weight")]
            A = tensors[key]
            B = tensors[prefix + module + ".lora_B.weight"]
            r = A.shape[0]
            alpha = pattern_match(cfg.get("alpha_pattern", {}), module) or cfg["lora_alpha"]
            r_cfg = pattern_match(cfg.get("rank_pattern", {}), module) or cfg["r"]
            assert r == r_cfg, (module, r, r_cfg)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            M = tensors.get(prefix + module + mixer_suffix) if mixer_suffix else None
            BA = B @ (M @ A if M is not None else A)
            delta = scale * BA
            if cfg.get("fan_in_fan_out"):
                delta = delta.T
            if cfg.get("use_dora"):
                m = tensors[prefix + module + ".lora_magnitude_vector"]
                up.dora[module + ".weight"] = (delta, m)
            else:
                up.add(module + ".weight", delta)
            bias_key = prefix + module + ".lora_B.bias"
            if bias_key in tensors:
                up.add(module + ".bias", scale * tensors[bias_key])
            seen.add(module)
        elif key.endswith(".lora_embedding_A"):
            module = key[len(prefix) : -len(".lora_embedding_A")]
            A = tensors[key]
            B = tensors[prefix + module + ".lora_embedding_B"]
            r = A.shape[0]
            alpha = pattern_match(cfg.get("alpha_pattern", {}), module) or cfg["lora_alpha"]
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            base_layer = prefix + module + ".base_layer.weight"
            if base_layer in tensors and not np.array_equal(tensors[base_layer], base[module + ".weight"]):
                up.replace[module + ".weight"] = tensors[base_layer]
            up.add(module + ".weight", scale * (B @ A).T)
    for mts in cfg.get("modules_to_save") or []:
        for key in tensors:
            if key.startswith(prefix) and key[len(prefix) :].split(".")[-2] == mts:
                up.replace[key[len(prefix) :]] = tensors[key]
    return up


def make_peft_lora(base):
    name = "peft-lora"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        A, B = lora_pair(rng, o, i, 4, "F32")
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
    cfg = peft_config()
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    write_st(os.path.join(folder, "adapter_model.safetensors"), t, PT)
    up = peft_lora_merge(os.path.join(folder, "adapter_model.safetensors"), cfg, base)
    return write_expected("tiny-llama+peft-lora", base, "BF16", up, "scale = 8/4")


def make_peft_lora_all(base):
    name = "peft-lora-all"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers.1.self_attn.o_proj": 32},
        target_modules=sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]),
        modules_to_save=["lm_head"],
    )
    t = {}
    for module, (o, i) in llama_modules(list(LLAMA_PROJ)):
        r = pattern_match(cfg["rank_pattern"], module) or cfg["r"]
        A, B = lora_pair(rng, o, i, r, "BF16", b_std=0.03)
        t[f"base_model.model.{module}.lora_A.weight"] = ("BF16", A)
        t[f"base_model.model.{module}.lora_B.weight"] = ("BF16", B)
    # PEFT Embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r), no ".weight".
    eA = q(rng.standard_normal((8, VOCAB)) * 0.1, "BF16")
    eB = q(rng.standard_normal((HIDDEN, 8)) * 0.05, "BF16")
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = ("BF16", eA)
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = ("BF16", eB)
    # save_embedding_layers="auto" also stores the (unchanged) base embedding.
    t["base_model.model.model.embed_tokens.base_layer.weight"] = ("BF16", base["model.embed_tokens.weight"])
    # modules_to_save: the fully trained copy of lm_head, saved under the base name.
    t["base_model.model.lm_head.weight"] = ("BF16", bf16_normal(rng, (VOCAB, HIDDEN)))
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    write_st(os.path.join(folder, "adapter_model.safetensors"), t, PT)
    up = peft_lora_merge(os.path.join(folder, "adapter_model.safetensors"), cfg, base)
    return write_expected(
        "tiny-llama+peft-lora-all", base, "BF16", up,
        "rslora: scale = alpha/sqrt(r); v_proj r=4 (scale 8); layers.1 o_proj alpha 32; lm_head replaced",
    )


def make_moslora_original(base, bases_by_dtype):
    name = "moslora-original"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = moslora_fork_config()
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]):
        A, B = lora_pair(rng, o, i, 4, "F32")
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{module}.lora_AB.weight"] = ("F32", mixer(rng, 4, "F32"))
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    path = os.path.join(folder, "adapter_model.safetensors")
    write_st(path, t, PT)
    up = peft_lora_merge(path, cfg, base, mixer_suffix=".lora_AB.weight")
    out = write_expected("tiny-llama+moslora-original", base, "BF16", up, "scale = 8/4, delta = s*B*AB*A")
    for dtype, b in bases_by_dtype.items():
        write_expected(f"tiny-llama-{dtype.lower()}+moslora-original", b, dtype, up, "scale = 8/4, delta = s*B*AB*A")
    return out


def make_moslora_original_partial(base):
    name = "moslora-original-partial"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    # The fork looks up lora_use_mixer_pattern with the full module name (its pattern-key
    # search only scans rank_pattern/alpha_pattern keys), so full names are what works there.
    pattern = {module: True for module, _ in llama_modules(projs, layers=[0])}
    cfg = moslora_fork_config(lora_use_mixer=False, lora_use_mixer_pattern=pattern)
    t = {}
    for module, (o, i) in llama_modules(projs):
        A, B = lora_pair(rng, o, i, 4, "F32")
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        if pattern.get(module, cfg["lora_use_mixer"]):
            t[f"base_model.model.{module}.lora_AB.weight"] = ("F32", mixer(rng, 4, "F32"))
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    path = os.path.join(folder, "adapter_model.safetensors")
    write_st(path, t, PT)
    up = peft_lora_merge(path, cfg, base, mixer_suffix=".lora_AB.weight")
    return write_expected(
        "tiny-llama+moslora-original-partial", base, "BF16", up,
        "layer 0 modules have a mixer (B*AB*A), layer 1 modules are plain LoRA (B*A); scale 2",
    )


def make_moslora_peft_pr(base):
    name = "moslora-peft-pr"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(
        peft_type="MOSLORA",
        use_moslora="orth",
        target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
    )
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]):
        A, B = lora_pair(rng, o, i, 4, "BF16")
        t[f"base_model.model.{module}.lora_A.weight"] = ("BF16", A)
        t[f"base_model.model.{module}.lora_mixer.weight"] = ("BF16", mixer(rng, 4, "BF16", kind="orth"))
        t[f"base_model.model.{module}.lora_B.weight"] = ("BF16", B)
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    path = os.path.join(folder, "adapter_model.safetensors")
    write_st(path, t, PT)
    up = peft_lora_merge(path, cfg, base, mixer_suffix=".lora_mixer.weight")
    return write_expected("tiny-llama+moslora-peft-pr", base, "BF16", up, "scale = 8/4, delta = s*B*M*A (M orthogonal, stored bf16)")


def make_peft_dora(base):
    name = "peft-dora"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(use_dora=True)
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        A, B = lora_pair(rng, o, i, 4, "F32")
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
        w = base[module + ".weight"]
        m = np.sqrt(np.sum(w * w, axis=1)) * (1.0 + 0.1 * rng.standard_normal(o))
        t[f"base_model.model.{module}.lora_magnitude_vector"] = ("F32", q(m, "F32"))
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    path = os.path.join(folder, "adapter_model.safetensors")
    write_st(path, t, PT)
    up = peft_lora_merge(path, cfg, base)
    return write_expected(
        "tiny-llama+peft-dora", base, "BF16", up,
        "DoRA: V = W + s*B*A, W' = (m / ||V||_row) * V; delta = W'(exact) - W",
    )


def make_peft_pissa():
    name = "peft-pissa"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(init_lora_weights="pissa", lora_alpha=4, target_modules=["q_proj"])
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj"]):
        A, B = lora_pair(rng, o, i, 4, "F32", a_scale=0.2)
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    write_st(os.path.join(folder, "adapter_model.safetensors"), t, PT)


def make_peft_unknown():
    name = "peft-unknown"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(target_modules=["q_proj"])
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj"]):
        A, B = lora_pair(rng, o, i, 4, "F32")
        t[f"base_model.model.{module}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{module}.lora_B.weight"] = ("F32", B)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = ("F32", q(rng.standard_normal((4, 4)), "F32"))
    t["some.random.tensor"] = ("F32", q(rng.standard_normal(3), "F32"))
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    write_st(os.path.join(folder, "adapter_model.safetensors"), t, PT)


def make_peft_gpt2(gbase):
    name = "peft-gpt2"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    cfg = peft_config(
        base_model_name_or_path="tiny-gpt2",
        task_type="FEATURE_EXTRACTION",
        fan_in_fan_out=True,
        lora_bias=True,
        target_modules=["c_attn", "wte"],
    )
    t = {}
    m = "base_model.model.h.0.attn.c_attn"
    A, B = lora_pair(rng, 3 * HIDDEN, HIDDEN, 4, "F32")  # Conv1D: in 16, out 48
    t[m + ".lora_A.weight"] = ("F32", A)
    t[m + ".lora_B.weight"] = ("F32", B)
    t[m + ".lora_B.bias"] = ("F32", q(rng.standard_normal(3 * HIDDEN) * 0.05, "F32"))
    t["base_model.model.wte.lora_embedding_A"] = ("F32", q(rng.standard_normal((4, VOCAB)) * 0.1, "F32"))
    t["base_model.model.wte.lora_embedding_B"] = ("F32", q(rng.standard_normal((HIDDEN, 4)) * 0.05, "F32"))
    write_json(os.path.join(folder, "adapter_config.json"), cfg)
    path = os.path.join(folder, "adapter_model.safetensors")
    write_st(path, t, PT)
    up = peft_lora_merge(path, cfg, gbase)
    return write_expected(
        "tiny-gpt2+peft-gpt2", gbase, "F32", up,
        "fan_in_fan_out: delta = (s*B*A)^T on the (in, out) Conv1D weight; bias += s*lora_B.bias; wte += s*(B_e*A_e)^T; s = 2",
    )


# --------------------------------------------------------------------------------------
# MARK: - mlx-lm, PaddleNLP, MyTransformers on tiny-llama
# --------------------------------------------------------------------------------------


def make_mlx(base):
    name = "mlx"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    rank, scale = 4, 20.0
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        # mlx-lm LoRALinear: lora_a (in, r) uniform(+-1/sqrt(in)), lora_b (r, out).
        a = q(rng.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), size=(i, rank)), "F32")
        b = q(rng.standard_normal((rank, o)) * 0.005, "F32")
        t[f"{module}.lora_a"] = ("F32", a)
        t[f"{module}.lora_b"] = ("F32", b)
    # mlx_lm.lora: save_config(vars(args)) -> keys sorted, indent 4, no trailing newline.
    cfg = {
        "adapter_path": "adapters",
        "batch_size": 4,
        "config": None,
        "data": "data/",
        "fine_tune_type": "lora",
        "grad_checkpoint": False,
        "iters": 100,
        "learning_rate": 1e-05,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
        "lr_schedule": None,
        "mask_prompt": False,
        "max_seq_length": 2048,
        "model": "tiny-llama",
        "num_layers": 2,
        "optimizer": "adam",
        "optimizer_config": {"adam": {}, "adamw": {}},
        "resume_adapter_file": None,
        "save_every": 100,
        "seed": 0,
        "steps_per_eval": 200,
        "steps_per_report": 10,
        "test": False,
        "test_batches": 500,
        "train": True,
        "val_batches": 25,
        "wandb": None,
    }
    write_json(os.path.join(folder, "adapter_config.json"), cfg, indent=4, sort_keys=False)
    path = os.path.join(folder, "adapters.safetensors")
    write_st(path, t, {"format": "mlx"})
    back = values(read_st(path)[0])
    up = Updates()
    for module, _ in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        up.add(module + ".weight", scale * (back[module + ".lora_a"] @ back[module + ".lora_b"]).T)
    return write_expected("tiny-llama+mlx", base, "BF16", up, "delta = scale * (lora_a @ lora_b)^T, scale 20")


def make_paddle(base):
    name = "paddle"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    r, alpha, rslora = 4, 8, True
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        pm = "llama." + module[len("model.") :]
        # PaddleNLP LoRALinear: lora_A [in, r], lora_AB [r, r], lora_B [r, out]; x @ A @ AB @ B.
        t[pm + ".lora_A"] = ("F32", q(kaiming_uniform(rng, (i, r), i), "F32"))
        t[pm + ".lora_AB"] = ("F32", mixer(rng, r, "F32"))
        t[pm + ".lora_B"] = ("F32", q(rng.standard_normal((r, o)) * 0.03, "F32"))
    cfg = {
        "base_model_name_or_path": "tiny-llama",
        "do_qat": False,
        "dtype": "float32",
        "enable_lora_list": None,
        "head_dim": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "lora_plus_scale": 1.0,
        "lora_use_mixer": True,
        "loraga": False,
        "lorapro": False,
        "merge_weights": False,
        "pissa": False,
        "r": r,
        "rslora": rslora,
        "scaling": scaling,
        "target_modules": [".*q_proj.*", ".*v_proj.*"],
        "tensor_parallel_degree": -1,
        "trainable_bias": None,
        "trainable_modules": None,
        "use_mora": False,
        "use_quick_lora": False,
    }
    write_json(os.path.join(folder, "lora_config.json"), cfg)
    path = os.path.join(folder, "peft_model.safetensors")
    write_st(path, t, {"format": "np"})
    back = values(read_st(path)[0])
    up = Updates()
    for module, _ in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        pm = "llama." + module[len("model.") :]
        d_in_out = scaling * (back[pm + ".lora_A"] @ back[pm + ".lora_AB"] @ back[pm + ".lora_B"])
        up.add(module + ".weight", d_in_out.T)
    return write_expected(
        "tiny-llama+paddle", base, "BF16", up,
        "Paddle (in,out): delta^T = scaling * A @ AB @ B; rslora: scaling = 8/sqrt(4) = 4",
    )


def make_mytransformers(base):
    name = "mytransformers"
    rng = rng_for(name)
    folder = os.path.join(ADAPTERS, name)
    rank, scaler = 4, 8
    t = {}
    for module, (o, i) in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        t[module + ".weight_a"] = ("F32", q(rng.standard_normal((rank, i)) / math.sqrt(i), "F32"))
        t[module + ".weight_ab_mixer"] = ("F32", mixer(rng, rank, "F32"))
        t[module + ".weight_b"] = ("F32", q(rng.standard_normal((o, rank)) * 0.05, "F32"))
    # Trainer.save_model dumps vars(args) with json.dump (no indent, insertion order).
    cfg = {
        "experiment_name": "tiny-llama-moslora",
        "output_path": "output",
        "model_name_or_path": "tiny-llama",
        "huggingface": True,
        "default_dtype": "fp32",
        "save_trainable": True,
        "params_to_save": None,
        "use_lora": True,
        "replace_modules": ["q_proj", "v_proj"],
        "lora_rank": rank,
        "lora_scaler": scaler,
        "lora_dropout": None,
        "run_lora_in_fp32": False,
        "weight_a_init_method": None,
        "weight_b_init_method": None,
        "use_dora": False,
        "use_rslora": False,
        "use_mos_lora": True,
        "weight_ab_mixer_init_method": None,
        "use_me_lora": False,
        "use_pissa": False,
        "use_olora": False,
    }
    write_bytes(os.path.join(folder, "config.json"), json.dumps(cfg).encode("utf-8"))
    path = os.path.join(folder, "final.safetensors")
    write_st(path, t, None)
    back = values(read_st(path)[0])
    up = Updates()
    for module, _ in llama_modules(["self_attn.q_proj", "self_attn.v_proj"]):
        s = scaler / rank
        up.add(module + ".weight", s * back[module + ".weight_b"] @ (back[module + ".weight_ab_mixer"] @ back[module + ".weight_a"]))
    return write_expected(
        "tiny-llama+mytransformers", base, "BF16", up,
        "delta = (lora_scaler/lora_rank) * weight_b @ weight_ab_mixer @ weight_a = 2 * B M A",
    )


# --------------------------------------------------------------------------------------
# MARK: - Diffusion adapters (kohya, diffusers) on tiny-unet + tiny-text-encoder
# --------------------------------------------------------------------------------------

# (base key, in, out, kind, kernel)
UNET_TARGETS = [
    (UNET_ATTN + "to_q", 8, 8, "linear", 1),
    (UNET_ATTN + "to_k", 8, 8, "linear", 1),
    (UNET_ATTN + "to_v", 8, 8, "linear", 1),
    (UNET_ATTN + "to_out.0", 8, 8, "linear", 1),
    (UNET_PROJ_IN, 8, 8, "conv", 1),
    (UNET_CONV, 4, 8, "conv", 3),
]
TE_TARGETS = [(TE_Q, 8, 8, "linear", 1), (TE_V, 8, 8, "linear", 1)]


def down_up(rng, in_f, out_f, kind, k, r, dtype):
    if kind == "linear":
        down = kaiming_uniform(rng, (r, in_f), in_f)
        up = rng.standard_normal((out_f, r)) * 0.05
    else:
        down = kaiming_uniform(rng, (r, in_f, k, k), in_f * k * k)
        up = rng.standard_normal((out_f, r, 1, 1)) * 0.05
    return q(down, dtype), q(up, dtype)


def lowrank_delta(down, up, scale, base_shape, mid=None):
    """scale * up @ [mid @] down with conv shapes flattened as PEFT / kohya do."""
    d = down.reshape(down.shape[0], -1)
    u = up.reshape(up.shape[0], -1)
    if mid is not None:
        d = mid @ d
    return (scale * (u @ d)).reshape(base_shape)


def kohya_name(prefix, base_key):
    return prefix + base_key.replace(".", "_")


def kohya_metadata(name, extra=None):
    md = {
        "ss_base_model_version": "sd_v1",
        "ss_training_comment": "None",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_max_train_steps": "100",
        "ss_mixed_precision": "fp16",
        "ss_network_alpha": "2.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}),
        "ss_network_dim": "4",
        "ss_network_module": "networks.lora",
        "ss_num_epochs": "1",
        "ss_output_name": name,
        "ss_sd_model_name": "tiny-unet",
        "ss_v2": "False",
    }
    md.update(extra or {})
    return md


def kohya_hashes(tensors, metadata):
    """sd-scripts' precalculate_safetensors_hashes: hashes of the file saved with ss_* metadata only."""
    blob = st_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[0:8]
    return model_hash, legacy_hash


def make_kohya(unet, te, moslora):
    name = "kohya-moslora" if moslora else "kohya-unet"
    rng = rng_for(name)
    dt = "F16"
    t = {}
    plan = []  # (file key prefix, base name, which base, kind, r, alpha)
    for base_key, i, o, kind, k in UNET_TARGETS:
        r, alpha = (4, 1.0) if k == 3 else (4, 2.0)
        plan.append((kohya_name("lora_unet_", base_key), base_key, "unet", i, o, kind, k, r, alpha))
    for base_key, i, o, kind, k in TE_TARGETS:
        plan.append((kohya_name("lora_te_", base_key), base_key, "te", i, o, kind, k, 4, 2.0))
    for key, _, _, i, o, kind, k, r, alpha in plan:
        down, up = down_up(rng, i, o, kind, k, r, dt)
        t[key + ".lora_down.weight"] = (dt, down)
        t[key + ".lora_up.weight"] = (dt, up)
        t[key + ".alpha"] = (dt, q(np.array(alpha), dt))
        if moslora:
            t[key + ".lora_mixer.weight"] = (dt, mixer(rng, r, dt))
    md = kohya_metadata(name, {"ss_adapter_algorithm": "moslora"} if moslora else None)
    model_hash, legacy_hash = kohya_hashes(t, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    path = os.path.join(ADAPTERS, name + ".safetensors")
    write_st(path, t, md)

    back = values(read_st(path)[0])
    ups = {"unet": Updates(), "te": Updates()}
    bases = {"unet": unet, "te": te}
    for key, base_key, which, *_ in plan:
        down = back[key + ".lora_down.weight"]
        up = back[key + ".lora_up.weight"]
        alpha = float(back[key + ".alpha"])
        mid = back.get(key + ".lora_mixer.weight")
        scale = alpha / down.shape[0]
        w = base_key + ".weight"
        ups[which].add(w, lowrank_delta(down, up, scale, bases[which][w].shape, mid))
    note = "scale = alpha/r (linear and 1x1: 2/4, 3x3 LoCon: 1/4)" + ("; delta = s*up*mixer*down" if moslora else "")
    write_expected(f"tiny-unet+{name}", unet, "F16", ups["unet"], note)
    write_expected(f"tiny-text-encoder+{name}", te, "F32", ups["te"], note)


def make_diffusers(unet, te, style):
    name = {"old": "diffusers-lora", "peft": "diffusers-peft", "moslora": "diffusers-moslora"}[style]
    rng = rng_for(name)
    dt = "F16" if style == "peft" else "F32"
    down_s, up_s = {
        "old": (".lora.down.weight", ".lora.up.weight"),
        "moslora": (".lora.down.weight", ".lora.up.weight"),
        "peft": (".lora_A.weight", ".lora_B.weight"),
    }[style]
    if style == "old":
        unet_targets = [x for x in UNET_TARGETS if x[4] == 1]  # attention linears + proj_in 1x1 conv
        te_targets = TE_TARGETS
    elif style == "peft":
        unet_targets = [x for x in UNET_TARGETS if x[3] == "linear"]
        te_targets = TE_TARGETS
    else:
        unet_targets = [x for x in UNET_TARGETS if x[0].endswith(("to_q", "to_v", "to_out.0"))]
        te_targets = TE_TARGETS[:1]
    t = {}
    plan = []
    for prefix, which, targets in (("unet.", "unet", unet_targets), ("text_encoder.", "te", te_targets)):
        for base_key, i, o, kind, k in targets:
            key = prefix + base_key
            down, up = down_up(rng, i, o, kind, k, 4, dt)
            t[key + down_s] = (dt, down)
            t[key + up_s] = (dt, up)
            if style == "moslora":
                t[key + ".lora.downB.weight"] = (dt, mixer(rng, 4, dt))
            plan.append((key, base_key, which))
    path = os.path.join(ADAPTERS, name + ".safetensors")
    write_st(path, t, PT)
    back = values(read_st(path)[0])
    ups = {"unet": Updates(), "te": Updates()}
    bases = {"unet": unet, "te": te}
    for key, base_key, which in plan:
        mid = back.get(key + ".lora.downB.weight")
        w = base_key + ".weight"
        ups[which].add(w, lowrank_delta(back[key + down_s], back[key + up_s], 1.0, bases[which][w].shape, mid))
    note = "no alpha: scale 1" + ("; delta = up*downB*down" if style == "moslora" else "")
    write_expected(f"tiny-unet+{name}", unet, "F16", ups["unet"], note)
    write_expected(f"tiny-text-encoder+{name}", te, "F32", ups["te"], note)


# --------------------------------------------------------------------------------------
# MARK: - Optional: a real PEFT adapter
# --------------------------------------------------------------------------------------


def make_real_peft():
    try:
        import peft  # noqa: F401
        import torch
        import transformers
    except ImportError as e:
        print(f"skipping adapters/peft-real-lora: {e}")
        return False
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA_CONFIG.items() if k not in ("architectures", "model_type", "transformers_version", "torch_dtype")})
    model = transformers.LlamaForCausalLM(config)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    folder = os.path.join(ADAPTERS, "peft-real-lora")
    pm.save_pretrained(folder)
    return True


# --------------------------------------------------------------------------------------
# MARK: - Main
# --------------------------------------------------------------------------------------


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-peft", action="store_true", help="also write adapters/peft-real-lora with torch + peft")
    args = parser.parse_args(argv)

    # Self-check of the single rounding against numpy's own (single-rounding) casts.
    chk = np.random.default_rng(1).standard_normal(20000) * np.logspace(-9, 4, 20000)
    assert np.array_equal(round_to(chk, "F16"), chk.astype(np.float16).astype(np.float64))
    assert np.array_equal(round_to(chk, "F32"), chk.astype(np.float32).astype(np.float64))
    # bf16 halfway case that double rounding through float32 gets wrong:
    x = 1.0 + 2.0**-8 + 2.0**-30  # just above the bf16 midpoint; via f32 it would land on the midpoint
    assert round_to(np.array([x]), "BF16")[0] == 1.0 + 2.0**-7

    for d in (EXPECTED,):
        if os.path.isdir(d):
            shutil.rmtree(d)
    os.makedirs(EXPECTED, exist_ok=True)
    for sub in ("peft-lora", "peft-lora-all", "moslora-original", "moslora-original-partial", "moslora-peft-pr",
                "peft-gpt2", "peft-dora", "peft-pissa", "mlx", "paddle", "mytransformers", "peft-unknown"):
        p = os.path.join(ADAPTERS, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)

    llama = llama_tensors()
    write_tiny_llama(llama)
    by_dtype = {}
    for dtype in ("F32", "F16", "F64"):
        write_st(os.path.join(MODELS, f"tiny-llama-{dtype.lower()}.safetensors"), {k: (dtype, v) for k, v in llama.items()}, PT)
        by_dtype[dtype] = llama
    gpt2 = gpt2_tensors()
    write_st(os.path.join(MODELS, "tiny-gpt2.safetensors"), {k: ("F32", v) for k, v in gpt2.items()}, PT)
    unet = unet_tensors()
    write_st(os.path.join(MODELS, "tiny-unet.safetensors"), {k: ("F16", v) for k, v in unet.items()}, PT)
    te = text_encoder_tensors()
    write_st(os.path.join(MODELS, "tiny-text-encoder.safetensors"), {k: ("F32", v) for k, v in te.items()}, PT)

    # Merges read the base back from disk, as a user's tool would.
    base = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        base.update(values(read_st(os.path.join(MODELS, "tiny-llama", f))[0]))
    assert all(np.array_equal(base[k], llama[k]) for k in llama)
    bases_by_dtype = {d: values(read_st(os.path.join(MODELS, f"tiny-llama-{d.lower()}.safetensors"))[0]) for d in by_dtype}
    gbase = values(read_st(os.path.join(MODELS, "tiny-gpt2.safetensors"))[0])
    ubase = values(read_st(os.path.join(MODELS, "tiny-unet.safetensors"))[0])
    tbase = values(read_st(os.path.join(MODELS, "tiny-text-encoder.safetensors"))[0])

    make_peft_lora(base)
    make_peft_lora_all(base)
    make_moslora_original(base, bases_by_dtype)
    make_moslora_original_partial(base)
    make_moslora_peft_pr(base)
    make_peft_gpt2(gbase)
    make_peft_dora(base)
    make_peft_pissa()
    make_peft_unknown()
    make_mlx(base)
    make_paddle(base)
    make_mytransformers(base)
    make_kohya(ubase, tbase, moslora=False)
    make_kohya(ubase, tbase, moslora=True)
    for style in ("old", "peft", "moslora"):
        make_diffusers(ubase, tbase, style)

    if args.real_peft:
        make_real_peft()

    total = 0
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print(f"fixtures written under {ROOT} ({total} bytes in total)")


if __name__ == "__main__":
    main(sys.argv[1:])
