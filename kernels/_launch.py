"""Launcher helpers shared by the kernel files: interpreter detection, the device guard, 2-D row views."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``(rows, N)`` view with unit column stride.

    A copy is made only when the leading dimensions cannot be flattened into one row
    stride or the last dimension is not contiguous.
    """
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    return rows
