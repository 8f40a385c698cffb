"""The packed-sequence contract of the variable-length ops: what ``cu_seqlens`` and ``max_seqlen`` must be.

``total`` tokens packed row after row, ``batch`` sequences: ``cu_seqlens`` is an int32
``(batch + 1,)`` tensor of offsets with ``cu_seqlens[0] == 0``, non-decreasing, and
``cu_seqlens[-1] == total``; sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i + 1]``.
``max_seqlen`` is at least the longest sequence (the kernels size their grid with it, so a
smaller one silently skips queries).

The kernels trust these values: offsets past ``total`` read and write out of bounds, offsets
short of it leave rows unwritten.  :func:`check_cu_seqlens` checks them with one host read of
the small tensor (on a GPU, a synchronisation), so ``bertfast.ops.attention_varlen`` and the
Triton launcher call it unless told ``check=False`` by a caller that built the offsets itself
(as the padding-free model path does, with :func:`bertfast.padding.pack_mask`).
"""

from __future__ import annotations

import torch

__all__ = ["check_cu_seqlens"]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Raise ``ValueError`` naming the problem unless ``cu_seqlens`` delimits ``total`` packed
    tokens and ``max_seqlen`` covers the longest sequence.

    The tensor's dtype, rank and device are the caller's to check.  While ``torch.compile``
    traces, the values cannot be read and nothing is checked.
    """
    if torch.compiler.is_compiling():
        return
    offsets = cu_seqlens.tolist()  # the one host read
    if not offsets:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {offsets[0]}")
    longest, longest_at = 0, None
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        if end < start:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i + 1}] = {end} < cu_seqlens[{i}] = {start}"
            )
        if end - start > longest:
            longest, longest_at = end - start, i
    if offsets[-1] != total:
        where = "stops short of" if offsets[-1] < total else "runs past"
        raise ValueError(
            f"cu_seqlens must end at the number of packed tokens {total} (q.shape[0]), but its last offset "
            f"{offsets[-1]} {where} it"
        )
    if max_seqlen < longest:
        raise ValueError(
            f"max_seqlen ({max_seqlen}) must be at least the longest sequence: sequence {longest_at} has "
            f"{longest} tokens"
        )
