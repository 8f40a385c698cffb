#!/usr/bin/env bash
# Print the folder that lays triton 3.6 (the GPU machine's) over .venv's pinned triton through
# PYTHONPATH, installing it first if needed: used by scripts/test-triton-compat.sh, prepare-triton-cache.sh and make gpu-resources-compat.
set -euo pipefail
cd "$(dirname "$0")/.."
overlay=.venv/overlay-triton-3.6
if [ ! -f "$overlay/.done" ]; then
  echo "[setup] installing triton 3.6 beside the pinned one ($overlay)" >&2
  .venv/bin/python -m pip install -q --no-deps --target "$overlay" triton==3.6.0 numpy==2.2.6 >&2
  touch "$overlay/.done"
fi
echo "$PWD/$overlay"
