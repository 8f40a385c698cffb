#!/usr/bin/env bash
# The shortest useful first GPU run: build, info, the extension's CUDA tests, and the quick
# model benchmarks, each step bounded so the whole run ends inside BUDGET_S seconds and every
# finished step's output is already under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
BUDGET_S="${BUDGET_S:-500}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16
deadline=$(( $(date +%s) + BUDGET_S ))
step() {  # step NAME CAP LOG COMMAND...: run with at most CAP seconds (and never past the deadline)
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 20 ]; then echo "$name: skipped (no time left)" >> "$OUT/summary.txt"; return; fi
    [ "$cap" -gt "$left" ] && cap=$left
    local started=$(date +%s)
    echo "===== $name (cap ${cap}s)" >> "$OUT/$log"
    timeout -k 5 "$cap" "$@" >> "$OUT/$log" 2>&1
    echo "$name: exit $? in $(( $(date +%s) - started )) s" >> "$OUT/summary.txt"
}
nvidia-smi > "$OUT/info.log" 2>&1
step build 240 build.log env BERTFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    python3 -m pip install -v -e . --no-deps --no-build-isolation
step info 60 info.log python3 -m bertfast.cli info
step ext-cuda-tests 90 ext.log python3 -m pytest tests/test_ext_ops.py -q -rs -k cuda
step bench-32x128 170 bench.log python3 -m bertfast.cli bench --quick --plain --batch 32 --seq 128 --save "$OUT/r128"
step bench-8x512 140 bench.log python3 -m bertfast.cli bench --quick --plain --batch 8 --seq 512 --save "$OUT/r512"
step bench-train-32x128 200 bench.log python3 -m bertfast.cli bench --quick --plain --train --save "$OUT/rtrain"
cat "$OUT/summary.txt"
