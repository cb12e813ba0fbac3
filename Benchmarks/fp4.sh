#!/usr/bin/env bash
# Merges into FP4 bases: gpt-oss-shaped MXFP4 experts (make_mxfp4_model.py: 8 experts of
# 2880 × 2880 in two layers, a target_parameters adapter) and a compressed-tensors NVFP4 LLaMA
# (make_nvfp4_model.py: four layers of hidden 4096, LoRA on q_proj and v_proj): what
# requantization keeps of updates of 0.1 %, 1 % and 10 % of ‖W‖, and the time and peak memory of
# a merge next to dd of the same bytes.
#
#   Benchmarks/fp4.sh [--work DIR]   (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK="$ROOT/Benchmarks/work/fp4"
while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK=$2; shift ;;
        *) echo "fp4.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
# shellcheck source=dd_seconds.sh
. "$ROOT/Benchmarks/dd_seconds.sh"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for format in mxfp4 nvfp4; do
    for update in 0.001 0.01 0.1; do
        dir="$WORK/$format-$update"
        [ -d "$dir/model" ] || "$PY" "$ROOT/Benchmarks/make_${format}_model.py" "$dir" --update "$update" > /dev/null
        merge_row "$dir" "$(printf '%-5s  update %-6s of ‖W‖' "$format" "$update")" "$ADAPTER"
    done
done
