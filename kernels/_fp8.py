"""FP8 (e4m3fn) quantization per row, shared by the kernels that write FP8 activations
(``quantize_rows.py``, the LayerNorm's and the bias-GELU's FP8 outputs).

The math (``bertfast.ops.reference.quantize_rows``, followed bit for bit), for an fp32 row ``v``::

    amax    = max |v|                   (NaN if the row holds a NaN, as torch.amax)
    scale   = amax / 448                (1 where amax is not > 0: a row of zeros, or NaN)
    inverse = (1 / amax) * 448          (1 likewise)

Both divisions are correctly rounded (``tl.math.div_rn``; a GPU's plain ``/`` may approximate), and
``inverse`` is rounded twice, as torch computes the reference's ``448 / amax`` (a scalar over a
tensor: the tensor's reciprocal times the scalar); 448 / amax rounded once differs by an ulp for
some ``amax``, which moves ``v * inverse`` across a rounding midpoint now and then.
    q       = e4m3fn(clamp(v * inverse, -448, 448)), rounded to nearest even

``q * scale`` approximates ``v``; ``scale`` is what ``torch._scaled_mm`` takes per row.

Why the rounding is spelled out in integer arithmetic (:func:`round_to_e4m3`) before the cast:
Triton's CPU interpreter converts fp32 to fp8 by truncating the mantissa and adding the rounding
bit without carrying it into the exponent (-127.88 becomes -64, not -128), and turns NaN into
384.  Given a value already on the e4m3fn grid, every converter (the interpreter's, a GPU's
``cvt.rn.satfinite.e4m3x2.f32``) is exact, so the kernels give the same bytes on every device and
can be tested in the interpreter.  The cost is a dozen integer operations per element in kernels
bound by memory bandwidth.

e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; normal values from 2^-6 to 448 (1.75 * 2^8),
subnormals ``k * 2^-9`` for ``k = 1..7``, no infinities, NaN = ``S.1111.111``.  FP8 e4m3 needs an
sm_89+ GPU (Ada or Hopper): Triton refuses ``float8e4nv`` on sm_80.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
MAX_COLS = 4096  # whole rows in registers (BERT-large's FFN width); wider rows would need two passes

_FP8_MAX = tl.constexpr(FP8_MAX)
_TWO_POW_MINUS_9 = tl.constexpr(0.001953125)  # e4m3fn's subnormal step
_MIN_NORMAL_BITS = tl.constexpr(0x3C800000)  # fp32 bits of 2^-6, e4m3fn's smallest normal value
_NAN_BITS = tl.constexpr(0x7FF00000)  # an fp32 NaN whose top three mantissa bits are set: e4m3fn's NaN


@triton.jit
def _max_keeping_nan(a, b):
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def round_to_e4m3(v):
    """fp32 ``v`` rounded to the nearest e4m3fn value (ties to even), saturated to [-448, 448], in fp32.

    NaN stays NaN (with bits the interpreter's converter also maps to e4m3fn's NaN); the sign of
    zero is kept.  The result converts exactly to ``tl.float8e4nv``.
    """
    is_nan = v != v
    magnitude = tl.minimum(tl.abs(tl.where(is_nan, 0.0, v)), _FP8_MAX)
    bits = magnitude.to(tl.uint32, bitcast=True)
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even; a carry moves into
    # the exponent by itself.
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    # Subnormal range: the significand with its implicit bit, m * 2^(e - 150), to a multiple of
    # 2^-9: k = m >> s with s = 141 - e, ties to even (s capped at 25: m < 2^24 then rounds to 0).
    exponent = (bits >> 23).to(tl.int32)
    shift = tl.minimum(tl.maximum(141 - exponent, 21), 25)
    m = ((bits & 0x7FFFFF) | 0x800000).to(tl.int32)
    half = (tl.zeros_like(shift) + 1) << (shift - 1)
    k = (m + half - 1 + ((m >> shift) & 1)) >> shift
    subnormal = (k.to(tl.float32) * _TWO_POW_MINUS_9).to(tl.uint32, bitcast=True)
    rounded = tl.where(bits >= _MIN_NORMAL_BITS, normal, subnormal)
    rounded = tl.where(is_nan, _NAN_BITS, rounded) | sign
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def row_scales(v):
    """``(scale, inverse)`` per row of an fp32 ``(ROWS, BLOCK)`` tile (masked elements 0)."""
    amax = tl.reduce(tl.abs(v), 1, _max_keeping_nan)
    nonzero = amax > 0.0
    divisor = tl.where(nonzero, amax, 1.0)  # no division by 0 (tile rows past the end are all 0)
    scale = tl.where(nonzero, tl.math.div_rn(divisor, _FP8_MAX), 1.0)
    # As torch computes the reference's ``448 / amax``: a correctly rounded reciprocal, then a multiply.
    inverse = tl.where(nonzero, tl.math.div_rn(1.0 + tl.zeros_like(divisor), divisor) * _FP8_MAX, 1.0)
    return scale, inverse


@triton.jit
def store_quantized_rows(v, q_ptr, scale_ptr, row_ids, rows, cols, mask, row_mask, n_cols):
    """Quantize the rows of an fp32 tile ``v`` (``(ROWS, BLOCK)``, 0 where masked) and store them:
    e4m3fn ``q`` into the contiguous ``(rows, n_cols)`` ``q_ptr``, one fp32 scale per row into ``scale_ptr``."""
    scale, inverse = row_scales(v)
    q = round_to_e4m3(v * inverse[:, None])
    tl.store(q_ptr + rows * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row_ids, scale, mask=row_mask)


# --------------------------------------------------------------------------- host side


def empty_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` for ``x`` (..., K): e4m3fn of ``x``'s shape, fp32 ``(..., 1)``."""
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return q, scale


def fake_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`empty_outputs` returns, for the custom ops' fake kernels."""
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def row_launch(n_rows: int, n_cols: int, *, gpu: bool) -> tuple[int, int, int]:
    """``(rows per program, BLOCK, num_warps)`` for the FP8 row kernels (whole rows in registers).

    GPU: one row per program from 1024 columns up, several rows of shorter ones (a 1024-element
    tile), 4 warps up to 1024 elements and 8 up to 4096 (16 elements per thread; no spills on sm_90,
    see kernels/RESOURCES.md).  Interpreter: small tiles of at least 2 rows, so tests cross tiles.
    """
    block = triton.next_power_of_2(n_cols)
    if not gpu:
        return max(2, 1024 // block), block, 4
    rows = max(1, 1024 // block)
    return rows, block, 4 if rows * block <= 1024 else 8
