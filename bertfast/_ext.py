"""Lazy access to the compiled extension :mod:`bertfast._C`.

The package works without it: importing bertfast never imports the extension, and
:func:`unavailable_reason` says why it cannot be used (not built, built against another
torch, ...), so the "ext" backend can report it instead of failing at import time.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from .errors import BackendUnavailable

REBUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` in the source tree (BERTFAST_CUDA=1 for the CUDA "
    "kernels; see setup.py)"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("bertfast._C")
    except Exception as exc:  # ImportError, or an undefined symbol after a torch upgrade
        return None, f"bertfast._C is not built or does not load ({type(exc).__name__}: {exc}); {REBUILD_HINT}"
    built_with = module.built_with_torch()
    if built_with != torch.__version__:
        return None, f"bertfast._C was built against torch {built_with} but torch {torch.__version__} is running; " + (
            REBUILD_HINT
        )
    return module, None


def extension() -> ModuleType | None:
    """The loaded :mod:`bertfast._C`, or ``None`` when it cannot be used."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """``None`` when :mod:`bertfast._C` is usable, else why not."""
    return _load()[1]


def require() -> ModuleType:
    """The loaded :mod:`bertfast._C`; raises :class:`BackendUnavailable` with the reason otherwise."""
    module, reason = _load()
    if module is None:
        raise BackendUnavailable(reason)
    return module


def build_info() -> dict[str, object]:
    """What the extension contains (for environment reports): built, CUDA kernels, archs, versions."""
    module, reason = _load()
    if module is None:
        return {"built": False, "reason": reason}
    return {
        "built": True,
        "cuda_kernels": module.has_cuda(),
        "cuda_archs": module.cuda_archs(),
        "cuda_runtime_version": module.cuda_runtime_version(),
        "built_with_torch": module.built_with_torch(),
    }
