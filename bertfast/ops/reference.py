"""The reference backend: every op in plain PyTorch.

This is the yardstick: the model on this backend matches Hugging Face transformers, and
every kernel is tested against these functions (run in float64).  Low-precision inputs
are computed in fp32 and cast back, so the reference is never the weak link.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTS_ATTENTION_DROPOUT = True
SUPPORTS_HIDDEN_DROPOUT = True


def availability() -> str | None:
    return None


def unsupported(op: str, *tensors, **meta) -> str | None:
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def layer_norm(x, weight, bias, eps, residual=None, linear_bias=None, dropout_p=0.0):
    """``LayerNorm(dropout(x + linear_bias) + residual)``: the dense bias is dropped with its output."""
    ct = _compute_dtype(x.dtype)
    h = x.to(ct)
    if linear_bias is not None:
        h = h + linear_bias.to(ct)
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p)
    if residual is not None:
        h = h + residual.to(ct)
    y = F.layer_norm(h, (h.shape[-1],), weight.to(ct), bias.to(ct), eps)
    return y.to(x.dtype)


def bias_gelu(x, bias):
    ct = _compute_dtype(x.dtype)
    return F.gelu(x.to(ct) + bias.to(ct)).to(x.dtype)


def _masked_softmax_attention(q, k, v, keep, scale, dropout_p=0.0):
    """q, k, v: (batch, heads, seq, dim); keep: (batch, seq_k) bool or None.

    A query with no valid key gets zero output.  Without dropout, below float64, this is one call
    of PyTorch's fused SDPA (its fastest CPU attention; fp32 statistics); such rows then attend to
    every key, so no NaN reaches the output or the gradients, and are zeroed after.  In float64,
    the kernels' yardstick in the tests, the softmax is written out: exact zeros stay exact (a
    softmax over one key has gradient 0, where the fused backward leaves rounding noise)."""
    if keep is not None:
        any_valid = keep.any(dim=-1, keepdim=True)
        keep = (keep | ~any_valid)[:, None, None, :]
        any_valid = any_valid[:, None, :, None]
    if dropout_p == 0.0 and q.dtype != torch.float64:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
        return out if keep is None else out * any_valid
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    out = torch.matmul(probs, v)
    return out if keep is None else out * any_valid


def attention(q, k, v, attention_mask, scale, dropout_p=0.0):
    ct = _compute_dtype(q.dtype)
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    out = _masked_softmax_attention(qh, kh, vh, attention_mask, scale, dropout_p)
    return out.transpose(1, 2).to(q.dtype)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0):
    """Per-sequence attention: each packed sequence attends only within itself.

    The whole batch runs as one padded attention call: q, k and v are gathered into
    ``(sequences, max_seqlen)`` with one index op each, attended with a key-padding mask, and the
    packed rows gathered back, so the cost is a few large ops whatever the number of sequences
    (a loop over sequences made a batch hundreds of small multi-threaded ops).  No host read:
    the positions come from ``cu_seqlens`` on the device.  Rows outside every sequence (offsets
    short of the tokens) read 0, not garbage."""
    ct = _compute_dtype(q.dtype)
    total, heads, head_dim = q.shape
    sequences = cu_seqlens.shape[0] - 1
    if total == 0 or sequences * max_seqlen == 0:
        return torch.zeros_like(q)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    # Padded layout: slot (i, j) holds packed row starts[i] + j where j < the sequence's length.
    slot = torch.arange(max_seqlen, device=q.device)
    keep = slot[None, :] < (ends - starts)[:, None]
    source = (starts[:, None] + slot[None, :]).clamp(max=total - 1).flatten()
    padded = [
        t.index_select(0, source).to(ct).view(sequences, max_seqlen, heads, head_dim).transpose(1, 2) for t in (q, k, v)
    ]
    out = _masked_softmax_attention(*padded, keep, scale, dropout_p).transpose(1, 2).flatten(0, 1)
    # Packed row r belongs to the sequence whose offsets bracket it; past the last offset, to none.
    row = torch.arange(total, device=q.device)
    sequence_of_row = torch.searchsorted(ends, row, right=True)
    inside = sequence_of_row < sequences
    sequence_of_row = sequence_of_row.clamp(max=sequences - 1)
    position = (row - starts.index_select(0, sequence_of_row)).clamp(max=max_seqlen - 1)
    packed = out.index_select(0, sequence_of_row * max_seqlen + position)
    return (packed * inside[:, None, None]).to(q.dtype)


def embedding_layer_norm(
    input_ids,
    position_ids,
    token_type_ids,
    word_embeddings,
    position_embeddings,
    token_type_embeddings,
    weight,
    bias,
    eps,
):
    summed = F.embedding(input_ids, word_embeddings) + F.embedding(token_type_ids, token_type_embeddings)
    summed = summed + F.embedding(position_ids, position_embeddings)
    return layer_norm(summed, weight, bias, eps)


def mean_pool(x, cu_seqlens, normalize=False):
    """Each packed sequence's mean row (0 when empty), then ``F.normalize`` when ``normalize``."""
    ct = _compute_dtype(x.dtype)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    sums = x.new_zeros((lengths.numel(), x.shape[1]), dtype=ct).index_add(0, sequence_of_row, x.to(ct))
    mean = sums / lengths.clamp(min=1)[:, None].to(ct)
    return (F.normalize(mean, dim=-1, eps=1e-12) if normalize else mean).to(x.dtype)
