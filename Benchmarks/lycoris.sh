#!/usr/bin/env bash
# LyCORIS merges against a rank-16 LoRA and dd of the same bytes, on an SDXL-shaped slice of a
# UNet (Benchmarks/make_lycoris_model.py: per block q/k/v/out 1280×1280, the GEGLU feed-forward,
# a 3×3 conv; bf16). Adapters: lora r16, loha dim 16, lokr (w2 at dim 16), lokr-full (w1 and w2
# whole: full rank), full (diffs). Every merge is --no-sync after `sync`, medians of --runs,
# with peak RSS.
#
#   Benchmarks/lycoris.sh [--blocks 4] [--runs 3] [--work DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BLOCKS=4 RUNS=3 WORK="$ROOT/Benchmarks/work/lycoris"
while [ $# -gt 0 ]; do
    case "$1" in
        --blocks) BLOCKS=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        --work) WORK=$2; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "lycoris.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
PY=${PYTHON:-python3}
[ -x "$ADAPTER" ] || { echo "lycoris.sh: build first: swift build -c release" >&2; exit 1; }
DIR="$WORK/$BLOCKS"
if [ ! -f "$DIR/base.safetensors" ]; then
    mkdir -p "$DIR"
    "$PY" "$ROOT/Benchmarks/make_lycoris_model.py" "$DIR" --blocks "$BLOCKS" > /dev/null
fi
trap 'rm -f "$DIR/out.safetensors" "$DIR/copy"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf "%-10s %8s %10s\n" tool seconds peak_MB
times=()
for _ in $(seq "$RUNS"); do
    rm -f "$DIR/copy"; sync
    s=$(date +%s.%N); dd if="$DIR/base.safetensors" of="$DIR/copy" bs=16M status=none; e=$(date +%s.%N)
    times+=("$(echo "$e - $s" | bc)")
done
printf "%-10s %8.2f %10s\n" dd "$(printf '%s\n' "${times[@]}" | median)" -
for kind in lora loha lokr lokr-full full; do
    times=() peak=0
    for _ in $(seq "$RUNS"); do
        rm -f "$DIR/out.safetensors"; sync
        out=$( { /usr/bin/time -f "%e %M" "$ADAPTER" merge --quiet --no-sync "$DIR/base.safetensors" "$DIR/adapters/$kind.safetensors" "$DIR/out.safetensors"; } 2>&1 )
        times+=("${out% *}")
        kb=${out#* }; [ "$kb" -gt "$peak" ] && peak=$kb
    done
    printf "%-10s %8.2f %10d\n" "$kind" "$(printf '%s\n' "${times[@]}" | median)" $((peak / 1024))
done
