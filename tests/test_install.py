"""Installing and running from the source tree: the top-level ``kernels`` name belongs to Hugging Face."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertfast import _ext
from bertfast._ext_name import extension_module_name

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


def test_top_level_kernels_without_hugging_faces_stays_an_empty_package():
    """``-S``: no site-packages, so only our folder answers to ``kernels`` (transformers 5.17 without Hugging
    Face's package).  transformers' availability check then imports it, finding no metadata: it must import,
    and without ``__version__``, so that the check reads it as not installed instead of failing."""
    done = _run_in_root("-S", "-c", "import kernels; print(kernels.__file__, hasattr(kernels, '__version__'))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), "False"]


def test_each_torch_gets_its_own_extension_module():
    """Two environments on one checkout (editable builds write into bertfast/) must not overwrite each other."""
    names = {version: extension_module_name(version) for version in ("2.13.0+cpu", "2.11.0+cu130", "2.11.0")}
    assert len(set(names.values())) == len(names), names
    assert all(name.isidentifier() and name.startswith("_C_torch") for name in names.values())


def test_extension_is_loaded_from_the_running_torchs_build():
    module = _ext.extension()
    if module is None:
        pytest.skip(f"bertfast._C is not built: {_ext.unavailable_reason()}")
    assert module.__name__ == _ext.module_name() == f"bertfast.{extension_module_name(torch.__version__)}"
    assert Path(module.__file__).name.startswith(_ext.module_name().removeprefix("bertfast.") + ".")


def test_a_missing_build_for_this_torch_is_reported():
    """Another torch in the same checkout: ``bertfast info`` and backend ``ext`` say there is no build for it."""
    script = (
        "import json, torch\n"
        "torch.__version__ = '2.99.0+cu999'\n"
        "from bertfast.cli import main\n"
        "main(['info', '--json'])\n"
    )
    done = _run_in_root("-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    reason = info["extension"]["reason"]
    assert not info["extension"]["built"] and info["backends"]["ext"] == f"unavailable: {reason}"
    assert reason.startswith(
        "bertfast._C is not built for torch 2.99.0+cu999 (no module bertfast._C_torch2_99_0_cu999; "
    ), reason
    assert "pip install -e . --no-build-isolation" in reason
    if _ext.extension() is not None:  # this torch's build is there, and named as one for another torch
        assert f"the builds here are for other torches: {_ext.module_name()}" in reason


def test_setup_without_torch_says_to_turn_build_isolation_off():
    """pip's isolated build cannot see the installed torch: the error says what to do, and why."""
    script = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py')"
    )
    done = _run_in_root("-c", script)
    assert done.returncode == 1
    assert "build isolation" in done.stderr and "pip install --no-build-isolation ." in done.stderr, done.stderr


def test_make_setup_rebuilds_exactly_when_a_build_input_changes(tmp_path):
    """scripts/build-inputs.sh, the stamp behind `make setup`'s skipped reinstall: a C++ source, setup.py or
    torch's version changes it; a Python edit (served by the editable install as it is) does not."""
    for name in ("scripts/build-inputs.sh", "setup.py", "pyproject.toml", "bertfast/_ext_name.py",
                 "requirements-dev.txt", "bertfast/layers.py", "csrc/bindings.cpp"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    site = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "torch-2.13.0+cpu.dist-info").mkdir(parents=True)

    def digest() -> str:
        done = subprocess.run([tmp_path / "scripts" / "build-inputs.sh"], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    stamp = digest()
    assert len(stamp) == 64 and digest() == stamp
    (tmp_path / "bertfast" / "layers.py").write_text("# edited\n")
    assert digest() == stamp
    (tmp_path / "csrc" / "cuda").mkdir()
    (tmp_path / "csrc" / "cuda" / "new_op.cu").write_text("// a new kernel\n")
    assert digest() != stamp
    stamp = digest()
    with open(tmp_path / "csrc" / "bindings.cpp", "a") as source:
        source.write("// edited\n")
    assert digest() != stamp
    stamp = digest()
    (site / "torch-2.13.0+cpu.dist-info").rename(site / "torch-2.11.0+cu130.dist-info")
    assert digest() != stamp
    stamp = digest()
    (tmp_path / "bertfast" / "_C_torch2_11_0_cu130.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert digest() != stamp  # what a build leaves (or a deleted build) counts too
