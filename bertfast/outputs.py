"""Model outputs that behave like Hugging Face's: attributes, and tuple indexing over the fields that are set."""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree


class ModelOutput:
    """Base for output dataclasses: ``out.logits``, ``out[0]``, ``out["logits"]``, ``tuple(out)``.

    As in Hugging Face, fields that are ``None`` are skipped when indexing by position, so
    ``out[0]`` is the loss when labels were given and the logits otherwise.  Like Hugging Face's
    ``ModelOutput`` (which pipelines and Trainer write to), ``out["key"] = value`` sets the attribute
    and ``out.key = value`` the item, for a field or a new key (kept after the fields, in order).
    """

    # The fields positions, keys() and len() count; None: every dataclass field.
    _TUPLE_FIELDS: tuple[str, ...] | None = None

    def __setattr__(self, name, value):
        if not name.startswith("_") and name not in self.__dataclass_fields__:
            added = self.__dict__.setdefault("_added_keys", [])
            if name not in added:
                added.append(name)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} items are set by name, got {key!r}")
        setattr(self, key, value)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def keys(self):
        names = self._TUPLE_FIELDS or tuple(self.__dataclass_fields__)
        return [n for n in (*names, *self.__dict__.get("_added_keys", ())) if getattr(self, n) is not None]

    def values(self):
        return [getattr(self, name) for name in self.keys()]

    def items(self):
        return [(name, getattr(self, name)) for name in self.keys()]

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


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
