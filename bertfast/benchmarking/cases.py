"""A benchmark case (one implementation, one op or model, one size) and how it is run.

Building a case may raise :class:`Skip` with the reason (a backend that is not
available here, an op a backend does not support, a missing package).  Running it
checks its error first (which also compiles and autotunes), then times it, and returns
a result row (see :mod:`bertfast.benchmarking.schema`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BackendUnavailable
from .schema import make_row, skipped_row
from .timing import Timer, TimingPlan, measure, measure_with_pytest_benchmark


class Skip(Exception):
    """This case cannot run here; the message says why."""


@dataclasses.dataclass
class Case:
    name: str  # the row name, e.g. "bert-large-fwd", "attention-bwd"
    impl: str  # e.g. "bertfast-triton", "hf-sdpa", "torch-compile"
    dtype: str  # "bf16" / "fp16" / "fp32"
    batch: int
    seq: int
    device: torch.device
    fn: Callable[..., Any]  # the timed call
    input_sets: list[tuple]  # rotated round by round
    prepare: Callable[..., tuple] | None = None  # untimed, turns an input set into fn's arguments
    flops: float | None = None
    nbytes: float | None = None
    shape: str | None = None
    max_error: Callable[[], float | None] | None = None  # measured once, before timing
    resident_bytes: Callable[[], int] | int = 0  # memory this implementation holds between calls
    note: str | None = None
    tokens: float | None = None  # real (non-padding) tokens per call, averaged over the input sets
    lengths: str | None = None  # the length distribution of a padding-free row


def skip_row_for(name, impl, dtype, batch, seq, reason, shape=None, lengths=None) -> dict:
    return skipped_row(
        name=name, impl=impl, dtype=dtype, batch=batch, seq=seq, reason=reason, shape=shape, lengths=lengths
    )


def unavailable(exc: BaseException) -> bool:
    """Errors that mean "this implementation cannot run here", not "it is broken"."""
    return isinstance(exc, (BackendUnavailable, ImportError))


def run_case(case: Case, *, plan: TimingPlan, peaks: dict[str, float] | None = None, benchmark=None) -> dict:
    """Check, then time ``case``; returns its row.  Raises :class:`Skip` if it cannot run here."""
    try:
        error = case.max_error() if case.max_error is not None else None
    except Exception as exc:
        if unavailable(exc):
            raise Skip(f"{type(exc).__name__}: {exc}") from exc
        raise
    cuda = case.device.type == "cuda"
    timer = Timer(case.device)
    if cuda:
        torch.cuda.synchronize(case.device)
        base = torch.cuda.memory_allocated(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
    if benchmark is not None:
        timing = measure_with_pytest_benchmark(
            benchmark, case.fn, case.input_sets, device=case.device, plan=plan, prepare=case.prepare, timer=timer
        )
    else:
        timing = measure(case.fn, case.input_sets, device=case.device, plan=plan, prepare=case.prepare, timer=timer)
    peak_mem_mb = None
    if cuda:
        resident = case.resident_bytes() if callable(case.resident_bytes) else case.resident_bytes
        peak_mem_mb = (torch.cuda.max_memory_allocated(case.device) - base + resident) / 2**20
    return make_row(
        name=case.name,
        impl=case.impl,
        dtype=case.dtype,
        batch=case.batch,
        seq=case.seq,
        timing=timing,
        flops=case.flops,
        nbytes=case.nbytes,
        peaks=peaks,
        peak_mem_mb=peak_mem_mb,
        max_error=error,
        shape=case.shape,
        note=case.note,
        tokens=case.tokens,
        lengths=case.lengths,
    )


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def compile_backend(device: torch.device, smoke: bool = False) -> str:
    """Inductor for real runs on a GPU; Dynamo's capture alone (``eager``) in smoke runs and on the CPU."""
    return "inductor" if device.type == "cuda" and not smoke else "eager"


def compile_note(backend: str) -> str | None:
    return None if backend == "inductor" else f"torch.compile backend={backend} (smoke run)"
