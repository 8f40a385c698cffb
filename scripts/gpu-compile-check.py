#!/usr/bin/env python
"""The static GPU compile check (tools/gpu/compile_check.py), run from anywhere."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.gpu.compile_check import main  # noqa: E402

if __name__ == "__main__":  # the compile workers are spawned processes that import this file as their main
    sys.exit(main())
