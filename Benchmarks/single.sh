#!/usr/bin/env bash
# One merge against dd of the same bytes: a LLaMA-shaped bf16 model (make_model.py) and a rank-16
# MoSLoRA adapter on all seven projections. Each timed command starts after `sync` from the same
# state (the model in the page cache when it fits, the previous output removed and flushed), and
# the tools alternate, the starting one rotating; medians of --runs.
#
#   no fsync:   adapter merge --no-sync   against  dd of every shard (bs=16M, through user space)
#   with fsync: adapter merge             against  the same dd followed by sync
#   parts:      adapter merge --part 1/2 & --part 2/2 (in parallel), then --finish (fsync on)
#
#   Benchmarks/single.sh [--size-gb 1.2] [--runs 5] [--work DIR] [--no-parts]
# Prints one line per run and a summary (median seconds, ratios, the merge's peak RSS); needs a
# release build (swift build -c release) and python3 with numpy and safetensors.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=1.2 RUNS=5 WORK="$ROOT/Benchmarks/work/single" PARTS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --size-gb) SIZE=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        --work) WORK=$2; shift ;;
        --no-parts) PARTS=0 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "single.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ADAPTER="$ROOT/.build/release/adapter"
PY=${PYTHON:-python3}
[ -x "$ADAPTER" ] || { echo "single.sh: build first: swift build -c release" >&2; exit 1; }
DIR="$WORK/$SIZE"
mkdir -p "$DIR"
if [ ! -f "$DIR/model/model.safetensors.index.json" ]; then
    rm -rf "$DIR/model" "$DIR/adapter"
    "$PY" "$ROOT/Benchmarks/make_model.py" "$DIR" --size-gb "$SIZE" --rank 16 > /dev/null
fi
BYTES=$(du -sb "$DIR/model" | awk '{print $1}')
clean() { rm -rf "$DIR/out" "$DIR/copy" "$DIR/.out.parts"; sync; }
trap clean EXIT

# timed LABEL COMMAND...: seconds of COMMAND (bash's clock), peak RSS KiB into $DIR/rss.
timed() {
    local label=$1 t0 t1; shift
    clean
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%M' -o "$DIR/rss" "$@" || { echo "single.sh: $label failed" >&2; exit 1; }
    t1=$EPOCHREALTIME
    echo "$label $(echo "$t1 - $t0" | bc) $(cat "$DIR/rss")" >> "$DIR/times"
}
dd_copy() {
    mkdir -p "$DIR/copy"
    for f in "$DIR"/model/*.safetensors; do dd if="$f" of="$DIR/copy/$(basename "$f")" bs=16M status=none; done
    [ "${1:-}" != sync ] || sync
}
parts() {
    "$ADAPTER" merge "$DIR/model" "$DIR/adapter" "$DIR/out" --part 1/2 --quiet &
    "$ADAPTER" merge "$DIR/model" "$DIR/adapter" "$DIR/out" --part 2/2 --quiet
    wait
    "$ADAPTER" merge "$DIR/model" "$DIR/adapter" "$DIR/out" --finish --quiet
}
export -f dd_copy parts
export DIR ADAPTER
rm -f "$DIR/times"
TOOLS=(dd merge_nosync dd_sync merge)
[ "$PARTS" = 1 ] && TOOLS+=(parts)
for run in $(seq 1 "$RUNS"); do
    n=${#TOOLS[@]}
    for k in $(seq 0 $((n - 1))); do
        tool=${TOOLS[$(( (k + run - 1) % n ))]}
        case $tool in
            dd) timed dd bash -c dd_copy ;;
            dd_sync) timed dd_sync bash -c 'dd_copy sync' ;;
            merge_nosync) timed merge_nosync "$ADAPTER" merge "$DIR/model" "$DIR/adapter" "$DIR/out" --no-sync --quiet ;;
            merge) timed merge "$ADAPTER" merge "$DIR/model" "$DIR/adapter" "$DIR/out" --quiet ;;
            parts) timed parts bash -c parts ;;
        esac
    done
    echo "run $run: $(grep -c . "$DIR/times") timings" >&2
done
"$PY" - "$DIR/times" "$BYTES" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for label, s, rss in rows:
    by.setdefault(label, []).append((float(s), int(rss)))
med = {k: statistics.median(s for s, _ in v) for k, v in by.items()}
gb = int(sys.argv[2]) / 1e9
print(f"model {gb:.2f} GB, {len(by['dd'])} runs each (median, min–max; peak RSS of the largest run)")
for k in ["dd", "merge_nosync", "dd_sync", "merge", "parts"]:
    if k not in by: continue
    v = [s for s, _ in by[k]]
    print(f"  {k:13s} {med[k]:6.2f} s  ({min(v):.2f}–{max(v):.2f})  {gb / med[k]:5.2f} GB/s  peak RSS {max(r for _, r in by[k]) / 1024:6.0f} MB")
print(f"  merge --no-sync / dd        {med['merge_nosync'] / med['dd']:.2f}×")
print(f"  merge (fsync) / dd && sync  {med['merge'] / med['dd_sync']:.2f}×")
if "parts" in med:
    print(f"  2 parts + finish / merge    {med['parts'] / med['merge']:.2f}×")
PY
