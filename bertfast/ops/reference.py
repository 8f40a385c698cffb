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


def _softmax_attention(q, k, v, allowed, scale, dropout_p=0.0):
    """q, k, v: (..., seq, dim); ``allowed``: a bool mask broadcastable to (..., seq_q, seq_k) in which
    every query allows at least one key, or None.

    Without dropout, below float64, this is one call of PyTorch's fused SDPA (its fastest CPU
    attention; fp32 statistics).  In float64, the kernels' yardstick in the tests, the softmax is
    written out: exact zeros stay exact (a softmax over one key has gradient 0, where the fused
    backward leaves rounding noise)."""
    if dropout_p == 0.0 and q.dtype != torch.float64:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.matmul(probs, v)


def _masked_softmax_attention(q, k, v, keep, scale, dropout_p=0.0):
    """q, k, v: (batch, heads, seq, dim); keep: (batch, seq_k) bool or None.

    A query with no valid key gets zero output: such rows attend to every key (so no NaN reaches
    the output or the gradients) and are zeroed after."""
    if keep is None:
        return _softmax_attention(q, k, v, None, scale, dropout_p)
    any_valid = keep.any(dim=-1, keepdim=True)
    out = _softmax_attention(q, k, v, (keep | ~any_valid)[:, None, None, :], scale, dropout_p)
    return out * any_valid[:, None, :, None]


def attention(q, k, v, attention_mask, scale, dropout_p=0.0, seed=None):
    ct = _compute_dtype(q.dtype)
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    out = _masked_softmax_attention(qh, kh, vh, attention_mask, scale, dropout_p)
    return out.transpose(1, 2).to(q.dtype)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    """Per-sequence attention: each packed sequence attends only within itself."""
    return attention_varlen_qkv(torch.stack((q, k, v), dim=1), cu_seqlens, max_seqlen, scale, dropout_p)


def _block_diagonal(total: int, sequences: int, max_seqlen: int) -> bool:
    """Whether all-tokens attention costs at most twice the padded layout's scores."""
    return total * total <= 2 * sequences * max_seqlen * max_seqlen


def attention_varlen_qkv(qkv, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    """:func:`attention_varlen` of ``qkv`` (total, 3, heads, dim), the packed projections side by side.

    The whole batch runs in a few large ops whatever the number of sequences (a loop over
    sequences made a batch hundreds of small multi-threaded ops), with no host read: the
    positions come from ``cu_seqlens`` on the device.  Two layouts, chosen by shape:

    - block-diagonal, when the scores of all tokens against all tokens are at most twice the
      padded layout's: one attention over the packed tokens with a mask allowing each token its
      own sequence's keys (no copy at all: the fewest ops, for small batches);
    - padded: the projections gathered into ``(sequences, max_seqlen)`` with one index op,
      attended with a key-padding mask, the packed rows gathered back.

    Offsets must end at ``total`` (``bertfast.ops.attention_varlen`` checks them)."""
    ct = _compute_dtype(qkv.dtype)
    total = qkv.shape[0]
    sequences = cu_seqlens.shape[0] - 1
    if total == 0 or sequences * max_seqlen == 0:
        return qkv.new_zeros((total, *qkv.shape[2:]))
    row = torch.arange(total, device=qkv.device, dtype=cu_seqlens.dtype)
    sequence_of_row = torch.searchsorted(cu_seqlens[1:], row, right=True)
    if _block_diagonal(total, sequences, max_seqlen):
        # (1, heads, total, dim) each: PyTorch's fused CPU attention takes 4-D inputs only
        q, k, v = qkv.to(ct).permute(1, 2, 0, 3)[:, None].unbind(0)
        allowed = sequence_of_row[:, None] == sequence_of_row[None, :]
        return _softmax_attention(q, k, v, allowed, scale, dropout_p)[0].transpose(0, 1).to(qkv.dtype)
    # Padded layout: slot (i, j) holds packed row starts[i] + j, a token where j < the sequence's length.
    starts = cu_seqlens[:-1]
    slot = torch.arange(max_seqlen, device=qkv.device, dtype=cu_seqlens.dtype)
    keep = slot < cu_seqlens.diff()[:, None]
    source = (starts[:, None] + slot).clamp_(max=total - 1).flatten()
    padded = qkv.index_select(0, source).to(ct).unflatten(0, (sequences, max_seqlen))
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # (sequences, heads, max_seqlen, dim) each
    # No sequence is empty among the packed rows read back, so no query lacks a key there.
    allowed = (keep | ~keep.any(dim=-1, keepdim=True))[:, None, None, :]
    out = _softmax_attention(q, k, v, allowed, scale, dropout_p).transpose(1, 2).flatten(0, 1)
    slot_of_row = row + (sequence_of_row * max_seqlen - starts.index_select(0, sequence_of_row))
    return out.index_select(0, slot_of_row).to(qkv.dtype)


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


# --------------------------------------------------------------------------------------
# FP8 (e4m3) quantization, per row: the activations of bertfast.fp8's GEMMs
# --------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value


def _quantize_rows_fp32(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of fp32 ``y`` (..., K): ``scale = amax / 448`` per row (1 for a row of zeros) and
    ``q = e4m3(clamp(y * (448 / amax)))``, rounded to nearest even; ``q * scale`` approximates ``y``.

    The definition every FP8 kernel follows bit for bit (a multiply by the row's reciprocal, not a
    division per element)."""
    amax = y.abs().amax(dim=-1, keepdim=True)
    nonzero = amax > 0
    scale = torch.where(nonzero, amax / FP8_MAX, 1.0)
    inverse = torch.where(nonzero, FP8_MAX / amax, 1.0)
    q = (y * inverse).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_rows(x):
    """``(q, scale)``: ``x`` (..., K) in e4m3 with one fp32 scale per row, ``scale`` of shape (..., 1)."""
    return _quantize_rows_fp32(x.float())


def layer_norm_fp8(x, weight, bias, eps, residual=None, linear_bias=None):
    """:func:`layer_norm` (no dropout: inference) returning ``(y, q, scale)``: ``y`` in ``x``'s dtype and
    the fp32 result quantized per row (:func:`quantize_rows`, from fp32, not from the rounded ``y``)."""
    h = x.float()
    if linear_bias is not None:
        h = h + linear_bias.float()
    if residual is not None:
        h = h + residual.float()
    y = F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)
    return (y.to(x.dtype), *_quantize_rows_fp32(y))


def bias_gelu_fp8(x, bias):
    """``gelu(x + bias)`` (:func:`bias_gelu`) quantized per row from fp32: ``(q, scale)``."""
    return _quantize_rows_fp32(F.gelu(x.float() + bias.float()))
