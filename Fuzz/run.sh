#!/usr/bin/env bash
# Builds the libFuzzer targets and runs one (or all, one after another) for SECONDS each.
#
#   Fuzz/run.sh TARGET SECONDS [libFuzzer flags...]    e.g. Fuzz/run.sh fuzz-zip 120
#   Fuzz/run.sh all SECONDS [libFuzzer flags...]
#   Fuzz/run.sh list
#
# Seeds come from Fixtures/ (made fresh each run into Fuzz/corpus/seeds-TARGET); what the fuzzer
# learns is kept in Fuzz/corpus/TARGET across runs; crashes, leaks, timeouts and out-of-memory
# inputs land in Fuzz/crashes/ as TARGET-crash-<sha1> etc. Resource bounds are findings too:
# an input may not take longer than -timeout seconds, nor push the process past -rss_limit_mb,
# nor ask for one allocation larger than -malloc_limit_mb (inputs are at most -max_len bytes,
# so nothing legitimate needs that much). Exit status: 0 when no target found anything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
targets=(fuzz-safetensors-header fuzz-model-index fuzz-adapter-config fuzz-zip fuzz-torch fuzz-pickle fuzz-gguf)

usage() { echo "usage: $0 TARGET|all|list SECONDS [libFuzzer flags...]; targets: ${targets[*]}" >&2; exit 2; }
[ $# -ge 1 ] || usage
if [ "$1" = list ]; then printf '%s\n' "${targets[@]}"; exit 0; fi
[ $# -ge 2 ] || usage
which="$1"; seconds="$2"; shift 2
case "$seconds" in ''|*[!0-9]*) usage ;; esac
if [ "$which" != all ] && [[ ! " ${targets[*]} " == *" $which "* ]]; then usage; fi

scratch="$root/.build-fuzz"
echo "== building the fuzz targets (debug, -sanitize=fuzzer,address) into $scratch" >&2
swift build -c debug --package-path "$here" --scratch-path "$scratch" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library 2>&1 \
    | grep -v "Cannot export local symbol" >&2
bin="$scratch/debug"

# Seeds from the fixtures, per target.
seed() {
    local target="$1" dir="$here/corpus/seeds-$1"
    rm -rf "$dir"; mkdir -p "$dir"
    case "$target" in
    fuzz-safetensors-header)
        find "$root/Fixtures" -name '*.safetensors' -size -64k | while read -r f; do
            cp "$f" "$dir/$(basename "$(dirname "$f")")-$(basename "$f")"
            # The header alone (length prefix + JSON), without the data buffer.
            python3 - "$f" "$dir/header-$(basename "$f")" <<'PY'
import struct, sys
b = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
open(sys.argv[2], 'wb').write(b[:8 + n])
PY
        done ;;
    fuzz-model-index)
        find "$root/Fixtures" -name '*.index.json' -exec cp {} "$dir/" \; ;;
    fuzz-adapter-config)
        local i=0
        for f in "$root"/Fixtures/adapters/*/adapter_config.json; do
            { printf '\x00'; cat "$f"; } > "$dir/peft-$((i++))"
        done
        # Pattern keys are regular expressions: seeds with a few, so the fuzzer mutates them too.
        python3 - "$root/Fixtures/adapters/moslora-original/adapter_config.json" "$dir" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["rank_pattern"] = {"q_proj": 4, "layers\\.[0-9]+\\.self_attn\\.v_proj": 4}
c["alpha_pattern"] = {".*down_proj": 16, "(q|k)_proj": 4}
open(sys.argv[2] + "/peft-patterns", "wb").write(b"\x00" + json.dumps(c).encode())
PY
        { printf '\x01'; cat "$root/Fixtures/adapters/paddle/lora_config.json"; } > "$dir/paddle"
        { printf '\x02'; cat "$root/Fixtures/adapters/mytransformers/config.json"; } > "$dir/mytransformers" ;;
    fuzz-zip|fuzz-torch)
        cp "$root"/Fixtures/pytorch/*.pt "$root"/Fixtures/pytorch/*.bin "$dir/" ;;
    fuzz-gguf)
        cp "$root"/Fixtures/gguf/*.gguf "$dir/"
        # A llama.cpp LoRA adapter as `convert to-gguf` writes it, when a built adapter is at hand.
        if [ -x "$root/.build/release/adapter" ]; then
            "$root/.build/release/adapter" convert to-gguf --quiet --force "$root/Fixtures/adapters/moslora-original" "$dir/lora.gguf" \
                --base "$root/Fixtures/models/tiny-llama" || true
        fi ;;
    fuzz-pickle)
        python3 - "$dir" "$root"/Fixtures/pytorch/*.pt "$root"/Fixtures/pytorch/*.bin <<'PY'
import os, sys, zipfile
out = sys.argv[1]
for path in sys.argv[2:]:
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith('.pkl'):
                    open(os.path.join(out, os.path.basename(path) + '-' + name.replace('/', '_')), 'wb').write(z.read(name))
    except Exception:
        pass  # hostile archives: their pickles are not needed as seeds
PY
        ;;
    esac
    # The inputs that once crashed or hung a target (replayed by FuzzRegressionTests) seed it too.
    if [ -d "$root/Fixtures/fuzz/$target" ]; then cp "$root/Fixtures/fuzz/$target/"* "$dir/"; fi
    [ -n "$(ls -A "$dir")" ] || { echo "no seeds for $target" >&2; exit 1; }
    echo "$dir"
}

status=0
run() {
    local target="$1" seeds corpus="$here/corpus/$1"
    shift
    seeds="$(seed "$target")"
    mkdir -p "$corpus" "$here/crashes"
    echo "== $target for ${seconds}s (seeds: $(ls "$seeds" | wc -l), corpus: $(ls "$corpus" | wc -l))" >&2
    ADAPTER_FIXTURES="$root/Fixtures" \
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}" \
    "$bin/$target" "$corpus" "$seeds" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 -max_len=65536 \
        -artifact_prefix="$here/crashes/$target-" -print_final_stats=1 "$@" \
        || { echo "!! $target found a problem: see $here/crashes/" >&2; status=1; }
}

if [ "$which" = all ]; then
    for t in "${targets[@]}"; do run "$t" "$@"; done
else
    run "$which" "$@"
fi
exit $status
