# Each target does its own set-up (scripts/setup-env.sh: .venv, pinned deps, editable build).
.PHONY: setup bench test test-triton-compat test-gpu-versions lint

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
