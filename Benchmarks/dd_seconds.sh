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

# merge_row DIR LABEL ADAPTER: dd + sync of DIR/model (dd_seconds), then `ADAPTER merge` of
# DIR/model and DIR/adapter (fsync on) under /usr/bin/time; prints LABEL, what requantization kept
# (the merge's own median and worst), the model's size, both times and the merge's peak RSS.
merge_row() {
    local dir=$1 label=$2 adapter=$3 dd_s kept wall rss
    rm -rf "$dir/out"
    dd_s=$(dd_seconds "$dir")
    /usr/bin/time -f '%e %M' -o "$dir/time.txt" "$adapter" merge "$dir/model" "$dir/adapter" "$dir/out" 2> "$dir/log.txt"
    kept=$(grep -o 'median [0-9.]* %, worst [0-9.]* %' "$dir/log.txt" || true)
    read -r wall rss < "$dir/time.txt"
    printf '%s  kept: %-28s  %5.2f GB  merge %5.2f s  dd + sync %5.2f s  peak RSS %4.0f MB\n' \
        "$label" "$kept" "$(du -sb "$dir/model" | awk '{print $1 / 1e9}')" "$wall" "$dd_s" "$(echo "$rss / 1024" | bc -l)"
    rm -rf "$dir/out"
}
