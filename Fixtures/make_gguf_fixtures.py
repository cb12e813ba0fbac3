#!/usr/bin/env python3
"""GGUF files written by gguf-py (llama.cpp's own Python package) for the reader and codec tests.

    pip install numpy gguf==0.19.0 llama-cpp-python==0.3.36    # only to regenerate
    python3 Fixtures/make_gguf_fixtures.py

Writes
- gguf/codecs.gguf: `source`, F32 [8, 256] (normal values, a row of zeros, a constant row, tiny
  values, values on the rounding points of the 4- and 5-bit grids), and the same rows as each
  type gguf-py quantizes bit for bit like ggml's reference quantizers (Q8_0, Q4_0, Q4_1, Q5_0,
  Q5_1) and as F16 and BF16, each with `<TYPE>.decoded` (F32: gguf-py's dequantization); the K-quants
  Q2_K … Q6_K quantized and dequantized by llama.cpp's own ggml (`quantize_row_q*_K_ref` and
  `dequantize_row_q*_K` of the libggml-base that llama-cpp-python ships, through ctypes); and one
  metadata key of every GGUF value type (`test.*`), arrays of strings and of integers included.
- gguf/kquants.gguf: 64 rows of 256 values drawn from different distributions (normal, Laplace,
  uniform, sparse, with outliers, tiny, huge, all positive, all negative) and the same rows as
  llama.cpp's ggml quantizes them to Q2_K … Q6_K (the bytes our ports must write).
- gguf/tiny-llama.gguf: a LLaMA-shaped GGUF (metadata as convert_hf_to_gguf.py writes it: the
  architecture, hyperparameters, a 64-token vocabulary) with F32, F16 and Q8_0 tensors in llama.cpp
  names, for inspect; llama.cpp loads and runs it.
- models/tiny-llama-64/ and gguf/tiny-llama-64-{f32,q8_0}.gguf: a Hugging Face LLaMA (hidden 64,
  one layer, 4 heads, 2 KV heads, a 64-piece SentencePiece BPE vocabulary trained here) and its
  conversions by llama.cpp's own convert_hf_to_gguf.py (the one in llama-cpp-python 0.3.36's sdist:
  LLAMA_CPP_DIR: the unpacked llama.cpp source, e.g. `vendor/llama.cpp` of that sdist), for
  end-to-end checks against transformers; and
  models/tiny-mixtral-gguf with gguf/tiny-mixtral-gguf-f32.gguf, a Mixtral (hidden 32, 4 experts)
  converted the same way, whose experts llama.cpp stacks into blk.0.ffn_{gate,up,down}_exps;
  models/tiny-llama-256 with gguf/tiny-llama-256-f16.gguf (hidden 256: rows llama.cpp's Q4_K_M
  quantizes in K-quants; F16 throughout to stay small); and models/tiny-qwen{2,3}-gguf with
  gguf/tiny-qwen{2,3}-gguf-f32.gguf (qwen2 with q/k/v biases, qwen3 with q/k norms and
  head_dim 32: llama.cpp's own names for both, q and k not permuted).
- adapters/gguf-lora/: a PEFT LoRA (r 4, alpha 8, rsLoRA, v_proj at rank 2) on every projection of
  that model, in Hugging Face names, for `merge` into the GGUF and `convert to-gguf --base` it.
"""
import os

import ctypes
import glob

import gguf
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf")
T = gguf.GGMLQuantizationType


def source_rows():
    rng = np.random.default_rng(20)
    rows = [rng.standard_normal(256).astype(np.float32) * 0.05 for _ in range(3)]
    rows.append(np.zeros(256, dtype=np.float32))
    rows.append(np.full(256, 0.25, dtype=np.float32))
    rows.append((rng.standard_normal(256) * 1e-6).astype(np.float32))
    # Multiples of 1/8 of a block maximum: values on the 4- and 5-bit grids' rounding points.
    grid = np.tile(np.concatenate([[1.0], np.arange(-15, 16) / 16.0]), 8)[:256].astype(np.float32)
    rows.append(grid)
    rows.append((rng.standard_normal(256) * 3).astype(np.float32))
    return np.stack(rows)


def ggml():
    """llama.cpp's libggml-base, as llama-cpp-python installs it."""
    import llama_cpp
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))[0])
    return lib


def k_quant(lib, src, qtype):
    """src (F32 [rows, 256·n]) quantized by ggml's reference quantizer of qtype, and dequantized by ggml."""
    name = qtype.name.lower().replace("_k", "_K")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(src, dtype=np.float32)
    q = np.zeros(x.size // block * size, dtype=np.uint8)
    quantize = getattr(lib, f"quantize_row_{name}_ref")
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    quantize(x.ctypes.data, q.ctypes.data, x.size)
    back = np.zeros(x.size, dtype=np.float32)
    dequantize = getattr(lib, f"dequantize_row_{name}")
    dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    dequantize(q.ctypes.data, back.ctypes.data, x.size)
    return q.reshape(src.shape[0], -1), back.reshape(src.shape)


def codecs():
    w = gguf.GGUFWriter(os.path.join(OUT, "codecs.gguf"), arch="test")
    src = source_rows()
    w.add_tensor("source", src)
    for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16):
        q = gguf.quants.quantize(src, t)
        w.add_tensor(t.name, q, raw_dtype=t)
        w.add_tensor(t.name + ".decoded", gguf.quants.dequantize(q, t).astype(np.float32))
    lib = ggml()
    for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        q, back = k_quant(lib, src, t)
        w.add_tensor(t.name, q, raw_dtype=t)
        w.add_tensor(t.name + ".decoded", back)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.ints", [1, 2, 3])
    w.add_uint64("test.u64", 2 ** 63 + 5)
    w.add_int64("test.i64", -(2 ** 62))
    w.add_float64("test.f64", 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def kquants():
    rng = np.random.default_rng(22)
    rows = []
    for i in range(64):
        kind = i % 8
        n = 256
        if kind == 0: x = rng.standard_normal(n)
        elif kind == 1: x = rng.laplace(size=n)
        elif kind == 2: x = rng.uniform(-1, 1, n)
        elif kind == 3: x = rng.standard_normal(n) * (rng.uniform(size=n) < 0.1)
        elif kind == 4:
            x = rng.standard_normal(n)
            x[rng.integers(0, n, 3)] *= 40
        elif kind == 5: x = rng.standard_normal(n) * 1e-4
        elif kind == 6: np.abs(x := rng.standard_normal(n), out=x)
        else: x = -np.abs(rng.standard_normal(n)) * 30
        rows.append((x * 10.0 ** rng.uniform(-3, 1)).astype(np.float32))
    src = np.stack(rows)
    lib = ggml()
    w = gguf.GGUFWriter(os.path.join(OUT, "kquants.gguf"), arch="test")
    w.add_tensor("source", src)
    for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        q, _ = k_quant(lib, src, t)
        w.add_tensor(t.name, q, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama():
    rng = np.random.default_rng(21)
    h, ffn, vocab = 64, 128, 64
    w = gguf.GGUFWriter(os.path.join(OUT, "tiny-llama.gguf"), arch="llama")
    w.add_name("tiny-llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)

    def weight(name, shape, qtype):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    weight("token_embd.weight", (vocab, h), T.Q8_0)
    weight("blk.0.attn_norm.weight", (h,), T.F32)
    for name, shape in (("attn_q", (h, h)), ("attn_k", (32, h)), ("attn_v", (32, h)), ("attn_output", (h, h)),
                        ("ffn_gate", (ffn, h)), ("ffn_up", (ffn, h)), ("ffn_down", (h, ffn))):
        weight(f"blk.0.{name}.weight", shape, T.Q8_0)
    weight("blk.0.ffn_norm.weight", (h,), T.F32)
    weight("output_norm.weight", (h,), T.F32)
    weight("output.weight", (vocab, h), T.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def spm_model():
    """A 64-piece SentencePiece BPE model trained here (convert_hf_to_gguf.py reads tokenizer.model)."""
    import io

    import sentencepiece as spm
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then", "home", "big", "small", "red"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=64, model_type="bpe", character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False, num_threads=1,
                                   normalization_rule_name="identity")
    return model.getvalue()


def hf_twin(name, make_model, outtypes, dtype=None):
    """models/<name> (a transformers model with random weights, N(0, 0.05) matrices, ones for the
    norms and biases; saved in `dtype` when given) and gguf/<name>-<outtype>.gguf converted by
    llama.cpp's convert_hf_to_gguf.py."""
    import shutil
    import subprocess
    import sys

    import torch

    folder = os.path.join(HERE, "models", name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tokenizer = spm_model()
    open(os.path.join(folder, "tokenizer.model"), "wb").write(tokenizer)
    m = make_model()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
            else:
                p.fill_(1.0)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(folder)
    os.remove(os.path.join(folder, "generation_config.json"))
    convert = os.path.join(os.environ["LLAMA_CPP_DIR"], "convert_hf_to_gguf.py")
    for outtype in outtypes:
        subprocess.run([sys.executable, convert, folder, "--outtype", outtype, "--outfile", os.path.join(OUT, f"{name}-{outtype}.gguf")],
                       check=True, capture_output=True)


def twins():
    if not os.environ.get("LLAMA_CPP_DIR"):
        raise SystemExit("make_gguf_fixtures.py: set LLAMA_CPP_DIR to a llama.cpp source tree (convert_hf_to_gguf.py is run from it)")
    import torch
    import transformers

    def llama():
        torch.manual_seed(1)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))

    def mixtral():
        torch.manual_seed(2)
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False))

    def llama256():
        # Every row 256 values long: llama.cpp's Q4_K_M quantizes it in K-quants (a 64-wide model
        # falls back to Q5_0 and Q8_0). Kept in F16 (both the HF twin and its conversion) to stay small.
        torch.manual_seed(5)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))

    def qwen2():
        # Qwen2: q/k/v biases, and convert_hf_to_gguf.py keeps q and k rows in the HF order.
        torch.manual_seed(6)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))

    def qwen3():
        # Qwen3: per-head q/k RMS norms, head_dim set apart from hidden / heads.
        torch.manual_seed(7)
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))

    hf_twin("tiny-llama-64", llama, ("f32", "q8_0"))
    hf_twin("tiny-mixtral-gguf", mixtral, ("f32",))
    hf_twin("tiny-llama-256", llama256, ("f16",), dtype=torch.float16)
    hf_twin("tiny-qwen2-gguf", qwen2, ("f32",))
    hf_twin("tiny-qwen3-gguf", qwen3, ("f32",))


def gguf_lora():
    from safetensors.numpy import save_file
    import json
    rng = np.random.default_rng(23)
    h, ffn = 64, 128
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (32, h), "self_attn.v_proj": (32, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn)}
    tensors = {}
    for leaf, (out, inp) in shapes.items():
        r = 2 if leaf.endswith("v_proj") else 4
        tensors[f"base_model.model.model.layers.0.{leaf}.lora_A.weight"] = (rng.standard_normal((r, inp)) * 0.2).astype(np.float32)
        tensors[f"base_model.model.model.layers.0.{leaf}.lora_B.weight"] = (rng.standard_normal((out, r)) * 0.2).astype(np.float32)
    folder = os.path.join(HERE, "adapters", "gguf-lora")
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2},
                   "target_modules": [k.split(".")[1] for k in shapes], "base_model_name_or_path": "tiny-llama.gguf"}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    codecs()
    kquants()
    tiny_llama()
    gguf_lora()
    twins()
    print("gguf/codecs.gguf, gguf/tiny-llama.gguf by gguf", gguf.__version__ if hasattr(gguf, "__version__") else "")
