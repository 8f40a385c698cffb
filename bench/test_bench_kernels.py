"""Kernel level: every op on every bertfast backend against PyTorch on the same device.

GPU: BERT-large sizes (16384 tokens x hidden 1024 / FFN 4096; attention 32 x 128 and
8 x 512 with 16 heads x 64), bf16 and fp16, forward and backward.  Without a GPU (or with
--benchmark-disable): one tiny odd size in fp32, each case run once.  What each impl is:
bench/kernels.py.
"""

import pytest

from bench.kernels import DIRECTIONS, KERNEL_IMPLS, kernel_case, kernel_shapes
from bertfast.benchmarking import shapes

# Which of the two runs (bench/conftest.py decides: smoke without a GPU or with --benchmark-disable).
GPU_ONLY = pytest.mark.bench_size("full")
SMOKE_ONLY = pytest.mark.bench_size("smoke")
# In float32 at these sizes a correct op is within ~1e-6 of float64; a real bug is far above this.
# (tests/ hold the precise numerics policy; bf16/fp16 errors are reported, not judged, here.)
FP32_MAX_ERROR = 1e-4


def _cases():
    for op, impls in KERNEL_IMPLS.items():
        sizes = [(s, dtype, GPU_ONLY) for s in kernel_shapes(op, smoke=False) for dtype in shapes.GPU_DTYPES]
        sizes += [(s, dtype, SMOKE_ONLY) for s in kernel_shapes(op, smoke=True) for dtype in shapes.SMOKE_DTYPES]
        for shape, dtype, mark in sizes:
            for direction in DIRECTIONS:
                for impl in impls:
                    case_id = f"{op}-{direction}-{dtype}-{shape.label}-{impl}"
                    yield pytest.param(op, impl, dtype, shape, direction, id=case_id, marks=mark)


@pytest.mark.parametrize("op, impl, dtype, shape, direction", list(_cases()))
def test_kernel(benchmark, bench_run, op, impl, dtype, shape, direction):
    if bench_run.quick and dtype != "bf16":
        pytest.skip("--bench-quick: bf16 only")
    benchmark.group = f"{op}-{direction} {dtype} {shape.label}"
    identity = dict(name=f"{op}-{direction}", impl=impl, dtype=dtype, batch=shape.batch, seq=shape.seq)
    device, smoke = bench_run.device, bench_run.smoke
    row, reason = bench_run.run(
        identity, lambda: kernel_case(op, impl, dtype, shape, direction, device, smoke=smoke), benchmark
    )
    if row is None:
        pytest.skip(reason)
    assert row["median_ms"] > 0
    assert row["max_error"] is not None and row["max_error"] == row["max_error"], "the output is not finite"
    if dtype == "fp32":
        assert row["max_error"] < FP32_MAX_ERROR
