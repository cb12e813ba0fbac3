#!/bin/bash
# Submits a split merge to Slurm: an array of N parts (slurm-array.sbatch), then the finish as a
# job that depends on every part succeeding (afterok). Prints both job ids.
#
#   scale/slurm-submit.sh N BASE ADAPTER OUT [merge options]
#
# Extra sbatch options go in SBATCH_OPTIONS (e.g. "--partition=cpu --account=ml"), to both jobs;
# FINISH_CPUS sets the finish's CPUs (default 2: it hashes every staged file, on all its CPUs).
# SBATCH names the sbatch command (default: sbatch).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 N BASE ADAPTER OUT [merge options]" >&2
    exit 2
fi
N=$1 BASE=$2 ADAPTER=$3 OUT=$4
shift 4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SBATCH=${SBATCH:-sbatch}
# shellcheck disable=SC2086
parts=$($SBATCH --parsable ${SBATCH_OPTIONS:-} --array="1-$N" "$HERE/slurm-array.sbatch" "$BASE" "$ADAPTER" "$OUT" "$@")
parts=${parts%%;*}
finish_cmd=$(printf '%q ' "${ADAPTER_BIN:-adapter}" merge "$BASE" "$ADAPTER" "$OUT" --finish "$@")
# shellcheck disable=SC2086
finish=$($SBATCH --parsable ${SBATCH_OPTIONS:-} --job-name=adapter-merge-finish --cpus-per-task="${FINISH_CPUS:-2}" \
    --dependency="afterok:$parts" --output="adapter-merge-finish-%j.log" --wrap "$finish_cmd")
echo "parts: job $parts (array 1-$N); finish: job ${finish%%;*} (after every part succeeds)"
