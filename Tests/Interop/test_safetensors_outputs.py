"""(a) Every writer's output opens in the reference safetensors library.

For each command that writes safetensors, every file it wrote must open with `safe_open` and
`load_file` in both the numpy and the torch framework, the two frameworks must agree on every
key, dtype, shape and byte, the JSON files beside it must be strict JSON, and our own `inspect`
must read it back (it refused its own `to-kohya` output once: issue 11, defect 1).

`to-safetensors` is also checked value by value against torch.load of the input checkpoint.
"""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as pt_load_file

from interop import ADAPTERS, FIXTURES, MODELS, adapter, strict_json

PT = FIXTURES / "pytorch"

# id -> (argv with "{out}" for the output path, output name)
WRITERS = {
    "merge-file-f32": (["merge", MODELS / "tiny-llama-f32.safetensors", ADAPTERS / "real-lora", "{out}"], "m.safetensors"),
    "merge-file-f16": (["merge", MODELS / "tiny-llama-f16.safetensors", ADAPTERS / "moslora-original", "{out}"], "m.safetensors"),
    "merge-folder-bf16-sharded": (["merge", MODELS / "tiny-llama", ADAPTERS / "moslora-original", "{out}"], "merged"),
    "merge-folder-f32": (["merge", "{f32_llama_dir}", ADAPTERS / "real-lora-rslora-patterns", "{out}"], "merged"),
    "merge-unet-kohya": (["merge", "--component", "unet", MODELS / "tiny-unet.safetensors",
                          ADAPTERS / "kohya-unet.safetensors", "{out}"], "unet.safetensors"),
    "to-peft-moslora-original": (["convert", "to-peft", ADAPTERS / "moslora-original", "{out}"], "peft"),
    "to-peft-moslora-peft-pr-bf16": (["convert", "to-peft", ADAPTERS / "moslora-peft-pr", "{out}"], "peft"),
    "to-peft-mlx": (["convert", "to-peft", ADAPTERS / "mlx", "{out}"], "peft"),
    "to-mlx-moslora-original": (["convert", "to-mlx", ADAPTERS / "moslora-original", "{out}"], "mlx"),
    "to-kohya-peft-lora": (["convert", "to-kohya", ADAPTERS / "peft-lora", "{out}"], "k.safetensors"),
    "to-kohya-diffusers-lora": (["convert", "to-kohya", ADAPTERS / "diffusers-lora.safetensors", "{out}"], "k.safetensors"),
    "lora-to-moslora-identity": (["convert", "lora-to-moslora", ADAPTERS / "peft-lora", "{out}"], "mos"),
    "lora-to-moslora-orthogonal-mixer-key": (["convert", "lora-to-moslora", "--mixer", "orthogonal", "--seed", "7",
                                              "--mixer-key", "lora_mixer", ADAPTERS / "real-lora", "{out}"], "mos"),
    "moslora-to-lora": (["convert", "moslora-to-lora", ADAPTERS / "moslora-original", "{out}"], "lora"),
    "moslora-to-lora-fold-b-kohya-unet": (["convert", "moslora-to-lora", "--fold-into", "b", "--component", "unet",
                                           "--base", MODELS / "tiny-unet.safetensors",
                                           ADAPTERS / "kohya-moslora.safetensors", "{out}"], "lora"),
    "resize-rank2": (["resize", "--rank", "2", ADAPTERS / "moslora-original", "{out}"], "r2"),
    "resize-rank2-moslora-form": (["resize", "--rank", "2", "--form", "moslora", ADAPTERS / "real-lora", "{out}"], "r2"),
    "resize-rank2-kohya": (["resize", "--rank", "2", ADAPTERS / "kohya-unet.safetensors", "{out}"], "r2.safetensors"),
}

# Every checkpoint of Fixtures/pytorch that is a valid state dict (the hostile_*, legacy and
# TorchScript files are refused on purpose; their refusals are tested by the Swift suite).
TORCH_CHECKPOINTS = ["adapter_model.bin", "deflated.pt", "dtypes.pt", "dtypes_v3.pt", "nested.pt",
                     "noncontig.pt", "parameter.pt", "shared.pt", "zip64.pt"]


NUMPY_LACKS = {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


def safetensors_files(out):
    files = [out] if out.is_file() else sorted(out.rglob("*.safetensors"))
    assert files, f"{out}: no safetensors file written"
    return files


def check_reference_reader(path):
    """Open PATH every way the reference library offers and check the ways agree."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])  # the header itself is JSON the stdlib parses
    metadata = header.pop("__metadata__", None)
    assert metadata is None or all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()), metadata

    with safe_open(path, framework="pt") as f:
        pt_keys = list(f.keys())
        pt_meta = f.metadata()
        pt = {k: f.get_tensor(k) for k in pt_keys}
        for k in pt_keys:
            s = f.get_slice(k)
            assert s.get_dtype() == header[k]["dtype"] and list(s.get_shape()) == header[k]["shape"]
    assert sorted(pt_keys) == sorted(header), path
    assert pt_meta == metadata

    # numpy has no bfloat16 or float8: the reference library's numpy framework refuses those
    # tensors (TypeError "data type 'bfloat16' not understood", AttributeError "module 'numpy'
    # has no attribute 'float8_e4m3fn'"). The torch framework reads them; numpy reads the rest.
    no_numpy = {k for k, v in header.items() if v["dtype"] in NUMPY_LACKS}
    with safe_open(path, framework="np") as f:
        assert sorted(f.keys()) == sorted(pt_keys) and f.metadata() == metadata
        npt = {}
        for k in f.keys():
            if k in no_numpy:
                with pytest.raises((TypeError, AttributeError), match="bfloat16|float8"):
                    f.get_tensor(k)
            else:
                npt[k] = f.get_tensor(k)

    loaded_pt = pt_load_file(path)
    assert sorted(loaded_pt) == sorted(pt_keys)
    if no_numpy:
        with pytest.raises((TypeError, AttributeError), match="bfloat16|float8"):
            np_load_file(path)
        loaded_np = npt
    else:
        loaded_np = np_load_file(path)
        assert sorted(loaded_np) == sorted(pt_keys)

    for k, t in pt.items():
        assert torch.equal(loaded_pt[k], t) or (t.is_floating_point() and torch.equal(loaded_pt[k].isnan(), t.isnan()))
        assert list(t.shape) == header[k]["shape"]
        if k in no_numpy:
            continue
        a = loaded_np[k]
        assert a.dtype.kind in "fiub" and list(a.shape) == list(t.shape)
        assert np.array_equal(npt[k], a, equal_nan=a.dtype.kind == "f")
        assert a.tobytes() == tensor_bytes(t), f"{path}: {k}: numpy and torch read different bytes"
    return header


def tensor_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("case", sorted(WRITERS))
def test_writer_output_opens_in_safetensors(case, tmp_path, f32_llama_dir):
    argv, out_name = WRITERS[case]
    out = tmp_path / out_name
    argv = [str(out) if a == "{out}" else str(f32_llama_dir) if a == "{f32_llama_dir}" else a for a in argv]
    adapter(*argv)
    for path in safetensors_files(out):
        check_reference_reader(path)
        adapter("inspect", path)
    if out.is_dir():
        for js in out.glob("*.json"):
            strict_json(js)
        adapter("inspect", out)
        index = out / "model.safetensors.index.json"
        if index.exists():
            weight_map = strict_json(index)["weight_map"]
            for shard in set(weight_map.values()):
                with safe_open(out / shard, framework="pt") as f:
                    assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == shard)


def torch_reference(name):
    # nested.pt and parameter.pt use pickle protocols 4/5, whose FRAME opcode torch's weights_only
    # unpickler rejects ("Unsupported operand 149"); they are this repository's own fixtures
    # (Fixtures/make_pytorch_fixtures.py), so they are loaded with the full unpickler.
    obj = torch.load(PT / name, map_location="cpu", weights_only=name not in ("nested.pt", "parameter.pt"))
    if "state_dict" in obj:
        obj = obj["state_dict"]
    return {k: v.detach() for k, v in obj.items()}


@pytest.mark.parametrize("name", TORCH_CHECKPOINTS)
def test_to_safetensors_output_opens_and_equals_torch_load(name, tmp_path):
    out = tmp_path / (name + ".safetensors")
    adapter("convert", "to-safetensors", PT / name, out)
    check_reference_reader(out)
    ours = pt_load_file(out)
    ref = torch_reference(name)
    assert sorted(ours) == sorted(ref)
    for k, t in ref.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, (k, ours[k].dtype, t.dtype)
        assert tensor_bytes(ours[k]) == tensor_bytes(t), k


def test_to_safetensors_folder_output_opens(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "adapter_model.bin").write_bytes((PT / "adapter_model.bin").read_bytes())
    (src / "adapter_config.json").write_bytes((ADAPTERS / "peft-lora" / "adapter_config.json").read_bytes())
    out = tmp_path / "out"
    adapter("convert", "to-safetensors", src, out)
    check_reference_reader(out / "adapter_model.safetensors")
    assert strict_json(out / "adapter_config.json") == strict_json(src / "adapter_config.json")
    ref = torch_reference("adapter_model.bin")
    ours = pt_load_file(out / "adapter_model.safetensors")
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
