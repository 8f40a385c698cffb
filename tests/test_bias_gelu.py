"""The Triton bias + GELU (kernels/bias_gelu.py) against the float64 reference.

Runs on a GPU when there is one, else in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bertfast.kernels import bias_gelu  # noqa: E402

import bertfast.ops as ops  # noqa: E402
from bertfast import BackendUnavailable  # noqa: E402
from bertfast.numerics import assert_close  # noqa: E402
from bertfast.ops import reference  # noqa: E402

from .ext_harness import CASE_IDS as EXT_CASE_IDS  # noqa: E402
from .ext_harness import CASES as EXT_CASES  # noqa: E402
from .ext_harness import C, check_op, ext, ext_ready, make_inputs  # noqa: E402, F401 (ext_ready: a fixture)
from .helpers import assert_fp8_close, assert_fp8_equal  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"

LOWP_DTYPES = [
    torch.float16,
    torch.bfloat16,  # no tl.dot in these kernels: bf16 runs in Triton's interpreter too
]


def _poison_allocator() -> None:
    """On a GPU, fill the caching allocator's free blocks with NaN so unwritten outputs fail."""
    if DEVICE == "cuda":
        blocks = [torch.full((1 << 24,), float("nan"), device=DEVICE)]
        blocks += [torch.full((1 << 16,), float("nan"), device=DEVICE) for _ in range(32)]
        del blocks


def _make_inputs(shape, dtype, seed=0):
    """Seeded ``x``, ``bias`` (requiring grad) and ``dy``; ``h`` spans GELU's curved part and tails."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2.0).to(device=DEVICE, dtype=dtype)
    bias = (torch.randn(shape[-1], generator=gen, dtype=torch.float64) * 0.5).to(device=DEVICE, dtype=dtype)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(), bias.requires_grad_(), dy


def _run(fn, x, bias, dy, cast=None):
    """Forward and backward of ``fn``; returns ``(y, dx, dbias)``."""
    # detach() keeps the strides of a strided view (clone() might not).
    x = (x.detach().to(cast) if cast is not None else x.detach()).requires_grad_()
    bias = (bias.detach().to(cast) if cast is not None else bias.detach()).requires_grad_()
    y = fn(x, bias)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, bias.grad


def _torch_lowp(x, bias):
    """PyTorch's own bias + GELU run entirely at the input's low precision."""
    return F.gelu(x + bias)


def _check_against_reference(x, bias, dy):
    _poison_allocator()
    y, dx, dbias = _run(bias_gelu.bias_gelu, x, bias, dy)
    y64, dx64, dbias64 = _run(reference.bias_gelu, x, bias, dy, cast=torch.float64)
    lowp = (None, None, None)
    if x.dtype != torch.float32:
        lowp = _run(_torch_lowp, x, bias, dy)

    assert y.dtype == dx.dtype == x.dtype and dbias.dtype == bias.dtype
    assert y.shape == dx.shape == x.shape and dbias.shape == bias.shape
    assert_close(y, y64, torch_lowp=lowp[0], name="y")
    assert_close(dx, dx64, direction="backward", torch_lowp=lowp[1], name="dx")
    assert_close(dbias, dbias64, direction="backward", torch_lowp=lowp[2], name="dbias")


SHAPES = [(33, 1000), (7, 1024), (1, 37), (33, 37), (2, 3, 1024), (3, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64_reference(shape):
    _check_against_reference(*_make_inputs(shape, torch.float32))


@pytest.mark.parametrize("dtype", LOWP_DTYPES)
@pytest.mark.parametrize("shape", [(33, 1000), (2, 3, 37)])
def test_low_precision_within_twice_pytorch_error(dtype, shape):
    _check_against_reference(*_make_inputs(shape, dtype, seed=1))


def test_strided_inputs_and_gradient():
    """A row-strided slice of a wider buffer, then leading dims that cannot be flattened; strided dy."""
    _, bias, _ = _make_inputs((1000,), torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 1100, generator=gen).to(DEVICE)[..., 50:1050]
    dy = torch.randn(5, 3, 2000, generator=gen).to(DEVICE)[..., ::2]
    assert not x.is_contiguous() and dy.stride(-1) == 2
    _check_against_reference(x, bias, dy)
    transposed = torch.randn(3, 5, 1000, generator=gen).to(DEVICE).transpose(0, 1)
    _check_against_reference(transposed, bias, dy)


def test_gpu_launch_configs(monkeypatch):
    """The GPU tile shapes (wide tiles, 128-row strips) give the same answer."""
    monkeypatch.setattr(
        bias_gelu, "_config_for", lambda t, n_cols, direction: bias_gelu.launch_config(n_cols, direction, gpu=True)
    )
    config = bias_gelu.launch_config(1000, "backward", gpu=True)
    assert config.rows_per_program % config.block_m == 0 and config.rows_per_program < 130
    _check_against_reference(*_make_inputs((130, 1000), torch.float32, seed=4))


def test_bias_gradient_is_deterministic():
    x, bias, dy = _make_inputs((45, 300), torch.float32, seed=5)
    first = _run(bias_gelu.bias_gelu, x, bias, dy)
    second = _run(bias_gelu.bias_gelu, x, bias, dy)
    for name, a, b in zip(("y", "dx", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_empty_batch():
    x, bias, dy = _make_inputs((0, 64), torch.float32)
    y, dx, dbias = _run(bias_gelu.bias_gelu, x, bias, dy)
    assert y.shape == dx.shape == (0, 64)
    assert torch.equal(dbias, torch.zeros(64, device=DEVICE))


def test_opcheck_forward():
    x, bias, _ = _make_inputs((2, 3, 16), torch.float32)
    torch.library.opcheck(torch.ops.bertfast.bias_gelu_fwd.default, (x, bias))


def test_opcheck_backward():
    x, bias, dy = _make_inputs((2, 3, 16), torch.float32)
    torch.library.opcheck(torch.ops.bertfast.bias_gelu_bwd.default, (dy, x.detach(), bias.detach()))


def test_torch_compile_traces_without_graph_breaks():
    x, bias, dy = _make_inputs((3, 5, 48), torch.float32, seed=7)

    def step(x, bias):
        # Ops around the kernel, so the graph is more than the one custom op.
        return bias_gelu.bias_gelu(x * 0.5, bias) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(_run(step, x, bias, dy), _run(compiled, x, bias, dy)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_public_api_on_triton_backend():
    x, bias, dy = _make_inputs((4, 9, 1000), torch.float32, seed=8)
    y, dx, dbias = _run(lambda x, bias: ops.bias_gelu(x, bias, backend="triton"), x, bias, dy)
    y64, dx64, dbias64 = _run(reference.bias_gelu, x, bias, dy, cast=torch.float64)
    assert_close(y, y64, name="y")
    assert_close(dx, dx64, direction="backward", name="dx")
    assert_close(dbias, dbias64, direction="backward", name="dbias")


def test_unsupported_explains_why():
    x = torch.empty(2, 64, device=DEVICE)
    assert bias_gelu.unsupported(x, x[0]) is None
    assert "float64" in bias_gelu.unsupported(x.double(), x[0].double())
    with pytest.raises(BackendUnavailable, match="float64"):
        ops.bias_gelu(x.double(), x[0].double(), backend="triton")


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        bias_gelu.bias_gelu(x, x[0, :32])
    with pytest.raises(TypeError, match="float64"):
        bias_gelu.bias_gelu(x.double(), x[0].double())


def test_bias_in_its_own_dtype():
    """An fp32 bias with fp16 activations (autocast's layout) is read as is: fp16 output, fp32 bias gradient."""
    x = torch.randn(3, 64, device=DEVICE).half().requires_grad_(True)
    bias = torch.randn(64, device=DEVICE, requires_grad=True)
    y = bias_gelu.bias_gelu(x, bias)
    expected = F.gelu(x.detach().float() + bias.detach())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)
    y.float().sum().backward()
    assert bias.grad.dtype == torch.float32 and x.grad.dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# The FP8 output (inference): bias_gelu_fp8's q and scale against the reference
# ------------------------------------------------------------------------------------------------

# Against the reference, q may differ by one e4m3 step where the kernel's fp32 erf and PyTorch's differ
# by an ulp across a rounding midpoint (about 2 ulp / 2^-4 ~ 1e-6 of the elements): 1 in 1000 leaves
# room and still catches a real error.  Against the kernel's own fp32 GELU there is no tolerance.
FP8_MAX_FLIPPED = 1e-3


def _check_fp8(x, bias):
    """q and scale exactly the contract applied to the plain kernel's fp32 GELU of the same inputs (the same
    expression, elementwise), and within ``FP8_MAX_FLIPPED`` of the reference's."""
    x, bias = x.detach(), bias.detach()
    _poison_allocator()
    q, scale = bias_gelu.bias_gelu_fp8(x, bias)
    assert q.shape == x.shape and scale.shape == (*x.shape[:-1], 1)
    with torch.no_grad():
        gelu32 = bias_gelu.bias_gelu(x.float(), bias.float())
    assert_fp8_equal(q, scale, *reference._quantize_rows_fp32(gelu32), name="q from the kernel's fp32 gelu")
    q_ref, scale_ref = (t.to(x.device) for t in reference.bias_gelu_fp8(x.cpu(), bias.cpu()))
    assert_fp8_close(q, scale, q_ref, scale_ref, max_flipped=FP8_MAX_FLIPPED, name="q against the reference")


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP_DTYPES], ids=str)
@pytest.mark.parametrize("shape", [(1, 37), (7, 1536), (33, 1000), (2, 3, 1024), (3, 4096)], ids=str)
def test_fp8_output_matches_reference(shape, dtype):
    _check_fp8(*_make_inputs(shape, dtype, seed=sum(shape))[:2])


def test_fp8_edge_rows():
    """A row whose GELU is 0 (scale 1), a 1e4x outlier (the rest in e4m3's subnormals and 0), a row of
    GELU's negative tail (values near its minimum -0.17), an fp32 bias with bf16 activations."""
    x, bias, _ = _make_inputs((5, 1000), torch.bfloat16, seed=9)
    x, bias = x.detach(), bias.detach().float()
    bias[:] = 0.0
    x[0] = 0.0
    x[1, 700] = 1e4
    x[2] = -0.75 + 0.01 * x[2]
    _check_fp8(x, bias)
    q, scale = bias_gelu.bias_gelu_fp8(x, bias)
    assert scale[0].item() == 1.0 and not q[0].float().any()
    outlier = q[1].view(torch.uint8) & 0x7F
    assert ((outlier > 0) & (outlier < 8)).sum() > 20 and (outlier == 0).sum() > 20


def test_fp8_strided_inputs_and_gpu_tiles(monkeypatch):
    _, bias, _ = _make_inputs((1000,), torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 1100, generator=gen).to(DEVICE)[..., 50:1050]
    transposed = torch.randn(3, 5, 1000, generator=gen).to(DEVICE).transpose(0, 1)
    for strided in (x, transposed):
        _check_fp8(strided, bias)
    monkeypatch.setattr(
        bias_gelu, "_fp8_config_for", lambda t, n_rows, n_cols: bias_gelu.row_launch(n_rows, n_cols, gpu=True)
    )
    _check_fp8(x, bias)
    _check_fp8(*_make_inputs((33, 37), torch.float32, seed=4)[:2])


def test_fp8_empty_batch_opcheck_and_compile():
    q, scale = bias_gelu.bias_gelu_fp8(torch.empty(0, 64, device=DEVICE), torch.zeros(64, device=DEVICE))
    assert q.shape == (0, 64) and scale.shape == (0, 1)
    x, bias, _ = _make_inputs((2, 3, 16), torch.float32)
    torch.library.opcheck(torch.ops.bertfast.bias_gelu_fp8.default, (x.detach(), bias.detach()))

    def step(x, bias):
        return bias_gelu.bias_gelu_fp8(x * 0.5, bias)

    x, bias = x.detach(), bias.detach()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, bias)
    assert_fp8_equal(*compiled, *step(x, bias), name="compiled")


def test_fp8_inference_only_public_api_and_errors():
    x, bias, _ = _make_inputs((4, 9, 1000), torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="inference-only"):
        bias_gelu.bias_gelu_fp8(x, bias)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.bias_gelu_fp8(x, bias, backend="triton")
    with torch.no_grad():
        q, scale = ops.bias_gelu_fp8(x, bias, backend="triton")
        q_ref, scale_ref = ops.bias_gelu_fp8(x.cpu(), bias.cpu(), backend="reference")
    assert_fp8_close(q, scale, q_ref.to(DEVICE), scale_ref.to(DEVICE), max_flipped=FP8_MAX_FLIPPED)
    x, bias = x.detach(), bias.detach()
    reasons = ops.explain("bias_gelu_fp8", x, bias)
    assert reasons["triton"] is None and reasons["ext"] is not None
    assert "4096" in bias_gelu.unsupported_fp8(torch.empty(2, 4097, device=DEVICE), torch.empty(4097, device=DEVICE))
    with pytest.raises(BackendUnavailable, match="4096"):
        ops.bias_gelu_fp8(torch.randn(2, 4097, device=DEVICE), torch.randn(4097, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(1000,\)"):
        bias_gelu.bias_gelu_fp8(x, bias[:10])
    with pytest.raises(TypeError, match="float64"):
        bias_gelu.bias_gelu_fp8(x.double(), bias.double())


# ------------------------------------------------------------------------------------------------
# The extension's kernels (backend "ext", bertfast._C): against the float64 reference, every gradient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), EXT_CASES, ids=EXT_CASE_IDS)
@pytest.mark.parametrize("shape", [(1, 1000), (7, 1024), (3, 11, 37)], ids=str)
@pytest.mark.usefixtures("ext_ready")
def test_ext_bias_gelu_matches_float64_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    floats = make_inputs({"x": shape, "bias": (shape[-1],)}, gen, {"x": 2.0})
    check_op(
        ext.bias_gelu,
        reference.bias_gelu,
        lambda x, bias: F.gelu(x + bias),
        floats,
        {},
        device,
        dtype,
        gen,
        "bias_gelu",
    )
