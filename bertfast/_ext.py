"""Lazy access to the compiled extension :mod:`bertfast._C`.

Each torch has its own build, the module ``bertfast._C_torch<version>``
(:func:`bertfast._ext_name.extension_module_name`), so environments sharing one checkout do not
overwrite each other's; this loads the running torch's.  The package works without it: importing
bertfast never imports the extension, and :func:`unavailable_reason` says why it cannot be used
(not built for this torch, does not load, ...), so the "ext" backend can report it instead of
failing at import time.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from ._ext_name import extension_module_name
from .errors import BackendUnavailable

REBUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` in the source tree (BERTFAST_CUDA=1 for the CUDA "
    "kernels; see setup.py)"
)


class Facts(NamedTuple):
    """What the loaded extension was built with, as plain values (read once, at load)."""

    has_cuda: bool
    cuda_archs: str
    cuda_max_row_elements: int


# A plain global rather than functools.cache: torch.compile reads a global, but traces into (and
# breaks on the import inside) a cached function.
_LOADED: tuple[ModuleType | None, str | None, Facts | None] | None = None


def module_name() -> str:
    """The full name of the extension built for the running torch, e.g. ``bertfast._C_torch2_13_0_cpu``."""
    return f"bertfast.{extension_module_name(torch.__version__)}"


def _other_builds() -> list[str]:
    """The extension modules beside this file that were built for other torches."""
    this = extension_module_name(torch.__version__)
    built = {
        path.name.split(".")[0]
        for path in Path(__file__).parent.glob("_C_torch*")
        if path.name.endswith(tuple(EXTENSION_SUFFIXES))
    }
    return [f"bertfast.{name}" for name in sorted(built - {this})]


def _import() -> tuple[ModuleType | None, str | None, Facts | None]:
    name = module_name()
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # not built for this torch, or an undefined symbol after a torch upgrade
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            others = _other_builds()
            found = f"the builds here are for other torches: {', '.join(others)}" if others else "no build here"
            reason = f"bertfast._C is not built for torch {torch.__version__} (no module {name}; {found}); "
            return None, reason + REBUILD_HINT, None
        return None, f"{name} does not load ({type(exc).__name__}: {exc}); {REBUILD_HINT}", None
    built_with = module.built_with_torch()
    if built_with != torch.__version__:
        reason = f"bertfast._C was built against torch {built_with} but torch {torch.__version__} is running; "
        return None, reason + REBUILD_HINT, None
    return module, None, Facts(module.has_cuda(), module.cuda_archs(), module.cuda_max_row_elements())


def _load() -> tuple[ModuleType | None, str | None, Facts | None]:
    global _LOADED
    if _LOADED is None:
        _LOADED = _import()
    return _LOADED


def facts() -> Facts | None:
    """The loaded extension's build facts, or ``None`` when it cannot be used."""
    return _load()[2]


def extension() -> ModuleType | None:
    """The loaded :mod:`bertfast._C`, or ``None`` when it cannot be used."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """``None`` when :mod:`bertfast._C` is usable, else why not."""
    return _load()[1]


def require() -> ModuleType:
    """The loaded :mod:`bertfast._C`; raises :class:`BackendUnavailable` with the reason otherwise."""
    module, reason, _ = _load()
    if module is None:
        raise BackendUnavailable(reason)
    return module


def build_info(probe_errors: bool = False) -> dict[str, object]:
    """What the extension contains (for environment reports): built, CUDA kernels, archs, versions;
    ``probe_errors``: also whether its errors reach Python (:func:`errors_reach_python`, a child process)."""
    module, reason, _ = _load()
    if module is None:
        return {"built": False, "reason": reason}
    info: dict[str, object] = {
        "built": True,
        "cuda_kernels": module.has_cuda(),
        "cuda_archs": module.cuda_archs(),
        "cuda_runtime_version": module.cuda_runtime_version(),
        "built_with_torch": module.built_with_torch(),
    }
    if probe_errors:
        info["errors_reach_python"] = errors_reach_python() or "yes"
    return info


# Bad input to one op: the extension must raise RuntimeError (a C++ exception that pybind11 turns into one).
_ERROR_PROBE = """
import torch
from bertfast._ext import require
C = require()
ids = torch.tensor([[1, 2, 10]])
try:
    C.embedding_layer_norm_forward(ids, ids * 0, ids * 0, torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8),
                                   torch.ones(8), torch.zeros(8), 1e-12, 0)
except RuntimeError as exc:
    raise SystemExit(0 if "outside the table's rows" in str(exc) else 3)
raise SystemExit(4)
"""


# The same through torch's own C++ (c10::Error from libtorch): tells a bertfast build from an environment where
# no C++ error survives (an unwinder that crashes taking c10's backtrace, as in pytorch/pytorch#117645).
_TORCH_ERROR_PROBE = """
import torch
try:
    torch.ones(2) + torch.ones(3)
except RuntimeError:
    raise SystemExit(0)
raise SystemExit(4)
"""


def _run_probe(code: str, timeout_s: float) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, errors="replace"
        )
    except subprocess.TimeoutExpired:
        return None


def errors_reach_python(timeout_s: float = 120.0) -> str | None:
    """``None`` when an error raised inside :mod:`bertfast._C` reaches Python as ``RuntimeError``; else what
    happens instead.  Run in a child process, because where the build's C++ exceptions cannot cross into
    Python (a compiler or runtime that does not match torch's) the raise kills the process: seen once on a
    GPU machine, as a segmentation fault.  Then a second child raises an error inside torch's own C++, to
    say whether the build or the environment is at fault."""
    done = _run_probe(_ERROR_PROBE, timeout_s)
    if done is None:
        return f"the error probe of bertfast._C did not end within {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode > 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        return f"the error probe of bertfast._C ended with exit {done.returncode}: {tail[0][:300]}"
    message = (
        f"an error raised inside bertfast._C kills the process (signal {-done.returncode}) instead of reaching "
        "Python as RuntimeError"
    )
    torch_side = _run_probe(_TORCH_ERROR_PROBE, timeout_s)
    if torch_side is not None and torch_side.returncode == 0:
        return (
            f"{message}, while torch's own do: rebuild the extension with the compiler torch was built with (CXX=...)"
        )
    if torch_side is None or torch_side.returncode > 0:
        return f"{message}; torch's own C++ error probe did not finish cleanly either"
    return (
        f"{message}, and so does one raised inside torch's own C++ (signal {-torch_side.returncode}): the "
        "environment loses C++ errors, not this build"
    )
