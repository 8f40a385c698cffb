"""Fused softmax attention (flash-attention-2 style): padded batches and packed varlen, forward and backward.

Math (per batch element and head; ``s_q`` queries, ``s_k`` keys, head size ``d``)::

    S   = scale * Q K^T                              (s_q, s_k)
    S_ij = -inf where key j is padding                (key-padding mask, or outside the sequence)
    P   = softmax(S, dim=-1)  = exp(S - lse[:, None])
    lse = log(sum_j exp(S_ij))                       (s_q,), kept in fp32 for the backward
    O   = P V                                        (s_q, d)

A query whose keys are all padding has ``P = 0`` and ``O = 0`` (its stored ``lse`` is ``+inf``,
so ``exp(S - lse) = 0`` in the backward too).  Backward, with ``dO = dL/dO``::

    D   = rowsum(dO * O)                              (s_q,)    [= rowsum(P * dP)]
    dV  = P^T dO
    dP  = dO V^T
    dS  = P * (dP - D[:, None])
    dQ  = scale * dS K
    dK  = scale * dS^T Q

Attention dropout (training, rate ``p``), as in flash-attention: with ``Z_ij = keep_ij / (1 - p)``,
``keep_ij`` a Bernoulli(1 - p) draw, ``O = (P * Z) V``; ``lse`` is still that of the undropped
``P``.  The backward regenerates the same ``keep`` and uses ``dV = (P * Z)^T dO``,
``dP = (dO V^T) * Z``; ``D = rowsum(dO * O)`` is unchanged (it equals ``rowsum(P * dP)``).
``keep_ij`` is ``philox(seed, (j, t, h, 0)) >= p`` (32-bit counters, see ``_dropout.py``): key ``j``,
query token ``t`` (its row in the whole batch: ``batch * seq_q + i`` padded, its packed row varlen)
and head ``h``.  It depends on no block size, so the forward and both backward kernels,
autotuned independently, draw the same mask.  The seed is read on the device from a 1-element
int64 tensor drawn from torch's generator (one draw per model forward, see ``_dropout.py``), so
``torch.manual_seed`` reproduces the masks, no call reads a value back to the host and a CUDA
graph draws fresh masks at each replay.  The cost is one philox draw (10 rounds of 32-bit
multiplies) per probability in the forward and two in the backward; with ``p = 0`` the kernels
are compiled without any of it.

Nothing of size ``s_q x s_k`` ever reaches global memory.  The forward runs one program per
(block of ``BLOCK_M`` queries, batch * head); it streams key/value blocks of ``BLOCK_N`` rows
through an online softmax (running max ``m`` and sum ``l`` in fp32, ``exp2`` with
``scale * log2(e)`` folded into the scores) and stops at the last key that is not padding.  The
backward is deterministic (no atomics): a small kernel computes ``D``, one kernel per key block
accumulates ``dK, dV`` in registers over all query blocks, and one kernel per query block
accumulates ``dQ`` over the key blocks.

Layouts:

- padded (:func:`attention`): ``q`` ``(batch, seq_q, heads, d)``, ``k, v`` ``(batch, seq_k, heads, d)``,
  any strides with ``stride(-1) == 1`` (e.g. views of one fused QKV projection, never copied);
  ``attention_mask`` bool ``(batch, seq_k)``, True = token; ``lse`` ``(batch, heads, seq_q)``.
- varlen (:func:`attention_varlen`): ``q, k, v`` ``(total_tokens, heads, d)``; sequence ``i`` is
  rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only within itself; ``lse`` ``(heads, total)``.
  ``max_seqlen`` must be at least the longest sequence (it sizes the grid).  The launcher checks
  the offsets and ``max_seqlen`` with one host read unless called with ``check=False``.

Both layouts share every jit function: the varlen kernels are the padded ones with
``IS_VARLEN`` set (batch stride 0, sequence start and length read from ``cu_seqlens``).
``head_dim`` may be anything up to 128: it is padded to a power of two (at least 16) in
registers and masked on load/store.  Scores and probabilities are fp32; ``tl.dot`` takes
fp16/bf16 operands with fp32 accumulation, or fp32 operands in full ("ieee") precision.

Cost (b batch, h heads, s = s_q = s_k, d head size, e bytes per element):

- forward FLOPs ``4 b h s^2 d`` (two matmuls); bytes at least ``e * b s h d * 4`` (read q, k, v,
  write o) plus ``4 b h s`` for lse and ``b s`` for the mask (k, v are re-read per query block,
  mostly from L2).
- backward useful FLOPs ``10 b h s^2 d`` (2.5x forward); these kernels do ``14 b h s^2 d`` because
  the separate dQ pass recomputes ``S`` and ``dP`` -- the price of a deterministic dQ.  Bytes at
  least ``e * b s h d * 8`` (read q, k, v, o, dO; write dq, dk, dv) plus ``12 b h s`` (read lse, write
  and read D).
"""

import torch
import triton
import triton.language as tl

from ..varlen import check_cu_seqlens
from ._dropout import call_seed, check_dropout_p, dropout_args, dropout_keep
from ._launch import (
    CachedLaunch,
    PlanCache,
    cdiv,
    device_guard,
    eager_fast_path,
    interpreting,
    needs_grad,
    next_launch_key,
    profiled,
    tensor_key,
)

__all__ = ["attention", "attention_varlen", "unsupported"]

_INTERPRET = interpreting()
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128

# Scores are kept in log2 units (exp(x) = exp2(x * log2(e))) so the inner loop uses exp2.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sequence_span(pid_bh, num_heads, cu_seqlens_ptr, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(batch, head, first row of the sequence, query count, key count) of this program."""
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + batch)
        length = tl.load(cu_seqlens_ptr + batch + 1) - start
        return batch, head, start, length, length
    else:
        return batch, head, tl.full([], 0, tl.int32), seq_q, seq_k


@triton.jit
def _head_base(ptr, batch, head, seq_start, stride_b, stride_s, stride_h):
    # 64-bit: a packed batch of long sequences can pass 2**31 elements.
    return ptr + batch.to(tl.int64) * stride_b + seq_start.to(tl.int64) * stride_s + head.to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, rows, stride_s, offs_d, num_rows, HEAD_DIM: tl.constexpr):
    """A (len(rows), HEAD_DIM_PADDED) tile; rows past the sequence and padded columns read 0."""
    ptrs = base + rows[:, None] * stride_s + offs_d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, tile, rows, stride_s, offs_d, num_rows, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_s + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _keys_valid(mask_row, stride_ms, cols, num_keys, HAS_MASK: tl.constexpr):
    """Which of the key columns ``cols`` may receive probability: inside the sequence and not padding."""
    valid = cols < num_keys
    if HAS_MASK:
        keep = tl.load(mask_row + cols * stride_ms, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def _first_token(batch, seq_start, seq_q, IS_VARLEN: tl.constexpr):
    """The batch-wide row of this sequence's query 0: the dropout counter of its queries starts there."""
    if IS_VARLEN:
        return seq_start.to(tl.int32)
    else:
        return batch.to(tl.int32) * seq_q


@triton.jit
def _dropout_keep(Seed, dropout_p, first_token, head, rows, cols):
    """Which probabilities of query ``rows`` x key ``cols`` survive dropout: one philox draw each.

    ``rows`` and ``cols`` are passed broadcastable (``rows[:, None], cols[None, :]``, or the
    transpose for a transposed tile); the mask does not depend on the tile shape.
    """
    return dropout_keep(tl.load(Seed), dropout_p, cols, first_token + rows, head)


@triton.jit
def _key_extent(mask_row, stride_ms, num_keys, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One past the last valid key: key blocks from here on are all padding and are skipped.

    With right padding (the usual case) this is the sequence's real length; an all-padding
    sequence gives 0, so its queries see no key at all.
    """
    if HAS_MASK:
        last = tl.full([], -1, tl.int32)
        for start_n in range(0, num_keys, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            keep = tl.load(mask_row + cols * stride_ms, mask=cols < num_keys, other=0)
            last = tl.maximum(last, tl.max(tl.where(keep != 0, cols, -1), axis=0))
        return last + 1
    else:
        return num_keys


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, KeyMask, CuSeqlens, Seed,
    sm_scale, dropout_p,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    num_heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, QK_DIM: tl.constexpr, OUT_DIM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, head), output columns ``OUT_DIM * program_id(2)`` on.

    ``QK_DIM == OUT_DIM == HEAD_DIM_PADDED`` except for fp32 at head sizes over 64 (see ``_fwd_split``):
    FMA dots hold whole operand rows per thread, so there Q K^T sums QK_DIM-wide slices and each program
    writes OUT_DIM of the output columns, recomputing the scores (no spill, at twice the Q K^T work).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_o = tl.program_id(2)
    batch, head, seq_start, num_q, num_k = _sequence_span(pid_bh, num_heads, CuSeqlens, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M >= num_q:  # varlen: this sequence is shorter than max_seqlen
        return
    mask_row = KeyMask + batch.to(tl.int64) * stride_mb
    key_end = _key_extent(mask_row, stride_ms, num_k, HAS_MASK, BLOCK_N)
    first_token = _first_token(batch, seq_start, seq_q, IS_VARLEN)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    offs_o = pid_o * OUT_DIM + tl.arange(0, OUT_DIM)
    q_base = _head_base(Q, batch, head, seq_start, stride_qb, stride_qs, stride_qh)
    k_base = _head_base(K, batch, head, seq_start, stride_kb, stride_ks, stride_kh)
    v_base = _head_base(V, batch, head, seq_start, stride_vb, stride_vs, stride_vh)
    o_base = _head_base(Out, batch, head, seq_start, stride_ob, stride_os, stride_oh)
    if QK_DIM == HEAD_DIM_PADDED:
        q = _load_rows(q_base, rows, stride_qs, offs_d, num_q, HEAD_DIM)

    qk_scale = sm_scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, OUT_DIM], tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        valid = _keys_valid(mask_row, stride_ms, cols, num_k, HAS_MASK)
        if QK_DIM == HEAD_DIM_PADDED:
            k = _load_rows(k_base, cols, stride_ks, offs_d, num_k, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:  # slices of the head; q is re-read per key block (from cache) rather than kept in registers
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in tl.static_range(0, HEAD_DIM_PADDED, QK_DIM):
                offs_c = d0 + tl.arange(0, QK_DIM)
                q_c = _load_rows(q_base, rows, stride_qs, offs_c, num_q, HEAD_DIM)
                k_c = _load_rows(k_base, cols, stride_ks, offs_c, num_k, HEAD_DIM)
                s = tl.dot(q_c, tl.trans(k_c), s, input_precision="ieee")
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no valid key yet keep m = -inf; subtract 0 instead so nothing becomes NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax normaliser takes the undropped p
        if HAS_DROPOUT:  # P @ V takes the dropped one; the 1 / (1 - p) is applied to the output
            keep = _dropout_keep(Seed, dropout_p, first_token, head, rows[:, None], cols[None, :])
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_base, cols, stride_vs, offs_o, num_k, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    _store_rows(o_base, out, rows, stride_os, offs_o, num_q, HEAD_DIM)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * _LN2, float("inf"))
    lse_ptrs = LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + seq_start + rows
    if OUT_DIM == HEAD_DIM_PADDED:
        tl.store(lse_ptrs, lse, mask=rows < num_q)
    elif pid_o == 0:  # every column block has the same lse: the first stores it
        tl.store(lse_ptrs, lse, mask=rows < num_q)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DOut, Delta, CuSeqlens,
    stride_ob, stride_os, stride_oh,
    stride_gb, stride_gs, stride_gh,
    stride_lb, stride_lh,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """D = rowsum(dO * O) in fp32, laid out like lse."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, seq_start, num_q, _ = _sequence_span(pid_bh, num_heads, CuSeqlens, seq_q, seq_q, IS_VARLEN)
    if pid_m * BLOCK_M >= num_q:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    o_base = _head_base(Out, batch, head, seq_start, stride_ob, stride_os, stride_oh)
    do_base = _head_base(DOut, batch, head, seq_start, stride_gb, stride_gs, stride_gh)
    o = _load_rows(o_base, rows, stride_os, offs_d, num_q, HEAD_DIM)
    do = _load_rows(do_base, rows, stride_gs, offs_d, num_q, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    delta_ptrs = Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + seq_start + rows
    tl.store(delta_ptrs, delta, mask=rows < num_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, LSE, Delta, DK, DV, KeyMask, CuSeqlens, Seed,
    sm_scale, dropout_p,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    num_heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_N keys: dV = P^T dO and dK = scale * dS^T Q over every query block.

    Computed transposed (keys along rows) so no (BLOCK_M, BLOCK_N) tile needs a transpose.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, seq_start, num_q, num_k = _sequence_span(pid_bh, num_heads, CuSeqlens, seq_q, seq_k, IS_VARLEN)
    if pid_n * BLOCK_N >= num_k:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask_row = KeyMask + batch.to(tl.int64) * stride_mb
    valid = _keys_valid(mask_row, stride_ms, cols, num_k, HAS_MASK)
    first_token = _first_token(batch, seq_start, seq_q, IS_VARLEN)
    q_base = _head_base(Q, batch, head, seq_start, stride_qb, stride_qs, stride_qh)
    k_base = _head_base(K, batch, head, seq_start, stride_kb, stride_ks, stride_kh)
    v_base = _head_base(V, batch, head, seq_start, stride_vb, stride_vs, stride_vh)
    do_base = _head_base(DOut, batch, head, seq_start, stride_gb, stride_gs, stride_gh)
    dk_base = _head_base(DK, batch, head, seq_start, stride_dkb, stride_dks, stride_dkh)
    dv_base = _head_base(DV, batch, head, seq_start, stride_dvb, stride_dvs, stride_dvh)
    stats_base = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + seq_start
    k = _load_rows(k_base, cols, stride_ks, offs_d, num_k, HEAD_DIM)
    v = _load_rows(v_base, cols, stride_vs, offs_d, num_k, HEAD_DIM)

    qk_scale = sm_scale * _LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], tl.float32)
    # A block of padding keys gets no probability, so its gradients are zero: skip the query loop.
    query_end = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, num_q, 0)
    for start_m in range(0, query_end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_base, rows, stride_qs, offs_d, num_q, HEAD_DIM)
        do = _load_rows(do_base, rows, stride_gs, offs_d, num_q, HEAD_DIM)
        # Rows past the sequence read lse = +inf, i.e. probability 0.
        lse2 = tl.load(LSE + stats_base + rows, mask=rows < num_q, other=float("inf")) * _LOG2E
        delta = tl.load(Delta + stats_base + rows, mask=rows < num_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        p_t = tl.exp2(tl.where(valid[:, None], s_t, float("-inf")) - lse2[None, :])
        if HAS_DROPOUT:  # dV takes the dropped, rescaled P; dP is masked and rescaled alike
            keep_t = _dropout_keep(Seed, dropout_p, first_token, head, rows[None, :], cols[:, None])
            p_kept_t = tl.where(keep_t, p_t * keep_scale, 0.0)
        else:
            p_kept_t = p_t
        dv = tl.dot(p_kept_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        if HAS_DROPOUT:
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")

    _store_rows(dk_base, dk * sm_scale, cols, stride_dks, offs_d, num_k, HEAD_DIM)
    _store_rows(dv_base, dv, cols, stride_dvs, offs_d, num_k, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, LSE, Delta, DQ, KeyMask, CuSeqlens, Seed,
    sm_scale, dropout_p,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    num_heads, seq_q, seq_k,
    seq_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M queries: dQ = scale * dS K over the key blocks (up to the last valid key)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, seq_start, num_q, num_k = _sequence_span(pid_bh, num_heads, CuSeqlens, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M >= num_q:
        return
    mask_row = KeyMask + batch.to(tl.int64) * stride_mb
    key_end = _key_extent(mask_row, stride_ms, num_k, HAS_MASK, BLOCK_N)
    first_token = _first_token(batch, seq_start, seq_q, IS_VARLEN)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q_base = _head_base(Q, batch, head, seq_start, stride_qb, stride_qs, stride_qh)
    k_base = _head_base(K, batch, head, seq_start, stride_kb, stride_ks, stride_kh)
    v_base = _head_base(V, batch, head, seq_start, stride_vb, stride_vs, stride_vh)
    do_base = _head_base(DOut, batch, head, seq_start, stride_gb, stride_gs, stride_gh)
    dq_base = _head_base(DQ, batch, head, seq_start, stride_dqb, stride_dqs, stride_dqh)
    stats_base = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + seq_start
    q = _load_rows(q_base, rows, stride_qs, offs_d, num_q, HEAD_DIM)
    do = _load_rows(do_base, rows, stride_gs, offs_d, num_q, HEAD_DIM)
    # Rows past the sequence read lse = +inf, i.e. probability 0.
    lse2 = tl.load(LSE + stats_base + rows, mask=rows < num_q, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + stats_base + rows, mask=rows < num_q, other=0.0)

    qk_scale = sm_scale * _LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + offs_n
        valid = _keys_valid(mask_row, stride_ms, cols, num_k, HAS_MASK)
        k = _load_rows(k_base, cols, stride_ks, offs_d, num_k, HEAD_DIM)
        v = _load_rows(v_base, cols, stride_vs, offs_d, num_k, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.exp2(tl.where(valid[None, :], s, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if HAS_DROPOUT:  # the forward's keep mask, regenerated
            keep = _dropout_keep(Seed, dropout_p, first_token, head, rows[:, None], cols[None, :])
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")

    _store_rows(dq_base, dq * sm_scale, rows, stride_dqs, offs_d, num_q, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Block sizes: autotuned on the GPU, one small fixed choice in the interpreter
# ----------------------------------------------------------------------------------------------

_AUTOTUNE_KEY = ["HEAD_DIM", "seq_bucket", "IS_VARLEN", "HAS_MASK", "HAS_DROPOUT"]


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


# (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages), per operand width: 16-bit operands go
# through tensor cores; fp32 ("ieee") ones through FMAs, which hold whole operand rows per thread,
# so fp32 gets small tiles and more warps.  Not every config suits every key: see _DROPPED.
_CONFIGS = {
    "fwd": {
        16: _configs([(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 4)]),
        32: _configs([(64, 32, 4, 4), (16, 32, 4, 2)]),
    },
    "dkdv": {
        16: _configs([(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 2)]),
        32: _configs([(32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)]),
    },
    "dq": {
        16: _configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)]),
        32: _configs([(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 4, 1), (32, 32, 4, 1)]),
    },
}

# Configs the autotuner never tries, per (kernel, target sm, operand bits, padded head size, dropout):
# each spills registers, or needs more shared memory than the target has (sm_90: 227 KiB, sm_80:
# 163 KiB), in at least one layout (padded, masked, varlen) under triton 3.6 or 3.9.  Read from the
# compiled binaries (kernels/RESOURCES.md, `make gpu-resources`);
# `scripts/gpu-compile-check.py --suggest-pruning RESULTS.json...` prints this table from them.  A
# target before sm_90 drops sm_90's entries too (sm_80's list only what spills there in addition).
_DROPPED: dict[tuple, list[tuple[int, int, int, int]]] = {
    ("dkdv", 80, 16, 32, True): [(64, 64, 4, 3), (32, 64, 8, 2)],
    ("dkdv", 80, 16, 64, False): [(64, 128, 8, 2), (64, 64, 4, 3)],
    ("dkdv", 80, 16, 64, True): [(64, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 3)],
    ("dkdv", 80, 16, 128, False): [(32, 128, 8, 3)],
    ("dkdv", 80, 16, 128, True): [(32, 128, 8, 3)],
    ("dkdv", 80, 32, 32, False): [(32, 32, 8, 2)],
    ("dkdv", 80, 32, 64, False): [(16, 16, 4, 2)],
    ("dkdv", 80, 32, 128, False): [(16, 32, 8, 2)],
    ("dkdv", 90, 16, 64, True): [(64, 64, 4, 3)],
    ("dkdv", 90, 16, 128, False): [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
    ("dkdv", 90, 16, 128, True): [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
    ("dkdv", 90, 32, 32, False): [(16, 32, 8, 2), (16, 32, 4, 2)],
    ("dkdv", 90, 32, 32, True): [(16, 32, 8, 2)],
    ("dkdv", 90, 32, 128, False): [(32, 32, 8, 2), (16, 16, 4, 2)],
    ("dkdv", 90, 32, 128, True): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 80, 16, 32, False): [(128, 64, 8, 2)],
    ("dq", 80, 16, 32, True): [(64, 32, 4, 3)],
    ("dq", 80, 16, 64, True): [(128, 64, 8, 2), (64, 64, 4, 3)],
    ("dq", 80, 16, 128, False): [(128, 64, 8, 2), (64, 64, 4, 3)],
    ("dq", 80, 16, 128, True): [(128, 64, 8, 2), (128, 32, 8, 3)],
    ("dq", 80, 32, 32, True): [(16, 32, 4, 2), (16, 32, 4, 1)],
    ("dq", 80, 32, 64, True): [(32, 32, 4, 1)],
    ("dq", 80, 32, 128, False): [(64, 32, 8, 2)],
    ("dq", 80, 32, 128, True): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 90, 16, 128, True): [(64, 64, 4, 3)],
    ("dq", 90, 32, 32, False): [(64, 32, 8, 2)],
    ("dq", 90, 32, 32, True): [(32, 32, 8, 2), (32, 32, 4, 1)],
    ("dq", 90, 32, 128, False): [(32, 32, 4, 1), (16, 32, 4, 2), (16, 32, 4, 1)],
    ("dq", 90, 32, 128, True): [(64, 32, 8, 2), (32, 32, 4, 1), (16, 32, 4, 1)],
    ("fwd", 80, 16, 32, False): [(64, 64, 4, 3), (64, 32, 4, 4)],
    ("fwd", 80, 16, 32, True): [(128, 128, 8, 3)],
    ("fwd", 80, 16, 128, False): [(128, 128, 8, 3)],
    ("fwd", 80, 32, 128, True): [(64, 32, 4, 4)],
    ("fwd", 90, 16, 32, True): [(128, 64, 4, 3)],
    ("fwd", 90, 16, 64, True): [(128, 128, 8, 3), (128, 64, 4, 3)],
    ("fwd", 90, 16, 128, False): [(128, 64, 4, 3)],
    ("fwd", 90, 16, 128, True): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("fwd", 90, 32, 64, False): [(64, 32, 4, 4)],
    ("fwd", 90, 32, 64, True): [(64, 32, 4, 4)],
}


def _target_sm() -> int | None:
    """The compute capability Triton compiles for (90 for sm_90), or None off NVIDIA (or with no GPU)."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except RuntimeError:  # no active driver
        return None
    return target.arch if target.backend == "cuda" and isinstance(target.arch, int) else None


def _shape(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def candidate_configs(kernel: str, configs, *, fp32: bool):
    """The configs of ``kernel`` ("fwd", "dkdv", "dq") declared for this operand width."""
    declared = {_shape(c) for c in _CONFIGS[kernel][32 if fp32 else 16]}
    return [c for c in configs if _shape(c) in declared]


def kept_configs(kernel: str, configs, *, fp32: bool, head_dim_padded: int, dropout: bool, sm: int | None):
    """The configs the autotuner may try for this key: the width's own, less those dropped for the key.

    If every one is dropped (a key no config serves without spilling), the last (smallest) is kept.
    """
    candidates = candidate_configs(kernel, configs, fp32=fp32)
    if sm is None:
        return candidates
    # Hopper and later drop sm_90's entries; Ampere and Ada those and sm_80's own.
    key = (32 if fp32 else 16, head_dim_padded, bool(dropout))
    dropped = {*_DROPPED.get((kernel, 90, *key), ()), *(_DROPPED.get((kernel, 80, *key), ()) if sm < 90 else ())}
    return [c for c in candidates if _shape(c) not in dropped] or candidates[-1:]


def _pruner(kernel: str):
    """An autotune ``early_config_prune`` hook: the launch's dtype and constexprs pick the key."""

    def prune(configs, named_args, **kwargs):
        return kept_configs(
            kernel, configs, fp32=named_args["Q"].dtype == torch.float32,
            head_dim_padded=kwargs["HEAD_DIM_PADDED"], dropout=kwargs["HAS_DROPOUT"], sm=_target_sm(),
        )  # fmt: skip

    # What the compile check lists as "pruned" for a launch: the width's configs it did not keep.
    prune.candidates = lambda configs, named_args, **kwargs: candidate_configs(
        kernel, configs, fp32=named_args["Q"].dtype == torch.float32
    )
    return prune


def _autotuned(kernel: str, fn):
    """``fn`` autotuned over every width's configs; the pruning hook picks those of the launch's key."""
    configs = list({_shape(c): c for width in _CONFIGS[kernel].values() for c in width}.values())
    return triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kernel)})(fn)


# The interpreter runs one fixed config (autotuning there would run them all).  The test shapes
# still span several query and key blocks, and BLOCK_M != BLOCK_N so swapped block sizes fail.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64}


def _delta_block_m(head_dim_padded: int) -> int:
    """Rows per program of the D = rowsum(dO * O) kernel: a tile of 4096 elements on a GPU (32 per thread
    and tensor; triton 3.6 gave fp32 varlen tiles of 2048 a stack frame on sm_90), 32 in the interpreter."""
    return 32 if _INTERPRET else min(128, 4096 // head_dim_padded)


if _INTERPRET:
    _fwd_kernel, _dkdv_kernel, _dq_kernel = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    _FIXED_BLOCKS = _INTERPRETER_BLOCKS
else:
    _fwd_kernel = _autotuned("fwd", _attn_fwd_kernel)
    _dkdv_kernel = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
    _dq_kernel = _autotuned("dq", _attn_bwd_dq_kernel)
    _FIXED_BLOCKS = {}


def _seq_bucket(seq: int) -> int:
    """Autotune key for the sequence length: next power of two, between 16 and 4096."""
    return min(max(triton.next_power_of_2(max(seq, 1)), 16), 4096)


def _fwd_split(head_dim_padded: int, fp32: bool) -> tuple[int, int]:
    """(QK_DIM, OUT_DIM) of the forward: the whole head, except fp32 over 64, whose FMA dots would spill
    at every tile (kernels/RESOURCES.md): 32-wide slices of Q K^T, 64 output columns per program."""
    return (32, 64) if fp32 and head_dim_padded > 64 else (head_dim_padded, head_dim_padded)


def _head_dim_padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------
# Checks and launchers
# ----------------------------------------------------------------------------------------------


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """``None`` if these kernels can run on ``q, k, v``, else the reason (devices are checked by the caller)."""
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"the Triton attention kernels take float16, bfloat16 or float32, got {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    head_dim = q.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim {head_dim} is larger than the {_MAX_HEAD_DIM} the Triton attention kernels support"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k and v must be contiguous in head_dim (stride(-1) == 1)"
    if q.dtype == torch.bfloat16:
        if _INTERPRET:
            return "Triton's interpreter multiplies bfloat16 tiles as raw integers in tl.dot; run bfloat16 on a GPU"
        if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
            return "bfloat16 tl.dot needs compute capability 8.0 or newer"
    return None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {t.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-2:] != k.shape[-2:]:
        first = layout[1:].split(",")[0]
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in {first}, heads and head_dim")
    reason = unsupported(q, k, v)
    if reason is not None:
        raise ValueError(reason)


def _check_mask(attention_mask: torch.Tensor | None, k: torch.Tensor) -> None:
    if attention_mask is None:
        return
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be a bool tensor (True = token), got {attention_mask.dtype}")
    if tuple(attention_mask.shape) != tuple(k.shape[:2]):
        expected, got = tuple(k.shape[:2]), tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must have shape (batch, seq_k) = {expected}, got {got}")
    if attention_mask.device != k.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but k is on {k.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor, max_seqlen: int, check: bool) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError("cu_seqlens must be a non-empty 1-D torch.int32 tensor of cumulative offsets")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if check:  # the kernels read and write out of bounds with bad offsets
        check_cu_seqlens(cu_seqlens, q.shape[0], int(max_seqlen))


def _layout(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int):
    """(batch, heads, seq_q, seq_k, strides) for either layout; strides(t) is t's (batch, seq, head) strides.

    Varlen: seq_q = seq_k = max_seqlen only size the grid (the kernels read each sequence's
    start and length from cu_seqlens); the batch stride is 0 and rows are tokens of the packed tensor.
    """
    if cu_seqlens is None:
        return q.shape[0], q.shape[2], q.shape[1], k.shape[1], lambda t: (t.stride(0), t.stride(1), t.stride(2))
    return cu_seqlens.numel() - 1, q.shape[1], max_seqlen, max_seqlen, lambda t: (0, t.stride(0), t.stride(1))


def _stats_strides(lse: torch.Tensor, varlen: bool):
    # lse / delta: (batch, heads, seq) padded, (heads, total) varlen.
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


# Launch decisions per (shapes, strides, dtypes, devices, flags), reused by every call with that key.
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()
_CHECKED = PlanCache()  # keys of the public entry points' arguments that passed their checks
_fwd_launch = CachedLaunch(globals(), "_fwd_kernel")
_delta_launch = CachedLaunch(globals(), "_attn_bwd_delta_kernel")
_dkdv_launch = CachedLaunch(globals(), "_dkdv_kernel")
_dq_launch = CachedLaunch(globals(), "_dq_kernel")


def _forward_plan(q, k, v, attention_mask, cu_seqlens, max_seqlen, has_dropout):
    varlen = cu_seqlens is not None
    batch, heads, seq_q, seq_k, strides = _layout(q, k, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    lse_shape = (heads, q.shape[0]) if varlen else (batch, heads, seq_q)
    # The lse is allocated contiguous: (heads, total) varlen, (batch, heads, seq_q) padded.
    stats_strides = (0, q.shape[0]) if varlen else (heads * seq_q, seq_q)
    has_mask = attention_mask is not None
    empty = q.numel() == 0 or batch * seq_q == 0
    mask_strides = (attention_mask.stride(0), attention_mask.stride(1)) if has_mask else (0, 0)
    out_strides = _fresh_strides(q.shape, varlen)
    ints = (
        *strides(q), *strides(k), *strides(v), *out_strides, *stats_strides, *mask_strides,
        heads, seq_q, seq_k, _seq_bucket(max(seq_q, seq_k)),
    )  # fmt: skip
    head_dim_padded = _head_dim_padded(head_dim)
    qk_dim, out_dim = _fwd_split(head_dim_padded, q.dtype == torch.float32)
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, QK_DIM=qk_dim, OUT_DIM=out_dim,
        IS_VARLEN=varlen, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
        **_FIXED_BLOCKS,
    )  # fmt: skip

    def grid(meta):
        return (cdiv(seq_q, meta["BLOCK_M"]), batch * heads, head_dim_padded // out_dim)

    seqlens_contiguous = cu_seqlens.is_contiguous() if varlen else True
    return (lse_shape, empty, ints, constexprs, grid, seqlens_contiguous, next_launch_key())


def _fresh_strides(shape, varlen: bool) -> tuple:
    """The (batch, seq, head) strides ``_layout`` gives a new contiguous tensor of ``shape`` (as torch.empty makes)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    return (0, strides[0], strides[1]) if varlen else (strides[0], strides[1], strides[2])


def _forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    dropout_p, seed = dropout_args(dropout_p, seed, q)
    key = (*map(tensor_key, (q, k, v, attention_mask, cu_seqlens)), max_seqlen, dropout_p > 0.0)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _FWD_PLANS.put(key, _forward_plan(q, k, v, attention_mask, cu_seqlens, max_seqlen, dropout_p > 0.0))
    lse_shape, empty, ints, constexprs, grid, seqlens_contiguous, launch_key = plan
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if empty:
        return out.zero_(), lse.fill_(float("inf"))
    mask = attention_mask.view(torch.uint8) if attention_mask is not None else q  # bool read as bytes, no copy
    if cu_seqlens is None:
        seqlens = q  # an unused placeholder pointer when padded
    else:
        seqlens = cu_seqlens if seqlens_contiguous else cu_seqlens.contiguous()

    with device_guard(q):
        _fwd_launch(
            launch_key,
            grid,
            (q, k, v, out, lse, mask, seqlens, seed, float(scale), dropout_p, *ints),
            constexprs,
        )
    return out, lse


def _backward_plan(grad_out, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, has_dropout, dqkv=None):
    varlen = cu_seqlens is not None
    grad_contiguous = grad_out.stride(-1) == 1
    if not grad_contiguous:  # e.g. an expanded gradient; the kernels want contiguous rows
        grad_out = grad_out.contiguous()
    batch, heads, seq_q, seq_k, strides = _layout(q, k, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    empty = q.numel() == 0 or batch * seq_q == 0 or batch * seq_k == 0
    has_mask = attention_mask is not None
    mask_strides = (attention_mask.stride(0), attention_mask.stride(1)) if has_mask else (0, 0)
    stats_strides = _stats_strides(lse, varlen)
    head_dim_padded = _head_dim_padded(head_dim)
    shape_args = (heads, seq_q, seq_k, _seq_bucket(max(seq_q, seq_k)))
    consts = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        IS_VARLEN=varlen, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
    )  # fmt: skip
    if dqkv is None:
        dq_strides = _fresh_strides(q.shape, varlen)
        dk_strides = dv_strides = _fresh_strides(k.shape, varlen)
    else:  # the three slices of one (..., 3, heads, head_dim) buffer
        dq_strides, dk_strides, dv_strides = map(strides, dqkv.unbind(-3))
    delta_ints = (*strides(out), *strides(grad_out), *stats_strides, heads, seq_q)
    dkdv_ints = (
        *strides(q), *strides(k), *strides(v), *strides(grad_out), *dk_strides, *dv_strides,
        *stats_strides, *mask_strides, *shape_args,
    )  # fmt: skip
    dq_ints = (
        *strides(q), *strides(k), *strides(v), *strides(grad_out), *dq_strides,
        *stats_strides, *mask_strides, *shape_args,
    )  # fmt: skip
    delta_block_m = _delta_block_m(head_dim_padded)
    delta_consts = dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, IS_VARLEN=varlen, BLOCK_M=delta_block_m)
    delta_grid = (cdiv(seq_q, delta_block_m), batch * heads)

    def dkdv_grid(meta):
        return (cdiv(seq_k, meta["BLOCK_N"]), batch * heads)

    def dq_grid(meta):
        return (cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    seqlens_contiguous = cu_seqlens.is_contiguous() if varlen else True
    return (
        grad_contiguous, empty, seqlens_contiguous,
        (delta_grid, delta_ints, delta_consts),
        (dkdv_grid, dkdv_ints, {**consts, **_FIXED_BLOCKS}),
        (dq_grid, dq_ints, {**consts, **_FIXED_BLOCKS}),
        next_launch_key(),
    )  # fmt: skip


def _backward(
    grad_out, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None, dqkv=None
):
    """``(dq, dk, dv)``; with ``dqkv`` (``(..., 3, heads, head_dim)``) they are written into its three slices."""
    dropout_p, seed = dropout_args(dropout_p, seed, q)
    tensors = (grad_out, q, k, v, out, lse, attention_mask, cu_seqlens, dqkv)
    key = (*map(tensor_key, tensors), max_seqlen, dropout_p > 0.0)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _BWD_PLANS.put(
            key,
            _backward_plan(grad_out, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, dropout_p > 0.0, dqkv),
        )
    grad_contiguous, empty, seqlens_contiguous, delta_plan, dkdv_plan, dq_plan, launch_key = plan
    if not grad_contiguous:
        grad_out = grad_out.contiguous()
    if dqkv is not None:
        dq, dk, dv = dqkv.unbind(-3)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if empty:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    mask = attention_mask.view(torch.uint8) if attention_mask is not None else q
    if cu_seqlens is None:
        seqlens = q
    else:
        seqlens = cu_seqlens if seqlens_contiguous else cu_seqlens.contiguous()
    scale = float(scale)

    with device_guard(q):
        grid, ints, consts = delta_plan
        _delta_launch(launch_key, grid, (out, grad_out, delta, seqlens, *ints), consts)
        grid, ints, consts = dkdv_plan
        _dkdv_launch(
            launch_key,
            grid,
            (q, k, v, grad_out, lse, delta, dk, dv, mask, seqlens, seed, scale, dropout_p, *ints),
            consts,
        )
        grid, ints, consts = dq_plan
        _dq_launch(
            launch_key,
            grid,
            (q, k, v, grad_out, lse, delta, dq, mask, seqlens, seed, scale, dropout_p, *ints),
            consts,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


# ``dropout_p`` and ``seed`` (a 1-element int64 tensor on the inputs' device, ``None`` without dropout)
# come last with defaults, so calls without dropout read as before.


@torch.library.custom_op("bertfast::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded attention forward: (out (batch, seq_q, heads, d), lse fp32 (batch, heads, seq_q))."""
    return _forward(q, k, v, attention_mask, None, 0, scale, dropout_p, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, attention_mask, scale, dropout_p=0.0, seed=None):
    batch, seq_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@torch.library.custom_op("bertfast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded attention backward: (dq, dk, dv), contiguous, in q's dtype."""
    return _backward(grad_out, q, k, v, out, lse, attention_mask, None, 0, scale, dropout_p, seed)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, attention_mask, scale, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("bertfast::attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward: (out (total, heads, d), lse fp32 (heads, total))."""
    return _forward(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)


@_attention_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total), dtype=torch.float32)


@torch.library.custom_op("bertfast::attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen attention backward: (dq, dk, dv), contiguous, in q's dtype."""
    return _backward(grad_out, q, k, v, out, lse, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)


@_attention_varlen_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_padded(ctx, inputs, output):
    q, k, v, attention_mask, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary statistic for the backward, not a result
    ctx.set_materialize_grads(False)  # lse's gradient is never zero-filled
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _backward_padded(ctx, grad_out, _grad_lse=None):
    if grad_out is None:
        return (None,) * 7
    q, k, v, out, lse, attention_mask, seed = ctx.saved_tensors
    args = (grad_out, q, k, v, out, lse, attention_mask, ctx.scale, ctx.dropout_p, seed)
    if not torch.is_grad_enabled() and eager_fast_path(grad_out, q, k, v, out, attention_mask):
        with profiled("bertfast::attention_bwd"):
            dq, dk, dv = _backward(grad_out, q, k, v, out, lse, attention_mask, None, 0, *args[7:])
    else:  # under torch.compile, a mode or create_graph: the custom op, as before
        dq, dk, dv = _attention_bwd_op(*args)
    return dq, dk, dv, None, None, None, None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient is never zero-filled
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _backward_varlen(ctx, grad_out, _grad_lse=None):
    if grad_out is None:
        return (None,) * 8
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    args = (grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.dropout_p, seed)
    if not torch.is_grad_enabled() and eager_fast_path(grad_out, q, k, v, out, cu_seqlens):
        with profiled("bertfast::attention_varlen_bwd"):
            dq, dk, dv = _backward(grad_out, q, k, v, out, lse, None, *args[6:])
    else:  # under torch.compile, a mode or create_graph: the custom op, as before
        dq, dk, dv = _attention_varlen_bwd_op(*args)
    return dq, dk, dv, None, None, None, None, None


class _AttentionFunction(torch.autograd.Function):
    """The eager fast path's autograd (padded): the custom op's forward, setup_context and backward."""

    @staticmethod
    def forward(ctx, *inputs):  # the op's arguments; its setup_context inside (a forward without ctx costs ~20 µs)
        q, k, v, attention_mask, scale, dropout_p, seed = inputs
        output = _forward(q, k, v, attention_mask, None, 0, scale, dropout_p, seed)
        _setup_padded(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_padded)


class _AttentionVarlenFunction(torch.autograd.Function):
    """The eager fast path's autograd (varlen): the custom op's forward, setup_context and backward."""

    @staticmethod
    def forward(ctx, *inputs):  # the op's arguments; its setup_context inside
        q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
        output = _forward(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)
        _setup_varlen(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_varlen)


_attention_fwd_op.register_autograd(_backward_padded, setup_context=_setup_padded)
_attention_varlen_fwd_op.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# Packed QKV: q, k, v are the ``(..., 3, heads, head_dim)`` output of one projection, passed as one
# tensor.  The backward writes dq, dk, dv into one buffer of that shape, which is the projection
# output's gradient itself: autograd does not stack three gradients again.


@torch.library.custom_op("bertfast::attention_qkv_fwd", mutates_args=())
def _attention_qkv_fwd_op(
    qkv: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (``cu_seqlens`` None) or varlen attention forward on packed QKV: (out, lse)."""
    q, k, v = qkv.unbind(-3)
    return _forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)


@_attention_qkv_fwd_op.register_fake
def _(qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    q = qkv.select(-3, 0)
    if cu_seqlens is None:
        batch, seq_q, heads, _ = q.shape
        lse_shape = (batch, heads, seq_q)
    else:
        total, heads, _ = q.shape
        lse_shape = (heads, total)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("bertfast::attention_qkv_bwd", mutates_args=())
def _attention_qkv_bwd_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed-QKV attention backward: dqkv, ``qkv``'s shape, contiguous."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv.unbind(-3)
    _backward(grad_out, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, dqkv)
    return dqkv


@_attention_qkv_bwd_op.register_fake
def _(grad_out, qkv, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    return qkv.new_empty(qkv.shape)


def _setup_qkv(ctx, inputs, output):
    qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient is never zero-filled
    ctx.save_for_backward(qkv, out, lse, attention_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p


def _backward_qkv(ctx, grad_out, _grad_lse=None):
    if grad_out is None:
        return (None,) * 7
    qkv, out, lse, attention_mask, cu_seqlens, seed = ctx.saved_tensors
    args = (grad_out, qkv, out, lse, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.dropout_p, seed)
    if not torch.is_grad_enabled() and eager_fast_path(grad_out, qkv, out, attention_mask, cu_seqlens):
        with profiled("bertfast::attention_qkv_bwd"):
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
            _backward(grad_out, *qkv.unbind(-3), *args[2:], dqkv)
    else:  # under torch.compile, a mode or create_graph: the custom op
        dqkv = _attention_qkv_bwd_op(*args)
    return dqkv, None, None, None, None, None, None


class _AttentionQKVFunction(torch.autograd.Function):
    """The eager fast path's autograd (packed QKV, padded or varlen): the custom op's pieces."""

    @staticmethod
    def forward(ctx, *inputs):
        qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
        output = _forward(*qkv.unbind(-3), attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)
        _setup_qkv(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_qkv)


_attention_qkv_fwd_op.register_autograd(_backward_qkv, setup_context=_setup_qkv)


def _attention_qkv(qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    """Packed-QKV attention: the launcher directly in eager mode, else the custom op."""
    if eager_fast_path(qkv, attention_mask, cu_seqlens):
        with profiled("bertfast::attention_qkv_fwd"):
            if needs_grad(qkv):
                return _AttentionQKVFunction.apply(qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)[
                    0
                ]
            return _forward(*qkv.unbind(-3), attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]
    return _attention_qkv_fwd_op(qkv, attention_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]


# ----------------------------------------------------------------------------------------------
# Public entry points (called by bertfast.ops.triton_backend)
# ----------------------------------------------------------------------------------------------


def _check_once(q, k, v, attention_mask=None, *, packed: bool = False) -> None:
    """The shape, stride and dtype checks of the entry points, padded or packed: they depend only on the key,
    so in eager mode once per key (a packed call's offsets are checked on every call, apart).  Traced, they
    run every time: a key of symbolic sizes would specialize them."""
    key = None if torch.compiler.is_compiling() else (*map(tensor_key, (q, k, v, attention_mask)),)
    if key is None or key not in _CHECKED:
        if packed:
            _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
        else:
            _check_qkv(q, k, v, 4, "(batch, seq, heads, head_dim)")
            _check_mask(attention_mask, k)
        if key is not None:
            _CHECKED.put(key, True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over ``(batch, seq, heads, head_dim)`` with an optional bool key-padding mask.

    ``dropout_p > 0`` drops attention probabilities; ``seed``: the philox seed (a 1-element int64 tensor
    on the inputs' device, see ``_dropout.draw_seeds``), by default a fresh draw from torch's generator.
    In eager mode the launcher runs directly (see ``_launch.eager_fast_path``); otherwise, as under
    torch.compile, the ``bertfast::attention_fwd`` custom op does.
    """
    _check_once(q, k, v, attention_mask)
    check_dropout_p(dropout_p)
    seed = call_seed(dropout_p, seed, q.device)
    scale, dropout_p = float(scale), float(dropout_p)
    if eager_fast_path(q, k, v, attention_mask):
        with profiled("bertfast::attention_fwd"):
            if needs_grad(q, k, v):
                return _AttentionFunction.apply(q, k, v, attention_mask, scale, dropout_p, seed)[0]
            return _forward(q, k, v, attention_mask, None, 0, scale, dropout_p, seed)[0]
    return _attention_fwd_op(q, k, v, attention_mask, scale, dropout_p, seed)[0]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    check: bool = True,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over packed ``(total_tokens, heads, head_dim)`` sequences delimited by ``cu_seqlens``.

    ``check``: read ``cu_seqlens`` back once (a synchronisation on a GPU) and raise ``ValueError``
    unless it starts at 0, never decreases, ends at ``total_tokens`` and ``max_seqlen`` covers the
    longest sequence (:func:`bertfast.varlen.check_cu_seqlens`).  ``False`` is for callers that
    built or checked the offsets themselves; bad offsets then corrupt memory.
    """
    _check_once(q, k, v, packed=True)
    # Every call: the offsets' values must never be judged from a cache.
    _check_cu_seqlens(cu_seqlens, q, max_seqlen, check)
    max_seqlen = int(max_seqlen)
    check_dropout_p(dropout_p)
    seed = call_seed(dropout_p, seed, q.device)
    scale, dropout_p = float(scale), float(dropout_p)
    if eager_fast_path(q, k, v, cu_seqlens):
        with profiled("bertfast::attention_varlen_fwd"):
            if needs_grad(q, k, v):
                return _AttentionVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]
            return _forward(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]
    return _attention_varlen_fwd_op(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]


def attention_qkv(
    qkv: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`attention` of ``qkv``: ``(batch, seq, 3, heads, head_dim)``; its gradient is one buffer."""
    q, k, v = qkv.unbind(-3)
    _check_once(q, k, v, attention_mask)
    check_dropout_p(dropout_p)
    seed = call_seed(dropout_p, seed, q.device)
    return _attention_qkv(qkv, attention_mask, None, 0, float(scale), float(dropout_p), seed)


def attention_varlen_qkv(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float = 0.0,
    check: bool = True,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`attention_varlen` of ``qkv``: ``(total_tokens, 3, heads, head_dim)``; its gradient is one buffer.

    ``check``: as in :func:`attention_varlen`.
    """
    q, k, v = qkv.unbind(-3)
    _check_once(q, k, v, packed=True)
    _check_cu_seqlens(cu_seqlens, q, max_seqlen, check)
    check_dropout_p(dropout_p)
    seed = call_seed(dropout_p, seed, q.device)
    return _attention_qkv(qkv, None, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), seed)
