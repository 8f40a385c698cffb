"""Hugging Face interoperability: converting live transformers models, and an attention function for transformers.

Two ways to run a transformers BERT on bertfast besides :func:`bertfast.patch`:

1. Conversion: ``bertfast.BertForSequenceClassification.from_hf(hf_model)`` (any of the six
   classes below), or :func:`convert` to pick the class by the Hugging Face class name.  The
   Hugging Face config is mapped field for field to :class:`bertfast.BertConfig` and the
   weights are copied (same names, same dtype and device); the result is a native bertfast
   model in the Hugging Face model's train/eval mode.  RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA
   and DistilBERT models become the same BERT classes (``RobertaForMaskedLM`` ->
   ``BertForMaskedLM``; see :mod:`bertfast.family`) where their head is BERT's; other heads
   raise ``TypeError`` naming them.  What bertfast cannot represent
   (a decoder, relative position embeddings, an activation other than the erf GELU, an MLM
   decoder not tied to the word embeddings) raises ``ValueError``.

2. An attention implementation for transformers' own model code: :func:`register_attention`
   adds ``"bertfast"`` to transformers' ``AttentionInterface`` (and a matching entry to its
   ``AttentionMaskInterface``), so ``BertModel.from_pretrained(..., attn_implementation="bertfast")``
   or ``model.set_attn_implementation("bertfast")`` runs every self-attention through
   ``bertfast.ops.attention``; everything else stays Hugging Face's.  Limits: it needs a
   transformers whose BERT calls the registry (5.x; older versions raise on registration);
   it runs bidirectional self-attention only (no cache, no cross-attention, no causal
   mask); ``output_attentions`` raises.  The mask entry hands the attention the user's 2-D
   padding mask unchanged; a 4-D mask (a user's own, or from a transformers without the
   mask registry) is converted back by :func:`key_padding_mask_from_hf` when it is a
   key-padding mask (boolean, or additive with 0 / a large negative value, the same for
   every query) and raises otherwise.  Checking that needs the values, so in eager mode only;
   under ``torch.compile`` a 4-D mask that is not expanded from one row is assumed to be a
   key-padding mask.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import ops
from .layers import values_checkable
from .modeling import SUPPORTED_CLASSES, config_from_hf, convert, from_hf
from .ops import check_backend
from .padding import tokens_of

__all__ = [
    "SUPPORTED_CLASSES",
    "attention_forward",
    "config_from_hf",
    "convert",
    "from_hf",
    "key_padding_mask_from_hf",
    "register_attention",
]

# --------------------------------------------------------------------------------------
# The attention function for transformers' AttentionInterface
# --------------------------------------------------------------------------------------


def key_padding_mask_from_hf(attention_mask, batch: int, q_len: int, kv_len: int):
    """The ``(batch, kv_len)`` boolean key-padding mask (True = token) a transformers mask encodes, or None.

    Accepts ``None``, a 2-D ``(batch, kv_len)`` padding mask (nonzero = token), or a 4-D
    ``(batch or 1, heads or 1, q_len or 1, kv_len)`` mask: boolean (True = attend) or
    additive (0 = attend, a large negative value = masked).  A 4-D mask must be the same for
    every query and head (that is what a key-padding mask is); otherwise, or for any other
    value or shape, ``ValueError``/``NotImplementedError`` is raised.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"the bertfast attention takes a tensor mask, got {type(attention_mask).__name__} "
            "(flex-attention block masks are not supported)"
        )
    mask = attention_mask
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, kv_len):
            raise ValueError(f"a 2-D attention mask must have shape {(batch, kv_len)}, got {tuple(mask.shape)}")
        return tokens_of(mask)
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, q_len) or mask.shape[3] != kv_len:
        raise NotImplementedError(
            f"the bertfast attention takes a key-padding mask; got a mask of shape {tuple(mask.shape)} "
            f"for batch {batch}, {q_len} queries and {kv_len} keys"
        )
    checkable = values_checkable(mask.device)
    # An expanded view is one row for every query and head by construction: nothing to check.
    broadcast = (mask.shape[1] == 1 or mask.stride(1) == 0) and (mask.shape[2] == 1 or mask.stride(2) == 0)
    if not checkable and (not broadcast or mask.dtype != torch.bool):
        # Compiled or captured, the values cannot be read: take only masks whose shape makes them key-padding masks.
        raise NotImplementedError(
            "under torch.compile or CUDA-graph capture the bertfast attention cannot check that a materialised or "
            f"additive 4-D mask ({mask.dtype}, shape {tuple(mask.shape)}) is a key-padding mask; pass the 2-D "
            "(batch, seq) padding mask, or a boolean mask expanded over heads and queries"
        )
    if mask.dtype == torch.bool:
        keep4 = mask
    elif mask.dtype.is_floating_point:
        keep4 = mask == 0
        if checkable:
            blocked = mask <= torch.finfo(mask.dtype).min / 2  # transformers uses finfo.min (or -inf)
            if not bool((keep4 | blocked).all()):
                raise NotImplementedError(
                    "this additive attention mask holds values other than 0 and a large negative number: it is a "
                    "bias, not a padding mask, and the bertfast attention cannot apply it"
                )
    else:
        raise NotImplementedError(f"attention masks of dtype {mask.dtype} are not supported")
    keep = keep4[:, 0, 0, :]
    if checkable and not broadcast and not torch.equal(keep4, keep[:, None, None, :].expand_as(keep4)):
        raise NotImplementedError(
            "this attention mask differs between queries or heads (causal or custom pattern); the bertfast "
            "attention supports key-padding masks only"
        )
    return keep.expand(batch, kv_len)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: str | None = "auto",
    **kwargs,
):
    """The transformers attention-interface function, through ``bertfast.ops.attention``.

    ``query, key, value``: ``(batch, heads, seq, head_dim)``.  Returns ``(output, None)``:
    the output as ``(batch, seq, heads, head_dim)``, and no probabilities (bertfast never
    forms them).
    """
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise NotImplementedError(
            "output_attentions=True is not supported by the 'bertfast' attention implementation (it never forms the "
            "probability matrix); use attn_implementation='eager' for attention probabilities"
        )
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise NotImplementedError("the 'bertfast' attention implementation is bidirectional only (no causal masks)")
    if query.dim() != 4:
        raise ValueError(f"query must have shape (batch, heads, seq, head_dim), got {tuple(query.shape)}")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[-2]
    if kv_len != q_len or key.shape[0] != batch:
        raise NotImplementedError(
            f"the 'bertfast' attention implementation runs self-attention without a cache; got {q_len} queries "
            f"and {kv_len} keys"
        )
    keep = key_padding_mask_from_hf(attention_mask, batch, q_len, kv_len)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # views: head_dim stays contiguous
    out = ops.attention(q, k, v, keep, scale=scaling, dropout_p=float(dropout), backend=backend)
    return out, None


def _padding_mask_for_bertfast(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask=None,
    **kwargs,
):
    """transformers mask-interface function: the 2-D padding mask itself for a plain bidirectional mask.

    Anything else (causal, sliding windows, offsets, or- and and-overlays) is refused here, by
    the mask function alone, so the answer is the same compiled or not: the bertfast attention
    applies key-padding masks only.
    """
    from transformers import masking_utils

    if mask_function is not masking_utils.bidirectional_mask_function:
        name = getattr(mask_function, "__qualname__", None) or type(mask_function).__name__
        raise NotImplementedError(
            f"the bertfast attention applies bidirectional key-padding masks only; this model asks for a mask built "
            f"by {name} (a sliding window, causal or custom pattern)"
        )
    if q_offset or kv_offset or q_length != kv_length:
        raise NotImplementedError(
            f"the bertfast attention runs self-attention without a cache; got q_offset {q_offset}, kv_offset "
            f"{kv_offset}, {q_length} queries and {kv_length} keys"
        )
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length):
        raise NotImplementedError(
            f"the bertfast attention takes a 2-D (batch, {kv_length}) padding mask here, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask


def register_attention(name: str = "bertfast", backend: str | None = "auto") -> str:
    """Register the bertfast attention with transformers under ``name``; returns ``name``.

    Then ``attn_implementation=name`` selects it in transformers models whose attention
    calls the registry (BERT in transformers 5).  ``backend`` is the bertfast backend the
    attention runs on.  Registering again replaces the earlier registration.  Raises
    ``RuntimeError`` when the installed transformers has no attention registry.
    """
    backend = check_backend(backend)
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("register_attention needs transformers (pip install 'transformers>=5')") from exc
    interface = getattr(transformers, "AttentionInterface", None)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        AttentionMaskInterface = None
    if interface is None or AttentionMaskInterface is None:
        raise RuntimeError(
            f"transformers {transformers.__version__} has no AttentionInterface/AttentionMaskInterface registry, "
            "so its BERT cannot call a registered attention; use bertfast.patch(model) or bertfast's own models"
        )
    interface.register(name, functools.partial(attention_forward, backend=backend))
    AttentionMaskInterface.register(name, _padding_mask_for_bertfast)
    return name
