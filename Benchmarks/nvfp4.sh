#!/usr/bin/env bash
# Merges into NVFP4 weights (compressed-tensors): what requantization keeps of updates of 0.1 %, 1 % and 10 %
# of ‖W‖, and the time and peak memory of a merge next to dd of the same
# bytes.
#
#   Benchmarks/nvfp4.sh [--layers N] [--hidden H] [--work DIR]   (needs a release build: swift build -c release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYERS=4 HIDDEN=4096 WORK="$ROOT/Benchmarks/work/nvfp4"
while [ $# -gt 0 ]; do
    case "$1" in
        --layers) LAYERS=$2; shift ;;
        --hidden) HIDDEN=$2; shift ;;
        --work) WORK=$2; shift ;;
        *) echo "nvfp4.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
# shellcheck source=dd_seconds.sh
. "$ROOT/Benchmarks/dd_seconds.sh"
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for update in 0.001 0.01 0.1; do
    dir="$WORK/$update"
    [ -d "$dir/model" ] || "$PY" "$ROOT/Benchmarks/make_nvfp4_model.py" "$dir" --layers "$LAYERS" --hidden "$HIDDEN" --update "$update" > /dev/null
    # The same bytes copied and flushed (dd, then sync), then the merge (which fsyncs too).
    rm -rf "$dir/out"
    dd_s=$(dd_seconds "$dir")
    /usr/bin/time -f '%e %M' -o "$dir/time.txt" "$ADAPTER" merge "$dir/model" "$dir/adapter" "$dir/out" 2> "$dir/log.txt"
    kept=$(grep -o 'median [0-9.]* %, worst [0-9.]* %' "$dir/log.txt")
    read -r wall rss < "$dir/time.txt"
    printf 'update %-6s of ‖W‖  kept: %-28s  %5.2f GB  merge %5.2f s  dd + sync %5.2f s  peak RSS %4.0f MB\n' \
        "$update" "$kept" "$(du -sb "$dir/model" | awk '{print $1 / 1e9}')" "$wall" "$dd_s" "$(echo "$rss / 1024" | bc -l)"
    rm -rf "$dir/out"
done
