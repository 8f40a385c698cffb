"""Removing padding once and putting it back: the padding-free encoder's bookkeeping.

A padded batch ``(batch, seq)`` with a key-padding mask becomes ``total`` packed tokens
(the valid ones, row-major), described by

- ``indices``: int64 ``(total,)``, each packed token's flat position ``b * seq + s``;
- ``cu_seqlens``: int32 ``(batch + 1,)``, cumulative valid-token counts from 0;
- ``max_seqlen``: the longest row's valid-token count (a Python int).

Sequences packed into rows by their position ids (transformers' padding-free format, as
``DataCollatorWithFlattening`` gives it: no mask, position ids that restart) need no packing:
:func:`sequence_starts` finds them and :func:`pack_lengths` describes them over every token.

Tokens keep their original position ids, so a mask with holes packs as well as a
right-padded one: in both cases each row attends only to its own valid tokens.
"""

from __future__ import annotations

import contextlib
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


def tokens_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """A key-padding mask (bool, or int/float with nonzero at tokens) as bool, True at tokens."""
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def pack_mask(keep: torch.Tensor, lengths: torch.Tensor | None = None, sizes: tuple | None = None) -> PackedBatch:
    """Bookkeeping for a boolean ``(batch, seq)`` mask (True = token).

    ``lengths`` (``keep.sum(1)`` as int32) and ``sizes`` (the token count and the longest
    row, as Python ints) when the caller has them; otherwise they are computed and read back.
    """
    batch, seq = keep.shape
    if lengths is None:
        lengths = keep.sum(dim=1, dtype=torch.int32)
    if sizes is None:
        sizes = torch.stack((lengths.sum(), lengths.max())).tolist() if batch else (0, 0)
    total, max_seqlen = sizes
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    # nonzero() and not nonzero_static(size=total): the sizes were read back already, so its sync costs
    # nothing more, and its length is checked against them.
    indices = keep.flatten().nonzero().flatten()
    if indices.shape[0] != total:
        raise RuntimeError(f"the mask holds {indices.shape[0]} tokens but its lengths sum to {total}")
    return PackedBatch(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, batch=batch, seq=seq)


def unpad(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(batch, seq, ...)`` -> ``(total, ...)``: the valid tokens."""
    return x.flatten(0, 1).index_select(0, packed.indices)


def pad(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """``(total, ...)`` -> ``(batch, seq, ...)``, zeros at padding positions."""
    out = x.new_zeros((packed.batch * packed.seq, *x.shape[1:]))
    out = out.index_copy(0, packed.indices, x)
    return out.unflatten(0, (packed.batch, packed.seq))


@dataclasses.dataclass(frozen=True)
class StaticPacking:
    """A batch packed on the host into fixed sizes (bertfast.TrainStep's token budget): the encoder takes
    ``packed`` as it is, and the masked-LM loss gathers exactly ``label_rows`` rows (the unused ones
    ignored), so no size is read back from the device."""

    packed: PackedBatch
    label_rows: int


# A module global, not a ContextVar: torch.compile traces a global's read (and guards on it), not ContextVar.get.
_STATIC_PACKING: StaticPacking | None = None


def static_packing() -> StaticPacking | None:
    """The :class:`StaticPacking` of the forward running now, if any (see :func:`use_static_packing`)."""
    return _STATIC_PACKING


@contextlib.contextmanager
def use_static_packing(static: StaticPacking):
    """Forwards inside this block run on ``static`` instead of packing their attention mask themselves."""
    global _STATIC_PACKING
    previous, _STATIC_PACKING = _STATIC_PACKING, static
    try:
        yield
    finally:
        _STATIC_PACKING = previous


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a sequence starts in ``(batch, seq)`` position ids: each row's first token and every token
    whose position id is not its predecessor's plus one (transformers' ``find_packed_sequence_indices`` rule)."""
    follows = position_ids[:, 1:] - position_ids[:, :-1] == 1
    return torch.cat((torch.ones_like(follows[:, :1]), ~follows), dim=1)


def sequence_lengths(starts: torch.Tensor) -> torch.Tensor:
    """int32 ``(batch * seq,)``: the token count of each sequence :func:`sequence_starts` marks, in order,
    then zeros (no host read: the count of sequences is not needed to size it)."""
    flat = starts.flatten()
    sequence_of_token = torch.cumsum(flat, dim=0) - 1
    return torch.zeros_like(flat, dtype=torch.int32).index_add_(
        0, sequence_of_token, torch.ones_like(flat, dtype=torch.int32)
    )


def pack_lengths(lengths: torch.Tensor, batch: int, seq: int, max_seqlen: int) -> PackedBatch:
    """Bookkeeping for ``(batch, seq)`` tokens that are all real, split into sequences of ``lengths`` (which
    may end in empty ones); ``max_seqlen`` at least the longest."""
    cu_seqlens = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    indices = torch.arange(batch * seq, device=lengths.device)
    return PackedBatch(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, batch=batch, seq=seq)
