#!/usr/bin/env bash
# The benchmark suite in one command (see Benchmarks/README.md for what each number means).
#
#   Benchmarks/run.sh            # full: models of 0.5, 1, 2, 4 GB, 5 timed runs per tool and size
#   Benchmarks/run.sh --quick    # 0.1 and 0.2 GB (a smaller LLaMA shape), 3 runs: checks the pipeline
#
# Options: --runs N (timed runs per tool and size; full 5, quick 3), --sizes "0.5 1" (GB),
#          --work DIR (default Benchmarks/work), --results DIR (default Benchmarks/results, quick:
#          Benchmarks/results/quick), --no-install (never pip install), --no-peft, --no-numpy,
#          --verify-max-gb G (check that the tools computed the same merge at sizes ≤ G; default:
#          the smallest size only)
#
# Writes DIR/raw/* (every timing as measured), then Benchmarks/report.py turns them into
# DIR/RESULTS.md, DIR/results.json and DIR/merge_time.png.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CMDLINE="Benchmarks/run.sh $*"

QUICK=0 RUNS="" SIZES="" WORK="Benchmarks/work" RESULTS="" INSTALL=1 PEFT=1 NUMPY=1 VERIFY_MAX=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS=$2; shift ;;
        --sizes) SIZES=$2; shift ;;
        --work) WORK=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-peft) PEFT=0 ;;
        --no-numpy) NUMPY=0 ;;
        --verify-max-gb) VERIFY_MAX=$2; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    : "${RUNS:=3}" "${SIZES:=0.1 0.2}" "${RESULTS:=Benchmarks/results/quick}"
    # The default shape's embedding and lm_head alone are 0.26 GB: quick sizes need a smaller model.
    SHAPE=(--hidden 1024 --intermediate 2752 --vocab 8000 --shard-gb 0.05)
else
    : "${RUNS:=5}" "${SIZES:=0.5 1 2 4}" "${RESULTS:=Benchmarks/results}"
    SHAPE=()
fi
RANK=16
INSPECT_RUNS=5
ADAPTER="$ROOT/.build/release/adapter"
KBENCH="$ROOT/.build/release/adapter-kernel-bench"
RAW="$RESULTS/raw"
TIMINGS="$RAW/timings.tsv"
mkdir -p "$RAW" "$WORK"
rm -f "$RAW"/*
WORK=$(cd "$WORK" && pwd)
MODELS="$WORK/models" OUT="$WORK/out" TIMEFILE="$WORK/time.txt" LOGS="$WORK/logs"
# Python baselines get numpy's fast kernels: unset the two OpenBLAS overrides of this machine in
# their commands only (see Benchmarks/README.md); Hugging Face libraries stay offline.
PYENV=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
       TOKENIZERS_PARALLELISM=false)

cleanup() { rm -rf "$MODELS" "$OUT" "$WORK/.out.parts" "$WORK"/verify-* "$TIMEFILE"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RAW/log.txt" >&2; }
note() { echo "$*" >> "$RAW/notes.txt"; log "note: $*"; }

# measure SECTION SIZE TOOL RUN -- COMMAND...: wall time (bash's microsecond clock around
# /usr/bin/time) and peak RSS ("Maximum resident set size" of /usr/bin/time -v) into timings.tsv.
measure() {
    local section=$1 size=$2 tool=$3 run=$4; shift 5
    local t0 t1 rc=0 rss
    t0=$EPOCHREALTIME
    /usr/bin/time -v -o "$TIMEFILE" "$@" >"$LOGS/$tool.out" 2>&1 || rc=$?
    t1=$EPOCHREALTIME
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$TIMEFILE" 2>/dev/null || true)
    local us=$(( ${t1/./} - ${t0/./} ))
    printf '%s\t%s\t%s\t%s\t%d.%06d\t%s\t%s\n' "$section" "$size" "$tool" "$run" $((us / 1000000)) $((us % 1000000)) \
        "${rss:-0}" "$rc" >> "$TIMINGS"
    if [ "$rc" != 0 ]; then
        note "$tool failed at $size GB (run $run, exit $rc): $(tail -n 3 "$LOGS/$tool.out" | tr '\n' ' ' | cut -c1-300)"
    fi
    return "$rc"
}

# ---------------------------------------------------------------- machine, build, dependencies
START=$EPOCHSECONDS
log "benchmark: $CMDLINE (quick=$QUICK, sizes: $SIZES GB, $RUNS timed runs each) → $RESULTS"
rm -rf "$LOGS"; mkdir -p "$LOGS"
log "building release"
swift build -c release >"$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log" >&2; exit 1; }

[ -x /usr/bin/time ] || { echo "run.sh: GNU time is needed for peak memory (apt-get install time)" >&2; exit 1; }
python3 -c 'import numpy, safetensors' 2>/dev/null || {
    echo "run.sh: numpy and safetensors are needed (pip install numpy safetensors)" >&2; exit 1; }
pyhas() { python3 -c "import $1" >/dev/null 2>&1; }
if ! pyhas matplotlib && [ "$INSTALL" = 1 ]; then
    log "pip install matplotlib (for the chart)"
    pip install -q matplotlib >"$LOGS/pip-matplotlib.log" 2>&1 || true
fi
pyhas matplotlib || note "matplotlib unavailable: merge_time.png drawn by report.py's own PNG writer"
if ! pyhas threadpoolctl && [ "$INSTALL" = 1 ]; then
    pip install -q threadpoolctl >"$LOGS/pip-threadpoolctl.log" 2>&1 || true
fi
PEFT_VERSIONS=""
if [ "$PEFT" = 1 ]; then
    if ! python3 Benchmarks/peft_merge.py --check >/dev/null 2>&1 && [ "$INSTALL" = 1 ]; then
        log "pip install peft transformers (benchmark only)"
        pip install -q peft transformers >"$LOGS/pip-peft.log" 2>&1 || true
    fi
    if PEFT_VERSIONS=$(python3 Benchmarks/peft_merge.py --check 2>&1); then
        log "PEFT baseline: $PEFT_VERSIONS"
    else
        note "PEFT baseline skipped: import torch, peft, transformers failed ($PEFT_VERSIONS)"
        PEFT=0 PEFT_VERSIONS=""
    fi
else
    note "PEFT baseline skipped: --no-peft"
fi
[ "$NUMPY" = 1 ] || note "numpy merge baseline skipped: --no-numpy"

# Disk: the largest model, its outputs kept once for the correctness check, and a margin.
MAXSIZE=$(printf '%s\n' $SIZES | sort -g | tail -n 1)
: "${VERIFY_MAX:=$(printf '%s\n' $SIZES | sort -g | head -n 1)}"
NEED_KB=$(awk -v s="$MAXSIZE" 'BEGIN { printf "%d", (s * 2.2 + 1) * 1e6 }')
AVAIL_KB=$(df -Pk "$WORK" | awk 'NR == 2 {print $4}')
if [ "$AVAIL_KB" -lt "$NEED_KB" ]; then
    echo "run.sh: $WORK has $((AVAIL_KB / 1000000)) GB free; the $MAXSIZE GB model needs about $((NEED_KB / 1000000)) GB" >&2
    exit 1
fi

{
    echo "date	$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command	$CMDLINE"
    echo "quick	$QUICK"
    echo "runs	$RUNS"
    echo "sizes	$SIZES"
    echo "nproc	$(nproc)"
    echo "cpu	$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)"
    echo "cpu_flags	$(grep -o -w -E 'avx2|fma|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "memory_bytes	$(awk '/MemTotal/ {printf "%.0f", $2 * 1024}' /proc/meminfo)"
    echo "disk	$(df -PhT "$WORK" | awk 'NR == 2 {print $1 " (" $2 "), " $3 " total, " $5 " free at start"}')"
    echo "kernel	$(uname -sr)"
    echo "swift	$(swift --version 2>&1 | head -n 1)"
    echo "python	$(python3 -c 'import sys, numpy, safetensors; print(sys.version.split()[0], "numpy", numpy.__version__, "safetensors", safetensors.__version__)')"
    echo "peft	$PEFT_VERSIONS"
    echo "git	$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- Sources Package.swift 2>/dev/null || echo ' (Sources modified)')"
    echo "adapter	$("$ADAPTER" --version 2>&1)"
    echo "openblas_env	OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-unset}"
} > "$RAW/machine.tsv"

# ---------------------------------------------------------------- kernel: fused vs numpy unfused
log "kernel: adapter-kernel-bench vs Benchmarks/numpy_kernel.py"
"$KBENCH" "$(nproc)" > "$RAW/kernel_adapter.tsv"
"${PYENV[@]}" python3 Benchmarks/numpy_kernel.py --blas-info > "$RAW/kernel_numpy.tsv" 2> "$RAW/blas.txt"
if [ -n "${OPENBLAS_CORETYPE:-}${OPENBLAS_L2_SIZE:-}" ]; then
    # For reference only: numpy with this machine's OpenBLAS overrides left in place.
    python3 Benchmarks/numpy_kernel.py --blas-info > "$RAW/kernel_numpy_env.tsv" 2> "$RAW/blas_env.txt"
fi

# ---------------------------------------------------------------- inspect: 100 shards, headers only
log "inspect: 100-shard folder, adapter inspect --tensors vs Benchmarks/inspect_listing.py"
rm -rf "$MODELS"; mkdir -p "$MODELS"
python3 Benchmarks/make_model.py "$MODELS/inspect" --hidden 64 --intermediate 128 --vocab 256 --layers 98 --shards 100 \
    --rank 4 > "$LOGS/make-inspect.log"
TINY="$MODELS/inspect/model"
echo "inspect	$(ls "$TINY" | grep -c '\.safetensors$')	$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["weight_map"]))' "$TINY/model.safetensors.index.json")" > "$RAW/inspect_folder.tsv"
sync
for run in $(seq 1 "$INSPECT_RUNS"); do
    if [ $((run % 2)) = 1 ]; then order="adapter python"; else order="python adapter"; fi
    for tool in $order; do
        case $tool in
            adapter) measure inspect 0 adapter_inspect "$run" -- "$ADAPTER" inspect --tensors "$TINY" ;;
            python) measure inspect 0 python_safe_open "$run" -- "${PYENV[@]}" python3 Benchmarks/inspect_listing.py "$TINY" ;;
        esac
        sync
    done
done
rm -rf "$MODELS"

# ---------------------------------------------------------------- merge: wall time and peak memory
TOOLS=(adapter_merge adapter_merge_nosync cp cp_sync adapter_parts2)
[ "$NUMPY" = 1 ] && TOOLS+=(numpy_merge)
[ "$PEFT" = 1 ] && TOOLS+=(peft_merge)
printf 'size_gb\tlayers\tshards\tmodel_bytes\tlargest_tensor\tlargest_bytes\tadapter_bytes\tlora_bytes\tgenerate_s\n' > "$RAW/sizes.tsv"

SECTION=merge
run_tool() {  # TOOL SIZE RUN (into section $SECTION: merge, or verify for the untimed correctness runs)
    local base="$MODELS/model" moslora="$MODELS/adapter" lora="$MODELS/lora"
    case $1 in
        adapter_merge) measure "$SECTION" "$2" "$1" "$3" -- "$ADAPTER" merge "$base" "$moslora" "$OUT" ;;
        adapter_merge_nosync) measure "$SECTION" "$2" "$1" "$3" -- "$ADAPTER" merge "$base" "$moslora" "$OUT" --no-sync ;;
        # A split merge as a cluster would run it, here on one machine: both parts at once, then the finish.
        adapter_parts2) measure "$SECTION" "$2" "$1" "$3" -- sh -c '"$0" merge "$1" "$2" "$3" --part 1/2 --quiet & "$0" merge "$1" "$2" "$3" --part 2/2 --quiet; s=$?; wait $! && [ $s = 0 ] && "$0" merge "$1" "$2" "$3" --finish --quiet' "$ADAPTER" "$base" "$moslora" "$OUT" ;;
        cp) measure "$SECTION" "$2" "$1" "$3" -- cp -r "$base" "$OUT" ;;
        cp_sync) measure "$SECTION" "$2" "$1" "$3" -- sh -c 'cp -r "$0" "$1" && sync' "$base" "$OUT" ;;
        numpy_merge) measure "$SECTION" "$2" "$1" "$3" -- "${PYENV[@]}" python3 Benchmarks/numpy_merge.py "$base" "$moslora" "$OUT" ;;
        peft_merge) measure "$SECTION" "$2" "$1" "$3" -- "${PYENV[@]}" python3 Benchmarks/peft_merge.py "$base" "$lora" "$OUT" ;;
    esac
}

DONE_GB=0 MERGE_START=$EPOCHSECONDS
for size in $SIZES; do
    rm -rf "$MODELS" "$OUT"; mkdir -p "$MODELS"
    log "merge: generating the $size GB model (rank $RANK MoSLoRA adapter)"
    g0=$EPOCHREALTIME
    python3 Benchmarks/make_model.py "$MODELS" --size-gb "$size" --rank "$RANK" "${SHAPE[@]}" > "$LOGS/make-$size.log"
    "$ADAPTER" convert moslora-to-lora "$MODELS/adapter" "$MODELS/lora" --quiet
    g1=$EPOCHREALTIME
    gus=$(( ${g1/./} - ${g0/./} ))
    python3 - "$MODELS" "$size" "$((gus / 1000000)).$(printf %03d $((gus % 1000000 / 1000)))" >> "$RAW/sizes.tsv" <<'EOF'
import json, os, sys
root, size, gen_s = sys.argv[1:]
model = os.path.join(root, "model")
files = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))
total, largest = 0, ("", 0)
for fname in files:
    with open(os.path.join(model, fname), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    for name, info in header.items():
        b, e = info["data_offsets"]
        total += e - b
        largest = max(largest, (name, e - b), key=lambda x: x[1])
layers = json.load(open(os.path.join(model, "config.json")))["num_hidden_layers"]
sz = lambda d: os.path.getsize(os.path.join(root, d, "adapter_model.safetensors"))
print(f"{size}\t{layers}\t{len(files)}\t{total}\t{largest[0]}\t{largest[1]}\t{sz('adapter')}\t{sz('lora')}\t{gen_s}")
EOF
    log "  $(tail -n 1 "$RAW/sizes.tsv" | awk -F'\t' '{printf "%s layers, %s shards, %.3f GB of weights, generated in %s s", $2, $3, $4 / 1e9, $9}')"
    sync

    # Correctness, untimed: every tool that computes a merge must produce the same weights.
    if awk -v s="$size" -v m="$VERIFY_MAX" 'BEGIN { exit !(s <= m) }'; then
        dirs=()
        for tool in adapter_merge numpy_merge peft_merge; do
            case " ${TOOLS[*]} " in *" $tool "*) ;; *) continue ;; esac
            SECTION=verify run_tool "$tool" "$size" 1 || true
            if [ -d "$OUT" ]; then mv "$OUT" "$WORK/verify-$tool"; dirs+=("$WORK/verify-$tool"); fi
        done
        if [ ${#dirs[@]} -ge 2 ]; then
            verdict=$("${PYENV[@]}" python3 Benchmarks/numpy_merge.py --compare "${dirs[@]}" 2>&1 | tail -n 1) || true
            printf '%s\t%s\t%s\n' "$size" "$(basename -a "${dirs[@]}" | sed 's/^verify-//' | tr '\n' ' ')" "$verdict" >> "$RAW/verify.tsv"
            log "  check: $verdict"
        fi
        rm -rf "$WORK"/verify-*; sync
    fi

    # Timed runs, alternating: each round runs every tool once, the order rotating by one per round.
    n=${#TOOLS[@]}
    for run in $(seq 1 "$RUNS"); do
        for j in $(seq 0 $((n - 1))); do
            tool=${TOOLS[$(( (j + run - 1) % n ))]}
            rm -rf "$OUT" "$WORK/.out.parts"; sync
            run_tool "$tool" "$size" "$run" || true
            rm -rf "$OUT" "$WORK/.out.parts"; sync
        done
        log "  $size GB round $run/$RUNS done ($(( EPOCHSECONDS - START )) s elapsed)"
    done
    rm -rf "$MODELS"
    DONE_GB=$(awk -v a="$DONE_GB" -v b="$size" 'BEGIN { print a + b }')
    left=$(printf '%s\n' $SIZES | awk -v d="$DONE_GB" '{ t += $1 } END { print t - d }')
    log "  $size GB done; $(( EPOCHSECONDS - START )) s elapsed, about $(awk -v e=$(( EPOCHSECONDS - MERGE_START )) \
        -v d="$DONE_GB" -v l="$left" 'BEGIN { printf "%d", e / d * l }') s to go at this pace"
done

# ---------------------------------------------------------------- report
echo "elapsed_s	$(( EPOCHSECONDS - START ))" >> "$RAW/machine.tsv"
cp "$LOGS"/make-*.log "$RAW/" 2>/dev/null || true
python3 Benchmarks/report.py "$RESULTS"
log "done in $(( EPOCHSECONDS - START )) s: $RESULTS/RESULTS.md, $RESULTS/results.json, $RESULTS/merge_time.png"
