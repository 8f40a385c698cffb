"""Removing padding once and putting it back: the padding-free encoder's bookkeeping.

A padded batch ``(batch, seq)`` with a key-padding mask becomes ``total`` packed tokens
(the valid ones, row-major), described by

- ``indices``: int64 ``(total,)``, each packed token's flat position ``b * seq + s``;
- ``cu_seqlens``: int32 ``(batch + 1,)``, cumulative valid-token counts from 0;
- ``max_seqlen``: the longest row's valid-token count (a Python int).

Tokens keep their original position ids, so a mask with holes packs as well as a
right-padded one: in both cases each row attends only to its own valid tokens.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PackedBatch:
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]


def pack_mask(keep: torch.Tensor) -> PackedBatch:
    """Bookkeeping for a boolean ``(batch, seq)`` mask (True = token). Reads the lengths back to the host."""
    batch, seq = keep.shape
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    indices = keep.flatten().nonzero().flatten()
    max_seqlen = int(lengths.max().item()) if batch else 0
    return PackedBatch(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, batch=batch, seq=seq)


def unpad(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(batch, seq, ...)`` -> ``(total, ...)``: the valid tokens."""
    return x.flatten(0, 1).index_select(0, packed.indices)


def pad(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(total, ...)`` -> ``(batch, seq, ...)``, zeros at padding positions."""
    out = x.new_zeros((packed.batch * packed.seq, *x.shape[1:]))
    out = out.index_copy(0, packed.indices, x)
    return out.unflatten(0, (packed.batch, packed.seq))


def first_tokens(x: torch.Tensor, packed: PackedBatch, keep: torch.Tensor) -> torch.Tensor:
    """Each row's position-0 hidden state from the packed tensor (zeros where position 0 is padding).

    What the pooler reads, gathered without unpacking everything.
    """
    rows = packed.cu_seqlens[:-1].clamp(max=max(packed.total - 1, 0)).long()
    first = x.index_select(0, rows) if packed.total else x.new_zeros((packed.batch, *x.shape[1:]))
    return first * keep[:, :1].to(x.dtype)
