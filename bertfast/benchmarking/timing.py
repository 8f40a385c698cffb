"""Timing GPU work honestly.

One call is timed at a time (:class:`Timer`):

- on a GPU, between two CUDA events recorded on the current stream; the device is
  synchronized before the call (so earlier work is not billed to it) and after it (so the
  host reads a finished clock).  Before the start event the timer zeroes a buffer twice
  the size of the L2 cache: this evicts whatever the previous call left in L2 and gives
  the host a head start, so a short kernel is not timed waiting for its own launch;
- on the CPU, with ``time.perf_counter``.

A kernel is timed by its device duration instead (:class:`KernelTimer`): every timed round runs
inside one ``torch.profiler`` session between round markers, and a round's time is the time the
device was busy with the kernels (and copies) that started in it, from the profiler's kernel
events.  Host time (launch overhead, Python) is then never in the number; it is kept beside it
(``host_ms``: from the call to its return, before the device is waited for).

The caller passes several input sets and every round takes the next one, so a small
problem is not measured with its inputs still warm in the cache.  A measurement
(:func:`measure`, or :func:`measure_with_pytest_benchmark` inside the pytest suites) first
warms up (compilation, autotuning, allocator growth), estimates the time of one call,
then runs enough rounds to fill a time budget and reports the median and the 20th/80th
percentiles.  A difference smaller than the p20-p80 spread is noise.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    """How long to warm up and how many rounds to time."""

    min_warmup: int = 2  # calls, at least (the first one compiles/autotunes)
    warmup_ms: float = 50.0  # ... and keep warming up until this much time has passed
    target_ms: float = 300.0  # time budget for the timed rounds
    min_rounds: int = 10
    max_rounds: int = 100

    def rounds_for(self, estimate_ms: float) -> int:
        if estimate_ms <= 0 or not math.isfinite(estimate_ms):
            return self.max_rounds
        return max(self.min_rounds, min(self.max_rounds, math.ceil(self.target_ms / estimate_ms)))


# On a GPU; --quick trades precision for time.
GPU_PLAN = TimingPlan()
QUICK_GPU_PLAN = TimingPlan(min_warmup=2, warmup_ms=20.0, target_ms=100.0, min_rounds=5, max_rounds=50)
# The full suite (bench/run_gpu.sh) times a few hundred cases in about 8 minutes: fewer rounds per case.
# Kernels take microseconds, so 10-50 rounds in ~100 ms already give a tight median; model cases 10-50 in ~200 ms.
SUITE_KERNEL_PLAN = TimingPlan(min_warmup=2, warmup_ms=25.0, target_ms=100.0, min_rounds=10, max_rounds=50)
SUITE_MODEL_PLAN = TimingPlan(min_warmup=2, warmup_ms=30.0, target_ms=200.0, min_rounds=10, max_rounds=50)
# On the CPU the suites only check that everything runs: one untimed-quality call.
SMOKE_PLAN = TimingPlan(min_warmup=0, warmup_ms=0.0, target_ms=0.0, min_rounds=1, max_rounds=1)


# What a timing measured: the device's busy time in kernel events, CUDA events around the call
# (device time including any wait for the host), or the host's clock.
CLOCKS = ("kernel", "events", "host")


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    rounds: int
    clock: str | None = None  # one of CLOCKS
    host_ms: float | None = None  # median host time per call, where it is measured apart

    @property
    def spread(self) -> float:
        """The p20-p80 spread as a share of the median."""
        return (self.p80_ms - self.p20_ms) / self.median_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], clock: str | None = None, host_ms=None) -> Timing:
        if not samples_ms:
            raise ValueError("no timed samples")
        ordered = sorted(samples_ms)

        def quantile(q: float) -> float:
            # Linear interpolation between the closest ranks.
            pos = q * (len(ordered) - 1)
            low, high = math.floor(pos), math.ceil(pos)
            return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

        return cls(
            median_ms=statistics.median(ordered),
            p20_ms=quantile(0.2),
            p80_ms=quantile(0.8),
            min_ms=ordered[0],
            rounds=len(ordered),
            clock=clock,
            host_ms=statistics.median(host_ms) if host_ms else None,
        )


def l2_flush_bytes(device: torch.device) -> int:
    """Twice the device's L2 (at least 64 MiB): writing this much evicts all of it."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return max(2 * int(l2), 64 << 20)


class Timer:
    """Times single calls on ``device`` and keeps the samples (milliseconds)."""

    def __init__(self, device: torch.device | str, flush_l2: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.samples_ms: list[float] = []
        self.host_ms: list[float] = []  # from the call to its return, before the device is waited for
        self._flush = None
        if self.cuda and flush_l2:
            self._flush = torch.empty(l2_flush_bytes(self.device), dtype=torch.int8, device=self.device)

    def call(self, fn: Callable[..., Any], args: Sequence[Any]) -> float:
        """Run ``fn(*args)`` once, record and return its time in ms.  The result is dropped."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            if self._flush is not None:
                self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            fn(*args)
            self.host_ms.append((time.perf_counter() - begin) * 1e3)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            fn(*args)
            elapsed = (time.perf_counter() - begin) * 1e3
            self.host_ms.append(elapsed)
        self.samples_ms.append(elapsed)
        return elapsed

    def reset(self) -> None:
        """Forget the calls so far (the warm-up's)."""
        self.samples_ms.clear()
        self.host_ms.clear()

    def timing(self) -> Timing:
        return Timing.from_samples(self.samples_ms, clock="events" if self.cuda else "host", host_ms=self.host_ms)


ROUND_MARKER = "bertfast.round"


def is_device_work(event) -> bool:
    """A kernel, copy or fill on a GPU in ``torch.profiler``'s events (not a user range drawn there)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation


def busy_ms_per_round(events, is_work=is_device_work, marker: str = ROUND_MARKER) -> list[float]:
    """Device-busy milliseconds of each round in a profile: the union of the work intervals that
    start between a round marker's start and the next one's (so a wait on the host, a launch gap or
    two overlapping kernels are not counted twice or at all).  ``events``: ``profile.events()``."""
    return busy_ms_per_marker(events, (marker,), is_work)[marker]


def busy_ms_per_marker(events, markers, is_work=is_device_work) -> dict[str, list[float]]:
    """:func:`busy_ms_per_round` over rounds of several kinds, interleaved: each work interval belongs to
    the latest marker of any of ``markers`` started before it; returns each marker's rounds, in order."""
    cpu = torch.autograd.DeviceType.CPU  # on a GPU the marker is drawn on the device's timeline too
    rounds = sorted((e.time_range.start, e.name) for e in events if e.name in markers and e.device_type == cpu)
    starts = [start for start, _ in rounds]
    work = sorted((e.time_range.start, e.time_range.end) for e in events if is_work(e))
    busy = [0.0] * len(starts)
    covered = [float("-inf")] * len(starts)  # how far each round's union reaches so far
    for begin, end in work:
        i = bisect.bisect_right(starts, begin) - 1
        if i < 0:
            continue  # before the first round: the untimed set-up
        busy[i] += max(0.0, end - max(begin, covered[i]))
        covered[i] = max(covered[i], end)
    out: dict[str, list[float]] = {marker: [] for marker in markers}
    for (_, name), us in zip(rounds, busy):
        out[name].append(us / 1e3)
    return out


class KernelTimer(Timer):
    """Times calls by the device's kernel time (see the module docstring), with host time beside it.

    ``is_work`` picks the events that are device work and ``activities`` what the profiler
    records; the defaults are the GPU's (a test on the CPU passes a CPU range as its "kernel")."""

    def __init__(self, device, flush_l2: bool = True, is_work=is_device_work, activities=None):
        super().__init__(device, flush_l2)
        self.is_work = is_work
        activities = activities or [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        self._activities = activities
        self._profile = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def call(self, fn: Callable[..., Any], args: Sequence[Any]) -> float:
        """Run ``fn(*args)`` once inside the profile; returns its wall time (for planning rounds)."""
        if self._profile is None:
            self._profile = torch.profiler.profile(activities=self._activities)
            self._profile.__enter__()
        self._sync()
        if self._flush is not None:
            self._flush.zero_()
            self._sync()  # the flush ends before the round begins
        begin = time.perf_counter()
        with torch.profiler.record_function(ROUND_MARKER):
            fn(*args)
            returned = time.perf_counter()
            self._sync()
        elapsed = (time.perf_counter() - begin) * 1e3
        self.host_ms.append((returned - begin) * 1e3)
        self.samples_ms.append(elapsed)
        return elapsed

    def _close(self):
        profile, self._profile = self._profile, None
        if profile is not None:
            profile.__exit__(None, None, None)
        return profile

    def reset(self) -> None:
        self._close()
        super().reset()

    def timing(self) -> Timing:
        profile = self._close()
        busy = busy_ms_per_round(profile.events(), self.is_work) if profile is not None else []
        if len(busy) != len(self.host_ms) or not all(busy):
            idle = sum(1 for ms in busy if not ms)
            raise RuntimeError(
                f"the profiler saw device work in {len(busy) - idle} of {len(self.host_ms)} rounds: "
                "a kernel timing needs every round's kernels (is the profiler's CUDA activity available?)"
            )
        return Timing.from_samples(busy, clock="kernel", host_ms=self.host_ms)


class Rotation:
    """Hands out the input sets in turn, each passed through ``prepare`` (untimed)."""

    def __init__(self, input_sets: Sequence[tuple], prepare: Callable[..., tuple] | None = None):
        if not input_sets:
            raise ValueError("at least one input set is needed")
        self.input_sets = list(input_sets)
        self.prepare = prepare
        self.count = 0

    def next(self) -> tuple:
        inputs = self.input_sets[self.count % len(self.input_sets)]
        self.count += 1
        return tuple(self.prepare(*inputs)) if self.prepare is not None else tuple(inputs)


def warm_up(timer: Timer, fn: Callable[..., Any], rotation: Rotation, plan: TimingPlan) -> float:
    """Warm-up calls; returns the estimated time of one call (ms), 0 if none was made."""
    began = time.perf_counter()
    calls = 0
    while calls < plan.min_warmup or (time.perf_counter() - began) * 1e3 < plan.warmup_ms:
        timer.call(fn, rotation.next())
        calls += 1
        if calls >= 1000:
            break
    estimate = statistics.median(timer.samples_ms[1:] or timer.samples_ms) if calls else 0.0
    timer.reset()
    return estimate


def measure(
    fn: Callable[..., Any],
    input_sets: Sequence[tuple],
    *,
    device: torch.device | str,
    plan: TimingPlan = GPU_PLAN,
    prepare: Callable[..., tuple] | None = None,
    timer: Timer | None = None,
) -> Timing:
    """Time ``fn(*prepare(*inputs))`` over rotating ``input_sets`` under ``plan``."""
    timer = timer or Timer(device)
    rotation = Rotation(input_sets, prepare)
    estimate = warm_up(timer, fn, rotation, plan)
    for _ in range(plan.rounds_for(estimate)):
        timer.call(fn, rotation.next())
    return timer.timing()


def measure_with_pytest_benchmark(
    benchmark,
    fn: Callable[..., Any],
    input_sets: Sequence[tuple],
    *,
    device: torch.device | str,
    plan: TimingPlan = GPU_PLAN,
    prepare: Callable[..., tuple] | None = None,
    timer: Timer | None = None,
) -> Timing:
    """Like :func:`measure`, with the timed rounds run by ``benchmark.pedantic``.

    pytest-benchmark's own statistics then time the synchronized calls from the host
    (setup, which rotates inputs, untimed); the device-timer statistics returned here are
    the numbers to trust and are what the suites put in ``benchmark.extra_info``.  With
    ``--benchmark-disable`` pytest-benchmark runs the target once.
    """
    timer = timer or Timer(device)
    rotation = Rotation(input_sets, prepare)
    estimate = warm_up(timer, fn, rotation, plan)

    def setup():
        return (rotation.next(),), {}

    def target(args):
        timer.call(fn, args)

    benchmark.pedantic(target, setup=setup, rounds=plan.rounds_for(estimate), iterations=1, warmup_rounds=0)
    return timer.timing()


def input_set_count(bytes_per_set: int, device: torch.device | str, most: int = 8) -> int:
    """Enough input sets that together they overflow L2 twice (2 to ``most``)."""
    device = torch.device(device)
    if device.type != "cuda" or bytes_per_set <= 0:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    return max(2, min(most, math.ceil(2 * l2 / bytes_per_set)))


def timing_description(device: torch.device) -> str:
    """How a run on ``device`` was timed, in words (stored in the result file)."""
    if device.type == "cuda":
        how = "one call per round between CUDA events, the device synchronized before and after, L2 flushed before it"
    else:
        how = "one call per round timed with time.perf_counter"
    return how + ", inputs rotated among several sets; warm-up first, then the median (p20/p80) of the rounds"
