#!/usr/bin/env bash
# Compile the first-light kernels (bf16 and fp16, head_dim 64, every kept autotune config; padded,
# masked and varlen attention with and without dropout; LayerNorm at 1024 and bias-GELU at 4096)
# for sm_90 under triton 3.6, the GPU machine's, into a Triton cache OUTDIR to carry there, and
# packs it as OUTDIR.tar.gz (about 7 MB; 25 MB unpacked, the cubins carry line info).
# On the GPU machine, after unpacking, before the first kernel runs:
#   python -m tools.gpu.triton_cache relocate OUTDIR && python -m tools.gpu.triton_cache verify OUTDIR
#   export TRITON_CACHE_DIR=OUTDIR
# See tools/gpu/triton_cache.py for what the cache key is made of and why it should hit.
set -euo pipefail
out=${1:?usage: scripts/prepare-triton-cache.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
scripts/setup-env.sh >/dev/null
overlay=$(scripts/triton-overlay.sh)
env -u TRITON_INTERPRET PYTHONPATH="$overlay" nice .venv/bin/python -m tools.gpu.triton_cache prepare "$out"
tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
echo "packed $(du -h "$out.tar.gz" | cut -f1) into $out.tar.gz"
