#!/usr/bin/env bash
# Runs the whole test suite under AddressSanitizer, then under ThreadSanitizer, each in its own
# scratch path (.build-asan, .build-tsan) so neither disturbs the normal build. One at a time:
# each is a heavy job. Extra arguments go to `swift test` (e.g. --filter MergeTests).
#
#   scripts/sanitizers.sh            both
#   SANITIZERS=thread scripts/sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Leaks are reported by LeakSanitizer at exit; the Swift runtime's caches are not leaks, and the
# test runner's own allocations are out of scope, so leak checking stays off for the suite.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=0:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"

status=0
for sanitizer in ${SANITIZERS:-address thread}; do
    case "$sanitizer" in
    address) scratch=.build-asan ;;
    thread) scratch=.build-tsan ;;
    *) echo "unknown sanitizer $sanitizer (address or thread)" >&2; exit 2 ;;
    esac
    echo "== swift test --sanitize=$sanitizer --scratch-path $scratch" >&2
    if swift test --sanitize="$sanitizer" --scratch-path "$scratch" "$@"; then
        echo "== $sanitizer: passed" >&2
    else
        echo "!! $sanitizer: FAILED" >&2
        status=1
    fi
done
exit $status
