#!/usr/bin/env bash
# Mixture-of-Experts merges: time and peak memory of `adapter merge` of a PEFT target_parameters
# adapter into a synthetic Qwen3-30B-A3B-shaped model (two layers of 128 experts, bf16), once with
# per-expert tensors (as transformers saves it) and once fused ([E, 2I, H], as it holds it), next to
# what copying the same bytes costs (dd, the lower bound for an I/O-bound merge).
#
#   Benchmarks/moe.sh [--layers N] [--runs N] [--work DIR]   (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYERS=2 RUNS=3 WORK="$ROOT/Benchmarks/work/moe"
while [ $# -gt 0 ]; do
    case "$1" in
        --layers) LAYERS=$2; shift ;;
        --work) WORK=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        *) echo "moe.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
# shellcheck source=dd_seconds.sh
. "$ROOT/Benchmarks/dd_seconds.sh"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for form in per-expert fused; do
    dir="$WORK/$form"
    if [ ! -d "$dir/model" ]; then
        "$PY" "$ROOT/Benchmarks/make_moe_model.py" "$dir" --layers "$LAYERS" $([ $form = fused ] && echo --fused)
    fi
    bytes=$(du -sb "$dir/model" | cut -f1)
    : > "$dir/runs.tsv"
    for run in $(seq "$RUNS"); do
        # The same bytes copied and flushed (dd, then sync), then the merge (which fsyncs too).
        rm -rf "$dir/out"
        dd_s=$(dd_seconds "$dir")
        sync
        /usr/bin/time -f '%e %M %U %S' -o "$dir/time.txt" "$ADAPTER" merge --quiet "$dir/model" "$dir/adapter" "$dir/out"
        echo "$dd_s $(cat "$dir/time.txt")" >> "$dir/runs.tsv"
        rm -rf "$dir/out"
    done
    # Medians of the runs: dd, merge wall, peak RSS (KiB), user, system (each column on its own).
    med() { cut -d' ' -f"$1" "$dir/runs.tsv" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
    awk -v f="$form" -v b="$bytes" -v d="$(med 1)" -v w="$(med 2)" -v r="$(med 3)" -v u="$(med 4)" -v s="$(med 5)" -v n="$RUNS" 'BEGIN {
        printf "%-10s  %5.2f GB  dd + sync %6.2f s  merge %6.2f s (%.2f GB/s, user %.2f s, sys %.2f s)  peak RSS %5.0f MB  (medians of %d)\n",
               f, b / 1e9, d, w, b / 1e9 / w, u, s, r / 1024, n }'
done
