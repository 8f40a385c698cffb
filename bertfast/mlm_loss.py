"""The masked-LM head and its cross-entropy, fused and chunked so the logits never exist whole.

Math, for the ``M`` labelled positions (``labels != -100``) of ``hidden`` ``(..., H)``, with
vocabulary size ``V``::

    t      = LayerNorm(gelu(h @ W1^T + b1))      (M, H)    the head's transform (bertfast.ops)
    z      = t @ Wd^T + bd                        (M, V)    the decoder, tied to the word embeddings
    lse    = logsumexp(z, dim=-1)                 (M,)      fp32
    loss   = sum_i (lse_i - z_i[y_i]) / M                   ("mean", as F.cross_entropy(ignore_index=-100))

Backward, with ``g = dloss`` and ``s = g / M``::

    dz     = s * (softmax(z) - onehot(y))         (M, V)    fp32, one chunk at a time
    dWd    = dz^T @ t,   dbd = sum_i dz_i,   dt = dz @ Wd
    dh, dW1, db1, dLN = the transform's backward of dt        (autograd through bertfast.ops)

How: the labelled rows are gathered first, so unlabelled positions (85% in BERT
pre-training) cost nothing.  The rows are then walked ``chunk_size`` at a time by one
:class:`torch.autograd.Function`: the forward keeps only ``lse`` (4 bytes a row) and the
running fp32 sum; the backward recomputes each chunk's transform and logits, turns them
into ``dz`` in place and accumulates ``dWd`` and ``dbd`` in fp32 across chunks.

Memory: the unfused head materialises the logits ``M x V`` in the compute dtype, an fp32
copy for the loss and the same again for the gradient; for BERT pre-training at batch 256,
sequence 512 (``M`` ~ 20k masked tokens, ``V = 30522``) the fp32 logits alone are
``20k * 30522 * 4`` bytes ~ 2.4 GB, twice that with their gradient.  Here the largest
buffers are one chunk of logits, ``chunk_size x V`` in fp32 (4 bytes an element, plus one
copy in the compute dtype when that is fp16/bf16): ``2048 * 30522 * 4`` bytes = 250 MB at
the default chunk size, whatever ``M`` is, and the fp32 ``V x H`` accumulator of ``dWd``
(what the decoder's weight gradient costs anyway).  The price is compute: the transform and
the decoder GEMM run twice (forward and backward), one extra ``2 M V H`` FLOPs, about a
third more than the unfused head's forward + backward.

Dtypes: under ``torch.autocast`` the GEMMs run in the autocast dtype (weights are cast, as
``nn.Linear`` does); otherwise in ``hidden``'s dtype.  Softmax statistics, the loss and
every gradient accumulator are fp32 (fp64 when computing in fp64); each gradient is returned
in its input's dtype.

No labelled token at all: the loss is 0 with zero gradients (and still a graph, so
``backward()`` and DistributedDataParallel work).  Hugging Face's ``BertForMaskedLM``
returns NaN there (``F.cross_entropy`` with ``reduction="mean"`` divides 0 by 0, although
its gradients are zero); a NaN would poison logging and loss scaling, so we do not copy it.

Eager only: gathering the labelled rows reads their count back to the host (as
``nonzero`` does), so under ``torch.compile`` this is a graph break.  Inside :class:`bertfast.TrainStep`
(a :func:`bertfast.padding.use_static_packing` block) it gathers a fixed number of rows instead
(``nonzero_static``; the unused ones are masked out of the loss and the gradient) and reads nothing back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .padding import static_packing

IGNORE_INDEX = -100

# 2048 rows of a 30522-word vocabulary in fp32: 250 MB of logits per chunk; M = 2048 is
# already a full-speed GEMM shape on an H100.
DEFAULT_CHUNK_SIZE = 2048

__all__ = ["DEFAULT_CHUNK_SIZE", "IGNORE_INDEX", "masked_lm_head_loss", "masked_lm_loss"]


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _transform(h, dense_weight, dense_bias, ln_weight, ln_bias, ln_eps, backend):
    """``LayerNorm(gelu(h @ W1^T + b1))`` in ``h``'s dtype, through bertfast.ops."""
    ct = h.dtype
    x = ops.bias_gelu(F.linear(h, dense_weight.to(ct)), dense_bias.to(ct), backend=backend)
    return ops.layer_norm(x, ln_weight.to(ct), ln_bias.to(ct), ln_eps, backend=backend)


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when computing in fp64."""
    return torch.promote_types(compute_dtype, torch.float32)


def _chunk_logits(t, decoder_weight, decoder_bias) -> torch.Tensor:
    """``t @ Wd^T + bd`` as ``(rows, V)`` fp32 (a GEMM in ``t``'s dtype, then one upcast) or fp64."""
    ct = t.dtype
    return F.linear(t, decoder_weight.to(ct), decoder_bias.to(ct)).to(_accumulate_dtype(ct))


class _ChunkedMaskedLMLoss(torch.autograd.Function):
    """Sum over rows of the head's cross-entropy; inputs are the gathered labelled rows."""

    @staticmethod
    def forward(
        ctx,
        rows,
        targets,
        row_valid,
        dense_weight,
        dense_bias,
        ln_weight,
        ln_bias,
        decoder_weight,
        decoder_bias,
        ln_eps,
        chunk_size,
        compute_dtype,
        backend,
    ):
        device_type = rows.device.type
        acc = _accumulate_dtype(compute_dtype)
        lse = torch.empty(rows.shape[0], dtype=acc, device=rows.device)
        total = torch.zeros((), dtype=acc, device=rows.device)
        # The decoder (V x H, the largest weight) is cast once per call, not once per chunk.
        decoder_weight_ct, decoder_bias_ct = decoder_weight.to(compute_dtype), decoder_bias.to(compute_dtype)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, rows.shape[0], chunk_size):
                stop = min(start + chunk_size, rows.shape[0])
                t = _transform(
                    rows[start:stop].to(compute_dtype), dense_weight, dense_bias, ln_weight, ln_bias, ln_eps, backend
                )
                logits = _chunk_logits(t, decoder_weight_ct, decoder_bias_ct)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[start:stop] = chunk_lse
                target_logits = logits.gather(1, targets[start:stop, None]).squeeze(1)
                row_losses = chunk_lse - target_logits
                if row_valid is not None:
                    row_losses = row_losses * row_valid[start:stop]
                total += row_losses.sum()
        ctx.save_for_backward(
            rows, targets, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias, lse
        )
        ctx.ln_eps, ctx.chunk_size, ctx.compute_dtype, ctx.backend = ln_eps, chunk_size, compute_dtype, backend
        ctx.row_valid = row_valid
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = ctx.saved_tensors
        rows, targets, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias, lse = saved
        transform_params = (dense_weight, dense_bias, ln_weight, ln_bias)
        needs = ctx.needs_input_grad
        need_rows, need_transform = needs[0], needs[3:7]
        need_decoder_weight, need_decoder_bias = needs[7], needs[8]
        ct = ctx.compute_dtype
        acc = _accumulate_dtype(ct)

        def zeros(t):
            return torch.zeros(t.shape, dtype=acc, device=t.device)

        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_transform = [zeros(p) if need else None for p, need in zip(transform_params, need_transform)]
        grad_decoder_weight = zeros(decoder_weight) if need_decoder_weight else None
        grad_decoder_bias = zeros(decoder_bias) if need_decoder_bias else None
        decoder_weight_ct, decoder_bias_ct = decoder_weight.to(ct), decoder_bias.to(ct)
        # Leaves for the transform's recomputation: autograd gives their per-chunk gradients.
        param_leaves = [p.detach().requires_grad_(need) for p, need in zip(transform_params, need_transform)]
        wanted_params = [leaf for leaf, need in zip(param_leaves, need_transform) if need]

        with torch.autocast(rows.device.type, enabled=False):
            for start in range(0, rows.shape[0], ctx.chunk_size):
                stop = min(start + ctx.chunk_size, rows.shape[0])
                chunk = rows[start:stop].detach().to(ct).requires_grad_(need_rows)
                with torch.enable_grad():
                    t = _transform(chunk, *param_leaves, ctx.ln_eps, ctx.backend)
                t_data = t.detach()
                # dz = softmax(z) - onehot(y) in fp32.  The loss's gradient g scales the products of dz
                # (rows x H, H, V), not dz (rows x V): one pass fewer.  z - lse is in place when z is already
                # fp32; from a 16-bit z the subtraction's type promotion is the upcast: one pass, not two.
                z = F.linear(t_data, decoder_weight_ct, decoder_bias_ct)
                dz = z.sub_(lse[start:stop, None]) if z.dtype == acc else torch.sub(z, lse[start:stop, None])
                del z
                dz.exp_()
                dz[torch.arange(stop - start, device=dz.device), targets[start:stop]] -= 1.0
                if ctx.row_valid is not None:  # fill rows of a fixed-size gather: no gradient
                    dz.mul_(ctx.row_valid[start:stop, None])
                if grad_decoder_bias is not None:
                    grad_decoder_bias += dz.sum(dim=0) * grad_total
                dz_ct = dz.to(ct)
                if grad_decoder_weight is not None:
                    t_scaled = t_data * grad_total.to(ct)
                    if ct == acc:
                        grad_decoder_weight.addmm_(dz_ct.t(), t_scaled)
                    else:
                        grad_decoder_weight += (dz_ct.t() @ t_scaled).to(acc)
                del dz
                if not (need_rows or wanted_params):
                    continue
                dt = (dz_ct @ decoder_weight_ct).mul_(grad_total.to(ct))
                inputs = ([chunk] if need_rows else []) + wanted_params
                grads = list(torch.autograd.grad(t, inputs, dt))
                if need_rows:
                    grad_rows[start:stop] = grads.pop(0).to(rows.dtype)
                for i, need in enumerate(need_transform):
                    if need:
                        grad_transform[i] += grads.pop(0).to(acc)

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (
            grad_rows,
            None,
            None,
            *(cast(g, p) for g, p in zip(grad_transform, transform_params)),
            cast(grad_decoder_weight, decoder_weight),
            cast(grad_decoder_bias, decoder_bias),
            None,
            None,
            None,
            None,
        )


def _check_vector(name: str, t: torch.Tensor, size: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")


def masked_lm_loss(
    hidden: torch.Tensor,
    transform_dense_weight: torch.Tensor,
    transform_dense_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of the BERT MLM head on the labelled positions, without whole logits.

    ``hidden``: ``(..., H)`` encoder output; ``labels``: integer, ``hidden.shape[:-1]``,
    a token id in ``[0, V)`` or ``-100`` (ignored).  The head: ``transform_dense_*``
    ``(H, H)`` / ``(H,)``, the LayerNorm ``ln_*`` ``(H,)`` with ``ln_eps``, the decoder
    ``decoder_weight`` ``(V, H)`` (tied to the word embeddings) and ``decoder_bias``
    ``(V,)``.  ``chunk_size``: labelled rows per chunk (bounds the memory, see the
    module docstring).  ``reduction``: ``"mean"`` over the labelled tokens (0 when there
    are none) or ``"sum"`` (to normalise by a count taken over several micro-batches or
    ranks).  ``backend``: for the transform's ops (``bertfast.ops``).

    Returns an fp32 scalar (fp64 for fp64 inputs), differentiable with respect to ``hidden`` and every weight.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.dtype.is_floating_point or hidden.dim() < 1:
        raise TypeError("hidden must be a floating-point torch.Tensor of shape (..., hidden)")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's without H), got {labels.shape}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    size = hidden.shape[-1]
    if not isinstance(decoder_weight, torch.Tensor) or decoder_weight.dim() != 2 or decoder_weight.shape[1] != size:
        raise ValueError(f"decoder_weight must have shape (vocab, {size})")
    vocab = decoder_weight.shape[0]
    if tuple(transform_dense_weight.shape) != (size, size):
        raise ValueError(
            f"transform_dense_weight must have shape ({size}, {size}), got {tuple(transform_dense_weight.shape)}"
        )
    for name, t, n in (
        ("transform_dense_weight", transform_dense_weight.flatten(), size * size),
        ("decoder_weight", decoder_weight.flatten(), vocab * size),
        ("transform_dense_bias", transform_dense_bias, size),
        ("ln_weight", ln_weight, size),
        ("ln_bias", ln_bias, size),
        ("decoder_bias", decoder_bias, vocab),
    ):
        _check_vector(name, t, n, hidden.device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not ln_eps > 0:
        raise ValueError(f"ln_eps must be positive, got {ln_eps}")
    ops.validate_backend_name(backend)

    flat_labels = labels.reshape(-1)
    static = static_packing()
    row_valid = None
    if static is None:
        selected = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # reads the count back to the host
        targets = flat_labels.index_select(0, selected).long()
        count = targets.shape[0]
        if count:
            low, high = torch.stack(torch.aminmax(targets)).tolist()
            if low < 0 or high >= vocab:
                raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}; got values in [{low}, {high}]")
    else:
        # A fixed number of rows (bertfast.TrainStep checked the labels on the host): the labelled ones
        # first, then fill rows whose loss and gradient are masked out.  No size is read back.
        labelled = flat_labels != IGNORE_INDEX
        selected = torch.nonzero_static(labelled, size=static.label_rows, fill_value=0).squeeze(1)
        row_valid = torch.arange(static.label_rows, device=labels.device) < labelled.sum()
        targets = torch.where(row_valid, flat_labels.index_select(0, selected), 0).long()
        count = row_valid.sum().clamp_min(1)
        row_valid = row_valid.to(_accumulate_dtype(_compute_dtype(hidden)))
    rows = hidden.reshape(-1, size).index_select(0, selected)
    total = _ChunkedMaskedLMLoss.apply(
        rows,
        targets,
        row_valid,
        transform_dense_weight,
        transform_dense_bias,
        ln_weight,
        ln_bias,
        decoder_weight,
        decoder_bias,
        float(ln_eps),
        chunk_size,
        _compute_dtype(hidden),
        backend,
    )
    if reduction == "sum":
        return total
    return total / (count if static is not None else max(count, 1))


def masked_lm_head_loss(
    head,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`masked_lm_loss` with the weights of a ``BertLMPredictionHead`` (``model.cls.predictions``)."""
    transform = head.transform
    return masked_lm_loss(
        hidden,
        transform.dense.weight,
        transform.dense.bias,
        transform.LayerNorm.weight,
        transform.LayerNorm.bias,
        transform.LayerNorm.eps,
        head.decoder.weight,
        head.decoder.bias,
        labels,
        chunk_size=chunk_size,
        reduction=reduction,
        backend=backend,
    )
