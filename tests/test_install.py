"""Installing and running from the source tree: the top-level ``kernels`` name belongs to Hugging Face."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def _hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(
    not _hugging_face_kernels_installed(), reason="Hugging Face's kernels package (transformers >= 5.25) is absent"
)


@needs_hf_kernels
def test_top_level_kernels_from_the_repo_root_is_hugging_faces():
    """transformers >= 5.25 imports ``kernels``; from the repository root it must not get our folder."""
    script = (
        "import kernels, bertfast.kernels.attention as ours\n"
        "from transformers.integrations import hub_kernels\n"
        "print(kernels.__file__); print(ours.__file__)\n"
    )
    done = _run_in_root("-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = map(Path, done.stdout.split())
    assert theirs.parent != ROOT / "kernels" and theirs.name == "__init__.py", theirs
    assert ours == ROOT / "kernels" / "attention.py"


@needs_hf_kernels
def test_egg_info_from_the_repo_root(tmp_path):
    """``pip install [-e] .`` runs egg_info with the repository root first on sys.path, and Hugging Face's
    kernels registers an egg_info writer there (``kernels._internals.locking``)."""
    done = _run_in_root("setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), BERTFAST_BUILD_EXT="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "bertfast.egg-info" / "PKG-INFO").exists()


def test_top_level_kernels_without_hugging_faces_says_so():
    """``-S``: no site-packages, so only our folder answers to ``kernels``; it refuses the name clearly."""
    done = _run_in_root("-S", "-c", "import kernels")
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels': " in done.stderr
    assert "import them as bertfast.kernels" in done.stderr
