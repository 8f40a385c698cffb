"""Dropout shared by the kernels that drop (attention probabilities, the residual-LayerNorm input).

Each call draws one philox seed from torch's default CPU generator, so ``torch.manual_seed``
reproduces every mask, and the kernels receive it as a plain integer: drawing it never waits
for the GPU.  The backward gets the same seed (saved for autograd) and regenerates the masks.

An element's draw is ``philox(seed, (c0, c1, c2, 0))`` on four 32-bit counters that name the
element by its logical coordinates (e.g. key, query token, head), never by a tile: kernels
with different block sizes draw the same mask.  32-bit counters keep philox at 32-bit
multiplies; one flat 64-bit index (``tl.rand`` on int64 offsets) would double its cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, dropout_p, c0, c1, c2):
    """Which elements survive dropout at rate ``dropout_p``: a bool block of ``c0``/``c1``'s broadcast shape.

    ``c0``, ``c1``: int32 blocks, broadcastable to each other; ``c2``: an int32 scalar.
    """
    c0, c1 = tl.broadcast(c0, c1)
    c2 = tl.zeros_like(c0) + c2
    draw, _, _, _ = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    return tl.uint_to_uniform_float(draw) >= dropout_p


def check_dropout_p(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def draw_seed(dropout_p: float) -> torch.Tensor | None:
    """A philox seed for one call: an int64 scalar on the CPU; ``None`` (generator untouched) without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(2**31 - 1, (), dtype=torch.int64, device="cpu")


def dropout_args(dropout_p: float, seed: torch.Tensor | None) -> tuple[float, int]:
    """(dropout_p, seed) as kernel scalars; (0.0, 0) without dropout."""
    if dropout_p == 0.0:
        return 0.0, 0
    check_dropout_p(dropout_p)
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed (see draw_seed)")
    if seed.device.type != "cpu" or seed.numel() != 1 or seed.dtype.is_floating_point:
        raise ValueError(
            f"seed must be a one-element integer CPU tensor, got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
        )
    return float(dropout_p), int(seed.item())
