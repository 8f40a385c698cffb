#!/usr/bin/env bash
# Print one digest of everything the editable build of bertfast depends on: setup.py and what it reads,
# every file under csrc/ (names and contents), the pinned requirements, .venv's torch version, the build
# knobs in the environment, and what the build left (the editable install, the extension modules).
# scripts/setup-env.sh skips `pip install -e .` while this matches what it printed after the last build.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  sha256sum setup.py pyproject.toml bertfast/_ext_name.py requirements-dev.txt
  find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  # torch's version (with its CUDA tag) from its metadata folder: no torch import, this runs on every make call
  ls -d .venv/lib/python*/site-packages/torch-*.dist-info 2>/dev/null || echo "no torch"
  ls .venv/lib/python*/site-packages/ 2>/dev/null | grep -i "^__editable__.*bertfast" || echo "not installed"
  ls bertfast/ | grep "^_C_torch" || echo "no extension"
  env | grep -E '^(BERTFAST_BUILD_EXT|BERTFAST_CUDA|TORCH_CUDA_ARCH_LIST|CUDA_HOME|CUDA_PATH|CC|CXX)=' | LC_ALL=C sort || true
} | sha256sum | cut -d' ' -f1
