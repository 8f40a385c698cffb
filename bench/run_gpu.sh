#!/usr/bin/env bash
# The whole benchmark on this machine's GPU: run bench/, store the result file, render the
# README and plots, compare with the previous stored run of the same GPU.
#
#   bench/run_gpu.sh [extra pytest arguments, e.g. -k attention or --bench-quick]
#
# Writes bench/results/<gpu-slug>/<date>-<commit>.json, README.md, throughput.png and
# speedup.png; pytest-benchmark's own JSON goes to .benchmarks/ (not committed).
# Sized for about 8 minutes on an H100 (BERTFAST_BUDGET_S, default 480; the budget per section
# is in bench/README.md, and each result file records the time each section took): a run
# over budget says so, and still succeeds.
# Exit status: pytest's if a benchmark failed, else the regression check's (1 = slower than
# the previous run by more than BERTFAST_THRESHOLD, default 0.05).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RESULTS="${BERTFAST_RESULTS:-bench/results}"
THRESHOLD="${BERTFAST_THRESHOLD:-0.05}"
BUDGET_S="${BERTFAST_BUDGET_S:-480}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/run_gpu.sh needs a CUDA GPU (without one: pytest bench --benchmark-disable runs the smoke suite)" >&2
    exit 2
fi
slug=$("$PYTHON" -c "from bertfast.benchmarking.device import default_device, device_name, slug
print(slug(device_name(default_device())))") || exit 2
folder="$RESULTS/$slug"
mkdir -p "$folder" .benchmarks
marker=$(mktemp)
started=$(date +%s)

"$PYTHON" -m pytest bench --benchmark-only --bench-save "$RESULTS" \
    --benchmark-json ".benchmarks/$slug-$(date -u +%Y%m%d-%H%M%S).json" -p no:cacheprovider -q -rs "$@"
pytest_status=$?

new=$(find "$folder" -maxdepth 1 -name '*.json' -newer "$marker" | sort | tail -n 1)
rm -f "$marker"
if [ -z "$new" ]; then
    echo "no result file was written (pytest exit status $pytest_status)" >&2
    exit 2
fi
took=$(( $(date +%s) - started ))
echo "benchmark took $took s (budget $BUDGET_S s); results: $new"
if [ "$took" -gt "$BUDGET_S" ]; then
    echo "warning: over the time budget; see the per-section times in the result's setup.sections" >&2
fi
"$PYTHON" -m bench.render "$folder" --file "$new" || exit 2
"$PYTHON" -m bench.compare "$new" --threshold "$THRESHOLD"
compare_status=$?
if [ "$pytest_status" -ne 0 ]; then
    exit "$pytest_status"
fi
exit "$compare_status"
