"""Model outputs that behave like Hugging Face's: attributes, and tuple indexing over the fields that are set."""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree


class ModelOutput:
    """Base for output dataclasses: ``out.logits``, ``out[0]``, ``out["logits"]``, ``tuple(out)``.

    As in Hugging Face, fields that are ``None`` are skipped when indexing by position, so
    ``out[0]`` is the loss when labels were given and the logits otherwise.
    """

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def _register(cls):
    """Make the output a pytree node, so torch.compile(fullgraph=True) can return it."""
    names = [f.name for f in dataclasses.fields(cls)]

    def flatten(out):
        return [getattr(out, n) for n in names], None

    def unflatten(values, _context):
        return cls(*values)

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"bertfast.{cls.__name__}")
    return cls


@_register
@dataclasses.dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # Set by the padding-free path: the token bookkeeping (indices, cu_seqlens, max_seqlen).
    packed: object | None = dataclasses.field(default=None, repr=False)
    # ... and the encoder's output as it was computed, packed ``(total_tokens, hidden)``, for
    # users (and heads) that stay packed; ``packed.indices`` maps its rows to ``(batch, seq)``.
    packed_last_hidden_state: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    # The packed fields are attributes only: like Hugging Face's outputs, positions, keys() and
    # len() count the same fields.
    _TUPLE_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states")

    def keys(self):
        return [n for n in self._TUPLE_FIELDS if getattr(self, n) is not None]


@_register
@dataclasses.dataclass
class MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@_register
@dataclasses.dataclass
class PreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@_register
@dataclasses.dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@_register
@dataclasses.dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@_register
@dataclasses.dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
