"""The Triton LayerNorm (kernels/layer_norm.py) against the float64 reference.

Runs on a GPU when there is one, else in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bertfast.kernels import layer_norm  # noqa: E402

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
GRAD_NAMES = ("x", "residual", "linear_bias", "weight", "bias")

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,  # no tl.dot in these kernels: bf16 runs in Triton's interpreter too
]


def _poison_allocator() -> None:
    """On a GPU, fill the caching allocator's free blocks with NaN so unwritten outputs fail."""
    if DEVICE == "cuda":
        blocks = [torch.full((1 << 24,), float("nan"), device=DEVICE)]
        blocks += [torch.full((1 << 16,), float("nan"), device=DEVICE) for _ in range(32)]
        del blocks


def _make_inputs(shape, dtype, *, residual: bool, linear_bias: bool, seed: int = 0, weight_dtype=None):
    """Seeded inputs (a mean offset tests the variance's stability), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    weight_dtype = weight_dtype or dtype

    def rand(*size, scale=1.0, offset=0.0, dt=dtype):
        t = torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset
        return t.to(device=DEVICE, dtype=dt).requires_grad_()

    inputs = {
        "x": rand(*shape, offset=2.0),
        "residual": rand(*shape) if residual else None,
        "linear_bias": rand(hidden, scale=0.5) if linear_bias else None,
        "weight": rand(hidden, scale=0.3, offset=1.0, dt=weight_dtype),
        "bias": rand(hidden, scale=0.2, dt=weight_dtype),
    }
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return inputs, dy


def _run(fn, inputs, dy, eps, cast=None):
    """Forward and backward of ``fn``; returns ``(y, {name: grad})`` for the given inputs."""
    leaves = {}
    for name, t in inputs.items():
        if t is not None:
            # detach() keeps the strides of a strided view (clone() might not).
            leaves[name] = (t.detach().to(cast) if cast is not None else t.detach()).requires_grad_()
    args = {name: leaves.get(name) for name in inputs}
    y = fn(args["x"], args["weight"], args["bias"], eps, args["residual"], args["linear_bias"])
    y.backward(dy.to(y.dtype))
    return y.detach(), {name: t.grad for name, t in leaves.items()}


def _torch_lowp(x, weight, bias, eps, residual=None, linear_bias=None):
    """PyTorch's own LayerNorm run entirely at the input's low precision."""
    h = x
    if linear_bias is not None:
        h = h + linear_bias
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), bias.to(h.dtype), eps)


def _check_against_reference(inputs, dy, eps):
    """The kernel's output and every gradient against float64 (and PyTorch's low-precision run)."""
    _poison_allocator()
    y, grads = _run(layer_norm.layer_norm, inputs, dy, eps)
    y64, grads64 = _run(reference.layer_norm, inputs, dy, eps, cast=torch.float64)
    lowp = inputs["x"].dtype != torch.float32
    y_lp, grads_lp = _run(_torch_lowp, inputs, dy, eps) if lowp else (None, {})

    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
    assert_close(y, y64, torch_lowp=y_lp, name="y")
    assert set(grads) == {name for name in GRAD_NAMES if inputs[name] is not None}
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads64[name], direction="backward", torch_lowp=grads_lp.get(name), name=f"d{name}")


CASES = [
    # (shape, residual, linear_bias)
    ((33, 1000), True, True),
    ((7, 1024), False, False),
    ((1, 37), True, False),
    ((33, 37), True, True),
    ((2, 3, 1024), False, True),
    ((3, 4096), True, True),
    ((1, 4096), False, True),
]


@pytest.mark.parametrize("shape,residual,linear_bias", CASES)
def test_fp32_matches_float64_reference(shape, residual, linear_bias):
    inputs, dy = _make_inputs(shape, torch.float32, residual=residual, linear_bias=linear_bias)
    _check_against_reference(inputs, dy, eps=1e-12)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("shape,residual,linear_bias", [((33, 1000), True, True), ((7, 37), False, False)])
def test_low_precision_within_twice_pytorch_error(dtype, shape, residual, linear_bias):
    inputs, dy = _make_inputs(shape, dtype, residual=residual, linear_bias=linear_bias, seed=1)
    _check_against_reference(inputs, dy, eps=1e-5)


def test_fp16_input_with_fp32_weights():
    """The autocast layout: activations in fp16, LayerNorm parameters kept in fp32."""
    inputs, dy = _make_inputs((33, 1000), torch.float16, residual=True, linear_bias=True, weight_dtype=torch.float32)
    _check_against_reference(inputs, dy, eps=1e-12)


def test_strided_inputs_and_gradient():
    """Row-strided views, leading dims that cannot be flattened, and a strided dy."""
    inputs, dy = _make_inputs((5, 3, 1000), torch.float32, residual=True, linear_bias=True, seed=2)
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 3, 1100, generator=gen).to(DEVICE)
    x = wide[..., 50:1050].requires_grad_()  # a slice of a wider buffer: row stride 1100
    transposed = torch.randn(3, 5, 1000, generator=gen).to(DEVICE).transpose(0, 1)  # not flattenable
    inputs = {**inputs, "x": x, "residual": transposed.requires_grad_()}
    dy = torch.randn(5, 3, 2000, generator=gen).to(DEVICE)[..., ::2]  # last dim not contiguous
    assert not x.is_contiguous() and not inputs["residual"].is_contiguous() and dy.stride(-1) == 2
    _check_against_reference(inputs, dy, eps=1e-12)


def test_gpu_launch_configs(monkeypatch):
    """The GPU tile shapes (one row per program, few groups, large multi-row tiles) give the same answer."""
    gpu_config = lambda t, n_rows, n_cols, direction: layer_norm.launch_config(  # noqa: E731
        n_rows, n_cols, direction, gpu=True, sm_count=1
    )
    monkeypatch.setattr(layer_norm, "_config_for", gpu_config)
    assert layer_norm.launch_config(33, 1000, "forward", gpu=True).rows == 1
    for n_rows, n_cols in ((33, 1000), (70, 37)):  # several groups of several tiles each
        config = layer_norm.launch_config(n_rows, n_cols, "backward", gpu=True, sm_count=1)
        assert config.num_groups == 2 and n_rows > 2 * config.rows
    for shape in ((33, 1000), (70, 37)):
        inputs, dy = _make_inputs(shape, torch.float32, residual=True, linear_bias=True, seed=4)
        _check_against_reference(inputs, dy, eps=1e-12)


def test_weight_gradients_are_deterministic():
    inputs, dy = _make_inputs((45, 300), torch.float32, residual=True, linear_bias=True, seed=5)
    first = _run(layer_norm.layer_norm, inputs, dy, 1e-12)[1]
    second = _run(layer_norm.layer_norm, inputs, dy, 1e-12)[1]
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), f"d{name} differs between two runs"


def test_residual_gradient_is_x_gradient():
    inputs, dy = _make_inputs((7, 64), torch.float32, residual=True, linear_bias=False, seed=6)
    grads = _run(layer_norm.layer_norm, inputs, dy, 1e-12)[1]
    assert torch.equal(grads["x"], grads["residual"])


def test_empty_batch():
    inputs, dy = _make_inputs((0, 64), torch.float32, residual=True, linear_bias=True)
    y, grads = _run(layer_norm.layer_norm, inputs, dy, 1e-12)
    assert y.shape == (0, 64)
    assert grads["x"].shape == (0, 64)
    for name in ("weight", "bias", "linear_bias"):
        assert torch.equal(grads[name], torch.zeros(64, device=DEVICE)), name


def test_statistics_are_fp32_per_row():
    inputs, _ = _make_inputs((2, 3, 100), torch.float16, residual=False, linear_bias=False)
    y, mean, rstd = torch.ops.bertfast.layer_norm_fwd(inputs["x"], inputs["weight"], inputs["bias"], 1e-5, None, None)
    h = inputs["x"].detach().double().reshape(6, 100)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (6,)
    torch.testing.assert_close(mean.double(), h.mean(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (h.var(dim=1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("residual,linear_bias", [(True, True), (False, False)])
def test_opcheck_forward(residual, linear_bias):
    inputs, _ = _make_inputs((2, 3, 16), torch.float32, residual=residual, linear_bias=linear_bias)
    args = (inputs["x"], inputs["weight"], inputs["bias"], 1e-5, inputs["residual"], inputs["linear_bias"])
    torch.library.opcheck(torch.ops.bertfast.layer_norm_fwd.default, args)


def test_opcheck_backward():
    inputs, dy = _make_inputs((2, 3, 16), torch.float32, residual=True, linear_bias=True)
    x, weight = inputs["x"].detach(), inputs["weight"].detach()
    _, mean, rstd = torch.ops.bertfast.layer_norm_fwd(x, weight, inputs["bias"].detach(), 1e-5, None, None)
    args = (dy, x, weight, mean, rstd, inputs["residual"].detach(), inputs["linear_bias"].detach())
    torch.library.opcheck(torch.ops.bertfast.layer_norm_bwd.default, args)


def test_torch_compile_traces_without_graph_breaks():
    inputs, dy = _make_inputs((3, 5, 48), torch.float32, residual=True, linear_bias=True, seed=7)

    def step(x, weight, bias, eps, residual, linear_bias):
        # Ops around the kernel, so the graph is more than the one custom op.
        return layer_norm.layer_norm(x * 2.0, weight, bias, eps, residual, linear_bias).relu()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y_eager, grads_eager = _run(step, inputs, dy, 1e-12)
    y_compiled, grads_compiled = _run(compiled, inputs, dy, 1e-12)
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=0, atol=0)


def test_public_api_on_triton_backend():
    inputs, dy = _make_inputs((4, 9, 1000), torch.float32, residual=True, linear_bias=True, seed=8)

    def public(x, weight, bias, eps, residual, linear_bias):
        return ops.layer_norm(x, weight, bias, eps, residual=residual, linear_bias=linear_bias, backend="triton")

    y, grads = _run(public, inputs, dy, 1e-12)
    y64, grads64 = _run(reference.layer_norm, inputs, dy, 1e-12, cast=torch.float64)
    assert_close(y, y64, name="y")
    for name in GRAD_NAMES:
        assert_close(grads[name], grads64[name], direction="backward", name=f"d{name}")


def test_unsupported_explains_why():
    hidden = torch.empty(2, 64, device=DEVICE)
    assert layer_norm.unsupported(hidden) is None
    assert layer_norm.unsupported(torch.empty(2, 4096, device=DEVICE)) is None
    assert "4096" in layer_norm.unsupported(torch.empty(2, 4097, device=DEVICE))
    assert "float64" in layer_norm.unsupported(hidden.double())
    weight = torch.ones(4097, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="4096"):
        ops.layer_norm(torch.randn(2, 4097, device=DEVICE), weight, weight, backend="triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        ops.layer_norm(hidden.double(), weight[:64].double(), weight[:64].double(), backend="triton")


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm.layer_norm(x, weight[:32], weight, 1e-5)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        layer_norm.layer_norm(x, weight, weight[:32], 1e-5)
    with pytest.raises(ValueError, match=r"linear_bias must have shape \(64,\)"):
        layer_norm.layer_norm(x, weight, weight, 1e-5, linear_bias=weight[:63])
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        layer_norm.layer_norm(x, weight, weight, 1e-5, residual=x.half())
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm.layer_norm(x, weight, weight, 1e-5, residual=x[:2])
    with pytest.raises(TypeError, match="float64"):
        layer_norm.layer_norm(x.double(), weight, weight, 1e-5)
    with pytest.raises(ValueError, match="eps must be positive"):
        layer_norm.layer_norm(x, weight, weight, 0.0)


# ------------------------------------------------------------------------------------------------
# The FP8 output (inference): layer_norm_fp8's y, q and scale against the reference
# ------------------------------------------------------------------------------------------------

FP8_CASES = [
    # (shape, residual, linear_bias)
    ((33, 1000), True, True),
    ((7, 1024), False, False),
    ((1, 37), True, False),
    ((2, 3, 384), False, True),
    ((3, 4096), True, True),
]
# q may differ from the reference's by one e4m3 step where the kernel's fp32 LayerNorm (its own summation
# order for the mean and variance) and PyTorch's differ by a few ulps across a rounding midpoint: a
# relative difference d flips a value with probability about 2 d / 2^-4 (e4m3's relative step is 2^-3
# to 2^-4), ~1e-5 for d ~ 4 ulps.  1 in 1000 leaves room for unlucky draws and catches a real error,
# which moves far more codes, or moves one by two steps.
FP8_MAX_FLIPPED = 1e-3


def _fp8_args(inputs):
    return (inputs["x"], inputs["weight"], inputs["bias"]), dict(
        residual=inputs["residual"], linear_bias=inputs["linear_bias"]
    )


def _reference_fp8(inputs, eps):
    """The contract computed on the CPU, as the reference defines it (then moved to the kernel's device)."""
    cpu = {name: t.detach().cpu() if t is not None else None for name, t in inputs.items()}
    args, kwargs = _fp8_args(cpu)
    return tuple(t.to(DEVICE) for t in reference.layer_norm_fp8(*args, eps, **kwargs))


def _check_fp8(inputs, eps, max_flipped=FP8_MAX_FLIPPED):
    """y as the plain kernel's, q and scale exactly the contract applied to the kernel's own fp32 result
    (where that is at hand), and within ``max_flipped`` of the reference's."""
    inputs = {name: t.detach() if t is not None else None for name, t in inputs.items()}
    args, kwargs = _fp8_args(inputs)
    _poison_allocator()
    y, q, scale = layer_norm.layer_norm_fp8(*args, eps, **kwargs)
    y_ref, q_ref, scale_ref = _reference_fp8(inputs, eps)
    x = inputs["x"]
    assert y.dtype == x.dtype and y.shape == x.shape and q.shape == x.shape and scale.shape == (*x.shape[:-1], 1)
    # y: the plain kernel's, bit for bit (tested against float64 above)
    assert torch.equal(y, layer_norm.layer_norm(*args, eps, **kwargs)), "QUANTIZE changed y"
    if x.dtype == torch.float32:  # y is the fp32 result that was quantized
        assert_fp8_equal(q, scale, *reference._quantize_rows_fp32(y), name="q from y")
    elif INTERPRETING:  # the same tiles and sums in fp32: the plain kernel's fp32 result, bit for bit
        y32 = layer_norm.layer_norm(*(t.float() for t in args), eps, **{
            k: v.float() if v is not None else None for k, v in kwargs.items()
        })  # fmt: skip
        assert_fp8_equal(q, scale, *reference._quantize_rows_fp32(y32), name="q from fp32 y")
    assert_fp8_close(q, scale, q_ref, scale_ref, max_flipped=max_flipped, name="q against the reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,residual,linear_bias", FP8_CASES, ids=str)
def test_fp8_output_matches_reference(shape, residual, linear_bias, dtype):
    inputs, _ = _make_inputs(shape, dtype, residual=residual, linear_bias=linear_bias, seed=sum(shape))
    _check_fp8(inputs, eps=1e-12)


def test_fp8_edge_rows():
    """A row that normalises to zeros (scale 1), a 1e4x outlier, a row of tiny variance, columns whose
    tiny weights put them in e4m3's subnormals and flush to 0, fp32 weights with bf16 activations."""
    inputs, _ = _make_inputs((6, 1000), torch.bfloat16, residual=True, linear_bias=True, seed=9)
    x, residual = inputs["x"].detach(), inputs["residual"].detach()
    x[0], residual[0] = 1.5, 0.0
    x[1, 500] = 1e4
    x[2] = 2.0 + 1e-3 * x[2]
    lb = inputs["linear_bias"].detach()
    lb[:] = 0.0
    bias = torch.zeros(1000, device=DEVICE)  # row 0's y is exactly 0
    weight = inputs["weight"].detach().float()
    weight[:100] *= 1e-4
    weight[100:200] *= 1e-5
    inputs = {**inputs, "x": x, "residual": residual, "bias": bias, "weight": weight}
    _check_fp8(inputs, eps=1e-5)
    y, q, scale = layer_norm.layer_norm_fp8(x, weight, bias, 1e-5, residual, lb)
    assert scale[0].item() == 1.0 and not q[0].float().any()
    small = q[4, :200].view(torch.uint8) & 0x7F
    assert ((small > 0) & (small < 8)).sum() > 20 and (small == 0).sum() > 20


def test_fp8_strided_inputs():
    inputs, _ = _make_inputs((5, 3, 1000), torch.float32, residual=True, linear_bias=True, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 1100, generator=gen).to(DEVICE)[..., 50:1050]
    residual = torch.randn(3, 5, 1000, generator=gen).to(DEVICE).transpose(0, 1)
    assert not x.is_contiguous() and not residual.is_contiguous()
    _check_fp8({**inputs, "x": x, "residual": residual}, eps=1e-12)


def test_fp8_gpu_launch_configs(monkeypatch):
    gpu_config = lambda t, n_rows, n_cols, direction: layer_norm.launch_config(  # noqa: E731
        n_rows, n_cols, direction, gpu=True, sm_count=1
    )
    monkeypatch.setattr(layer_norm, "_config_for", gpu_config)
    for shape in ((33, 1000), (70, 37)):
        inputs, _ = _make_inputs(shape, torch.float32, residual=True, linear_bias=True, seed=4)
        _check_fp8(inputs, eps=1e-12)


def test_fp8_empty_batch():
    inputs, _ = _make_inputs((0, 64), torch.float32, residual=True, linear_bias=True)
    with torch.no_grad():
        y, q, scale = layer_norm.layer_norm_fp8(*_fp8_args(inputs)[0], 1e-12, **_fp8_args(inputs)[1])
    assert y.shape == q.shape == (0, 64) and scale.shape == (0, 1)


@pytest.mark.parametrize("residual,linear_bias", [(True, True), (False, False)])
def test_fp8_opcheck(residual, linear_bias):
    inputs, _ = _make_inputs((2, 3, 16), torch.float32, residual=residual, linear_bias=linear_bias)
    inputs = {name: t.detach() if t is not None else None for name, t in inputs.items()}
    args = (inputs["x"], inputs["weight"], inputs["bias"], 1e-5, inputs["residual"], inputs["linear_bias"])
    torch.library.opcheck(torch.ops.bertfast.layer_norm_fp8.default, args)


def test_fp8_torch_compile_traces_without_graph_breaks():
    inputs, _ = _make_inputs((3, 5, 48), torch.float32, residual=True, linear_bias=True, seed=7)
    args = [inputs[name].detach() for name in ("x", "weight", "bias", "residual", "linear_bias")]

    def step(x, weight, bias, residual, linear_bias):
        y, q, scale = layer_norm.layer_norm_fp8(x * 2.0, weight, bias, 1e-12, residual, linear_bias)
        return y.relu(), q, scale

    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(compiled[0], eager[0])
    assert_fp8_equal(*compiled[1:], *eager[1:], name="compiled")


def test_fp8_inference_only_and_public_api():
    inputs, _ = _make_inputs((4, 9, 1000), torch.float32, residual=True, linear_bias=True, seed=8)
    args, kwargs = _fp8_args(inputs)  # parameters that require grad, as a model's do
    with pytest.raises(RuntimeError, match="inference-only"):
        layer_norm.layer_norm_fp8(*args, 1e-12, **kwargs)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.layer_norm_fp8(*args, 1e-12, **kwargs, backend="triton")
    with torch.inference_mode():
        y, q, scale = ops.layer_norm_fp8(*args, 1e-12, **kwargs, backend="triton")
        y_ref, q_ref, scale_ref = _reference_fp8(inputs, 1e-12)
    assert_close(y, y_ref, name="y")
    assert_fp8_close(q, scale, q_ref, scale_ref, max_flipped=FP8_MAX_FLIPPED)
    x = inputs["x"].detach()
    reasons = ops.explain("layer_norm_fp8", x, args[1], args[2])
    assert reasons["triton"] is None and reasons["reference"] is None and reasons["ext"] is not None
    assert "layer_norm_fp8" not in ops.backend_capabilities("ext")["ops"]


def test_fp8_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm.layer_norm_fp8(x, weight[:32], weight, 1e-5)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm.layer_norm_fp8(x, weight, weight, 1e-5, residual=x[:2])
    with pytest.raises(ValueError, match="eps must be positive"):
        layer_norm.layer_norm_fp8(x, weight, weight, 0.0)
    with pytest.raises(TypeError, match="float64"):
        layer_norm.layer_norm_fp8(x.double(), weight, weight, 1e-5)
    wide = torch.ones(4097, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="4096"):
        ops.layer_norm_fp8(torch.randn(2, 4097, device=DEVICE), wide, wide, backend="triton")
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.layer_norm_fp8(x, weight, weight, -1.0)


# ------------------------------------------------------------------------------------------------
# The extension's kernels (backend "ext", bertfast._C): against the float64 reference, every gradient
# ------------------------------------------------------------------------------------------------


def torch_fused_layer_norm(x, weight, bias, residual=None, linear_bias=None, eps=1e-12):
    """PyTorch's own LayerNorm at the inputs' precision (the low-precision yardstick)."""
    h = x
    if linear_bias is not None:
        h = h + linear_bias
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize(("device", "dtype"), EXT_CASES, ids=EXT_CASE_IDS)
@pytest.mark.parametrize(("rows", "hidden"), [((1,), 1000), ((7,), 1024), ((3, 11), 37)], ids=str)
@pytest.mark.parametrize("fused", ["plain", "residual", "residual+linear_bias"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_layer_norm_matches_float64_reference(device, dtype, rows, hidden, fused):
    gen = torch.Generator().manual_seed(hidden + len(fused))
    shapes = {"x": (*rows, hidden), "weight": (hidden,), "bias": (hidden,)}
    if "residual" in fused:
        shapes["residual"] = (*rows, hidden)
    if "linear_bias" in fused:
        shapes["linear_bias"] = (hidden,)
    # An offset mean and a non-unit scale, as in a real residual stream.
    floats = make_inputs(shapes, gen, {"x": 3.0, "weight": 0.5})
    floats["x"] += 2.0
    check_op(
        lambda eps, **t: ext.layer_norm(eps=eps, **t),
        lambda eps, **t: reference.layer_norm(eps=eps, **t),
        lambda eps, **t: torch_fused_layer_norm(eps=eps, **t),
        floats,
        {"eps": 1e-5},
        device,
        dtype,
        gen,
        f"layer_norm[{fused}]",
    )


@pytest.mark.usefixtures("ext_ready")
def test_ext_layer_norm_weight_of_another_dtype():
    """fp32 weights with fp64 activations are cast (differentiably): output in x's dtype, fp32 weight grads."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    y = ext.layer_norm(x, weight, bias, 1e-6)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    expected = reference.layer_norm(x.detach(), weight.detach().double(), bias.detach().double(), 1e-6)
    assert_close(y.detach(), expected)


@pytest.mark.usefixtures("ext_ready")
def test_ext_layer_norm_backward_is_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(9)
    x, res, dy = (torch.randn(257, 300, generator=gen) for _ in range(3))
    weight, lin = torch.randn(300, generator=gen), torch.randn(300, generator=gen)
    _, mean, rstd = C.layer_norm_forward(x, weight, weight, res, lin, 1e-5, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = C.layer_norm_backward(dy, x, weight, res, lin, mean, rstd, 0)
        torch.set_num_threads(max(2, threads))
        multi = C.layer_norm_backward(dy, x, weight, res, lin, mean, rstd, 0)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)
