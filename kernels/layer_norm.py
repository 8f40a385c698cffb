"""Fused residual + bias + LayerNorm in Triton, forward and backward.

Math, over the last dimension (``hidden = N``), for every row of ``x``::

    h     = dropout(x + linear_bias) + residual (the pre-norm sum; every term but x optional)
    mean  = sum(h) / N
    rstd  = 1 / sqrt(sum((h - mean)^2) / N + eps)
    xhat  = (h - mean) * rstd
    y     = xhat * weight + bias

Backward, with ``g = dy * weight``::

    dh            = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the row)
    dx            = dh * Z              (Z: see below; without dropout dx = dh)
    dresidual     = dh                  (without dropout the same tensor as dx)
    dlinear_bias  = sum over rows of dx
    dweight       = sum over rows of dy * xhat
    dbias         = sum over rows of dy

Hidden dropout (training, rate ``p``): ``dropout(u) = u * Z`` with ``Z = keep / (1 - p)``,
``keep`` a Bernoulli(1 - p) draw per element: ``philox(seed, (col, row, 0, 0)) >= p`` (32-bit
counters, see ``_dropout.py``), ``row`` the row of the flattened ``(rows, N)`` input.  The seed
is read on the device from a 1-element int64 tensor drawn from torch's generator (one draw per
model forward; ``torch.manual_seed`` reproduces the mask; no host read, graph-capturable).
The mask is never stored: the backward regenerates it from the seed, at the cost of one philox
draw per element in each direction (no extra memory traffic).  ``p = 0`` compiles it out.

Shapes: ``x`` and ``residual`` are ``(..., N)`` with any leading shape (flattened to
``rows`` rows; a row stride is honoured, so a slice of a wider buffer costs no copy);
``weight``, ``bias``, ``linear_bias`` are ``(N,)``.  ``N <= 4096`` (``MAX_HIDDEN``).  ``y`` has ``x``'s
shape and dtype; ``mean`` and ``rstd`` are fp32 ``(rows,)``.  Every statistic and every
accumulator is fp32 whatever the input dtype.

What the backward needs, and why it recomputes ``h``: the forward saves only ``mean`` and
``rstd`` (8 bytes per row) and the backward recomputes ``h`` from ``x``, ``linear_bias``
and ``residual``.  Saving ``h`` instead would cost a write in the forward plus a read in
the backward (2 + 2 bytes per element in bf16), the same as re-reading ``x`` and
``residual`` when there is a residual, and strictly more without one; recomputing also
gives the backward the exact fp32 ``h`` rather than one rounded to bf16.  Memory is the
same either way: ``x`` is kept where the other design would keep ``h``, and in BERT the
``residual`` is kept anyway as the input of the GEMMs that read it.

Memory traffic per element (``s`` = bytes of the input dtype, 2 for bf16/fp16), the
bandwidth floor on a GPU:

- forward: read ``x`` (+ ``residual``), write ``y``: ``2s`` bytes, ``3s`` with a residual
  (plus 8 bytes per row for ``mean`` and ``rstd``; weights are read once per program);
- backward: read ``x`` (+ ``residual``) and ``dy``, write ``dx``: ``3s``, ``4s`` with a
  residual (``5s`` with a residual and dropout, which also writes ``dresidual``); plus the
  fp32 partial sums of the weight gradients, ``(num_groups, N)`` per gradient written once
  and read once (``num_groups`` is one or two per SM: about 5% of the traffic at
  16384 x 1024, less for more rows).

Determinism: the weight, bias and linear-bias gradients are reduced without atomics.  The
backward runs ``num_groups`` programs; each walks its own contiguous range of row tiles,
accumulates in fp32 registers and writes one row of a ``(num_groups, N)`` fp32 buffer; a
``torch.sum`` over that buffer (deterministic) finishes the reduction.  The grouping
depends only on the shape and the device, so two runs give bit-identical gradients.

FP8 output (inference, ``layer_norm_fp8``): the forward kernel with ``QUANTIZE`` also writes the
fp32 ``y`` (not the rounded one) quantized per row to e4m3fn with one fp32 scale per row (``_fp8.py``;
the input of the next FP8 GEMM), and skips ``mean`` and ``rstd``; no dropout, no backward.  It adds
1 byte per element and 4 per row to the forward's traffic; ``QUANTIZE = False`` compiles it out.

Launch shape: a program handles a tile of ``ROWS x BLOCK_N`` elements with
``BLOCK_N = next_power_of_2(N)``: on a GPU one row per tile from ``N = 1024`` (forward) or
``N = 2048`` (backward), several rows per tile for smaller rows so each program still
moves enough bytes; ``num_warps`` grows with the tile (see :func:`launch_config`).
Under Triton's interpreter (tests) tiles are smaller so that the multi-tile and
multi-group paths run even on tiny inputs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..errors import check_inference_only
from ._dropout import call_seed, check_dropout_p, dropout_args, dropout_keep
from ._fp8 import empty_outputs, fake_outputs, store_quantized_rows
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

MAX_HIDDEN = 4096  # the backward holds whole rows in registers: at 8192 it spilled (see launch_config)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _pre_norm_sum(
    x_ptr,
    residual_ptr,
    linear_bias_ptr,
    rows,
    cols,
    mask,
    col_mask,
    n_cols,
    x_row_stride,
    residual_row_stride,
    dropout_p,
    seed_ptr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """``(h, keep)`` for a ``(ROWS, BLOCK_N)`` tile: ``h = dropout(x + linear_bias) + residual`` in
    fp32 (0 where masked) and the dropout keep mask (``mask`` itself without dropout).

    The one place the pre-norm sum and the dropout mask are formed, shared by forward and backward.
    """
    h = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_LINEAR_BIAS:
        h += tl.load(linear_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    keep = mask
    if HAS_DROPOUT:
        # The counters are the element's (col, row) in the logical (rows, N) input: no tile shape in them.
        keep = mask & dropout_keep(tl.load(seed_ptr), dropout_p, cols, rows.to(tl.int32), 0)
        h = tl.where(keep, h * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + rows * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, h, 0.0), keep


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    linear_bias_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    q_ptr,
    scale_ptr,
    seed_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    residual_row_stride,
    eps,
    dropout_p,
    HAS_RESIDUAL: tl.constexpr,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    QUANTIZE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col_ids = tl.arange(0, BLOCK_N)
    row_mask = row_ids < n_rows
    col_mask = col_ids < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = row_ids.to(tl.int64)[:, None]  # int64: rows * stride may pass 2**31
    cols = col_ids[None, :]

    h, _ = _pre_norm_sum(
        x_ptr,
        residual_ptr,
        linear_bias_ptr,
        rows,
        cols,
        mask,
        col_mask[None, :],
        n_cols,
        x_row_stride,
        residual_row_stride,
        dropout_p,
        seed_ptr,
        HAS_RESIDUAL,
        HAS_LINEAR_BIAS,
        HAS_DROPOUT,
    )
    mean = tl.sum(h, axis=1) / n_cols
    centered = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)

    weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if QUANTIZE:
        # Inference: no statistics for a backward; the fp32 y (0 in masked columns) in e4m3fn, per row.
        store_quantized_rows(y, q_ptr, scale_ptr, row_ids, rows, cols, mask, row_mask, n_cols)
    else:
        tl.store(mean_ptr + row_ids, mean, mask=row_mask)
        tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    residual_ptr,
    linear_bias_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dresidual_ptr,
    dweight_partial_ptr,
    dbias_partial_ptr,
    dlinear_bias_partial_ptr,
    seed_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    x_row_stride,
    residual_row_stride,
    tiles_per_group,
    dropout_p,
    HAS_RESIDUAL: tl.constexpr,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    col_ids = tl.arange(0, BLOCK_N)
    col_mask = col_ids < n_cols
    cols = col_ids[None, :]
    weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)

    dweight_acc = tl.zeros((BLOCK_N,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), tl.float32)
    dlinear_bias_acc = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, tiles_per_group):
        row_ids = (group * tiles_per_group + i) * ROWS + tl.arange(0, ROWS)
        row_mask = row_ids < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows = row_ids.to(tl.int64)[:, None]

        h, keep = _pre_norm_sum(
            x_ptr,
            residual_ptr,
            linear_bias_ptr,
            rows,
            cols,
            mask,
            col_mask[None, :],
            n_cols,
            x_row_stride,
            residual_row_stride,
            dropout_p,
            seed_ptr,
            HAS_RESIDUAL,
            HAS_LINEAR_BIAS,
            HAS_DROPOUT,
        )
        # Rows past the end load mean = rstd = 0 and dy = 0, so they add nothing below.
        mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)

        g = dy * weight[None, :]
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_g_xhat = tl.sum(g * xhat, axis=1) / n_cols
        dh = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
        dh = tl.where(mask, dh, 0.0)
        if HAS_DROPOUT:
            # The residual skips the dropout; x + linear_bias goes through the same mask and scale.
            if HAS_RESIDUAL:
                tl.store(dresidual_ptr + rows * n_cols + cols, dh.to(dresidual_ptr.dtype.element_ty), mask=mask)
            dx = tl.where(keep, dh * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            dx = dh
        tl.store(dx_ptr + rows * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        dweight_acc += tl.sum(dy * xhat, axis=0)
        dbias_acc += tl.sum(dy, axis=0)
        if HAS_LINEAR_BIAS:
            dlinear_bias_acc += tl.sum(dx, axis=0)

    partial_offsets = group * n_cols + col_ids
    tl.store(dweight_partial_ptr + partial_offsets, dweight_acc, mask=col_mask)
    tl.store(dbias_partial_ptr + partial_offsets, dbias_acc, mask=col_mask)
    if HAS_LINEAR_BIAS:
        tl.store(dlinear_bias_partial_ptr + partial_offsets, dlinear_bias_acc, mask=col_mask)


# --------------------------------------------------------------------------- launch configuration


class LaunchConfig(NamedTuple):
    rows: int  # rows per tile
    block_n: int  # columns per tile (next power of two >= hidden)
    num_warps: int
    num_groups: int  # backward only: programs, each writing one row of partial sums


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(n_rows: int, n_cols: int, direction: str, *, gpu: bool, sm_count: int = 132) -> LaunchConfig:
    """Tile shape and grid for one call; ``gpu=False`` gives the small interpreter tiles.

    These are the knobs to tune per GPU.  The GPU values come from register counts of the
    sm_90 build (no spills up to N = 4096, ``MAX_HIDDEN``), not yet from
    timings.  The backward grouping fixes the order of the weight-gradient sums, so it
    depends only on the shape and the device.
    """
    block_n = triton.next_power_of_2(n_cols)
    if not gpu:
        rows = max(2, 1024 // block_n)
        num_warps, groups_wanted = 4, 4  # a handful of groups exercises the partial-sum reduction
    elif direction == "forward":
        # One row per program from N = 1024 up; 8-16 elements per thread.
        rows = max(1, 1024 // block_n)
        tile = rows * block_n
        num_warps, groups_wanted = (4 if tile <= 1024 else 8 if tile <= 4096 else 16), 0
    else:
        # About 8 elements per thread per tensor (the backward holds h, dy, xhat, dh and three
        # accumulators): ~80-110 registers, so two 8-warp programs fit on an SM for N <= 2048.
        # Rows of at most 128 take half the tile: 16 of them with dropout's counters spilled under
        # triton 3.6 on sm_90.
        rows = max(1, (1024 if block_n <= 128 else 2048) // block_n)
        tile = rows * block_n
        num_warps = 8 if tile <= 2048 else 16
        # Few groups keep the (num_groups, N) partial-sum buffers small; as many as fit on
        # the GPU at once keep the memory system busy.
        groups_wanted = (2 if tile <= 2048 else 1) * sm_count
    n_tiles = triton.cdiv(n_rows, rows)
    if direction == "forward":
        num_groups = n_tiles
    else:
        tiles_per_group = triton.cdiv(n_tiles, max(1, min(groups_wanted, n_tiles)))
        num_groups = triton.cdiv(n_tiles, tiles_per_group) if n_tiles > 0 else 0
    return LaunchConfig(rows, block_n, num_warps, num_groups)


def _config_for(t: torch.Tensor, n_rows: int, n_cols: int, direction: str) -> LaunchConfig:
    if t.device.type == "cuda" and not interpreting():
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return launch_config(n_rows, n_cols, direction, gpu=True, sm_count=_sm_count(index))
    return launch_config(n_rows, n_cols, direction, gpu=False)


# --------------------------------------------------------------------------- launchers


def unsupported(*tensors) -> str | None:
    """``None`` if these kernels can run on ``tensors`` (``x, weight, bias, ...``), else the reason."""
    x = tensors[0]
    for name, t in zip(("x", "weight", "bias", "residual", "linear_bias"), tensors):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton LayerNorm supports float16, bfloat16 and float32"
    if x.dim() == 0:
        return "x must have at least one dimension"
    hidden = x.shape[-1]
    if not 1 <= hidden <= MAX_HIDDEN:
        return f"hidden size (x.shape[-1]) must be between 1 and {MAX_HIDDEN}, got {hidden}"
    return None


def _vector(name: str, t: torch.Tensor, n_cols: int, device: torch.device) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if tuple(t.shape) != (n_cols,):
        raise ValueError(f"{name} must have shape ({n_cols},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_inputs(x, weight, residual, linear_bias) -> None:
    """Validate what forward and backward share."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    reason = unsupported(x)
    if reason is not None:
        raise ValueError(reason)
    n_cols = x.shape[-1]
    _vector("weight", weight, n_cols, x.device)
    if linear_bias is not None:
        # Read in its own dtype (an fp32 bias with bf16 activations under autocast): no cast kernel.
        _vector("linear_bias", linear_bias, n_cols, x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")


# Launch decisions per (shapes, strides, dtypes, devices, flags): the checks above pass once per
# key, then every call with that key reuses the tile shape, grid and row strides.  The keys name
# ``_config_for`` too, so a test that replaces it gets fresh plans.
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()
_fwd_launch = CachedLaunch(globals(), "_layer_norm_fwd_kernel")
_bwd_launch = CachedLaunch(globals(), "_layer_norm_bwd_kernel")


class _ForwardPlan(NamedTuple):
    n_rows: int
    n_cols: int
    x_stride: int | None  # the row stride; None: x must be copied into rows first
    res_stride: int | None  # 0 without a residual; None: copy it
    contiguous_vectors: bool  # weight, bias and linear_bias need no copy
    grid: tuple
    constexprs: dict
    launch_key: int


class _BackwardPlan(NamedTuple):
    n_rows: int
    n_cols: int
    x_stride: int | None
    dy_stride: int | None
    res_stride: int | None
    contiguous_inputs: bool  # weight, linear_bias, mean and rstd need no copy
    num_groups: int
    n_partials: int
    separate_dresidual: bool
    tiles_per_group: int
    constexprs: dict
    launch_key: int


def _constexprs(cfg: LaunchConfig, residual, linear_bias, has_dropout: bool) -> dict:
    return dict(
        HAS_RESIDUAL=residual is not None,
        HAS_LINEAR_BIAS=linear_bias is not None,
        HAS_DROPOUT=has_dropout,
        ROWS=cfg.rows,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )


def _forward_plan(x, weight, bias, residual, linear_bias, has_dropout: bool, quantize: bool) -> _ForwardPlan:
    _check_inputs(x, weight, residual, linear_bias)
    _vector("bias", bias, x.shape[-1], x.device)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    vectors = [t for t in (weight, bias, linear_bias) if t is not None]
    cfg = _config_for(x, n_rows, n_cols, "forward")
    return _ForwardPlan(
        n_rows,
        n_cols,
        row_stride(x),
        row_stride(residual) if residual is not None else 0,
        all(t.is_contiguous() for t in vectors),
        (cfg.num_groups,),
        {**_constexprs(cfg, residual, linear_bias, has_dropout), "QUANTIZE": quantize},
        next_launch_key(),
    )


def _cached_forward_plan(x, weight, bias, eps, residual, linear_bias, has_dropout: bool, quantize: bool):
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    key = (*map(tensor_key, (x, weight, bias, residual, linear_bias)), has_dropout, quantize, _config_for)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _FWD_PLANS.put(key, _forward_plan(x, weight, bias, residual, linear_bias, has_dropout, quantize))
    return plan


def _launch_forward(plan, x, weight, bias, eps, residual, linear_bias, dropout_p, seed, outputs):
    """Launch the forward kernel writing ``outputs`` (``y, mean, rstd, q, scale``; the unused ones stand-ins)."""
    n_rows = plan.n_rows
    if n_rows == 0:
        return
    if not plan.contiguous_vectors:
        weight, bias = weight.contiguous(), bias.contiguous()
        linear_bias = linear_bias.contiguous() if linear_bias is not None else None
    # x and the residual go to the kernel as they are (a pointer and a row stride) unless
    # their rows cannot be addressed with one stride.
    x_stride = plan.x_stride
    if x_stride is None:
        x, x_stride = as_rows(x), plan.n_cols
    res_stride = plan.res_stride
    if residual is None:
        residual = x  # never read when HAS_RESIDUAL is False
    elif res_stride is None:
        residual, res_stride = as_rows(residual), plan.n_cols
    with device_guard(x):
        _fwd_launch(
            plan.launch_key,
            plan.grid,
            (
                x,
                residual,
                linear_bias if linear_bias is not None else weight,
                weight,
                bias,
                *outputs,
                seed,
                n_rows,
                plan.n_cols,
                x_stride,
                res_stride,
                eps,
                dropout_p,
            ),
            plan.constexprs,
        )


def _forward(x, weight, bias, eps, residual, linear_bias, dropout_p=0.0, seed=None):
    dropout_p, seed = dropout_args(dropout_p, seed, x)
    plan = _cached_forward_plan(x, weight, bias, eps, residual, linear_bias, dropout_p > 0.0, False)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(plan.n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(plan.n_rows, dtype=torch.float32, device=x.device)
    # q and scale: never written without QUANTIZE (mean and rstd stand in for the pointers).
    _launch_forward(plan, x, weight, bias, eps, residual, linear_bias, dropout_p, seed, (y, mean, rstd, mean, rstd))
    return y, mean, rstd


def _forward_fp8(x, weight, bias, eps, residual, linear_bias):
    """``(y, q, scale)``: the inference forward, its fp32 result also quantized per row (see ``_fp8.py``)."""
    plan = _cached_forward_plan(x, weight, bias, eps, residual, linear_bias, False, True)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    q, scale = empty_outputs(x)
    # mean and rstd: never written with QUANTIZE (scale stands in for the pointers); x for the seed's.
    _launch_forward(plan, x, weight, bias, eps, residual, linear_bias, 0.0, x, (y, scale, scale, q, scale))
    return y, q, scale


def _backward_plan(dy, x, weight, mean, rstd, residual, linear_bias, has_dropout: bool) -> _BackwardPlan:
    _check_inputs(x, weight, residual, linear_bias)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.dtype != torch.float32 or tuple(stat.shape) != (n_rows,):
            raise ValueError(f"{name} must be float32 of shape ({n_rows},), got {stat.dtype} {tuple(stat.shape)}")
    cfg = _config_for(x, n_rows, n_cols, "backward")
    num_groups = cfg.num_groups
    inputs = [t for t in (weight, linear_bias, mean, rstd) if t is not None]
    return _BackwardPlan(
        n_rows,
        n_cols,
        row_stride(x),
        row_stride(dy),
        row_stride(residual) if residual is not None else 0,
        all(t.is_contiguous() for t in inputs),
        num_groups,
        3 if linear_bias is not None else 2,
        has_dropout and residual is not None,
        cdiv(cdiv(n_rows, cfg.rows), num_groups) if n_rows > 0 else 0,
        _constexprs(cfg, residual, linear_bias, has_dropout),
        next_launch_key(),
    )


def _backward(dy, x, weight, mean, rstd, residual, linear_bias, dropout_p=0.0, seed=None):
    dropout_p, seed = dropout_args(dropout_p, seed, x)
    key = (*map(tensor_key, (dy, x, weight, mean, rstd, residual, linear_bias)), dropout_p > 0.0, _config_for)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _BWD_PLANS.put(key, _backward_plan(dy, x, weight, mean, rstd, residual, linear_bias, dropout_p > 0.0))
    if not plan.contiguous_inputs:
        weight, mean, rstd = weight.contiguous(), mean.contiguous(), rstd.contiguous()
        linear_bias = linear_bias.contiguous() if linear_bias is not None else None
    n_rows, n_cols, num_groups, n_partials = plan.n_rows, plan.n_cols, plan.num_groups, plan.n_partials

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # With dropout the residual's gradient is no longer x's: a second output (else an empty one).
    dresidual = torch.empty(x.shape if plan.separate_dresidual else (0,), dtype=x.dtype, device=x.device)
    # Every group writes its whole row of partial sums, so the buffers need no zeroing.
    partial_buffer = torch.empty((n_partials, num_groups, n_cols), dtype=torch.float32, device=x.device)
    partials = partial_buffer.unbind(0)
    if n_rows > 0:
        x_stride, dy_stride, res_stride = plan.x_stride, plan.dy_stride, plan.res_stride
        if x_stride is None:
            x, x_stride = as_rows(x), n_cols
        if dy_stride is None:
            dy, dy_stride = as_rows(dy), n_cols
        if residual is None:
            residual = x
        elif res_stride is None:
            residual, res_stride = as_rows(residual), n_cols
        with device_guard(x):
            _bwd_launch(
                plan.launch_key,
                (num_groups,),
                (
                    dy,
                    x,
                    residual,
                    linear_bias if linear_bias is not None else weight,
                    weight,
                    mean,
                    rstd,
                    dx,
                    dresidual if plan.separate_dresidual else dx,  # written only with dropout and a residual
                    partials[0],
                    partials[1],
                    partials[-1],  # dlinear_bias: written only when HAS_LINEAR_BIAS
                    seed,
                    n_rows,
                    n_cols,
                    dy_stride,
                    x_stride,
                    res_stride,
                    plan.tiles_per_group,
                    dropout_p,
                ),
                plan.constexprs,
            )
    # Fixed-order reduction of the per-group partial sums (deterministic), one for all the gradients.
    return dx, partial_buffer.sum(dim=1), dresidual


def _parameter_gradients(dparams, dtypes):
    """The rows of ``dparams`` (fp32) in their parameters' dtypes: one cast when they share one."""
    if all(dtype == dtypes[0] for dtype in dtypes):
        return dparams.to(dtypes[0]).unbind(0)
    return [row.to(dtype) for row, dtype in zip(dparams.unbind(0), dtypes)]


# --------------------------------------------------------------------------- custom ops


# ``dropout_p`` and ``seed`` (a 1-element int64 tensor on x's device, ``None`` without dropout)
# come last with defaults, so calls without dropout read as before.


@torch.library.custom_op("bertfast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],  # noqa: UP045 (torch.library parses the annotation)
    linear_bias: Optional[torch.Tensor],  # noqa: UP045
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: ``y = LayerNorm(dropout(x + linear_bias) + residual)``; fp32 row statistics."""
    return _forward(x, weight, bias, eps, residual, linear_bias, dropout_p, seed)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, residual, linear_bias, dropout_p=0.0, seed=None):
    n_rows = math.prod(x.shape[:-1])  # not Size.numel(), which would specialize symbolic sizes
    y = x.new_empty(x.shape)
    mean = x.new_empty((n_rows,), dtype=torch.float32)
    rstd = x.new_empty((n_rows,), dtype=torch.float32)
    return y, mean, rstd


@torch.library.custom_op("bertfast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    residual: Optional[torch.Tensor],  # noqa: UP045
    linear_bias: Optional[torch.Tensor],  # noqa: UP045
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dparams, dresidual)``.

    ``dparams``: fp32 ``(2, N)`` rows ``dweight, dbias``, or ``(3, N)`` with ``dlinear_bias`` when
    there is a linear bias.  ``dresidual`` is empty unless there are both dropout and a residual:
    otherwise the residual's gradient is ``dx`` itself.
    """
    return _backward(dy, x, weight, mean, rstd, residual, linear_bias, dropout_p, seed)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, residual, linear_bias, dropout_p=0.0, seed=None):
    dx = x.new_empty(x.shape)
    dparams = x.new_empty((3 if linear_bias is not None else 2, x.shape[-1]), dtype=torch.float32)
    dresidual = x.new_empty(x.shape if dropout_p > 0.0 and residual is not None else (0,))
    return dx, dparams, dresidual


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, residual, linear_bias, dropout_p, seed = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd, residual, linear_bias, seed)
    ctx.dtypes = (
        (weight.dtype, bias.dtype, linear_bias.dtype) if linear_bias is not None else (weight.dtype, bias.dtype)
    )
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # the statistics' gradients are never zero-filled


def _layer_norm_backward(ctx, dy, _dmean=None, _drstd=None):
    if dy is None:
        return (None,) * 8
    x, weight, mean, rstd, residual, linear_bias, seed = ctx.saved_tensors
    args = (dy, x, weight, mean, rstd, residual, linear_bias, ctx.dropout_p, seed)
    if not torch.is_grad_enabled() and eager_fast_path(dy, x, weight, residual, linear_bias):
        with profiled("bertfast::layer_norm_bwd"):
            dx, dparams, dresidual = _backward(*args)
    else:  # under torch.compile, a mode or create_graph: the custom op, as before
        dx, dparams, dresidual = torch.ops.bertfast.layer_norm_bwd(*args)
    if residual is None:
        dresidual = None
    elif ctx.dropout_p == 0.0:
        dresidual = dx  # x and residual are added, so they share one gradient tensor (as PyTorch's add does)
    dweight, dbias, *dlinear_bias = _parameter_gradients(dparams, ctx.dtypes)
    return dx, dweight, dbias, None, dresidual, dlinear_bias[0] if dlinear_bias else None, None, None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_setup_context)


class _LayerNormFunction(torch.autograd.Function):
    """The eager fast path's autograd: the custom op's forward, setup_context and backward, no dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):  # the op's arguments; the op's setup_context (a forward without ctx costs ~20 µs)
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_layer_norm_backward)


def layer_norm(x, weight, bias, eps, residual=None, linear_bias=None, dropout_p=0.0, seed=None) -> torch.Tensor:
    """``LayerNorm(dropout(x + linear_bias) + residual)`` over the last dimension, differentiable.

    ``dropout_p > 0`` drops elements of ``x + linear_bias``; ``seed``: the philox seed (see
    ``_dropout.draw_seeds``), by default a fresh draw from torch's generator.
    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::layer_norm_fwd`` custom op does.
    """
    check_dropout_p(dropout_p)
    seed = call_seed(dropout_p, seed, x.device)
    eps, dropout_p = float(eps), float(dropout_p)
    if eager_fast_path(x, weight, bias, residual, linear_bias):
        with profiled("bertfast::layer_norm_fwd"):
            if needs_grad(x, weight, bias, residual, linear_bias):
                return _LayerNormFunction.apply(x, weight, bias, eps, residual, linear_bias, dropout_p, seed)[0]
            return _forward(x, weight, bias, eps, residual, linear_bias, dropout_p, seed)[0]
    return torch.ops.bertfast.layer_norm_fwd(x, weight, bias, eps, residual, linear_bias, dropout_p, seed)[0]


# --------------------------------------------------------------------------- FP8 output (inference)


@torch.library.custom_op("bertfast::layer_norm_fp8", mutates_args=())
def layer_norm_fp8_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],  # noqa: UP045
    linear_bias: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, q, scale)``: ``y = LayerNorm(x + linear_bias + residual)`` and its fp32 value in e4m3fn per row."""
    return _forward_fp8(x, weight, bias, eps, residual, linear_bias)


@layer_norm_fp8_op.register_fake
def _(x, weight, bias, eps, residual, linear_bias):
    return (x.new_empty(x.shape), *fake_outputs(x))


def layer_norm_fp8(x, weight, bias, eps, residual=None, linear_bias=None):
    """``(y, q, scale)``: ``y = LayerNorm(x + linear_bias + residual)`` in ``x``'s dtype, plus the fp32
    result quantized to e4m3fn with one fp32 scale per row (``q * scale ~ y``; see ``_fp8.py``), from the
    same kernel.  Inference only: no dropout, no backward (inputs requiring grad are refused).

    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::layer_norm_fp8`` custom op does.
    """
    check_inference_only("layer_norm_fp8", x, weight, bias, residual, linear_bias)
    eps = float(eps)
    if eager_fast_path(x, weight, bias, residual, linear_bias):
        with profiled("bertfast::layer_norm_fp8"):
            return _forward_fp8(x, weight, bias, eps, residual, linear_bias)
    return torch.ops.bertfast.layer_norm_fp8(x, weight, bias, eps, residual, linear_bias)
