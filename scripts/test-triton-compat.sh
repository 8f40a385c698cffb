#!/usr/bin/env bash
# The Triton kernels' tests under the oldest supported triton (3.6), in its interpreter.
# requirements-dev.txt pins the newest (3.9); both must work.  triton 3.6 is laid over .venv
# through PYTHONPATH, with numpy 2.2: numpy 2.4 refuses the 1-element-array-to-int
# conversion that triton 3.6's interpreter does on every scalar kernel argument.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
overlay=$(scripts/triton-overlay.sh)
export PYTHONPATH="$overlay"
.venv/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__; print('triton', triton.__version__)"
.venv/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_attention.py tests/test_layer_norm.py tests/test_bias_gelu.py tests/test_dropout.py \
  tests/test_kernel_launch.py tests/test_mean_pool.py "$@"
