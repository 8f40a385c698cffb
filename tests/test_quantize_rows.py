"""The FP8 (e4m3fn) row quantization: the shared rounding (kernels/_fp8.py) and the Triton
quantize_rows kernel (kernels/quantize_rows.py) against torch's own e4m3fn conversion and the reference.

Runs on a GPU when there is one (the FP8 ones need sm_89+), else in Triton's interpreter on CPU tensors.
The quantization of an fp32 value is exact arithmetic (a max, a correctly rounded division, one
multiply, a rounding), so every comparison here is bit for bit.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bertfast.kernels import quantize_rows as Q  # noqa: E402
from bertfast.kernels._fp8 import round_to_e4m3, row_launch  # noqa: E402

import bertfast.ops as ops  # noqa: E402
from bertfast import BackendUnavailable  # noqa: E402
from bertfast.ops import reference, triton_backend  # noqa: E402

from .helpers import assert_fp8_close, assert_fp8_equal  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"
if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 e4m3 needs an sm_89+ GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
E4M3 = torch.float8_e4m3fn


def _reference(x):
    """The contract as the reference computes it on the CPU (on a GPU torch divides by a scalar differently)."""
    return tuple(t.to(x.device) for t in reference.quantize_rows(x.cpu()))


# --------------------------------------------------------------------------- the rounding helper


@triton.jit
def _round_kernel(x_ptr, rounded_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    rounded = round_to_e4m3(tl.load(x_ptr + offsets, mask=mask))
    tl.store(rounded_ptr + offsets, rounded, mask=mask)
    tl.store(q_ptr + offsets, rounded.to(q_ptr.dtype.element_ty), mask=mask)


def _sweep() -> torch.Tensor:
    """Every finite e4m3fn value, every midpoint between neighbours and the fp32 values one ulp either
    side (subnormals and the step from 0 included), the saturation edge, specials, and random values
    over 40 binades."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = torch.unique(values[~values.isnan()])  # sorted; +0 and -0 are one value here
    midpoints = ((grid[1:].double() + grid[:-1].double()) / 2).float()
    assert torch.equal(midpoints.double(), (grid[1:].double() + grid[:-1].double()) / 2)  # exact in fp32
    inf = torch.tensor(float("inf"))
    edges = [448.0, 448.00003, 463.99997, 464.0, 464.00003, 480.0, 1e4, 3e38, float("inf"), -float("inf")]
    edges += [0.0, -0.0, 2.0**-10, 2.0**-11, 1e-30, 1e-40, 2.0**-6, 2.0**-6 - 2.0**-10, -127.88, 127.88]
    edges += [float("nan"), -float("nan")]
    gen = torch.Generator().manual_seed(11)
    magnitudes = torch.exp2(torch.rand(20000, generator=gen) * 40 - 24)
    signs = torch.where(torch.rand(20000, generator=gen) < 0.5, -1.0, 1.0)
    points = torch.cat([grid, midpoints, torch.nextafter(midpoints, inf), torch.nextafter(midpoints, -inf)])
    points = torch.cat([points, -points, torch.nextafter(grid, inf), torch.nextafter(grid, -inf)])
    return torch.cat([points, torch.tensor(edges), magnitudes * signs])


def test_round_to_e4m3_matches_torch_on_a_dense_sweep():
    """The bit arithmetic of ``round_to_e4m3`` and the cast after it give torch's e4m3fn conversion of the
    value clamped to +-448: ties to even (to 0 at 2^-10), subnormals, carries into the next binade,
    saturation, the sign of zero, NaN."""
    x = _sweep().to(DEVICE)
    rounded = torch.empty_like(x)
    q = torch.empty(x.shape, dtype=E4M3, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, rounded, q, x.numel(), BLOCK=1024)
    expected = x.clamp(-448.0, 448.0).to(E4M3)
    assert_fp8_equal(q, torch.ones(1), expected, torch.ones(1), name="sweep")
    nan = x.isnan()
    assert torch.equal(rounded.isnan(), nan)
    # The fp32 result is on the grid already, sign of zero included.
    assert torch.equal(rounded[~nan].view(torch.int32), expected.float()[~nan].view(torch.int32))
    # The sweep reaches what it claims to: ties that round down and up, subnormals, the saturation edge.
    codes = expected.view(torch.uint8)
    assert ((codes & 0x78) == 0).sum() > 100 and (codes == 0x7E).any() and (codes == 0x80).any()


def test_sweep_catches_the_plain_cast_in_the_interpreter():
    """Without the explicit rounding the interpreter's fp32 -> e4m3 cast is wrong (why ``round_to_e4m3``
    exists); this keeps the sweep honest about what it can detect."""
    if not INTERPRETING:
        pytest.skip("the interpreter's converter only")

    @triton.jit
    def plain_cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(q_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(q_ptr.dtype.element_ty), mask=mask)

    x = torch.tensor([-127.88, 127.88, 1.0])
    q = torch.empty(3, dtype=E4M3)
    plain_cast[(1,)](x, q, 3, BLOCK=4)
    assert q.float()[0] != -128.0 and q.float()[2] == 1.0


# --------------------------------------------------------------------------- the kernel


def _rows(shape, dtype, seed=0):
    """Random rows with the hard cases in the first ones: zeros, a 1e4x outlier (the rest lands in e4m3's
    subnormals and flushes to 0), values over eight decades, a constant row, an all-negative row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1, shape[-1])
    specials = [
        lambda r: r.zero_(),
        lambda r: r.index_fill_(0, torch.tensor([r.numel() // 2]), 1e4),
        lambda r: r.copy_(r.sign() * torch.pow(10.0, torch.rand(r.shape, generator=gen, dtype=torch.float64) * -8)),
        lambda r: r.fill_(-3.25),
        lambda r: r.copy_(-r.abs()),
    ]
    for row, special in zip(flat, specials[: max(0, flat.shape[0] - 2)]):
        special(row)
    return x.to(device=DEVICE, dtype=dtype)


SHAPES = [(1, 37), (7, 384), (33, 1000), (2, 3, 1024), (3, 4096), (9, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_bit_for_bit(shape, dtype):
    x = _rows(shape, dtype, seed=sum(shape))
    q, scale = Q.quantize_rows(x)
    assert q.shape == x.shape and scale.shape == (*shape[:-1], 1)
    assert_fp8_equal(q, scale, *_reference(x), name=f"{shape} {dtype}")


def test_subnormal_and_zero_codes_are_exercised():
    """The outlier row of ``_rows`` really reaches e4m3's subnormals and its flush to zero."""
    x = _rows((7, 1000), torch.float32)
    q, _ = Q.quantize_rows(x)
    outlier_codes = q[1].view(torch.uint8) & 0x7F
    assert ((outlier_codes > 0) & (outlier_codes < 8)).sum() > 50 and (outlier_codes == 0).sum() > 5


def test_special_rows():
    """NaN, infinity and zero rows as the reference has them: a NaN row keeps scale 1 (amax is NaN, not
    > 0) and its other values saturate; an infinite row has an infinite scale and 0 * inf = NaN."""
    x = torch.randn(5, 70, device=DEVICE)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[3] = 0.0
    x[4] *= 1000.0
    q, scale = Q.quantize_rows(x)
    q_ref, scale_ref = _reference(x)
    assert scale[0].item() == 1.0 and scale[1].item() == float("inf")
    assert_fp8_equal(q, scale, q_ref, scale_ref, name="special rows")


def test_strided_inputs():
    """A row-strided slice of a wider buffer, leading dims that do not flatten, a strided last dim."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 3, 1100, generator=gen).to(DEVICE)
    for x in (
        wide[..., 50:1050],
        torch.randn(3, 5, 1000, generator=gen).to(DEVICE).transpose(0, 1),
        torch.randn(5, 2000, generator=gen).to(DEVICE, torch.bfloat16)[:, ::2],
    ):
        assert not x.is_contiguous()
        assert_fp8_equal(*Q.quantize_rows(x), *_reference(x), name=str(x.stride()))


def test_gpu_launch_configs(monkeypatch):
    """The GPU tiles (one row per program from 1024 columns, several shorter rows per program) agree."""
    monkeypatch.setattr(Q, "_config_for", lambda t, n_rows, n_cols: row_launch(n_rows, n_cols, gpu=True))
    assert row_launch(5, 1024, gpu=True) == (1, 1024, 4) and row_launch(5, 4096, gpu=True) == (1, 4096, 8)
    assert row_launch(5, 37, gpu=True)[0] == 16
    for shape in ((33, 37), (5, 1024), (2, 4096)):
        x = _rows(shape, torch.bfloat16, seed=4)
        assert_fp8_equal(*Q.quantize_rows(x), *_reference(x), name=str(shape))


def test_empty_batch():
    q, scale = Q.quantize_rows(torch.randn(0, 3, 64, device=DEVICE))
    assert q.shape == (0, 3, 64) and q.dtype == E4M3 and scale.shape == (0, 3, 1)


def test_dequantized_rows_approximate_the_input():
    """``q * scale`` is ``x`` within half an e4m3 step: 2^-4 relative for normals, 2^-10 * scale below."""
    x = _rows((33, 1000), torch.float32, seed=5)
    q, scale = Q.quantize_rows(x)
    error = (q.float() * scale - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 2.0**-20)
    assert (error <= bound).all()


def test_outputs_feed_a_rowwise_scaled_mm():
    """``(q, scale)`` is what ``torch._scaled_mm`` takes per row (where this torch runs it)."""
    x = _rows((16, 64), torch.bfloat16, seed=6)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    qx, sx = Q.quantize_rows(x)
    qw, sw = Q.quantize_rows(w)
    try:
        out = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm with row-wise scales does not run here: {exc}")
    expected = (qx.float() * sx) @ (qw.float() * sw).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_opcheck():
    x = torch.randn(2, 3, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.bertfast.quantize_rows.default, (x,))


def test_torch_compile_traces_without_graph_breaks():
    def step(x):
        q, scale = Q.quantize_rows(x * 2.0)
        return q, scale * 0.5

    x = torch.randn(3, 5, 48, device=DEVICE)
    q_eager, s_eager = step(x)
    q_compiled, s_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert_fp8_equal(q_compiled, s_compiled, q_eager, s_eager, name="compiled")


def test_inference_only():
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    for fn in (Q.quantize_rows, lambda x: ops.quantize_rows(x, backend="triton"), ops.quantize_rows):
        with pytest.raises(RuntimeError, match="inference-only"):
            fn(x)
    with torch.no_grad():
        assert_fp8_equal(*Q.quantize_rows(x), *_reference(x.detach()), name="no_grad")
    with torch.inference_mode():
        Q.quantize_rows(x)


def test_public_api_and_dispatch():
    x = _rows((7, 384), torch.bfloat16, seed=7)
    assert_fp8_equal(*ops.quantize_rows(x, backend="triton"), *_reference(x), name="triton")
    assert_fp8_equal(*ops.quantize_rows(x, backend="reference"), *_reference(x), name="reference")
    reasons = ops.explain("quantize_rows", x)
    assert reasons["triton"] is None and reasons["reference"] is None
    assert "does not implement quantize_rows" in reasons["ext"] or "unavailable" in reasons["ext"]
    assert "quantize_rows" in ops.backend_capabilities("triton")["ops"]
    assert "quantize_rows" not in ops.backend_capabilities("ext")["ops"]


def test_fp8_needs_sm89_on_a_gpu(monkeypatch):
    """The Triton backend refuses the FP8 ops on a GPU before Ada (Triton has no e4m3 there)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_backend, "_capability", lambda index: (8, 0))
    gpu_tensor = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert "sm_89+" in triton_backend._fp8_reason(gpu_tensor) and "sm_80" in triton_backend._fp8_reason(gpu_tensor)
    monkeypatch.setattr(triton_backend, "_capability", lambda index: (9, 0))
    assert triton_backend._fp8_reason(gpu_tensor) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "_capability", lambda index: (8, 0))
    assert triton_backend._fp8_reason(torch.empty(1)) is None  # the interpreter converts anywhere


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        Q.quantize_rows(x.double())
    with pytest.raises(ValueError, match="between 1 and 4096"):
        Q.quantize_rows(torch.randn(2, 4097, device=DEVICE))
    assert "4096" in Q.unsupported(torch.empty(2, 4097, device=DEVICE))
    with pytest.raises(BackendUnavailable, match="float64"):
        ops.quantize_rows(x.double(), backend="triton")
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.quantize_rows(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        ops.quantize_rows(torch.ones(3, 4, dtype=torch.int32, device=DEVICE))


def test_close_comparison_can_fail():
    """``assert_fp8_close`` (the LayerNorm's and bias-GELU's tolerance) rejects two steps, too many
    one-step flips and a scale off by more than a few ulps."""
    x = _rows((7, 256), torch.float32, seed=8)
    q, scale = reference.quantize_rows(x)
    codes = q.view(torch.uint8).clone()
    assert (codes[3] == 0xFE).all()  # the constant row: -448
    codes[3, 10] = 0xFC  # two steps towards 0
    with pytest.raises(AssertionError, match="steps away"):
        assert_fp8_close(codes.view(E4M3), scale, q, scale, max_flipped=1.0)
    codes = q.view(torch.uint8).clone()
    codes[5, :20] ^= 1  # each one step away
    with pytest.raises(AssertionError, match="one step away"):
        assert_fp8_close(codes.view(E4M3), scale, q, scale, max_flipped=0.01)
    with pytest.raises(AssertionError, match="scales differ"):
        assert_fp8_close(q, scale * (1 + 2.0**-18), q, scale, max_flipped=0.01)
    assert_fp8_close(q, scale, q, scale, max_flipped=0.0)
