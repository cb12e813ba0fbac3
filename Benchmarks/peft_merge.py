#!/usr/bin/env python3
"""The PEFT baseline: what a user of Hugging Face's stack runs to merge a LoRA into a model.

    python3 Benchmarks/peft_merge.py BASE_DIR LORA_DIR OUT_DIR
    python3 Benchmarks/peft_merge.py --check      # exit 0 when torch, peft and transformers import

Loads the base with transformers' LlamaForCausalLM in bfloat16, attaches the adapter with PEFT,
merge_and_unload(), save_pretrained(safe_serialization=True). Stock PEFT has no MoSLoRA mixer, so
LORA_DIR must be a plain LoRA (run.sh makes one with `adapter convert moslora-to-lora`).
Benchmark only: never imported by tests or CI.
"""
import sys


def main():
    if sys.argv[1:] == ["--check"]:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except Exception as e:  # report why, run.sh prints it as the skip note
            print(f"{type(e).__name__}: {e}")
            return 1
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
        return 0
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    base, lora, out = sys.argv[1:]

    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    try:  # transformers ≥ 4.56 calls it dtype; older releases only know torch_dtype
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, lora)
    model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
