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


def layer_norm(x, weight, bias, eps, residual=None, linear_bias=None, dropout_p=0.0, seed=None):
    """``LayerNorm(dropout(x + linear_bias) + residual)``: the dense bias is dropped with its output.
    ``seed``: the kernels' philox seed, unused here (``F.dropout`` draws from torch's generator)."""
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


def attention(q, k, v, attention_mask, scale, dropout_p=0.0, seed=None):
    ct = _compute_dtype(q.dtype)
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    out = _masked_softmax_attention(qh, kh, vh, attention_mask, scale, dropout_p)
    return out.transpose(1, 2).to(q.dtype)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    """Per-sequence attention: each packed sequence attends only within itself."""
    ct = _compute_dtype(q.dtype)
    out = torch.zeros_like(q)  # rows outside every sequence (offsets short of the tokens) read 0, not garbage
    offsets = cu_seqlens.tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].to(ct).transpose(0, 1) for t in (q, k, v))
        out[start:end] = _masked_softmax_attention(qs, ks, vs, None, scale, dropout_p).transpose(0, 1).to(q.dtype)
    return out


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
