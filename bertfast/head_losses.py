"""The heads' losses at padding: one rule for every face, backend, ``unpad`` mode and ``torch.compile``.

Padding is not part of a sequence.  A padding-free forward never computes hidden states there
(they read as zeros), a padded one computes values that depend on nothing the model should
learn from, so a loss that reads them depends on the execution path.  bertfast's heads
therefore keep padding out of every loss, in native models and in patched transformers models
alike (where this differs from transformers, which reads padding positions, the difference
is only there):

- token-level labels (masked LM, pre-training's MLM part, token classification): a label at a
  padding position is ignored, as ``-100`` is;
- question answering: the span softmax runs over the sequence's tokens only (start and end
  logits at padding are the dtype's lowest value, so they get no probability and no
  gradient), and a start or end position at padding is ignored like one past the end.

``attention_mask`` is the user's ``(batch, seq)`` key-padding mask (nonzero = token), or
``None`` (no padding: nothing changes).  The native heads given Trainer's ``num_items_in_batch``
divide their loss by it through :func:`normalized_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .padding import tokens_of

IGNORE_INDEX = -100


def ignore_padding_labels(labels: torch.Tensor | None, attention_mask: torch.Tensor | None):
    """``labels`` with ``-100`` at padding positions."""
    if labels is None or attention_mask is None:
        return labels
    return labels.masked_fill(~tokens_of(attention_mask).expand_as(labels), IGNORE_INDEX)


def span_logits(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Start or end logits ``(batch, seq)`` with padding out of the span softmax."""
    if attention_mask is None:
        return logits.contiguous()
    return logits.masked_fill(~tokens_of(attention_mask).expand_as(logits), torch.finfo(logits.dtype).min)


def normalized_loss(loss_fn, prediction, target, num_items_in_batch, **kwargs):
    """``loss_fn``'s mean; given ``num_items_in_batch``, its sum divided by that count instead.

    Under gradient accumulation transformers' Trainer counts the items (labels other than
    -100) of every micro-batch of an optimizer step and does not divide the loss by the
    number of micro-batches itself, so the step's loss is the mean over all of its items.
    """
    if num_items_in_batch is None:
        return loss_fn(prediction, target, **kwargs)
    total = loss_fn(prediction, target, reduction="sum", **kwargs)
    count = num_items_in_batch
    return total / (count.to(total.device) if isinstance(count, torch.Tensor) else count)


def span_loss(
    start_logits, end_logits, start_positions, end_positions, attention_mask, num_items_in_batch=None
) -> torch.Tensor:
    """Mean of the start and end cross-entropies over the span logits (:func:`span_logits`, already
    masked).  As in transformers, positions past the sequence are clamped to it and ignored; a
    position at padding is ignored too.  ``num_items_in_batch``: each is a sum divided by it."""
    seq = start_logits.shape[1]
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        positions = positions.reshape(-1).clamp(0, seq)
        if attention_mask is not None:
            tokens = F.pad(tokens_of(attention_mask).expand(logits.shape[0], seq), (0, 1))  # seq: ignored already
            at_token = tokens.gather(1, positions[:, None]).squeeze(1)
            positions = positions.masked_fill(~at_token, seq)
        losses.append(normalized_loss(F.cross_entropy, logits.float(), positions, num_items_in_batch, ignore_index=seq))
    return (losses[0] + losses[1]) / 2
