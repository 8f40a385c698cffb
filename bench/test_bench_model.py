"""Model level: BERT-large forward and a training step, bertfast against Hugging Face.

GPU: forward at batch x seq 1x128, 32x128, 128x128, 8x512, 32x512 in bf16 and fp16; a
training step (forward, backward, AdamW) at 32x128 and 8x512 in bf16.  Without a GPU (or
with --benchmark-disable): a 2-layer BERT at 2 x 13 in fp32, each case run once.
Implementations: bertfast/benchmarking/models.py.
"""

import pytest

from bertfast.benchmarking import shapes
from bertfast.benchmarking.models import MODEL_IMPLS

# Which of the two runs (bench/conftest.py decides: smoke without a GPU or with --benchmark-disable).
GPU_ONLY = pytest.mark.bench_size("full")
SMOKE_ONLY = pytest.mark.bench_size("smoke")
# In float32 every implementation computes the same function; a real bug is far above this.
# (tests/ hold the precise numerics policy; bf16/fp16 errors are reported, not judged, here.)
FP32_MAX_ERROR = 1e-4


def _params(gpu_shapes, gpu_dtypes, smoke_shapes):
    sizes = [(shape, dtype, GPU_ONLY) for dtype in gpu_dtypes for shape in gpu_shapes]
    sizes += [(shape, dtype, SMOKE_ONLY) for dtype in shapes.SMOKE_DTYPES for shape in smoke_shapes]
    return [
        pytest.param(shape, dtype, impl, id=f"{dtype}-{shape.label}-{impl}", marks=mark)
        for shape, dtype, mark in sizes
        for impl in MODEL_IMPLS
    ]


def _run(benchmark, bench_run, kind, shape, dtype, impl):
    if bench_run.quick and dtype != "bf16":
        pytest.skip("--bench-quick: bf16 only")
    models = bench_run.model_bench
    benchmark.group = f"{models.label}-{kind} {dtype} {shape.label}"
    identity = dict(name=f"{models.label}-{kind}", impl=impl, dtype=dtype, batch=shape.batch, seq=shape.seq)
    build = models.forward_case if kind == "fwd" else models.train_case
    row, reason = bench_run.run(identity, lambda: build(impl, dtype, shape), benchmark)
    if row is None:
        pytest.skip(reason)
    assert row["median_ms"] > 0 and row["tflops"] > 0
    return row


FORWARD_PARAMS = _params(shapes.FORWARD_SHAPES, shapes.GPU_DTYPES, shapes.SMOKE_FORWARD_SHAPES)
TRAIN_PARAMS = _params(shapes.TRAIN_SHAPES, shapes.TRAIN_DTYPES, shapes.SMOKE_TRAIN_SHAPES)


@pytest.mark.parametrize("shape, dtype, impl", FORWARD_PARAMS)
def test_forward(benchmark, bench_run, shape, dtype, impl):
    row = _run(benchmark, bench_run, "fwd", shape, dtype, impl)
    assert row["max_error"] == row["max_error"], "the output is not finite"
    if dtype == "fp32":
        assert row["max_error"] < FP32_MAX_ERROR


@pytest.mark.parametrize("shape, dtype, impl", TRAIN_PARAMS)
def test_train_step(benchmark, bench_run, shape, dtype, impl):
    _run(benchmark, bench_run, "train", shape, dtype, impl)
