#!/usr/bin/env bash
# Mixture-of-Experts merges: time and peak memory of `adapter merge` of a PEFT target_parameters
# adapter into a synthetic Qwen3-30B-A3B-shaped model (two layers of 128 experts, bf16), once with
# per-expert tensors (as transformers saves it) and once fused ([E, 2I, H], as it holds it), next to
# what copying the same bytes costs (dd, the lower bound for an I/O-bound merge).
#
#   Benchmarks/moe.sh [--layers N] [--work DIR]      (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYERS=2 WORK="$ROOT/Benchmarks/work/moe"
while [ $# -gt 0 ]; do
    case "$1" in
        --layers) LAYERS=$2; shift ;;
        --work) WORK=$2; shift ;;
        *) echo "moe.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for form in per-expert fused; do
    dir="$WORK/$form"
    if [ ! -d "$dir/model" ]; then
        "$PY" "$ROOT/Benchmarks/make_moe_model.py" "$dir" --layers "$LAYERS" $([ $form = fused ] && echo --fused)
    fi
    bytes=$(du -sb "$dir/model" | cut -f1)
    rm -rf "$dir/out" "$dir/copy"
    mkdir -p "$dir/copy"
    start=$(date +%s.%N)
    for f in "$dir"/model/*.safetensors; do dd if="$f" of="$dir/copy/$(basename "$f")" bs=16M status=none; done
    sync
    dd_s=$(echo "$(date +%s.%N) - $start" | bc)
    rm -rf "$dir/copy"
    /usr/bin/time -v "$ADAPTER" merge --quiet "$dir/model" "$dir/adapter" "$dir/out" 2> "$dir/time.txt"
    merge_s=$(grep 'Elapsed (wall clock)' "$dir/time.txt" | awk '{print $NF}')
    rss=$(grep 'Maximum resident set size' "$dir/time.txt" | awk '{print $NF}')
    printf '%-10s  %6.2f GB  dd %6.2f s  merge %8s (m:ss)  peak RSS %6.0f MB\n' "$form" "$(echo "$bytes / 1e9" | bc -l)" "$dd_s" "$merge_s" "$(echo "$rss / 1024" | bc -l)"
    rm -rf "$dir/out"
done
