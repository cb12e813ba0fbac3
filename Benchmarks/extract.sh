#!/usr/bin/env bash
# `adapter extract` against mergekit-extract-lora (mergekit 0.1.5, CPU: a full SVD per module in
# torch), side by side on a LLaMA-shaped bf16 pair made at run time (make_extract_pair.py: every
# projection of 9 layers of hidden 2048 tuned by a slowly decaying rank-64 update), rank 16: wall
# time and peak RSS of each (median of --runs alternating runs, a sync before each), and the
# relative Frobenius error ‖D − ΔW‖/‖D‖ of both outputs computed by extract_error.py (numpy).
# Also our peak memory on a pair twice as large (18 layers): flat in the model size.
#
#   Benchmarks/extract.sh [--work DIR] [--runs N] [--no-mergekit]
# Needs a release build (swift build -c release), python3 with numpy, torch and safetensors, and
# mergekit 0.1.5 in its own virtual environment: MERGEKIT=path/to/mergekit-extract-lora (default:
# Benchmarks/work/venv-mergekit/bin/..., installed there with pip when missing).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK="$ROOT/Benchmarks/work/extract"
RUNS=3
WITH_MERGEKIT=1
while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        --no-mergekit) WITH_MERGEKIT=0 ;;
        *) echo "extract.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
if [ "$WITH_MERGEKIT" = 1 ] && [ -z "${MERGEKIT:-}" ]; then
    venv="$ROOT/Benchmarks/work/venv-mergekit"
    [ -x "$venv/bin/mergekit-extract-lora" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q mergekit==0.1.5; }
    MERGEKIT="$venv/bin/mergekit-extract-lora"
fi
pair() {  # pair DIR LAYERS
    [ -f "$1/tuned/model.safetensors.index.json" ] || (cd "$ROOT/Benchmarks" && "$PY" make_extract_pair.py "$1" --layers "$2" > /dev/null)
}
timed() {  # timed LABEL OUT COMMAND… : prints "LABEL wall rss_kb"
    local label=$1 out=$2
    shift 2
    rm -rf "$out"
    sync
    /usr/bin/time -f '%e %M' -o "$WORK/time.txt" "$@" > /dev/null 2> "$WORK/log.txt" || { cat "$WORK/log.txt" >&2; exit 1; }
    echo "$label $(cat "$WORK/time.txt")"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

pair "$WORK/9" 9
: > "$WORK/runs.txt"
for run in $(seq 1 "$RUNS"); do
    # Alternate which tool starts.
    tools=(adapter mergekit)
    [ $((run % 2)) = 0 ] && tools=(mergekit adapter)
    for tool in "${tools[@]}"; do
        case $tool in
            adapter) timed adapter "$WORK/ours" "$ADAPTER" extract --rank 16 --no-sync --quiet "$WORK/9/base" "$WORK/9/tuned" "$WORK/ours" >> "$WORK/runs.txt" ;;
            mergekit) [ "$WITH_MERGEKIT" = 1 ] && timed mergekit "$WORK/mergekit" "$MERGEKIT" --model "$WORK/9/tuned" --base-model "$WORK/9/base" \
                          --out-path "$WORK/mergekit" --max-rank 16 --quiet >> "$WORK/runs.txt" ;;
        esac
    done
done
for tool in adapter mergekit; do
    grep -q "^$tool " "$WORK/runs.txt" || continue
    wall=$(grep "^$tool " "$WORK/runs.txt" | awk '{print $2}' | median)
    rss=$(grep "^$tool " "$WORK/runs.txt" | awk '{print $3}' | sort -n | tail -1)
    out=$([ "$tool" = adapter ] && echo ours || echo mergekit)
    err=$("$PY" "$ROOT/Benchmarks/extract_error.py" "$WORK/9/base" "$WORK/9/tuned" "$WORK/$out")
    printf '%-8s 1.2 GB pair, rank 16: median %6.2f s (%s runs)  peak RSS %5.0f MB  %s\n' "$tool" "$wall" "$RUNS" "$(echo "$rss / 1024" | bc -l)" "$err"
done
pair "$WORK/18" 18
read -r _ wall rss < <(timed adapter18 "$WORK/ours18" "$ADAPTER" extract --rank 16 --no-sync --quiet "$WORK/18/base" "$WORK/18/tuned" "$WORK/ours18")
printf 'adapter  2.4 GB pair (18 layers), rank 16: %6.2f s  peak RSS %5.0f MB\n' "$wall" "$(echo "$rss / 1024" | bc -l)"
