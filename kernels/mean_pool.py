"""Mean pooling over packed sequences, fused with an optional L2 normalisation, in Triton.

Math, per sequence ``b`` of the packed batch (rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``x``,
``n_b`` of them)::

    m_b = (1 / max(n_b, 1)) * sum_t x_t                        the masked mean (0 for an empty sequence)
    y_b = m_b                          (normalize=False)
    y_b = m_b / max(|m_b|, eps)        (normalize=True, eps = 1e-12: F.normalize's)

    backward:  g_b  = dy_b                                     (normalize=False)
               g_b  = (dy_b - y_b (y_b . dy_b)) / |m_b|        (normalize=True, |m_b| > eps)
               g_b  = dy_b / eps                               (normalize=True, |m_b| <= eps)
               dx_t = g_b / max(n_b, 1)                        for every row t of sequence b

This is sentence-transformers' ``Pooling(pooling_mode="mean")`` followed by ``Normalize()``
over the tokens a padding-free encoder produced: no padded ``(batch, seq, hidden)`` tensor,
no mask.  Shapes: ``x`` ``(total, hidden)`` (a row stride is honoured; columns contiguous),
``cu_seqlens`` int32 ``(batch + 1,)`` (see :mod:`bertfast.varlen`); ``y`` ``(batch, hidden)``
in ``x``'s dtype.  Sums and norms are fp32.  The forward also returns the fp32 mean ``m``
(``batch x hidden``, small) for the backward, which so never reads ``x`` again.

Memory traffic (``s`` = bytes of the dtype): forward reads ``x`` once, ``total * hidden * s``,
and writes ``batch * hidden * (s + 4)``; backward writes ``dx``, ``total * hidden * s``, and
reads ``batch * hidden * (s + 4)``.  Bandwidth-bound.

Blocking: one program per sequence holds the whole hidden row (``BLOCK_H`` = its next power
of two, at most 16384) and walks the sequence ``BLOCK_T`` rows at a time, accumulating in an
fp32 vector.  The order of the sums depends only on the shape: results are deterministic.
At small batches (tens of sequences) this leaves most SMs idle; each program still streams
its rows at full width, and the op is a few microseconds at sentence-embedding sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = 1e-12  # torch.nn.functional.normalize's, which sentence-transformers' Normalize uses
MAX_HIDDEN = 16384  # one program keeps a whole row in registers


# --------------------------------------------------------------------------- kernels


@triton.jit
def _sequence(cu_seqlens_ptr, n_cols, BLOCK_H: tl.constexpr):
    """This program's sequence: its index, its rows ``[start, end)`` and the hidden columns."""
    seq = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    return seq, tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1), cols, cols < n_cols


@triton.jit
def _mean_pool_fwd_kernel(
    x_ptr,
    cu_seqlens_ptr,
    y_ptr,
    mean_ptr,
    n_cols,
    x_row_stride,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq, start, end, cols, col_mask = _sequence(cu_seqlens_ptr, n_cols, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for first in range(start, end, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * x_row_stride + cols[None, :]  # int64: rows * stride may pass 2**31
        acc += tl.sum(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), axis=0)
    mean = acc / tl.maximum(end - start, 1).to(tl.float32)
    out = seq.to(tl.int64) * n_cols + cols
    tl.store(mean_ptr + out, mean, mask=col_mask)
    if NORMALIZE:
        mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), eps)
    tl.store(y_ptr + out, mean.to(y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _mean_pool_bwd_kernel(
    dy_ptr,
    mean_ptr,
    cu_seqlens_ptr,
    dx_ptr,
    n_cols,
    dy_row_stride,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq, start, end, cols, col_mask = _sequence(cu_seqlens_ptr, n_cols, BLOCK_H)
    grad = tl.load(dy_ptr + seq.to(tl.int64) * dy_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        mean = tl.load(mean_ptr + seq.to(tl.int64) * n_cols + cols, mask=col_mask, other=0.0)
        norm = tl.sqrt(tl.sum(mean * mean, axis=0))
        denom = tl.maximum(norm, eps)
        y = mean / denom
        # Below eps the norm is clamped to a constant: no radial term.
        radial = tl.where(norm > eps, tl.sum(y * grad, axis=0), 0.0)
        grad = (grad - y * radial) / denom
    grad = grad / tl.maximum(end - start, 1).to(tl.float32)
    tile = (tl.zeros((BLOCK_T, BLOCK_H), tl.float32) + grad[None, :]).to(dx_ptr.dtype.element_ty)
    for first in range(start, end, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_mask[None, :]
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], tile, mask=mask)


# --------------------------------------------------------------------------- launchers


def launch_config(n_cols: int, *, gpu: bool) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_H, num_warps)``: a ``BLOCK_T x BLOCK_H`` tile of about 8192 elements on a GPU
    (16 x 512 at MiniLM's hidden 384, 8 x 1024 at BERT-large's); small row steps in the
    interpreter, so tests on short sequences cross tile edges."""
    block_h = triton.next_power_of_2(max(n_cols, 1))
    if not gpu:
        return 4, block_h, 4
    # 16 warps above 2048 columns: at 4096 with 8 warps triton 3.6 puts 8 bytes of the fp32 forward on the stack.
    warps = 4 if block_h <= 1024 else 8 if block_h <= 2048 else 16
    return max(1, min(64, 8192 // block_h)), block_h, warps


def unsupported(*tensors) -> str | None:
    """``None`` if these kernels can run on ``tensors`` (``x``, ``cu_seqlens``), else the reason."""
    x = tensors[0]
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x has dtype {x.dtype}; the Triton mean pooling supports float16, bfloat16 and float32"
    if x.dim() != 2:
        return f"x must have shape (total_tokens, hidden), got {tuple(x.shape)}"
    if x.shape[1] > MAX_HIDDEN:
        return f"hidden size {x.shape[1]} is above the Triton mean pooling's {MAX_HIDDEN}"
    return None


def _check_inputs(x: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    reason = unsupported(x, cu_seqlens)
    if reason is not None:
        raise TypeError(reason)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of offsets, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous columns (a row stride is fine)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _config(x: torch.Tensor) -> tuple[int, int, int]:
    return launch_config(x.shape[-1], gpu=x.device.type == "cuda" and not interpreting())


def _launch(kernel, x: torch.Tensor, batch: int, args: tuple, normalize: bool) -> None:
    """One program per sequence, tiles chosen for ``x``'s hidden size and device."""
    block_t, block_h, warps = _config(x)
    with device_guard(x):
        kernel[(batch,)](*args, EPS, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps)


def _forward(x: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, cu_seqlens)
    batch, hidden = cu_seqlens.numel() - 1, x.shape[1]
    y = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty((batch, hidden), dtype=torch.float32, device=x.device)
    if batch == 0 or hidden == 0:
        return y, mean
    x = _rows(x)
    _launch(_mean_pool_fwd_kernel, x, batch, (x, cu_seqlens, y, mean, hidden, x.stride(0)), normalize)
    return y, mean


def _backward(
    dy: torch.Tensor, mean: torch.Tensor, cu_seqlens: torch.Tensor, x: torch.Tensor, normalize: bool
) -> torch.Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    batch, hidden = mean.shape
    if batch == 0 or hidden == 0 or x.shape[0] == 0:
        return dx.zero_()
    dy = _rows(dy)
    _launch(_mean_pool_bwd_kernel, x, batch, (dy, mean, cu_seqlens, dx, hidden, dy.stride(0)), normalize)
    return dx


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("bertfast::mean_pool_fwd", mutates_args=())
def mean_pool_fwd(x: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, fp32 mean)``: each packed sequence's mean row, L2-normalised into ``y`` when ``normalize``."""
    return _forward(x, cu_seqlens, normalize)


@mean_pool_fwd.register_fake
def _(x, cu_seqlens, normalize):
    shape = (cu_seqlens.shape[0] - 1, x.shape[1])
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("bertfast::mean_pool_bwd", mutates_args=())
def mean_pool_bwd(
    dy: torch.Tensor, mean: torch.Tensor, cu_seqlens: torch.Tensor, x: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """``dx`` for ``y = mean_pool(x)``; ``x`` gives only the shape and dtype."""
    return _backward(dy, mean, cu_seqlens, x, normalize)


@mean_pool_bwd.register_fake
def _(dy, mean, cu_seqlens, x, normalize):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, cu_seqlens, normalize = inputs
    ctx.save_for_backward(output[1], cu_seqlens, x)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(output[1])


def _mean_pool_backward(ctx, dy, _dmean):
    mean, cu_seqlens, x = ctx.saved_tensors
    return torch.ops.bertfast.mean_pool_bwd(dy, mean, cu_seqlens, x, ctx.normalize), None, None


mean_pool_fwd.register_autograd(_mean_pool_backward, setup_context=_setup_context)


def mean_pool(x: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Each packed sequence's mean row of ``x`` ``(total, hidden)``, L2-normalised when ``normalize``;
    ``(batch, hidden)`` in ``x``'s dtype, differentiable.  ``cu_seqlens`` is trusted (see
    :func:`bertfast.varlen.check_cu_seqlens`; ``bertfast.ops.mean_pool`` checks it)."""
    return torch.ops.bertfast.mean_pool_fwd(x, cu_seqlens, normalize)[0]
