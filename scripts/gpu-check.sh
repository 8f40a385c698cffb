#!/usr/bin/env bash
# First light on a GPU, inside a time budget: every GPU minute yields committed numbers.
#
#   scripts/gpu-check.sh [--budget-s N] [--triton-cache DIR] [--prebuilt-ext FILE] [--commit SHA] [--only STAGES]
#   scripts/gpu-check.sh --dry-run          # the same plan on the CPU at tiny sizes (CI, <= 60 s)
#
# Stages, in priority order, each with a time estimate on an H100 (a stage that would not fit
# in what is left of the budget, default 420 s, is skipped and listed as skipped):
#   a  env        nvidia-smi, `bertfast info`                                          ~10 s
#   a  build      the CUDA build for this GPU's arch only (torch.cuda.get_device_capability);
#                 reuses an installed build with the arch, one in the tree, or a carried one  ~50 s (8-20 s reused)
#   b  smoke      pytest -m gpu_smoke tests/test_gpu_smoke.py                           ~90 s
#   c  bench      python -m bench.firstlight: headline rows, host probe,
#                 autotune choices; result file rendered                               ~220 s
#   d  sanitizer  compute-sanitizer memcheck of python -m tools.gpu.launch_all  ~60 s
#   e  rest       the rest of the tests, then bench/run_gpu.sh --bench-quick, until the budget ends
# Output folder: $GPU_CHECK_OUT (default gpu-check/, or --out), at most 7 files, no subfolders:
#   summary.json, summary.txt, gpu-check.log, artifacts.tar.gz (logs, JUnit XML, results/<gpu>/ with the
#   rendered README and plots), result.json, bench-README.md, profile.txt. Each stage's files land there
#   as soon as it ends. Work files go to $GPU_CHECK_WORK (default: a temp folder).
# A carried Triton cache: --triton-cache DIR or TRITON_CACHE_DIR; a carried extension built for this
# torch: --prebuilt-ext bertfast/_C...so or BERTFAST_PREBUILT_EXT. Interpreter: $PYTHON (default:
# .venv/bin/python if present, else python3). --commit SHA: the commit recorded in the result file when the
# tree has no .git. Exit status 1 if a stage failed or timed out (stage e stopped by the budget is its
# normal end). A dry run runs every stage however busy the machine is (its time is reported against the
# budget); it fails on a stage's failure, or when stages a-d could never fit the GPU budget on their estimates.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
exec "$PYTHON" scripts/gpu_check.py --python "$PYTHON" "$@"
