#!/usr/bin/env bash
# Merges into GGUF bases: a LLaMA-shaped model (make_gguf_model.py; 18 layers of hidden 2048 in Q8_0,
# about 1 GB, and 4 layers in Q4_K) with a rank-16 LoRA on q_proj and v_proj of every layer, and a
# qwen3moe (2 layers of 64 experts, fused 3-D expert tensors of 185 M values, the adapter on every
# expert's down_proj too), merged in the base's own type and with --dtype f16; dd + sync of the
# same bytes for scale, peak RSS.
#
#   Benchmarks/gguf.sh [--work DIR]   (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK="$ROOT/Benchmarks/work/gguf"
while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK=$2; shift ;;
        *) echo "gguf.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for spec in "Q8_0 18 0" "Q4_K 4 0" "Q8_0 2 64"; do
    set -- $spec
    dir="$WORK/$1-$2-$3"
    shape=()
    [ "$3" -gt 0 ] && shape=(--experts "$3" --ffn 1408)
    [ -f "$dir/model.gguf" ] || "$PY" "$ROOT/Benchmarks/make_gguf_model.py" "$dir" --type "$1" --layers "$2" "${shape[@]}" > /dev/null
    for dtype in same f16; do
        rm -f "$dir/out.gguf" "$dir/copy.gguf"
        sync
        start=$(date +%s.%N)
        dd if="$dir/model.gguf" of="$dir/copy.gguf" bs=16M status=none
        sync
        dd_s=$(echo "$(date +%s.%N) - $start" | bc)
        rm -f "$dir/copy.gguf"
        extra=()
        [ "$dtype" = f16 ] && extra=(--dtype f16)
        /usr/bin/time -f '%e %M' -o "$dir/time.txt" "$ADAPTER" merge "${extra[@]}" "$dir/model.gguf" "$dir/adapter" "$dir/out.gguf" 2> "$dir/log.txt"
        read -r wall rss < "$dir/time.txt"
        kept=$(grep -o -m1 'median [0-9.]* %' "$dir/log.txt" || echo "-")
        printf '%-5s %2s layers %2s experts  %-9s %5.2f GB  merge %5.2f s  dd + sync %5.2f s  peak RSS %4.0f MB  kept: %s\n' \
            "$1" "$2" "$3" "$([ "$dtype" = same ] && echo "own type" || echo "--dtype f16")" "$(du -b "$dir/model.gguf" | awk '{print $1 / 1e9}')" \
            "$wall" "$dd_s" "$(echo "$rss / 1024" | bc -l)" "$kept"
        rm -f "$dir/out.gguf"
    done
done
