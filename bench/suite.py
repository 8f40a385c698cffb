"""One run of the pytest-benchmark suites in ``bench/``: what they share and what they record.

The suites (``bench/test_bench_*.py``) ask a :class:`SuiteRun` to run each case; it
measures the device's peaks once, builds the models once, times every case with the
device timer, records the row (or the reason it was skipped) and, at the end of the
session, writes the result file.  On a machine without a GPU the same cases run once
at tiny sizes (``smoke``): nothing is timed seriously, everything is exercised.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

import torch

from bertfast.benchmarking.cases import Case, Skip, run_case, skip_row_for
from bertfast.benchmarking.device import environment, measure_peaks
from bertfast.benchmarking.models import ModelBench
from bertfast.benchmarking.schema import new_result, row_problems, write_result
from bertfast.benchmarking.shapes import PADDING_DISTRIBUTION, bert_large_config, lengths_description, tiny_config
from bertfast.benchmarking.timing import (
    QUICK_GPU_PLAN,
    SMOKE_PLAN,
    SUITE_KERNEL_PLAN,
    SUITE_MODEL_PLAN,
    TimingPlan,
    timing_description,
)

# The suite's sections, in the order they run; each case belongs to one (see section_of).
SECTIONS = ("kernels", "forward", "training", "padding-free")


def section_of(name: str) -> str:
    """The section of a row name: kernel ops, BERT forward, BERT training, padding-free BERT."""
    if not name.startswith("bert-"):
        return "kernels"
    if name.endswith("-varlen"):
        return "padding-free"
    return "training" if name.endswith("-train") else "forward"


class InvalidRow(Exception):
    """A case ran but its row is no result (a NaN error): recorded as failed."""


class SuiteRun:
    def __init__(self, device: torch.device | str | None = None, quick: bool = False, smoke: bool | None = None):
        """``smoke`` (default: no GPU): tiny sizes, each case run once, nothing compiled for real."""
        self.device = torch.device(device) if device is not None else _default_device()
        self.smoke = self.device.type != "cuda" if smoke is None else smoke
        self.quick = quick
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.failed: list[str] = []  # with keep_going: what failed, in one line each
        self.seconds = dict.fromkeys(SECTIONS, 0.0)  # wall time spent building and timing each section's cases
        self._peaks: dict[str, float] | None = None
        self._model_bench: ModelBench | None = None

    def plan_for(self, section: str) -> TimingPlan:
        """How a case of ``section`` is timed: once (smoke), briefly (quick), or the suite's plan."""
        if self.smoke:
            return SMOKE_PLAN
        if self.quick:
            return QUICK_GPU_PLAN
        return SUITE_KERNEL_PLAN if section == "kernels" else SUITE_MODEL_PLAN

    @property
    def peaks(self) -> dict[str, float]:
        if self._peaks is None:
            self._peaks = measure_peaks(self.device, self.plan_for("kernels"))
        return self._peaks

    @peaks.setter
    def peaks(self, measured: dict[str, float]) -> None:
        self._peaks = measured

    @property
    def model_bench(self) -> ModelBench:
        if self._model_bench is None:
            config = tiny_config() if self.smoke else bert_large_config()
            self._model_bench = ModelBench(config, self.device, smoke=self.smoke)
        return self._model_bench

    def run(
        self,
        identity: dict,
        build: Callable[[], Case],
        benchmark=None,
        plan: TimingPlan | None = None,
        keep_going: bool = False,
    ) -> tuple[dict | None, str | None]:
        """Build and run one case; returns ``(row, None)`` or ``(None, reason it was skipped)``.

        ``identity`` holds the row's ``name, impl, dtype, batch, seq`` (and ``shape``,
        ``lengths``), so a case that cannot even be built is still recorded as skipped.
        ``plan``: how to time it (default: the section's, :meth:`plan_for`).  ``keep_going``
        (first light): a case that raises, or whose row is not a valid result (a NaN error),
        is recorded as skipped with ``failed: ...`` and listed in :attr:`failed`, not raised.
        """
        section = section_of(identity["name"])
        peaks = self.peaks  # measured once, before the first case, and not billed to it
        began = time.perf_counter()
        try:
            case = build()
            row = run_case(case, plan=plan or self.plan_for(section), peaks=peaks, benchmark=benchmark)
            problems = row_problems(row) if keep_going else []
            if problems:  # e.g. a NaN max error: the output was wrong, so its time is no result
                timing = f"{row['median_ms']:.3f} ms (p20-p80 {row['p20_ms']:.3f}-{row['p80_ms']:.3f})"
                raise InvalidRow(f"not a valid result ({'; '.join(problems)}); timed {timing}")
        except Skip as exc:
            reason = str(exc) or "skipped"
            self.skipped.append(skip_row_for(reason=reason, **identity))
            return None, reason
        except Exception as exc:  # a broken case must not cost the rest of a first-light run
            if not keep_going:
                raise
            detail = str(exc) if isinstance(exc, InvalidRow) else f"{type(exc).__name__}: {exc}".strip()
            what = f"{identity['name']} {identity['impl']} {identity['dtype']} {identity['batch']}x{identity['seq']}"
            print(f"[bench] FAILED {what}: {detail}", flush=True)
            if not isinstance(exc, InvalidRow):
                traceback.print_exc()
            self.failed.append(f"{what}: {detail[:300]}")
            self.skipped.append(skip_row_for(reason=f"failed: {detail[:500]}", **identity))
            return None, f"failed: {detail}"
        finally:
            self.seconds[section] += time.perf_counter() - began
        self.rows.append(row)
        if benchmark is not None:
            benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
        return row, None

    def result(self) -> dict:
        setup = {
            "padding": PADDING_DISTRIBUTION,
            "lengths": lengths_description(),
            "timing": timing_description(self.device),
        }
        if self.smoke:
            setup["mode"] = "smoke run: tiny sizes, one call each; the numbers mean nothing"
        elif self.quick:
            setup["mode"] = "quick run (--bench-quick): bf16 only, fewer rounds; not a baseline"
        setup["sections"] = self.sections_description()
        return new_result(environment(self.device), self.peaks, self.rows, self.skipped, setup)

    def sections_description(self) -> str:
        """Wall time per section, in words (stored in the result file: the suite's time budget, measured)."""
        spent = ", ".join(f"{name} {self.seconds[name]:.0f} s" for name in SECTIONS)
        return f"wall time building, checking and timing the cases (compilation included): {spent}"

    def save(self, root) -> str:
        return write_result(self.result(), root)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
