"""Token-budget buckets: a padding-free batch in static shapes, so one CUDA graph serves many batches.

A padded batch of ``batch`` rows of at most ``seq`` positions holds ``total`` real tokens.
Its bucket has static sizes that hold it:

- ``tokens``: ``total`` rounded up to the next of four steps per octave (64, 80, 96, 112, 128,
  160, ...): at most 25 % filler, about 12 % on average;
- ``max_seqlen``: ``seq`` rounded up to a power of two (at least 16), the attention grid's bound;
- ``sequences``: the real rows plus the spare sequences that hold the filler tokens (at most
  ``max_seqlen`` each), rounded up to a power of two; spare slots past them are empty.

The filler tokens are real rows of the packed batch (pad token, position 0, type 0) in
sequences of their own, so they never meet a real token in attention and every offset
satisfies the varlen contract (:mod:`bertfast.varlen`).  :class:`StaticPackedBatch` holds one
bucket's tensors; :meth:`StaticPackedBatch.fill` writes a batch into them on the device (no host
read: the sizes are known on the host already), so a graph captured over them replays for every
batch of that bucket.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .padding import PackedBatch

__all__ = ["Bucket", "MAX_BUCKET_TOKENS", "StaticPackedBatch", "choose_bucket", "dense_packed"]

MIN_BUCKET_TOKENS = 64
MAX_BUCKET_TOKENS = 32768  # BERT-large at 64 x 512; larger batches run eagerly
STEPS_PER_OCTAVE = 4


@dataclasses.dataclass(frozen=True)
class Bucket:
    tokens: int
    sequences: int
    max_seqlen: int


def _round_tokens(total: int) -> int:
    if total <= MIN_BUCKET_TOKENS:
        return MIN_BUCKET_TOKENS
    octave = 1 << (total - 1).bit_length() - 1  # the power of two below total (total > it)
    step = octave // STEPS_PER_OCTAVE
    return octave + step * math.ceil((total - octave) / step)


def choose_bucket(total: int, batch: int, seq: int, max_positions: int | None = None) -> Bucket | None:
    """The bucket of ``batch`` rows of at most ``seq`` positions holding ``total`` tokens; None when
    ``total`` exceeds ``MAX_BUCKET_TOKENS``.  ``max_positions`` caps ``max_seqlen`` (a model's
    ``max_position_embeddings``: no row can be longer)."""
    if total < 1 or batch < 1 or seq < 1 or total > batch * seq:
        raise ValueError(f"no bucket holds {total} tokens in {batch} rows of at most {seq} positions")
    if total > MAX_BUCKET_TOKENS:
        return None
    tokens = _round_tokens(total)
    max_seqlen = max(16, 1 << (seq - 1).bit_length())
    if max_positions is not None:
        max_seqlen = max(seq, min(max_seqlen, max_positions))
    spare = math.ceil((tokens - total) / max_seqlen)
    return Bucket(tokens=tokens, sequences=1 << (batch + spare - 1).bit_length(), max_seqlen=max_seqlen)


class StaticPackedBatch:
    """One bucket's packed inputs: ``input_ids``, ``token_type_ids``, ``position_ids`` ``(tokens,)``
    and ``cu_seqlens`` ``(sequences + 1,)`` int32, filled per batch by :meth:`fill`.

    ``mask`` is what the encoder layers read (``cu_seqlens`` and the bucket's ``max_seqlen``); its
    ``indices`` are None: in a bucket, packed row ``r`` is just row ``r``."""

    def __init__(self, bucket: Bucket, device: torch.device, pad_token_id: int = 0):
        self.bucket = bucket
        self.pad_token_id = pad_token_id
        tokens = bucket.tokens
        self.input_ids = torch.full((tokens,), pad_token_id, dtype=torch.long, device=device)
        self.token_type_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.cu_seqlens = torch.full((bucket.sequences + 1,), tokens, dtype=torch.int32, device=device)
        self.cu_seqlens[0] = 0
        self.mask = PackedBatch(
            indices=None,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=bucket.max_seqlen,
            batch=bucket.sequences,
            seq=bucket.max_seqlen,
        )

    def fill(self, packed: PackedBatch, input_ids, token_type_ids, position_ids) -> None:
        """Write the real tokens of ``packed`` (gathered from the padded ``(batch, seq)`` inputs by
        ``packed.indices``) and the filler after them.  Device copies only."""
        total, batch, bucket = packed.total, packed.batch, self.bucket
        if total > bucket.tokens or packed.max_seqlen > bucket.max_seqlen:
            raise ValueError(f"{total} tokens (longest row {packed.max_seqlen}) do not fit {bucket}")
        for static, padded in (
            (self.input_ids, input_ids),
            (self.token_type_ids, token_type_ids),
            (self.position_ids, position_ids),
        ):
            torch.index_select(padded.flatten(), 0, packed.indices, out=static[:total])
        self.input_ids[total:] = self.pad_token_id
        self.token_type_ids[total:] = 0
        self.position_ids[total:] = 0
        self.cu_seqlens[: batch + 1] = packed.cu_seqlens
        # Spare sequence i ends max_seqlen filler tokens after the one before; empty ones after the filler.
        spare = math.ceil((bucket.tokens - total) / bucket.max_seqlen)
        if batch + spare > bucket.sequences:
            raise ValueError(f"{batch} rows and {bucket.tokens - total} filler tokens do not fit {bucket}")
        ends = [min(total + bucket.max_seqlen * i, bucket.tokens) for i in range(1, spare + 1)]
        ends += [bucket.tokens] * (bucket.sequences - batch - spare)
        self.cu_seqlens[batch + 1 :].copy_(torch.tensor(ends, dtype=torch.int32), non_blocking=True)


def dense_packed(batch: int, seq: int, device: torch.device) -> PackedBatch:
    """The packed bookkeeping of a batch with no padding: every position a token, built on the host."""
    return PackedBatch(
        indices=torch.arange(batch * seq, device=device),
        cu_seqlens=torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32).to(device, non_blocking=True),
        max_seqlen=seq,
        batch=batch,
        seq=seq,
    )
