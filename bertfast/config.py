"""BertConfig: Hugging Face's BertConfig field names and defaults, validated."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .family import FAMILIES, bert_config_fields, family_config_fields

SUPPORTED_ACTIVATIONS = ("gelu",)  # the exact erf GELU, as Hugging Face's "gelu"
SUPPORTED_POSITION_EMBEDDINGS = ("absolute",)
FAMILY_NAMES = tuple(t for f in FAMILIES for t in f.model_types)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"BertConfig.{name} must be a number, got {value!r} ({type(value).__name__})")


@dataclasses.dataclass
class BertConfig:
    """Configuration of a BERT encoder, field for field like ``transformers.BertConfig``.

    Unknown keys read from a ``config.json`` are kept in ``extra`` (and written back by
    :meth:`to_dict`) so a round trip loses nothing.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None
    # RoBERTa's rule (also XLM-RoBERTa's and CamemBERT's): default position ids count real tokens
    # (input ids other than pad_token_id) from pad_token_id + 1, padding gets pad_token_id.
    positions_from_input_ids: bool = False
    # DistilBERT has no dropout after the attention projection: 0.0 there; None: hidden_dropout_prob, as BERT.
    attention_output_dropout_prob: float | None = None
    # The transformers family the model is (its model_type): it decides the heads' layout
    # (bertfast.family.sequence_classification_head), token types and the names save_pretrained writes.
    family: str = "bert"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- presets -------------------------------------------------------------------
    @classmethod
    def bert_large(cls, **overrides) -> BertConfig:
        """BERT-large: 24 layers, hidden 1024, 16 heads, FFN 4096 (340M parameters)."""
        fields = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        return cls(**{**fields, **overrides})

    @classmethod
    def bert_base(cls, **overrides) -> BertConfig:
        """BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072 (110M parameters)."""
        return cls(**overrides)

    # -- checks --------------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        # Type checks before any comparison, so a string read from a config.json ("0.1") is named, not a TypeError.
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps"):
            _check_number(name, getattr(self, name))
        for name in ("classifier_dropout", "attention_output_dropout_prob"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
        if self.family not in FAMILY_NAMES:
            raise ValueError(f"BertConfig.family must be one of {FAMILY_NAMES}, got {self.family!r}")
        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, int)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(
                f"BertConfig.pad_token_id must be None or an integer in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}"
            )
        if not isinstance(self.positions_from_input_ids, bool):
            raise ValueError(
                f"BertConfig.positions_from_input_ids must be true or false, got {self.positions_from_input_ids!r}"
            )
        if self.positions_from_input_ids and self.pad_token_id is None:
            raise ValueError("BertConfig.positions_from_input_ids needs a pad_token_id (positions count from it)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; bertfast implements {SUPPORTED_ACTIVATIONS} "
                "(the exact erf GELU)"
            )
        if self.position_embedding_type not in SUPPORTED_POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding_type {self.position_embedding_type!r} is not supported; "
                f"bertfast implements {SUPPORTED_POSITION_EMBEDDINGS}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {p!r}")
        for name in ("classifier_dropout", "attention_output_dropout_prob"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1) or None, got {p}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"BertConfig.problem_type {self.problem_type!r} is not one of Hugging Face's")
        if self.extra.get("is_decoder") or self.extra.get("add_cross_attention"):
            raise ValueError("bertfast implements the BERT encoder only (is_decoder / add_cross_attention are set)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # -- what transformers reads from any model's config (Trainer, pipelines) ------
    model_type = "bert"

    @property
    def return_dict(self) -> bool:
        return self.extra.get("return_dict", True)

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def id2label(self) -> dict[int, str]:
        stored = self.extra.get("id2label")
        if isinstance(stored, dict):  # JSON keys are strings
            return {int(k): v for k, v in stored.items()}
        return {i: f"LABEL_{i}" for i in range(self.num_labels)}

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @property
    def name_or_path(self) -> str:
        return self.extra.get("_name_or_path", "")

    # transformers 5.17's pipeline() reads it (None: not loaded from the hub)
    _commit_hash = None

    # -- (de)serialisation ---------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        # RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA and DistilBERT configs become BERT's fields.
        data = bert_config_fields(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "num_labels" not in data and isinstance(data.get("id2label"), dict):
            data["num_labels"] = len(data["id2label"])
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, extra=data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BertConfig:
        """Read ``config.json`` from a local Hugging Face-format folder (never the network)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder {path!r} does not exist (bertfast loads local folders only)")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        try:
            with open(config_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{config_file}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as the family's own ``config.json`` (``model_type`` and names of the family)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {**self.extra, **data}
        # BERT's own configs stay exactly transformers' fields: bertfast's are written only when set.
        if not self.positions_from_input_ids:
            del data["positions_from_input_ids"]
        if self.attention_output_dropout_prob is None:
            del data["attention_output_dropout_prob"]
        return family_config_fields(data)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
