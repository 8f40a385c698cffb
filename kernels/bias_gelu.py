"""Fused bias + exact (erf) GELU in Triton, forward and backward.

Math, elementwise with ``bias`` broadcast over the rows::

    h         = x + bias
    y         = gelu(h) = 0.5 * h * (1 + erf(h / sqrt(2)))
    gelu'(h)  = 0.5 * (1 + erf(h / sqrt(2))) + h * exp(-h^2 / 2) / sqrt(2 pi)
    dx        = dy * gelu'(h)
    dbias     = sum over rows of dx

Shapes: ``x`` is ``(..., N)`` with any leading shape (flattened to ``rows`` rows; a row
stride is honoured), ``bias`` is ``(N,)``; ``y`` and ``dx`` have ``x``'s shape and dtype,
``dbias`` has ``bias``'s.  Everything is computed in fp32.  The backward recomputes ``h``
from ``x`` and ``bias`` (the forward saves no output).

Memory traffic per element (``s`` = bytes of the dtype, 2 for bf16/fp16), the floor for a
kernel that is bound by bandwidth, as this one is on a GPU:

- forward: read ``x``, write ``y``: ``2s`` bytes (the bias is read once per tile);
- backward: read ``x`` and ``dy``, write ``dx``: ``3s`` bytes, plus the fp32 partial sums
  of ``dbias``, ``(rows / ROWS_PER_PROGRAM, N)`` written once and read once (under 2% of
  the traffic with ``ROWS_PER_PROGRAM = 128``).

Blocking: a program owns a ``BLOCK_M x BLOCK_N`` tile (forward, 16 x 256 on a GPU) or a
``ROWS_PER_PROGRAM x BLOCK_N`` strip walked ``BLOCK_M`` rows at a time (backward,
128 x 128 in steps of 16 rows), with columns contiguous in memory for coalesced,
vectorised loads; at ``16384 x 4096`` that is 16384 (forward) or 4096 (backward) programs,
enough to keep every SM's memory pipeline full.

FP8 output (inference, ``bias_gelu_fp8``): the same ``gelu(h)`` in fp32, quantized per row to
e4m3fn with one fp32 scale per row (``_fp8.py``; the input of the FFN's second FP8 GEMM), and no
output in ``x``'s dtype.  A program holds whole rows (``N <= 4096``, ``BLOCK_N =
next_power_of_2(N)``, see ``_fp8.row_launch``), since a row's scale must be known before any of
its elements is stored.  Traffic per element: read ``x`` (``s``), write ``q`` (1 byte): ``s + 1``
bytes, plus 4 bytes per row for the scale.

Determinism: each backward program sums its strip's ``dx`` in fp32 registers in a fixed
order and writes one row of a ``(num_strips, N)`` fp32 buffer; ``torch.sum`` over it
(deterministic) gives ``dbias``.  The tiling depends only on the shape and the device, so
two runs give bit-identical ``dbias`` (no atomics, no autotuning).
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
    needs_grad,
    next_launch_key,
    profiled,
    row_stride,
    tensor_key,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Globals read inside a kernel must be constexpr.
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gelu(h):
    """erf-GELU of fp32 ``h``: the one expression the forward and the FP8 kernels share."""
    return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,
    bias_ptr,
    y_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < n_cols
    mask = (row_ids < n_rows)[:, None] & col_mask[None, :]
    rows = row_ids.to(tl.int64)[:, None]  # int64: rows * stride may pass 2**31
    cols = col_ids[None, :]

    bias = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
    h = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    tl.store(y_ptr + rows * n_cols + cols, _gelu(h).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_fp8_kernel(
    x_ptr,
    bias_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Whole rows per program: the per-row scale needs the row's largest |gelu| before any store.
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col_ids = tl.arange(0, BLOCK_N)
    row_mask = row_ids < n_rows
    col_mask = col_ids < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = row_ids.to(tl.int64)[:, None]
    cols = col_ids[None, :]

    bias = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
    h = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    # gelu(0) = 0 in masked columns; masked rows are never stored.
    store_quantized_rows(_gelu(h), q_ptr, scale_ptr, row_ids, rows, cols, mask, row_mask, n_cols)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,
    x_ptr,
    bias_ptr,
    dx_ptr,
    dbias_partial_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    x_row_stride,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    strip = tl.program_id(0)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < n_cols
    cols = col_ids[None, :]
    bias = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)

    dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for step in range(0, ROWS_PER_PROGRAM // BLOCK_M):
        row_ids = strip * ROWS_PER_PROGRAM + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (row_ids < n_rows)[:, None] & col_mask[None, :]
        rows = row_ids.to(tl.int64)[:, None]

        h = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dy = tl.load(dy_ptr + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dx = dy * (cdf + h * pdf)  # 0 where masked, since dy is
        tl.store(dx_ptr + rows * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dbias_acc += dx

    tl.store(dbias_partial_ptr + strip * n_cols + col_ids, tl.sum(dbias_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launch configuration


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    rows_per_program: int  # backward: rows summed by one program into one partial row
    num_warps: int


def launch_config(n_cols: int, direction: str, *, gpu: bool) -> LaunchConfig:
    """Tile shape for one call; ``gpu=False`` gives the small interpreter tiles.

    These are the knobs to tune per GPU; the GPU values come from register counts of the
    sm_90 build, not yet from timings.  Forward: 4096-element tiles, 16 elements per thread
    with 8 warps (two 16-byte loads per thread in bf16), about 52 registers, so four
    programs share an SM.  Backward: 2048-element steps (it also keeps ``dy``, the
    derivative and an fp32 accumulator live), about 53 registers, again four per SM.  The
    backward's ``rows_per_program`` fixes the order of the ``dbias`` sums, so it depends
    only on the shape and the device.
    """
    if gpu:
        if direction == "forward":
            block_n = min(256, triton.next_power_of_2(n_cols))
            block_m = max(1, 4096 // block_n)
        else:
            block_n = min(128, triton.next_power_of_2(n_cols))
            block_m = max(1, 2048 // block_n)
        return LaunchConfig(block_m, block_n, max(128, block_m), 8)
    # Interpreter: small tiles, so tests on small shapes cross tile and strip edges.
    block_n = min(256, triton.next_power_of_2(n_cols))
    return LaunchConfig(16 if direction == "forward" else 8, block_n, 16, 4)


def _config_for(t: torch.Tensor, n_cols: int, direction: str) -> LaunchConfig:
    return launch_config(n_cols, direction, gpu=t.device.type == "cuda" and not interpreting())


# --------------------------------------------------------------------------- launchers


def unsupported(*tensors) -> str | None:
    """``None`` if these kernels can run on ``tensors`` (``x``, ``bias``), else the reason."""
    for name, t in zip(("x", "bias"), tensors):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton bias-GELU supports float16, bfloat16 and float32"
    if tensors[0].dim() == 0:
        return "x must have at least one dimension"
    return None


def unsupported_fp8(*tensors) -> str | None:
    """``None`` if the FP8 kernel can run on ``tensors`` (``x``, ``bias``), else the reason."""
    reason = unsupported(*tensors)
    n_cols = tensors[0].shape[-1] if reason is None else 1
    if not 1 <= n_cols <= MAX_COLS:
        reason = f"row length (x.shape[-1]) must be between 1 and {MAX_COLS} for the FP8 output, got {n_cols}"
    return reason


def _check_inputs(x: torch.Tensor, bias: torch.Tensor) -> None:
    reason = unsupported(x, bias)
    if reason is not None:
        raise TypeError(reason)
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1]},) (x.shape[-1]), got {tuple(bias.shape)}")
    # bias may have another supported dtype (fp32 with bf16 activations under autocast): read as fp32.
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


class _Plan(NamedTuple):
    """What a launch needs, decided once per (shapes, strides, dtypes, devices): see ``_launch.PlanCache``."""

    n_rows: int
    n_cols: int
    x_stride: int | None  # x's row stride; None: x must be copied into rows first
    dy_stride: int | None  # backward only
    bias_contiguous: bool
    grid: tuple
    n_strips: int  # backward only: rows of dbias partial sums
    constexprs: dict
    launch_key: int


_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()
_fwd_launch = CachedLaunch(globals(), "_bias_gelu_fwd_kernel")
_bwd_launch = CachedLaunch(globals(), "_bias_gelu_bwd_kernel")


def _plan(x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor | None, direction: str) -> _Plan:
    _check_inputs(x, bias)
    if dy is not None and dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols > 0 else 0
    cfg = _config_for(x, n_cols, direction)
    if direction == "forward":
        n_strips = 0
        grid = (cdiv(n_rows, cfg.block_m), cdiv(n_cols, cfg.block_n))
        constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    else:
        n_strips = cdiv(n_rows, cfg.rows_per_program)
        grid = (n_strips, cdiv(n_cols, cfg.block_n))
        constexprs = dict(
            ROWS_PER_PROGRAM=cfg.rows_per_program, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps
        )
    return _Plan(
        n_rows,
        n_cols,
        row_stride(x),
        row_stride(dy) if dy is not None else 0,
        bias.is_contiguous(),
        grid,
        n_strips,
        constexprs,
        next_launch_key(),
    )


def _forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    key = (tensor_key(x), tensor_key(bias), _config_for)  # _config_for: a test may replace it
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _FWD_PLANS.put(key, _plan(x, bias, None, "forward"))
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    if not plan.bias_contiguous:
        bias = bias.contiguous()
    x_stride = plan.x_stride
    if x_stride is None:
        x, x_stride = as_rows(x), plan.n_cols
    with device_guard(x):
        _fwd_launch(plan.launch_key, plan.grid, (x, bias, y, plan.n_rows, plan.n_cols, x_stride), plan.constexprs)
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tensor_key(dy), tensor_key(x), tensor_key(bias), _config_for)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _BWD_PLANS.put(key, _plan(x, bias, dy, "backward"))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(bias)
    if not plan.bias_contiguous:
        bias = bias.contiguous()
    x_stride, dy_stride = plan.x_stride, plan.dy_stride
    if x_stride is None:
        x, x_stride = as_rows(x), plan.n_cols
    if dy_stride is None:
        dy, dy_stride = as_rows(dy), plan.n_cols
    # Every strip writes its whole row of partial sums, so the buffer needs no zeroing.
    dbias_partial = torch.empty((plan.n_strips, plan.n_cols), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _bwd_launch(
            plan.launch_key,
            plan.grid,
            (dy, x, bias, dx, dbias_partial, plan.n_rows, plan.n_cols, dy_stride, x_stride),
            plan.constexprs,
        )
    return dx, dbias_partial.sum(dim=0).to(bias.dtype)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("bertfast::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_erf(x + bias)``."""
    return _forward(x, bias)


@bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bertfast::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)`` for ``y = gelu_erf(x + bias)``."""
    return _backward(dy, x, bias)


@bias_gelu_bwd.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)
    ctx.set_materialize_grads(False)


def _bias_gelu_backward(ctx, dy):
    if dy is None:
        return None, None
    x, bias = ctx.saved_tensors
    if not torch.is_grad_enabled() and eager_fast_path(dy, x, bias):
        with profiled("bertfast::bias_gelu_bwd"):
            return _backward(dy, x, bias)
    return torch.ops.bertfast.bias_gelu_bwd(dy, x, bias)  # under torch.compile, a mode or create_graph


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_setup_context)


class _BiasGeluFunction(torch.autograd.Function):
    """The eager fast path's autograd: the custom op's forward, setup_context and backward, no dispatcher."""

    @staticmethod
    def forward(ctx, x, bias):  # the op's setup_context inside (a forward without ctx costs ~20 µs)
        output = _forward(x, bias)
        _setup_context(ctx, (x, bias), output)
        return output

    backward = staticmethod(_bias_gelu_backward)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_erf(x + bias)`` with ``bias`` of shape ``(x.shape[-1],)``, differentiable.

    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::bias_gelu_fwd`` custom op does.
    """
    if eager_fast_path(x, bias):
        with profiled("bertfast::bias_gelu_fwd"):
            if needs_grad(x, bias):
                return _BiasGeluFunction.apply(x, bias)
            return _forward(x, bias)
    return torch.ops.bertfast.bias_gelu_fwd(x, bias)


# --------------------------------------------------------------------------- FP8 output (inference)


class _Fp8Plan(NamedTuple):
    n_rows: int
    n_cols: int
    x_stride: int | None
    bias_contiguous: bool
    grid: tuple
    constexprs: dict
    launch_key: int


_FP8_PLANS = PlanCache()
_fp8_launch = CachedLaunch(globals(), "_bias_gelu_fp8_kernel")


def _fp8_config_for(t: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    return row_launch(n_rows, n_cols, gpu=t.device.type == "cuda" and not interpreting())


def _fp8_plan(x: torch.Tensor, bias: torch.Tensor) -> _Fp8Plan:
    _check_inputs(x, bias)
    reason = unsupported_fp8(x, bias)
    if reason is not None:
        raise ValueError(reason)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    rows, block, num_warps = _fp8_config_for(x, n_rows, n_cols)
    constexprs = dict(ROWS=rows, BLOCK_N=block, num_warps=num_warps)
    return _Fp8Plan(
        n_rows, n_cols, row_stride(x), bias.is_contiguous(), (cdiv(n_rows, rows),), constexprs, next_launch_key()
    )


def _forward_fp8(x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tensor_key(x), tensor_key(bias), _fp8_config_for)
    plan = _FP8_PLANS.get(key)
    if plan is None:
        plan = _FP8_PLANS.put(key, _fp8_plan(x, bias))
    q, scale = empty_outputs(x)
    if plan.n_rows == 0:
        return q, scale
    if not plan.bias_contiguous:
        bias = bias.contiguous()
    x_stride = plan.x_stride
    if x_stride is None:
        x, x_stride = as_rows(x), plan.n_cols
    with device_guard(x):
        _fp8_launch(
            plan.launch_key, plan.grid, (x, bias, q, scale, plan.n_rows, plan.n_cols, x_stride), plan.constexprs
        )
    return q, scale


@torch.library.custom_op("bertfast::bias_gelu_fp8", mutates_args=())
def bias_gelu_fp8_op(x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``gelu_erf(x + bias)`` in e4m3fn, one fp32 scale per row (shape ``(..., 1)``)."""
    return _forward_fp8(x, bias)


@bias_gelu_fp8_op.register_fake
def _(x, bias):
    return fake_outputs(x)


def bias_gelu_fp8(x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``gelu_erf(x + bias)`` computed in fp32 and quantized per row to e4m3fn
    (``q * scale ~ gelu``; see ``_fp8.py``), with no output in ``x``'s dtype.  Inference only.

    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::bias_gelu_fp8`` custom op does.
    """
    check_inference_only("bias_gelu_fp8", x, bias)
    if eager_fast_path(x, bias):
        with profiled("bertfast::bias_gelu_fp8"):
            return _forward_fp8(x, bias)
    return torch.ops.bertfast.bias_gelu_fp8(x, bias)
