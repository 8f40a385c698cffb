# Each target does its own set-up (scripts/setup-env.sh: .venv, pinned deps, editable build).
.PHONY: setup bench test test-triton-compat test-gpu-versions lint gpu-compile-check gpu-resources gpu-resources-compat triton-cache

setup:
	@scripts/setup-env.sh

bench: setup
	.venv/bin/bertfast bench $(ARGS)

test: setup
	.venv/bin/python -m pytest tests bench --benchmark-disable -q $(ARGS)

# The Triton kernels under the oldest supported triton (3.6) too.
test-triton-compat:
	@scripts/test-triton-compat.sh $(ARGS)

# The whole suite under the GPU machine's versions (torch 2.11, triton 3.6, transformers 5.17),
# on the CPU, in .venv-gpu-versions.  Not in CI (too long); see the script.
test-gpu-versions:
	@scripts/test-gpu-versions.sh $(ARGS)

lint: setup
	.venv/bin/ruff check .

# Static GPU compile check (no GPU needed; see scripts/gpu-compile-check.py).  What CI runs:
# sm_90 under the pinned triton, BERT's own path at every config the autotuner can pick.
gpu-compile-check: setup
	env -u TRITON_INTERPRET nice .venv/bin/python scripts/gpu-compile-check.py --arch 90 --subset ci $(ARGS)

# The full matrix (every kernel, dtype, head size, variant and config; sm_80 and sm_90) under the
# pinned triton, written to kernels/RESOURCES.md.  Run it after any change to a kernel, with
# gpu-resources-compat, before submitting.  About an hour of CPU from cold; cached per binary.
gpu-resources: setup
	env -u TRITON_INTERPRET nice .venv/bin/python scripts/gpu-compile-check.py --arch 80 --arch 90 \
		--write-table kernels/RESOURCES.md $(ARGS)

# The same matrix under triton 3.6 (the oldest supported, the GPU machine's); checked, not written.
gpu-resources-compat: setup
	env -u TRITON_INTERPRET PYTHONPATH="$$(scripts/triton-overlay.sh)" nice .venv/bin/python \
		scripts/gpu-compile-check.py --arch 80 --arch 90 $(ARGS)

# A Triton cache of the first-light kernels for sm_90 under triton 3.6, to carry to the GPU machine.
triton-cache: setup
	scripts/prepare-triton-cache.sh $(or $(OUT),build/triton-cache-sm90)
