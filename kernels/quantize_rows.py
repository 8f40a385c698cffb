"""Per-row FP8 (e4m3fn) quantization in Triton: the input of an FP8 GEMM (``torch._scaled_mm``
with row-wise scales), for activations no fused kernel produces (the attention output, the
embedding output).  Inference only: there is no backward.

Math, for every row of ``x`` (over the last dimension, ``K`` columns), in fp32 whatever ``x``'s dtype::

    amax    = max |x|
    scale   = amax / 448                      (1 for a row of zeros)
    inverse = (1 / amax) * 448                (1 for a row of zeros; torch's 448 / amax)
    q       = e4m3fn(clamp(x * inverse, -448, 448)), rounded to nearest even

exactly as ``bertfast.ops.reference.quantize_rows`` (see ``_fp8.py`` for the rounding, NaN and
infinities).

Shapes: ``x`` is ``(..., K)`` in fp16, bf16 or fp32 with any leading shape (flattened to
``rows`` rows; a row stride is honoured, so a slice of a wider buffer costs no copy),
``1 <= K <= 4096``.  ``q`` has ``x``'s shape, contiguous, ``torch.float8_e4m3fn``; ``scale`` is
fp32 ``(..., 1)``.

Memory traffic per element (``s`` = bytes of the input dtype, 2 for bf16/fp16), the floor of
this bandwidth-bound kernel: read ``x`` (``s``), write ``q`` (1 byte): ``s + 1`` bytes, plus 4
bytes per row for the scale.  One pass: a program holds whole rows in registers, so ``x`` is
read once (two passes over memory would read it twice).

Launch shape: a program owns ``ROWS x BLOCK_K`` elements, ``BLOCK_K = next_power_of_2(K)``;
see ``_fp8.row_launch``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..errors import check_inference_only
from ._fp8 import MAX_COLS, empty_outputs, fake_outputs, row_launch, store_quantized_rows
from ._launch import (
    CachedLaunch,
    PlanCache,
    as_rows,
    cdiv,
    device_guard,
    eager_fast_path,
    interpreting,
    next_launch_key,
    profiled,
    row_stride,
    tensor_key,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col_ids = tl.arange(0, BLOCK_K)
    row_mask = row_ids < n_rows
    mask = row_mask[:, None] & (col_ids < n_cols)[None, :]
    rows = row_ids.to(tl.int64)[:, None]  # int64: rows * stride may pass 2**31
    cols = col_ids[None, :]

    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    store_quantized_rows(x, q_ptr, scale_ptr, row_ids, rows, cols, mask, row_mask, n_cols)


# --------------------------------------------------------------------------- launcher


def unsupported(*tensors) -> str | None:
    """``None`` if the kernel can run on ``tensors`` (``x``), else the reason."""
    x = tensors[0]
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x has dtype {x.dtype}; the Triton quantize_rows supports float16, bfloat16 and float32"
    if x.dim() == 0:
        return "x must have at least one dimension"
    if not 1 <= x.shape[-1] <= MAX_COLS:
        return f"row length (x.shape[-1]) must be between 1 and {MAX_COLS}, got {x.shape[-1]}"
    return None


class _Plan(NamedTuple):
    """What a launch needs, decided once per (shape, strides, dtype, device): see ``_launch.PlanCache``."""

    n_rows: int
    n_cols: int
    x_stride: int | None  # x's row stride; None: x must be copied into rows first
    grid: tuple
    constexprs: dict
    launch_key: int


_PLANS = PlanCache()
_launch = CachedLaunch(globals(), "_quantize_rows_kernel")


def _config_for(t: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    return row_launch(n_rows, n_cols, gpu=t.device.type == "cuda" and not interpreting())


def _plan(x: torch.Tensor) -> _Plan:
    reason = unsupported(x)
    if reason is not None:
        raise (TypeError if x.dtype not in SUPPORTED_DTYPES else ValueError)(reason)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    rows, block, num_warps = _config_for(x, n_rows, n_cols)
    constexprs = dict(ROWS=rows, BLOCK_K=block, num_warps=num_warps)
    return _Plan(n_rows, n_cols, row_stride(x), (cdiv(n_rows, rows),), constexprs, next_launch_key())


def _forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tensor_key(x), _config_for)  # _config_for: a test may replace it
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(x))
    q, scale = empty_outputs(x)
    if plan.n_rows == 0:
        return q, scale
    x_stride = plan.x_stride
    if x_stride is None:
        x, x_stride = as_rows(x), plan.n_cols
    with device_guard(x):
        _launch(plan.launch_key, plan.grid, (x, q, scale, plan.n_rows, plan.n_cols, x_stride), plan.constexprs)
    return q, scale


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("bertfast::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``x`` in e4m3fn, one fp32 scale per row (shape ``(..., 1)``)."""
    return _forward(x)


@quantize_rows_op.register_fake
def _(x):
    return fake_outputs(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale ~ x`` per row: see the module's docstring.  Inference only.

    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::quantize_rows`` custom op does.
    """
    check_inference_only("quantize_rows", x)
    if eager_fast_path(x):
        with profiled("bertfast::quantize_rows"):
            return _forward(x)
    return torch.ops.bertfast.quantize_rows(x)
