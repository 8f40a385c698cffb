"""A benchmark case (one implementation, one op or model, one size) and how it is run.

Building a case may raise :class:`Skip` with the reason (a backend that is not
available here, an op a backend does not support, a missing package).  Running it
checks its error first (which also compiles and autotunes), then times it, and returns
a result row (see :mod:`bertfast.benchmarking.schema`).
"""

from __future__ import annotations

import dataclasses
import statistics
import types
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BackendUnavailable
from .schema import make_row, skipped_row
from .timing import (
    KernelTimer,
    Rotation,
    Timer,
    TimingPlan,
    busy_ms_per_marker,
    measure,
    measure_with_pytest_benchmark,
    warm_up,
)


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
    # Compiled baselines: raises NotCompiled if any call of the case ran eagerly (checked after timing).
    check_compiled: Callable[[], None] | None = None
    # A kernel case is timed on a GPU by its kernels' device time (timing.KernelTimer), not CUDA events.
    kernel: bool = False


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
    timer = KernelTimer(case.device) if case.kernel and cuda else Timer(case.device)
    base = _memory_base(case)
    if benchmark is not None:
        timing = measure_with_pytest_benchmark(
            benchmark, case.fn, case.input_sets, device=case.device, plan=plan, prepare=case.prepare, timer=timer
        )
    else:
        timing = measure(case.fn, case.input_sets, device=case.device, plan=plan, prepare=case.prepare, timer=timer)
    if case.check_compiled is not None:
        case.check_compiled()  # a compiled baseline that fell back to eager fails its row
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
        peak_mem_mb=_peak_memory_mb(case, base),
        max_error=error,
        shape=case.shape,
        note=case.note,
        tokens=case.tokens,
        lengths=case.lengths,
    )


def _memory_base(case: Case) -> int | None:
    """Start counting ``case``'s peak memory (a GPU only): the memory allocated now, peak statistics reset."""
    if case.device.type != "cuda":
        return None
    torch.cuda.synchronize(case.device)
    torch.cuda.reset_peak_memory_stats(case.device)
    return torch.cuda.memory_allocated(case.device)


def _peak_memory_mb(case: Case, base: int | None) -> float | None:
    """``case``'s resident memory plus the most its calls since :func:`_memory_base` allocated beyond ``base``."""
    if base is None:
        return None
    resident = case.resident_bytes() if callable(case.resident_bytes) else case.resident_bytes
    return (torch.cuda.max_memory_allocated(case.device) - base + resident) / 2**20


# Model rows are readable as ratios when their p20-p80 spread is under this share of the median.
READABLE_SPREAD = 0.10
BACK_TO_BACK = 4  # calls per throughput round


def run_interleaved(cases: list[Case], *, plan: TimingPlan, peaks: dict[str, float] | None = None) -> list:
    """Model cases timed round-robin in one section, so that clock or temperature drift falls on every
    implementation alike; each round takes every case's latency call (one synchronized call) and its
    throughput call (``BACK_TO_BACK`` calls back to back, one synchronization).  On a GPU rounds are added
    (up to four times the plan's) until every latency spread is under ``READABLE_SPREAD``; a row still wider
    says it is not readable.  Returns, per case, its row or the :class:`Skip` it raised."""
    results: list = [None] * len(cases)
    live = []
    for i, case in enumerate(cases):
        try:
            error = case.max_error() if case.max_error is not None else None
        except Exception as exc:
            if not unavailable(exc):
                raise
            results[i] = Skip(f"{type(exc).__name__}: {exc}")
            continue
        latency, throughput = Timer(case.device), Timer(case.device)
        rotation = Rotation(case.input_sets, case.prepare)
        # Peak memory from the warm-up, which runs one case at a time (the interleaved rounds would mix them).
        base = _memory_base(case)
        estimate = warm_up(latency, case.fn, rotation, plan)
        peak_mem_mb = _peak_memory_mb(case, base)

        def calls(*args, fn=case.fn):
            for _ in range(BACK_TO_BACK):
                fn(*args)

        live.append((i, case, (error, peak_mem_mb), latency, throughput, rotation, calls, estimate))
    if not live:
        return results
    rounds = plan.rounds_for(sum(entry[-1] for entry in live) * (1 + BACK_TO_BACK))
    done = 0
    while True:
        for _ in range(rounds):
            for _, case, _, latency, throughput, rotation, calls, _ in live:
                latency.call(case.fn, rotation.next())
                throughput.call(calls, rotation.next())
        done += rounds
        on_gpu = live[0][1].device.type == "cuda"  # the CPU run is a smoke run: its plan's rounds only
        if not on_gpu or done >= 4 * plan.max_rounds or all(e[3].timing().spread < READABLE_SPREAD for e in live):
            break
        rounds = plan.max_rounds
    busy = gpu_busy_ms(live) if on_gpu else {}
    for i, case, (error, peak_mem_mb), latency, throughput, _, _, _ in live:
        case.check_compiled and case.check_compiled()
        timing = latency.timing()
        row = make_row(
            name=case.name, impl=case.impl, dtype=case.dtype, batch=case.batch, seq=case.seq, timing=timing,
            flops=case.flops, nbytes=case.nbytes, peaks=peaks, peak_mem_mb=peak_mem_mb, max_error=error,
            shape=case.shape, tokens=case.tokens, lengths=case.lengths,
            note="; ".join(filter(None, [case.note, None if timing.spread < READABLE_SPREAD else (
                f"not readable: the p20-p80 spread is {timing.spread:.0%} of the median")])) or None,
        )  # fmt: skip
        row["throughput_ms"] = throughput.timing().median_ms / BACK_TO_BACK
        if i in busy:
            row["gpu_busy_ms"] = busy[i]
        results[i] = row
    return results


PROFILED_ROUNDS = 5  # round-robin latency calls per case under the profiler, after the timed rounds


def gpu_busy_ms(live) -> dict[int, float]:
    """Each case's GPU-busy ms per call (median over :data:`PROFILED_ROUNDS`), from one ``torch.profiler``
    session over round-robin calls marked per case: the union of the device work each call started
    (:func:`busy_ms_per_marker`).  A pass of its own, so the profiler's host cost stays out of the timed
    rounds.  Set beside the latency, it says whether the GPU waits for the host."""
    markers = {i: f"bertfast.case.{i}" for i, *_ in live}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(PROFILED_ROUNDS):
            for i, case, _, _, _, rotation, _, _ in live:
                args = rotation.next()
                torch.cuda.synchronize(case.device)
                with torch.profiler.record_function(markers[i]):
                    case.fn(*args)
                    torch.cuda.synchronize(case.device)
    per_marker = busy_ms_per_marker(profile.events(), tuple(markers.values()))
    return {i: statistics.median(per_marker[m]) for i, m in markers.items() if per_marker[m]}


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def compile_backend(device: torch.device, smoke: bool = False) -> str:
    """Inductor for real runs on a GPU; Dynamo's capture alone (``eager``) in smoke runs and on the CPU."""
    return "inductor" if device.type == "cuda" and not smoke else "eager"


def compile_note(backend: str) -> str | None:
    return None if backend == "inductor" else f"torch.compile backend={backend} (smoke run)"


# --- compiled baselines that prove they ran compiled ------------------------------------------


class NotCompiled(RuntimeError):
    """A compiled baseline ran (some of) its calls as eager Python: its timing would be a lie."""


def _fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with a code object of its own.

    Dynamo keeps its compiled variants per code object, and its recompile limit counts them
    there: every ``torch.compile`` of the same function (or of closures made by one ``def``)
    shares that budget, and past it Dynamo silently runs the Python.  A fresh code object gives
    each compiled baseline its own cache.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


class CompiledFunction:
    """``torch.compile(fn)`` with its own Dynamo cache, which knows whether its calls ran compiled.

    The compiled body starts with ``if not torch.compiler.is_compiling(): eager_calls += 1``.
    While Dynamo traces, ``is_compiling()`` is true, so the compiled graph contains no such
    step; when Dynamo falls back to running the Python (recompile limit reached, a skipped
    frame, compilation disabled), the counter goes up.  :meth:`check` raises
    :class:`NotCompiled` then.  ``fullgraph=True`` (the default) makes a graph break an error
    at compile time instead of a silent split.
    """

    def __init__(self, fn: Callable, *, backend: str, dynamic: bool | None = False, fullgraph: bool = True, name=None):
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.calls = 0
        self.eager_calls = 0
        state = self

        def compiled_body(*args, **kwargs):
            if not torch.compiler.is_compiling():
                state.eager_calls += 1
            return fn(*args, **kwargs)

        self._compiled = torch.compile(
            _fresh_function(compiled_body), backend=backend, dynamic=dynamic, fullgraph=fullgraph
        )

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._compiled(*args, **kwargs)

    def check(self) -> None:
        """Raise :class:`NotCompiled` if any call so far ran as eager Python."""
        if self.eager_calls:
            raise NotCompiled(
                f"{self.name}: {self.eager_calls} of {self.calls} calls ran as eager Python, not compiled code "
                "(Dynamo fell back: recompile limit reached, frame skipped or compilation disabled)"
            )


def check_all_compiled(functions) -> Callable[[], None]:
    """A ``Case.check_compiled`` over several compiled functions (e.g. one per layer)."""
    functions = list(functions)

    def check() -> None:
        for function in functions:
            function.check()
        if functions and not any(f.calls for f in functions):
            raise NotCompiled(f"none of the compiled functions ({functions[0].name}, ...) was ever called")

    return check
