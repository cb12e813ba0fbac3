# Sourced by the benchmark scripts. dd_seconds DIR: copies DIR/model/*.safetensors with dd into
# DIR/copy, flushes with sync, and prints the seconds that took (the cost of moving the same
# bytes a merge moves, the lower bound of an I/O-bound merge); the copy is removed.
dd_seconds() {
    local dir=$1 start
    rm -rf "$dir/copy"
    mkdir -p "$dir/copy"
    sync
    start=$(date +%s.%N)
    for f in "$dir"/model/*.safetensors; do dd if="$f" of="$dir/copy/$(basename "$f")" bs=16M status=none; done
    sync
    echo "$(date +%s.%N) - $start" | bc
    rm -rf "$dir/copy"
}
