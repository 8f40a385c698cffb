# Each target does its own set-up (scripts/setup-env.sh: .venv, pinned deps, editable build).
.PHONY: setup bench test lint

setup:
	@scripts/setup-env.sh

bench: setup
	.venv/bin/bertfast bench $(ARGS)

test: setup
	.venv/bin/python -m pytest tests bench --benchmark-disable -q $(ARGS)

lint: setup
	.venv/bin/ruff check .
