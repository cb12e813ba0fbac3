#!/usr/bin/env bash
# Merges into block-scaled FP8 bases: what requantization keeps of updates of 0.1 %, 1 % and 10 %
# of ‖W‖ (F32 and UE8M0 scales), and the time and peak memory of a merge next to dd of the same
# bytes.
#
#   Benchmarks/fp8.sh [--layers N] [--hidden H] [--work DIR]   (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYERS=4 HIDDEN=4096 WORK="$ROOT/Benchmarks/work/fp8"
while [ $# -gt 0 ]; do
    case "$1" in
        --layers) LAYERS=$2; shift ;;
        --hidden) HIDDEN=$2; shift ;;
        --work) WORK=$2; shift ;;
        *) echo "fp8.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
# shellcheck source=dd_seconds.sh
. "$ROOT/Benchmarks/dd_seconds.sh"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for scales in f32 e8m0; do
    for update in 0.001 0.01 0.1; do
        dir="$WORK/$scales-$update"
        [ -d "$dir/model" ] || "$PY" "$ROOT/Benchmarks/make_fp8_model.py" "$dir" --layers "$LAYERS" --hidden "$HIDDEN" --update "$update" \
            $([ $scales = e8m0 ] && echo --e8m0) > /dev/null
        merge_row "$dir" "$(printf '%-5s scales  update %-6s of ‖W‖' "$scales" "$update")" "$ADAPTER"
    done
done
