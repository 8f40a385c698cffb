"""Model level: BERT-large forward and a training step, bertfast against Hugging Face.

GPU (bf16 unless stated):

- forward at batch x seq 1x128, 32x128, 128x128, 8x512, 32x512 in bf16 and fp16 (``MODEL_IMPLS``),
  plus the drop-in rows in bf16 (``DROP_IN_IMPLS``: hf-sdpa-patched, hf-sdpa-patched-compile,
  bertfast-cudagraph);
- a training step (forward, backward, AdamW) at 32x128 and 8x512 (``MODEL_IMPLS``, plus
  ``AMP_IMPLS``: float32 weights under torch.autocast);
- task training steps (``<model>-mlm-train``: masked-LM pre-training, ``<model>-cls-train``: a
  sequence-classification fine-tuning step) at 32x128 and 8x512: ``TASK_IMPLS`` (bertfast.TrainStep,
  captured; the eager step; hf-sdpa) in bf16 and ``TASK_AMP_IMPLS`` under autocast;
- padding-free rows (``*-varlen``): forward and training step at 32x128 and 16x512 with
  lengths from each of ``shapes.LENGTH_DISTRIBUTIONS`` (``VARLEN_IMPLS``: bertfast unpadded,
  bertfast-padded, hf-sdpa);
- FP8 inference (``bertfast-fp8``, ``bertfast.quantize(model, "fp8")``, rows in bf16) beside ``bertfast``
  and ``hf-sdpa`` at ``shapes.FP8_SHAPES``: padded 32x128 and 32x384, SQuAD-like lengths at 384
  (``<model>-fwd-varlen``, lengths ``squad-like``); refused, with ``bertfast.fp8.unsupported``'s reason,
  where FP8 cannot run.

Without a GPU (or with --benchmark-disable): a 2-layer BERT at 2 x 13 (4 x 13 for the
padding-free rows) in fp32 (the autocast rows in bf16), each case run once; the CUDA-graph
runner needs a GPU and is skipped without one; the compiled patched model is timed on a GPU
only.  Implementations: bertfast/benchmarking/models.py.
"""

import functools

import pytest

from bertfast.benchmarking import shapes
from bertfast.benchmarking.models import (
    AMP_IMPLS,
    DROP_IN_IMPLS,
    FP8_IMPL,
    FP8_IMPLS,
    FP8_ROW_DTYPE,
    MODEL_IMPLS,
    TASK_AMP_IMPLS,
    TASK_IMPLS,
    VARLEN_IMPLS,
)

# Which of the two runs (bench/conftest.py decides: smoke without a GPU or with --benchmark-disable).
GPU_ONLY = pytest.mark.bench_size("full")
SMOKE_ONLY = pytest.mark.bench_size("smoke")
# In float32 every implementation computes the same function; a real bug is far above this.
# (tests/ hold the precise numerics policy; bf16/fp16 errors are reported, not judged, here.)
FP32_MAX_ERROR = 1e-4


def _params(groups):
    """``groups``: ``(impls, gpu_shapes, gpu_dtypes, smoke_impls, smoke_shapes, smoke_dtypes)`` tuples."""
    params = []
    for impls, gpu_shapes, gpu_dtypes, smoke_impls, smoke_shapes, smoke_dtypes in groups:
        sizes = [(shape, dtype, GPU_ONLY, impls) for dtype in gpu_dtypes for shape in gpu_shapes]
        sizes += [(shape, dtype, SMOKE_ONLY, smoke_impls) for dtype in smoke_dtypes for shape in smoke_shapes]
        params += [
            pytest.param(shape, dtype, impl, id=f"{dtype}-{shape.label}-{impl}", marks=mark)
            for shape, dtype, mark, chosen in sizes
            for impl in chosen
        ]
    return params


def _varlen_params():
    sizes = [(s, d, GPU_ONLY) for d in shapes.VARLEN_DTYPES for s in shapes.VARLEN_SHAPES]
    sizes += [(s, d, SMOKE_ONLY) for d in shapes.SMOKE_DTYPES for s in shapes.SMOKE_VARLEN_SHAPES]
    return [
        pytest.param(shape, dtype, dist, impl, id=f"{dtype}-{shape.label}-{dist.name}-{impl}", marks=mark)
        for shape, dtype, mark in sizes
        for dist in shapes.LENGTH_DISTRIBUTIONS
        for impl in VARLEN_IMPLS
    ]


def _run(benchmark, bench_run, kind, shape, dtype, impl, lengths=None):
    if bench_run.quick and dtype != "bf16":
        pytest.skip("--bench-quick: bf16 only")
    models = bench_run.model_bench
    name = f"{models.label}-{kind}" + ("" if lengths is None else "-varlen")
    benchmark.group = f"{name} {dtype} {shape.label}" + ("" if lengths is None else f" {lengths.name}")
    identity = dict(name=name, impl=impl, dtype=dtype, batch=shape.batch, seq=shape.seq)
    if lengths is not None:
        identity["lengths"] = lengths.name
    build = {"fwd": models.forward_case, "train": models.train_case}.get(kind)
    if build is None:  # "<task>-train": the task model's training step
        build = functools.partial(models.task_train_case, kind.removesuffix("-train"))
    row, reason = bench_run.run(identity, lambda: build(impl, dtype, shape, lengths=lengths), benchmark)
    if row is None:
        pytest.skip(reason)
    assert row["median_ms"] > 0 and row["tflops"] > 0
    assert 0 < row["fill"] <= 1 and row["tokens_per_s"] > 0
    return row


def _check_forward(row, dtype):
    assert row["max_error"] == row["max_error"], "the output is not finite"
    if dtype == "fp32":
        assert row["max_error"] < FP32_MAX_ERROR


# The whole-model compile of the patched model is timed on a GPU only (tracing it is the slowest smoke case).
SMOKE_DROP_IN_IMPLS = tuple(impl for impl in DROP_IN_IMPLS if impl != "hf-sdpa-patched-compile")
FORWARD_PARAMS = _params(
    [
        (
            MODEL_IMPLS,
            shapes.FORWARD_SHAPES,
            shapes.GPU_DTYPES,
            MODEL_IMPLS,
            shapes.SMOKE_FORWARD_SHAPES,
            shapes.SMOKE_DTYPES,
        ),
        (
            DROP_IN_IMPLS,
            shapes.FORWARD_SHAPES,
            shapes.DROP_IN_DTYPES,
            SMOKE_DROP_IN_IMPLS,
            shapes.SMOKE_FORWARD_SHAPES,
            shapes.SMOKE_DTYPES,
        ),
    ]
)
TRAIN_PARAMS = _params(
    [
        (
            MODEL_IMPLS,
            shapes.TRAIN_SHAPES,
            shapes.TRAIN_DTYPES,
            MODEL_IMPLS,
            shapes.SMOKE_TRAIN_SHAPES,
            shapes.SMOKE_DTYPES,
        ),
        (
            AMP_IMPLS,
            shapes.TRAIN_SHAPES,
            shapes.AMP_DTYPES,
            AMP_IMPLS,
            shapes.SMOKE_TRAIN_SHAPES,
            shapes.SMOKE_AMP_DTYPES,
        ),
    ]
)
TASK_PARAMS = _params(
    [
        (
            TASK_IMPLS,
            shapes.TRAIN_SHAPES,
            shapes.TRAIN_DTYPES,
            TASK_IMPLS,
            shapes.SMOKE_TRAIN_SHAPES,
            shapes.SMOKE_DTYPES,
        ),
        (
            TASK_AMP_IMPLS,
            shapes.TRAIN_SHAPES,
            shapes.AMP_DTYPES,
            TASK_AMP_IMPLS,
            shapes.SMOKE_TRAIN_SHAPES,
            shapes.SMOKE_AMP_DTYPES,
        ),
    ]
)
VARLEN_PARAMS = _varlen_params()


def _fp8_params():
    """FP8 beside the bf16 default and Hugging Face; the padded 32x128 bf16 rows are test_forward's already."""
    params = []
    for chosen, mark, dtype in ((shapes.FP8_SHAPES, GPU_ONLY, "bf16"), (shapes.SMOKE_FP8_SHAPES, SMOKE_ONLY, "fp32")):
        standard = set(shapes.FORWARD_SHAPES) if mark is GPU_ONLY else set()
        for shape, lengths in chosen:
            for impl in FP8_IMPLS:
                if impl != FP8_IMPL and lengths is None and shape in standard:
                    continue
                row_dtype = FP8_ROW_DTYPE if impl == FP8_IMPL else dtype
                where = shape.label + ("" if lengths is None else f"-{lengths.name}")
                params.append(
                    pytest.param(shape, row_dtype, lengths, impl, id=f"{row_dtype}-{where}-{impl}", marks=mark)
                )
    return params


FP8_PARAMS = _fp8_params()


@pytest.mark.parametrize("shape, dtype, impl", FORWARD_PARAMS)
def test_forward(benchmark, bench_run, shape, dtype, impl):
    row = _run(benchmark, bench_run, "fwd", shape, dtype, impl)
    _check_forward(row, dtype)


@pytest.mark.parametrize("shape, dtype, impl", TRAIN_PARAMS)
def test_train_step(benchmark, bench_run, shape, dtype, impl):
    row = _run(benchmark, bench_run, "train", shape, dtype, impl)
    assert row["peak_mem_mb"] is None or row["peak_mem_mb"] > 0


@pytest.mark.parametrize("task", ("mlm", "cls"))
@pytest.mark.parametrize("shape, dtype, impl", TASK_PARAMS)
def test_task_train_step(benchmark, bench_run, shape, dtype, impl, task):
    """Masked-LM pre-training and a sequence-classification fine-tuning step: bertfast.TrainStep (captured on
    a GPU), the eager step and Hugging Face sdpa, pure low precision and AMP."""
    row = _run(benchmark, bench_run, f"{task}-train", shape, dtype, impl)
    assert row["peak_mem_mb"] is None or row["peak_mem_mb"] > 0


@pytest.mark.parametrize("shape, dtype, lengths, impl", VARLEN_PARAMS)
def test_forward_varlen(benchmark, bench_run, shape, dtype, lengths, impl):
    row = _run(benchmark, bench_run, "fwd", shape, dtype, impl, lengths)
    assert row["lengths"] == lengths.name
    _check_forward(row, dtype)


@pytest.mark.parametrize("shape, dtype, lengths, impl", VARLEN_PARAMS)
def test_train_step_varlen(benchmark, bench_run, shape, dtype, lengths, impl):
    row = _run(benchmark, bench_run, "train", shape, dtype, impl, lengths)
    assert row["lengths"] == lengths.name


@pytest.mark.parametrize("shape, dtype, lengths, impl", FP8_PARAMS)
def test_forward_fp8(benchmark, bench_run, shape, dtype, lengths, impl):
    """FP8 inference rows; where FP8 cannot run the case is skipped with bertfast.fp8.unsupported's reason."""
    row = _run(benchmark, bench_run, "fwd", shape, dtype, impl, lengths)
    assert row["dtype"] == dtype and row.get("lengths") == (None if lengths is None else lengths.name)
    if impl == FP8_IMPL:
        assert "e4m3" in row["note"]
    else:
        _check_forward(row, dtype)
