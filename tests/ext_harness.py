"""The extension's test harness (backend "ext", bertfast._C): the (device, dtype) cases, seeded inputs,
and :func:`check_op`, which compares an op's output and every gradient with the float64 reference under
:mod:`bertfast.numerics`.  Each op's tests live in its own file (tests/test_<op>.py), beside the other
backends' tests of that op; tests/test_ext_ops.py keeps what concerns the extension as a whole."""

from __future__ import annotations

import functools

import pytest
import torch

from bertfast import _ext
from bertfast.numerics import assert_close

C = _ext.extension()
if C is not None:
    from bertfast.ops import ext_backend as ext
else:  # the tests skip (ext_ready); the name stays importable
    ext = None

GPU = C is not None and C.has_cuda() and torch.cuda.is_available()
LOWP = (torch.float16, torch.bfloat16)

# (device, dtype) pairs every op is checked on.
CASES = [
    ("cpu", torch.float32),
    ("cpu", torch.float64),
    ("cpu", torch.float16),
    ("cpu", torch.bfloat16),
    *[
        pytest.param("cuda", dtype, marks=pytest.mark.skipif(not GPU, reason="needs a GPU and the CUDA kernels"))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ],
]
CASE_IDS = ["cpu-fp32", "cpu-fp64", "cpu-fp16", "cpu-bf16", "cuda-fp32", "cuda-fp16", "cuda-bf16"]


def make_inputs(shapes: dict, gen: torch.Generator, scales: dict | None = None) -> dict:
    """Seeded float64 inputs on the CPU, one per name."""
    scales = scales or {}
    return {
        name: torch.randn(*shape, generator=gen, dtype=torch.float64) * scales.get(name, 1.0)
        for name, shape in shapes.items()
    }


def check_op(ext_fn, ref_fn, torch_fn, floats: dict, fixed: dict, device: str, dtype, gen, name: str):
    """Runs ext_fn on (device, dtype) copies of ``floats`` and compares output and every gradient
    with ref_fn on float64 copies of the same rounded values; at fp16/bf16 against torch_fn's error
    at that precision.  ``fixed`` (ids, masks, scalars) is passed as is (tensors moved to ``device``)."""
    fixed_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fixed.items()}
    rounded = {k: v.to(dtype) for k, v in floats.items()}

    def leaves(target_device, target_dtype):
        return {k: v.to(target_device, target_dtype).requires_grad_() for k, v in rounded.items()}

    ext_in = leaves(device, dtype)
    out = ext_fn(**ext_in, **fixed_dev)
    ref_in = leaves("cpu", torch.float64)
    ref = ref_fn(**ref_in, **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fixed_dev.items()})
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ext_grads = torch.autograd.grad(out, list(ext_in.values()), grad.to(device, dtype))
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()), grad)

    lowp_out, lowp_grads = None, [None] * len(ext_in)
    if dtype in LOWP:
        lowp_in = leaves(device, dtype)
        lowp_out = torch_fn(**lowp_in, **fixed_dev)
        lowp_grads = [g.cpu() for g in torch.autograd.grad(lowp_out, list(lowp_in.values()), grad.to(device, dtype))]
        lowp_out = lowp_out.detach().cpu()

    assert out.dtype == dtype and out.device.type == device
    assert_close(out.detach().cpu(), ref, torch_lowp=lowp_out, name=f"{name} output")
    for key, got, want, lowp in zip(ext_in, ext_grads, ref_grads, lowp_grads):
        assert got is not None, f"{name}: no gradient for {key}"
        assert_close(got.cpu(), want, direction="backward", torch_lowp=lowp, name=f"{name} d{key}")
    return out


@functools.cache
def _extension_error_crash() -> str | None:
    """Probed once per session: what happens instead of RuntimeError when the extension raises, or None."""
    return _ext.errors_reach_python()


# Tests that run without the extension: they check that it is built, or that its absence is reported.
RUN_WITHOUT_EXTENSION = ("test_extension_is_built", "test_missing_extension_is_reported")


@pytest.fixture
def ext_ready(request):
    """What every test of the extension needs: the extension (skip without it, except the tests of its
    absence; under ``CI``, which builds it, test_extension_is_built fails instead); a test that makes it
    raise first checks in a child process that its errors reach Python (where they kill the process
    instead, as seen on a GPU machine, the test fails with that reason, not a crash); on a GPU the caching
    allocator's free memory filled with NaN, so an unwritten output element fails."""
    if C is None and request.node.originalname not in RUN_WITHOUT_EXTENSION:
        pytest.skip(f"bertfast._C is not built: {_ext.unavailable_reason()}")
    if C is not None and request.node.get_closest_marker("ext_raises") and _extension_error_crash():
        pytest.fail(_extension_error_crash())
    if GPU:
        torch.empty(64 << 20, device="cuda").fill_(float("nan"))
    yield
