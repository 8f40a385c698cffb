"""What bertfast can use on this machine: versions, the GPU, and each backend's availability."""

from __future__ import annotations

import importlib
import platform

import torch

from . import __version__
from .ops import BACKENDS, backend_availability, backend_capabilities


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return "not installed"


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "no GPU (CUDA is not available to torch)"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"


def report() -> dict[str, object]:
    """A dict suitable for bug reports: ``bertfast info`` prints it."""
    backends = {}
    for name in BACKENDS:
        reason = backend_availability(name)
        backends[name] = "available" if reason is None else f"unavailable: {reason}"
    return {
        "bertfast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "GPU": gpu_description(),
        "backends": backends,
        "capabilities": {name: _capabilities(name) for name in BACKENDS},
        "auto picks": _auto_choices(),
        "extension": _extension_info(),
    }


def _capabilities(name: str) -> str:
    """``"ops: ...; dropout in: ..."``: what the backend declares (whether or not it runs here)."""
    declared = backend_capabilities(name)
    return f"ops: {', '.join(declared['ops']) or '-'}; dropout in: {', '.join(declared['dropout']) or '-'}"


def _module(path: str):
    try:
        return importlib.import_module(path)
    except Exception:  # an unavailable backend: it picked nothing
        return None


def auto_backends(device: str, dtype: torch.dtype) -> dict[str, list[str]]:
    """``{backend: [ops]}``: what ``backend="auto"`` runs on ``device`` for a BERT-large layer in ``dtype``."""
    from .layers import Plan, plan

    ops = plan("auto", torch.empty(0, device=device), dtype, 1024, 4096, heads=16, head_dim=64)
    by_backend: dict[str, list[str]] = {}
    for op in Plan._fields:
        function = getattr(ops, op)
        if function is not None:
            name = next(n for n, path in BACKENDS.items() if getattr(_module(path), op, None) is function)
            by_backend.setdefault(name, []).append(op)
    return by_backend


def _auto_choices() -> dict[str, str]:
    """Per device here, in its usual dtype: which backend ``auto`` runs for which op."""
    devices = {"cpu": torch.float32, **({"cuda": torch.bfloat16} if torch.cuda.is_available() else {})}
    return {
        f"{device} ({str(dtype).removeprefix('torch.')})": "; ".join(
            f"{name}: {', '.join(found)}" for name, found in auto_backends(device, dtype).items()
        )
        for device, dtype in devices.items()
    }


def _extension_info() -> dict[str, object]:
    from ._ext import build_info

    return build_info(probe_errors=True)


def format_report(info: dict[str, object]) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            width = max((len(name) for name in value), default=0)
            lines.extend(f"  {name:<{width}}  {status}" for name, status in value.items())
        else:
            lines.append(f"{key:<13} {value}")
    return "\n".join(lines)
