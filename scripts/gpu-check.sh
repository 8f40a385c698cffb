#!/usr/bin/env bash
# Everything a GPU machine checks, in one call (a GPU is rare: use it fully).
#
#   scripts/gpu-check.sh [extra bench/run_gpu.sh arguments]
#
# 1. builds bertfast with its CUDA kernels (BERTFAST_CUDA=1: fails if they cannot be built);
# 2. `bertfast info`;
# 3. the whole test suite on the GPU (compiled Triton kernels, CUDA kernels, bf16, CUDA graphs);
# 4. the extension's tests under compute-sanitizer, memcheck and racecheck;
# 5. the benchmark suite (bench/run_gpu.sh: result file, README and plots under
#    bench/results/<gpu>/, compared with the previous run).
# Logs go to $GPU_CHECK_OUT (default gpu-check/), with a summary.txt of each step's exit status.
# Steps after a failure still run; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-gpu-check}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/gpu-check.sh needs a CUDA GPU" >&2
    exit 2
fi

failed=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the exit status
    local name=$1
    shift
    local started=$(date +%s)
    echo "[gpu-check] $name"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - started )) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

step build env BERTFAST_CUDA=1 "$PYTHON" -m pip install -v -e . --no-deps --no-build-isolation
step info "$PYTHON" -m bertfast.cli info
step tests "$PYTHON" -m pytest tests -q -rs --junitxml="$OUT/tests.xml"
if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "$PYTHON" -m pytest tests/test_ext_ops.py -q -k cuda
    done
else
    echo "sanitizer: compute-sanitizer not found" | tee -a "$OUT/summary.txt"
    failed=1
fi
step bench bench/run_gpu.sh "$@"
cat "$OUT/summary.txt"
exit "$failed"
