# Each target does its own set-up (scripts/setup-env.sh: .venv, pinned deps, editable build).
.PHONY: setup bench test test-triton-compat lint

setup:
	@scripts/setup-env.sh

bench: setup
	.venv/bin/bertfast bench $(ARGS)

test: setup
	.venv/bin/python -m pytest tests bench --benchmark-disable -q $(ARGS)

# The Triton kernels under the oldest supported triton (3.6) too.
test-triton-compat:
	@scripts/test-triton-compat.sh $(ARGS)

lint: setup
	.venv/bin/ruff check .
