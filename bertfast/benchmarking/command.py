"""``bertfast bench``: check every backend, then time BERT forward (and training) side by side.

1. Build BERT-large (random seeded weights, or ``--checkpoint DIR``) in float32 on the
   reference backend: the yardstick.
2. Check: every requested bertfast backend, and each Hugging Face baseline, runs a small
   padded batch; its max error at real tokens against the float32 reference is printed.
   A bertfast backend outside the numerics policy fails the command (exit 1) before
   anything is timed: in float32 the relative error must be within
   ``numerics.MODEL_FP32_REL_TOL``; in bf16/fp16 the max abs error must be within
   ``LOWP_FACTOR["forward"]`` times the reference backend's own error at that dtype plus
   ``LOWP_FLOOR``.  (A Hugging Face baseline must match in float32; in bf16/fp16 its
   error is shown for information.)
3. Time the forward pass (``--train``: a training step too) of each implementation at
   ``--batch x --seq`` with a padded batch and print sequences/s, latency, host ms, TFLOP/s,
   peak memory and max error, with the speed-up over Hugging Face sdpa.  ``--train`` adds
   the task steps: masked-LM pre-training and a sequence-classification fine-tuning step,
   ``bertfast.TrainStep`` (one CUDA graph per bucket on a GPU, eager on the CPU) against the
   eager step and Hugging Face sdpa, like for like (pure ``--dtype``; and in bf16/fp16 AMP:
   float32 weights under autocast), with MFU against the bf16 matmul rate measured in the
   same run (n/a on the CPU).
   ``--fp8`` adds ``bertfast-fp8`` (``bertfast.quantize(model, "fp8")``, rows in bf16) to the forward
   section, interleaved with the rest; its check against the reference is shown for information (FP8's
   accuracy is ``python -m bench.fp8_accuracy``'s).  A device that cannot run FP8 says why
   (``bertfast.fp8.unsupported``) and the row is listed as skipped with that reason.
4. ``--save DIR`` writes the rows as a result file, ``DIR/<gpu-slug>/<date>-<commit>.json``.

Without a GPU it says so and runs a reduced benchmark on the CPU (BERT-small unless
``--model``/``--checkpoint`` says otherwise, batch 1 x seq 32, float32, two timed rounds).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import torch

from .. import ops
from ..numerics import LOWP_FACTOR, LOWP_FLOOR, MODEL_FP32_REL_TOL, rel_error
from .cases import Skip, run_interleaved, skip_row_for, unavailable
from .device import DTYPES, device_name, environment, gpu_state, measure_peaks
from .display import Display
from .models import (
    FP8_IMPL,
    FP8_ROW_DTYPE,
    HF_IMPLS,
    MLPERF_OFFLINE_SEQ_PER_S,
    TASK_AMP_IMPLS,
    TASK_IMPLS,
    ModelBench,
    backend_of,
    impl_spec,
)
from .schema import new_result, row_problems, write_result
from .shapes import PADDING_DISTRIBUTION, ModelShape, bert_large_config, tiny_config
from .timing import GPU_PLAN, QUICK_GPU_PLAN, TimingPlan, timing_description

CPU_PLAN = TimingPlan(min_warmup=1, warmup_ms=0.0, target_ms=0.0, min_rounds=2, max_rounds=2)
MODELS = {
    "bert-large": bert_large_config,
    "bert-base": lambda: bert_large_config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    # Google's BERT-small (4 layers, hidden 512): the default on the CPU.
    "bert-small": lambda: bert_large_config(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048
    ),
    "tiny": tiny_config,
}
BASELINE = "hf-sdpa"
DROP_IN = "hf-sdpa-patched"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bertfast bench``."""
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default: 32; 1 on the CPU)")
    parser.add_argument("--seq", type=int, default=None, help="padded sequence length (default: 128; 32 on the CPU)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="compute dtype (default: bf16; fp32 on the CPU)"
    )
    parser.add_argument(
        "--backends",
        default="auto," + ",".join(ops.BACKENDS),
        help="comma-separated bertfast backends to time; 'auto' is the best one per op (default: %(default)s)",
    )
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time Hugging Face transformers: eager, sdpa and torch.compile (default: on)",
    )
    parser.add_argument("--train", action="store_true", help="also time a training step (forward, backward, AdamW)")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help='also time the FP8 model (bertfast.quantize(model, "fp8"): e4m3 GEMMs, the rest bf16) in the forward '
        "section; on a device that cannot run FP8 it says why",
    )
    parser.add_argument("--save", metavar="DIR", default=None, help="write a result file to DIR/<gpu-slug>/")
    parser.add_argument(
        "--checkpoint", metavar="DIR", default=None, help="a local Hugging Face folder of a BERT-family model"
    )
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default=None,
        help="model size with random weights when no --checkpoint is given (default: bert-large; bert-small on "
        "the CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds (a quick look)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is visible")
    parser.add_argument("--plain", action="store_true", help="plain text output (no rich)")


def _impls(args) -> list[str]:
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    impls = []
    for name in names:
        name = ops.validate_backend_name(name)
        impl = "bertfast" if name == "auto" else f"bertfast-{name}"
        if impl not in impls:
            impls.append(impl)
    if args.baselines:
        # The drop-in path most users take: Hugging Face's model after bertfast.patch (backend auto).
        impls += [DROP_IN] if "bertfast" in impls else []
        impls += HF_IMPLS
    if getattr(args, "fp8", False):
        impls.append(FP8_IMPL)
    return impls


def _is_ours(impl: str) -> bool:
    return backend_of(impl) is not None or impl == DROP_IN


def _labels(impls: list[str], device: torch.device, dtype: str) -> dict[str, str]:
    """What each row ran: ``auto`` with the backend it resolved to; interpreter timings marked as such."""
    from ..env_report import auto_backends
    from ..ops import triton_backend

    resolved = auto_backends(device.type, DTYPES[dtype])
    auto = "auto -> " + (", ".join(sorted(resolved, key=lambda name: -len(resolved[name]))) or "nothing")
    labels = {}
    for impl in impls:
        backend = "auto" if impl == DROP_IN else backend_of(impl)
        runs = set(resolved) if backend == "auto" else {backend}
        label = f"{impl} ({auto})" if backend == "auto" else impl
        if "triton" in runs and device.type == "cpu" and triton_backend.interpreter_on():
            label += " [Triton interpreter]"
        labels[impl] = label
    return labels


# A row whose p20-p80 spread is wider than this share of its median gives no readable ratio.
WIDE_SPREAD = 0.25


def _spread_warnings(rows: list[dict], labels: dict[str, str]) -> list[str]:
    warnings = []
    for r in rows:
        spread = (r["p80_ms"] - r["p20_ms"]) / r["median_ms"]
        if spread > WIDE_SPREAD:
            warnings.append(
                f"warning: {labels.get(r['impl'], r['impl'])} ({r['name'].rsplit('-', 1)[-1]}): the rounds spread "
                f"over {spread:.0%} of the median (p20-p80); ratios against it are not readable"
            )
    return warnings


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class _Check:
    """The correctness check of one implementation on a small batch."""

    def __init__(self, impl: str, max_error: float, rel: float, bound: str, ok: bool | None):
        self.impl, self.max_error, self.rel, self.bound, self.ok = impl, max_error, rel, bound, ok

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "MISMATCH", None: "info"}[self.ok]


def _check(models: ModelBench, impls: list[str], dtype: str, shape: ModelShape, skipped: dict) -> list[_Check]:
    """Run each implementation on one small padded batch against the float32 reference."""
    outputs = {}
    for impl in impls:
        try:
            _, forward = models.forward_fn(impl, dtype)
            outputs[impl] = models.compare(forward, shape)
        except Exception as exc:
            if not unavailable(exc):
                raise
            skipped[impl] = f"{type(exc).__name__}: {exc}"
    lowp_bound = None
    if dtype != "fp32":
        _, reference_forward = models.forward_fn("bertfast-reference", dtype)
        own_error = models.error_of(reference_forward, shape)
        lowp_bound = LOWP_FACTOR["forward"] * own_error + LOWP_FLOOR[DTYPES[dtype]]
    checks = []
    for impl, (out, ref) in outputs.items():
        max_error = (out.float() - ref).abs().max().item()
        rel = rel_error(out.float(), ref)
        ours = _is_ours(impl)
        if impl_spec(impl).fp8:  # not held to the bf16 bound: its accuracy has a report of its own
            checks.append(_Check(impl, max_error, rel, "FP8: see python -m bench.fp8_accuracy", None))
            continue
        if lowp_bound is None:
            ok = bool(rel <= MODEL_FP32_REL_TOL)
            bound = f"rel <= {MODEL_FP32_REL_TOL:.0e}"
        else:
            ok = bool(max_error <= lowp_bound) if ours else None
            bound = f"max <= {lowp_bound:.2e}"
        checks.append(_Check(impl, max_error, rel, bound, ok))
    return checks


def _pick_device(args, display: Display) -> torch.device:
    if torch.cuda.is_available() and not args.cpu:
        return torch.device("cuda")
    if not args.cpu:
        display.line(
            "No CUDA GPU is visible: running a reduced benchmark on the CPU (by default BERT-small at batch 1 x seq 32 "
            "in float32, 2 timed rounds; the Triton and CUDA kernels need a GPU). These are not GPU numbers.",
            style="bold yellow",
        )
    return torch.device("cpu")


def run(args) -> int:
    """Run ``bertfast bench`` with parsed ``args``; returns the exit code."""
    display = Display(plain=True if args.plain else None)
    try:
        impls = _impls(args)
    except ValueError as exc:
        display.line(f"error: {exc}")
        return 2
    device = _pick_device(args, display)
    cuda = device.type == "cuda"
    batch = args.batch if args.batch is not None else (32 if cuda else 1)
    seq = args.seq if args.seq is not None else (128 if cuda else 32)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    if batch < 1 or seq < 1:
        display.line(f"error: --batch and --seq must be positive, got {batch} and {seq}")
        return 2
    plan = (QUICK_GPU_PLAN if args.quick else GPU_PLAN) if cuda else CPU_PLAN
    if args.save:  # before anything runs: a folder that cannot take the result must not cost the benchmark
        reason = _unwritable(args.save)
        if reason is not None:
            display.line(f"error: --save {args.save!r}: {reason}")
            return 2

    began = time.perf_counter()
    try:
        if args.checkpoint:
            models = ModelBench(device=device, checkpoint=args.checkpoint)
        else:
            models = ModelBench(MODELS[args.model or ("bert-large" if cuda else "bert-small")](), device)
    except Exception as exc:  # a corrupt or foreign checkpoint: one line naming it, not a traceback
        what = f"the checkpoint {args.checkpoint!r}" if args.checkpoint else "the model"
        display.line(f"error: cannot build {what}: {type(exc).__name__}: {exc}")
        return 2
    config = models.config
    if seq > config.max_position_embeddings:
        display.line(f"error: --seq {seq} is longer than the model's max_position_embeddings")
        return 2
    shape = ModelShape(batch, seq)
    display.line(
        f"{models.label} ({config.num_hidden_layers} layers, hidden {config.hidden_size}) on {device_name(device)}, "
        f"{dtype}, batch {batch} x seq {seq}; padding: {PADDING_DISTRIBUTION}"
    )

    skipped: dict[str, str] = {}
    for impl in impls:
        reason = models.skip_reason(impl)
        if reason is None and impl == "hf-compile" and not cuda:
            reason = "the torch.compile baseline is timed on a GPU only"
        if reason is not None:
            skipped[impl] = reason
    if FP8_IMPL in skipped:
        display.line(f"--fp8: FP8 cannot run on {device_name(device)}: {skipped[FP8_IMPL]}", style="bold yellow")
    runnable = [impl for impl in impls if impl not in skipped]

    # 1. correctness, before anything is timed, at the batch that is timed
    labels = _labels(runnable, device, dtype)
    checks = _check(models, runnable, dtype, shape, skipped)
    display.table(
        f"Check against the float32 reference ({shape.batch} x {shape.seq}, real tokens)",
        ("impl", "max abs error", "rel error", "bound", "verdict"),
        [(labels[c.impl], f"{c.max_error:.3e}", f"{c.rel:.3e}", c.bound, c.verdict) for c in checks],
    )
    failed = [c.impl for c in checks if c.ok is False]
    if failed:
        display.line(
            f"error: {', '.join(failed)} do(es) not match the reference within the numerics policy; not timing.",
            style="bold red",
        )
        return 1
    runnable = [impl for impl in runnable if impl not in skipped]

    # 2. timing: each section's implementations round-robin (see cases.run_interleaved)
    # MFU needs the device's measured matmul rate: measured first on a GPU (on the CPU there is no MFU).
    peaks = measure_peaks(device, plan) if cuda else None
    rows, skipped_rows = [], []
    state_at_start = gpu_state(device)
    for kind, impls_of_section, build in _sections(args, models, runnable, dtype):
        cases, outcomes = [], {}
        for impl in impls_of_section:
            try:
                cases.append(build(impl, dtype, shape))
            except Skip as exc:
                outcomes[impl] = exc
        with display.progress(1, "timing") as progress:
            progress.start(f"{kind}: {', '.join(c.impl for c in cases)}, interleaved")
            outcomes.update(zip([c.impl for c in cases], run_interleaved(cases, plan=plan, peaks=peaks)))
            progress.done(f"{kind}: {len(cases)} implementations timed")
        for impl in impls_of_section:
            outcome, name = outcomes[impl], f"{models.label}-{kind}"
            row_dtype = FP8_ROW_DTYPE if impl == FP8_IMPL else dtype
            if isinstance(outcome, Skip):
                skipped_rows.append(skip_row_for(name, impl, row_dtype, batch, seq, str(outcome)))
                continue
            problems = row_problems(outcome)
            if problems:  # e.g. a NaN error: the output was wrong, so its time is no result
                reason = f"failed: not a valid result ({'; '.join(problems)})"
                skipped_rows.append(skip_row_for(name, impl, row_dtype, batch, seq, reason))
                continue
            rows.append(outcome)
    state_at_end = gpu_state(device)
    display.line(
        "SM clock {} -> {} MHz, temperature {} -> {} C (start -> end of timing)".format(
            state_at_start["sm_clock_mhz"], state_at_end["sm_clock_mhz"],
            state_at_start["temperature_c"], state_at_end["temperature_c"],
        )
    )  # fmt: skip

    for kind, impls_of_section, _ in _sections(args, models, runnable, dtype):
        section = [r for r in rows if r["name"] == f"{models.label}-{kind}" and r["impl"] in impls_of_section]
        _print_rows(display, models.label, kind, section, labels)
    for warning in _spread_warnings(rows, labels):
        display.line(warning, style="yellow")
    for impl, reason in skipped.items():
        if impl == FP8_IMPL:  # inference only
            skipped_rows.append(skip_row_for(f"{models.label}-fwd", impl, FP8_ROW_DTYPE, batch, seq, reason))
            continue
        for kind in ("fwd", "train") if args.train else ("fwd",):
            skipped_rows.append(skip_row_for(f"{models.label}-{kind}", impl, dtype, batch, seq, reason))
    if skipped_rows:
        display.table(
            "Skipped", ("name", "impl", "reason"), [(r["name"], r["impl"], r["reason"]) for r in skipped_rows]
        )

    if args.save:
        peaks = peaks or measure_peaks(device, plan)
        setup = {"padding": PADDING_DISTRIBUTION, "timing": timing_description(device), "source": "bertfast bench"}
        setup["gpu state"] = f"start {state_at_start}, end {state_at_end}"
        setup["model rows"] = (
            "implementations interleaved round-robin; median_ms one call, throughput_ms back to back, "
            "gpu_busy_ms the device's busy time per call (a profiled pass of its own)"
        )
        if not cuda:
            setup["mode"] = "CPU run without a GPU: reduced size, two rounds; not GPU numbers"
        path = write_result(new_result(environment(device), peaks, rows, skipped_rows, setup), args.save)
        display.line(f"results written to {path}")
    display.line(f"done in {time.perf_counter() - began:.1f} s")
    timed_ours = [r for r in rows if _is_ours(r["impl"])]
    if not timed_ours:
        display.line("error: no bertfast implementation was timed (see Skipped)", style="bold red")
        return 1
    if any(r["reason"].startswith("failed:") for r in skipped_rows):
        display.line("error: some rows failed (see Skipped)", style="bold red")
        return 1
    return 0


def _sections(args, models: ModelBench, runnable: list[str], dtype: str):
    """``(kind, impls, build)`` of each timed section, in order: the forward; with ``--train`` the encoder's
    training step, then each task's (``mlm``, ``cls``) in pure ``dtype`` and, in bf16/fp16, under AMP."""
    sections = [("fwd", runnable, models.forward_case)]
    if not args.train:
        return sections
    sections.append(("train", [impl for impl in runnable if impl != FP8_IMPL], models.train_case))
    ours, baseline = "bertfast" in runnable, BASELINE in runnable
    for task in ("mlm", "cls"):
        build = functools.partial(models.task_train_case, task)
        for impls in (TASK_IMPLS, TASK_AMP_IMPLS) if dtype != "fp32" else (TASK_IMPLS,):
            chosen = [impl for impl in impls if (baseline if impl.startswith("hf-") else ours)]
            if chosen:
                sections.append((f"{task}-train", chosen, build))
    return sections


def _unwritable(folder: str) -> str | None:
    """Why a result file cannot be written under ``folder`` (created if missing), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None


def _print_rows(display: Display, label: str, kind: str, rows: list[dict], labels: dict[str, str]) -> None:
    if not rows:
        return
    baseline = next((r for r in rows if r["impl"] in (BASELINE, f"{BASELINE}-amp")), None)
    table = []
    for r in rows:
        speedup = baseline["median_ms"] / r["median_ms"] if baseline else None
        table.append(
            (
                labels.get(r["impl"], r["impl"]),
                _fmt(r["median_ms"], ".2f"),
                f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
                _fmt(r["seq_per_s"], ".1f"),
                _fmt(r.get("host_ms"), ".2f"),
                _fmt(r.get("gpu_busy_ms"), ".2f"),
                _fmt(r["tflops"], ".1f" if (r["tflops"] or 0) >= 10 else ".3g"),
                "n/a" if r.get("frac_peak_tflops") is None else f"{r['frac_peak_tflops']:.0%}",
                _fmt(r["peak_mem_mb"], ".0f"),
                _fmt(r.get("max_error"), ".2e"),
                _fmt(speedup, ".2f") + ("x" if speedup else ""),
            )
        )
    first = rows[0]
    what = {
        "fwd": "forward (inference)",
        "train": "training step (forward, backward, AdamW)",
        "mlm-train": "masked-LM pre-training step",
        "cls-train": "sequence-classification fine-tuning step",
    }[kind]
    if any(r["impl"].endswith("-amp") for r in rows):
        what += " under AMP"
    display.table(
        f"{label} {what}, {first['dtype']}, batch {first['batch']} x seq {first['seq']}",
        (
            "impl",
            "median ms",
            "p20-p80 ms",
            "seq/s",
            "host ms",
            "GPU-busy ms",
            "TFLOP/s",
            "MFU",
            "peak MB",
            "max err",
            "vs hf-sdpa",
        ),  # fmt: skip
        table,
    )
    fp8 = next((r for r in rows if r["impl"] == FP8_IMPL), None)
    bf16 = next((r for r in rows if r["impl"] == "bertfast"), None)
    if fp8 is not None:
        rate = fp8["batch"] / (fp8.get("throughput_ms") or fp8["median_ms"]) * 1e3
        versus = "" if bf16 is None else f"{bf16['median_ms'] / fp8['median_ms']:.2f}x bertfast ({bf16['dtype']}); "
        display.line(
            f"{FP8_IMPL}: e4m3 GEMMs, the rest in {fp8['dtype']}; {versus}{rate:,.0f} seq/s back to back = "
            f"{rate / MLPERF_OFFLINE_SEQ_PER_S:.2f} of MLPerf Inference v3.1 offline ({MLPERF_OFFLINE_SEQ_PER_S:,.0f} "
            "seq/s on an H100, SQuAD lengths)"
        )
    recipes = {r["note"][r["note"].index("recipe: ") :] for r in rows if "recipe: " in (r.get("note") or "")}
    for recipe in sorted(recipes):
        display.line(recipe)
