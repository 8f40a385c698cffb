"""Dropout shared by the kernels that drop (attention probabilities, the residual-LayerNorm input).

The kernels read their philox seed from the device: a 1-element int64 tensor (the ``Seed``
pointer), never a host integer, so no call reads a value back to the host and a captured CUDA
graph draws fresh masks at each replay.  Seeds come from torch's generator of the tensors'
device (``torch.manual_seed`` reproduces every mask): :func:`draw_seeds` draws all the seeds
of one forward in one call (one per dropping kernel call, see ``bertfast.layers.encode``);
a kernel called on its own with no seed draws one for itself.  Under CUDA-graph capture the
draw is captured too: torch's CUDA generator advances its philox offset at each replay.  The
backward gets the same seed tensor (saved for autograd) and regenerates the masks.

An element's draw is ``philox(seed, (c0, c1, c2, 0))`` on four 32-bit counters that name the
element by its logical coordinates (e.g. key, query token, head), never by a tile: kernels
with different block sizes draw the same mask.  32-bit counters keep philox at 32-bit
multiplies; one flat 64-bit index (``tl.rand`` on int64 offsets) would double its cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Seeds are drawn below 2**62: philox takes the 64 bits as its two 32-bit keys.
_SEED_BOUND = 2**62


@triton.jit
def dropout_keep(seed, dropout_p, c0, c1, c2):
    """Which elements survive dropout at rate ``dropout_p``: a bool block of ``c0``/``c1``'s broadcast shape.

    ``seed``: the int64 loaded from the seed pointer; ``c0``, ``c1``: int32 blocks, broadcastable
    to each other; ``c2``: an int32 scalar.
    """
    c0, c1 = tl.broadcast(c0, c1)
    c2 = tl.zeros_like(c0) + c2
    draw, _, _, _ = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    return tl.uint_to_uniform_float(draw) >= dropout_p


def check_dropout_p(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def draw_seeds(count: int, device: torch.device) -> torch.Tensor:
    """``count`` independent philox seeds on ``device``, one generator call: an int64 ``(count, 2)`` tensor.

    Row ``i``'s first element is call ``i``'s seed (pass ``seeds[i, :1]``); rows are 16 bytes apart,
    so every seed pointer has the alignment the kernels are compiled for.
    """
    return torch.randint(_SEED_BOUND, (count, 2), dtype=torch.int64, device=device)


def call_seed(dropout_p: float, seed: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A call's seed: ``seed`` when the caller drew it, else a fresh one on ``device``; ``None`` (generator
    untouched) without dropout."""
    if dropout_p == 0.0:
        return None
    return seed if seed is not None else draw_seeds(1, device)[0, :1]


def dropout_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(dropout_p, seed pointer)`` for a launch next to ``like``; without dropout ``like`` stands in for the
    unused pointer."""
    if dropout_p == 0.0:
        return 0.0, like
    check_dropout_p(dropout_p)
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed (see draw_seeds)")
    if not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got {getattr(seed, 'dtype', type(seed))}")
    if seed.device != like.device:
        raise ValueError(f"seed is on {seed.device} but the inputs are on {like.device}: the kernels read it there")
    return float(dropout_p), seed
