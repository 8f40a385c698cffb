"""The BERT family: models whose encoder is BERT's math under other names or position ids.

RoBERTa, XLM-RoBERTa and CamemBERT are BERT with position ids counted over real tokens only
(offset by ``pad_token_id + 1``, read from the input ids) and usually one token type; ELECTRA
whose ``embedding_size`` equals ``hidden_size`` is BERT; DistilBERT is BERT without token
types, under its own module names.  :mod:`bertfast.layers` computes them all with the same
functions, reading each layer's modules through :func:`layer_parts_function` and the position-id
rule through :func:`default_position_ids`; nothing here computes a layer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import NamedTuple

import torch
from torch import nn


class LayerParts(NamedTuple):
    """One post-LN encoder layer's modules, whatever their names."""

    attention: nn.Module  # the module holding Wq, Wk, Wv (key of the fused-QKV cache)
    query: nn.Module
    key: nn.Module
    value: nn.Module
    attention_dropout: nn.Module
    attention_dense: nn.Module
    attention_norm: nn.Module
    attention_output_dropout: nn.Module | None  # DistilBERT has no dropout after its attention projection
    intermediate: nn.Module
    activation: nn.Module
    output_dense: nn.Module
    output_norm: nn.Module
    output_dropout: nn.Module
    heads: int
    head_dim: int


# Both read ``_modules`` directly: ``module.attr`` is a Python-level ``__getattr__`` call, and these run
# once per layer and forward.


def bert_layer_parts(layer: nn.Module) -> LayerParts:
    """``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output``: BERT's names
    (RoBERTa's and ELECTRA's too)."""
    modules = layer._modules
    attention = modules["attention"]._modules
    sa = attention["self"]
    qkv = sa._modules
    attention_output = attention["output"]._modules
    intermediate = modules["intermediate"]._modules
    output = modules["output"]._modules
    return LayerParts(
        sa,
        qkv["query"],
        qkv["key"],
        qkv["value"],
        qkv["dropout"],
        attention_output["dense"],
        attention_output["LayerNorm"],
        attention_output["dropout"],
        intermediate["dense"],
        intermediate.get("intermediate_act_fn"),
        output["dense"],
        output["LayerNorm"],
        output["dropout"],
        sa.num_attention_heads,
        sa.attention_head_size,
    )


def distilbert_layer_parts(layer: nn.Module) -> LayerParts:
    """``attention.{q,k,v,out}_lin``, ``sa_layer_norm``, ``ffn.lin1/lin2``, ``output_layer_norm`` (DistilBERT)."""
    modules = layer._modules
    sa = modules["attention"]
    query, key, value, dropout, out = map(sa._modules.__getitem__, ("q_lin", "k_lin", "v_lin", "dropout", "out_lin"))
    ffn = modules["ffn"]._modules
    ffn_parts = (ffn["lin1"], ffn.get("activation"), ffn["lin2"], modules["output_layer_norm"], ffn["dropout"])
    heads = (sa.n_heads, sa.attention_head_size)
    return LayerParts(sa, query, key, value, dropout, out, modules["sa_layer_norm"], None, *ffn_parts, *heads)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a transformers model family names differently from BERT."""

    model_types: tuple[str, ...]  # its configs' ``model_type``
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # classes' name prefix: ``{prefix}Model``, ``{prefix}PreTrainedModel``
    base_attr: str  # the encoder's attribute in head models (its checkpoint key prefix)
    activation_field: str = "hidden_act"
    positions_count_real_tokens: bool = False
    output: str = "BaseModelOutputWithPoolingAndCrossAttentions"  # the base model's output class


BERT = Family(("bert",), "bert", "Bert", "bert")
_ROBERTA_STYLE = dict(base_attr="roberta", positions_count_real_tokens=True)
FAMILIES = (
    BERT,
    Family(("roberta",), "roberta", "Roberta", **_ROBERTA_STYLE),
    Family(("xlm-roberta",), "xlm_roberta", "XLMRoberta", **_ROBERTA_STYLE),
    Family(("camembert",), "camembert", "Camembert", **_ROBERTA_STYLE),
    Family(("electra",), "electra", "Electra", "electra", output="BaseModelOutputWithPastAndCrossAttentions"),
    Family(
        ("distilbert",),
        "distilbert",
        "DistilBert",
        "distilbert",
        activation_field="activation",
        output="BaseModelOutput",
    ),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of_config(config) -> Family | None:
    """The family of a transformers config (by ``model_type``), or None."""
    return family_of_model_type(getattr(config, "model_type", None))


def family_of_model_type(model_type: str | None) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type)


def encoder_module(bert: nn.Module) -> nn.Module:
    """The module holding a base model's layers: ``encoder`` (DistilBERT: ``transformer``)."""
    modules = bert._modules
    encoder = modules.get("encoder")
    return encoder if encoder is not None else modules["transformer"]


def encoder_layers(bert: nn.Module):
    """The encoder layers of a base model of any family (``encoder.layer`` or ``transformer.layer``)."""
    return encoder_module(bert)._modules["layer"]


def layer_parts_function(bert: nn.Module):
    """The :class:`LayerParts` reader for ``bert``'s layers."""
    return distilbert_layer_parts if "transformer" in bert._modules else bert_layer_parts


def modeling_module(family: Family):
    try:
        return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    except ImportError as exc:  # transformers is an optional dependency
        raise ImportError("bertfast.patch needs transformers (pip install 'transformers>=5')") from exc


def find_base_model(model: nn.Module) -> tuple[nn.Module, Family] | None:
    """The family base model inside ``model`` (``model`` itself or its ``.bert``/``.roberta``/... attribute)."""
    for family in FAMILIES:
        modeling = modeling_module(family)
        base_class = getattr(modeling, f"{family.prefix}Model")
        if isinstance(model, base_class):
            return model, family
        pretrained = getattr(modeling, f"{family.prefix}PreTrainedModel")
        base = getattr(model, family.base_attr, None)
        if isinstance(model, pretrained) and isinstance(base, base_class):
            return base, family
    return None


def unsupported_config_reason(config) -> str | None:
    """Why bertfast cannot run a transformers config of the family (patched or converted), or None."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder (is_decoder / add_cross_attention); bertfast implements the encoder"
    position = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position != "absolute":
        return f"position_embedding_type is {position!r}; bertfast implements absolute position embeddings only"
    field = (family_of_config(config) or BERT).activation_field
    act = getattr(config, field, None)
    if not (isinstance(act, str) and act == "gelu"):
        return f"{field} is {act!r}; bertfast implements exactly 'gelu' (the erf GELU)"
    return None


# An ``activation`` beside one of these is a GELU of the family's: DistilBERT's FFN (lin1) and MLM head
# (vocab_transform), ELECTRA's generator head (LayerNorm); the pooler's Tanh has none of them.
_GELU_BESIDE = ("lin1", "vocab_transform", "LayerNorm")


def non_gelu_activation(model: nn.Module, prefix: str = "") -> str | None:
    """The first activation module in ``model`` (named from ``prefix``) that is not transformers' erf GELU,
    as a reason, or None: the config says "gelu", but a module may have been replaced since."""
    from transformers.activations import GELUActivation

    for name, module in model.named_modules(prefix=prefix):
        act = getattr(module, "intermediate_act_fn", None) or getattr(module, "transform_act_fn", None)
        if act is None and any(n in module._modules for n in _GELU_BESIDE):
            act = module._modules.get("activation")
        if act is not None and type(act) is not GELUActivation:
            return f"{name or type(module).__name__} uses {type(act).__name__}; bertfast implements the erf GELU only"
    return None


def separates_packed_sequences(bert: nn.Module) -> bool:
    """Whether ``bert``, given position ids and no ``attention_mask``, runs each run of consecutive position ids
    as a sequence of its own (transformers' padding-free format): bertfast's native models do; a transformers
    model does when its class builds the attention mask from position ids (from transformers 5.25 BERT,
    RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA; never DistilBERT, whose mask ignores them)."""
    return _separates_packed_sequences(type(bert))


@functools.cache
def _separates_packed_sequences(cls: type) -> bool:
    native = getattr(cls, "separates_packed_sequences", None)
    if native is not None:
        return native
    build_masks = getattr(cls, "_create_attention_masks", None)
    return build_masks is not None and "position_ids" in inspect.signature(build_masks).parameters


def positions_count_real_tokens(config) -> bool:
    """Whether position ids count real tokens from ``pad_token_id + 1`` (RoBERTa style): a native
    config's ``positions_from_input_ids``, or a transformers config of a RoBERTa-style family."""
    if getattr(config, "positions_from_input_ids", False):
        return True
    family = family_of_config(config)
    return family is not None and family.positions_count_real_tokens


def longest_sequence_message(config, tokens: int) -> str:
    """Why ``tokens`` real tokens are too many for a model whose position ids ``bertfast`` derives itself."""
    limit = config.max_position_embeddings
    if not positions_count_real_tokens(config):
        return f"a sequence of {tokens} tokens is longer than max_position_embeddings ({limit})"
    pad = config.pad_token_id
    return (
        f"a sequence of {tokens} tokens is too long: RoBERTa-style position ids count real tokens from "
        f"pad_token_id ({pad}) + 1, so max_position_embeddings ({limit}) takes at most {limit - pad - 1} tokens"
    )


def longest_sequence(config) -> int:
    """The most real tokens a sequence may hold when the model derives its position ids."""
    offset = config.pad_token_id + 1 if positions_count_real_tokens(config) else 0
    return config.max_position_embeddings - offset


def default_position_ids(config, input_ids, seq: int, device) -> torch.Tensor:
    """The position ids a model computes when none are given, from the padded ``input_ids``.

    BERT: ``0 .. seq-1``.  RoBERTa style: real tokens (ids other than ``pad_token_id``) count from
    ``pad_token_id + 1`` and padding tokens get ``pad_token_id``, as transformers'
    ``create_position_ids_from_input_ids``; from ``inputs_embeds`` (no ids to tell padding) every
    position counts.  Computed before the batch is packed, so left padding shifts nothing.
    """
    if not positions_count_real_tokens(config):
        return torch.arange(seq, device=device)[None, :]
    padding_idx = config.pad_token_id
    if input_ids is None:
        return torch.arange(padding_idx + 1, seq + padding_idx + 1, device=device)[None, :]
    real = input_ids.ne(padding_idx)
    return torch.cumsum(real, dim=1) * real + padding_idx


# --------------------------------------------------------------------------------------
# The native side: a family checkpoint as bertfast's BERT classes
# --------------------------------------------------------------------------------------

_DISTILBERT_FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size",
    "activation": "hidden_act",
    "dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


def _classification_head_fields(model_type: str, data: dict) -> dict:
    """The pooler fields that map the family's sequence-classification head onto BERT's pooler + classifier.

    RoBERTa's (and XLM-RoBERTa's, CamemBERT's) head: dropout, dense, tanh, dropout, out_proj on the first
    token; ELECTRA's the same with GELU; DistilBERT's: pre_classifier, ReLU, dropout (its
    ``seq_classif_dropout``), classifier.  ``dense``/``pre_classifier`` become the pooler's dense layer,
    ``out_proj``/``classifier`` the classifier (see the key renames below).
    """
    if model_type == "distilbert":
        return {"pooler_act": "relu", "classifier_dropout": data.get("seq_classif_dropout", 0.2)}
    if model_type == "bert":
        return {}
    rate = data.get("classifier_dropout")
    rate = data.get("hidden_dropout_prob", 0.1) if rate is None else rate
    return {"pooler_act": "gelu" if model_type == "electra" else "tanh", "pooler_input_dropout_prob": rate}


def bert_config_fields(data: dict) -> dict:
    """A family ``config.json``'s fields under :class:`bertfast.BertConfig`'s names, ``model_type`` removed.

    RoBERTa style sets ``positions_from_input_ids``; DistilBERT's fields are renamed and it gets one
    token type (a zero row) and its fixed LayerNorm eps; an ELECTRA whose ``embedding_size`` is not
    ``hidden_size`` raises ``ValueError``.
    """
    data = dict(data)
    model_type = data.pop("model_type", "bert")
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"expected a config of the BERT family (model_type one of {sorted(_BY_MODEL_TYPE)}), got {model_type!r}"
        )
    if family.positions_count_real_tokens:
        data["positions_from_input_ids"] = True
    if model_type == "electra":
        hidden = data.get("hidden_size")
        if data.get("embedding_size", hidden) != hidden:
            raise ValueError(
                f"ELECTRA's embedding_size ({data['embedding_size']}) differs from hidden_size ({hidden}): its "
                "embeddings_project layer is not BERT's; bertfast runs ELECTRA only with embedding_size == hidden_size"
            )
    if any(str(name).endswith("ForSequenceClassification") for name in data.get("architectures") or ()):
        data.update(_classification_head_fields(model_type, data))
    if model_type == "distilbert":
        for name, bert_name in _DISTILBERT_FIELDS.items():
            if name in data:
                data[bert_name] = data.pop(name)
        # DistilBERT's LayerNorms use a fixed 1e-12; its attention projection is not followed by dropout.
        data.update(type_vocab_size=1, layer_norm_eps=1e-12, attention_output_dropout_prob=0.0)
    return data


# Heads whose math is BERT's own (the same modules under other names), by class-name suffix.
NATIVE_HEADS = ("Model", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering", "ForSequenceClassification")
# Family heads without a native class, and why; bertfast.patch runs them (patched encoder, transformers' head).
_OTHER_HEADS = {
    "ForMultipleChoice": "its multiple-choice head is not BERT's",
    "ForPreTraining": "ELECTRA's discriminator head has no native class",
    "ForCausalLM": "bertfast implements the encoder, not a decoder",
}
_NOT_NATIVE = {
    ("distilbert", "ForQuestionAnswering"): "DistilBERT's question-answering head applies a dropout BERT's does not"
}


def foreign_head_reason(class_name: str) -> str | None:
    """Why the head of the family class ``class_name`` is not a native head's (``"its multiple-choice head is
    not BERT's"``), or None (a native head, BERT's own, or a class outside the family)."""
    for family in FAMILIES:
        if family is not BERT and class_name.startswith(family.prefix):
            head = class_name[len(family.prefix) :]
            return _NOT_NATIVE.get((family.model_types[0], head)) or _OTHER_HEADS.get(head)
    return None


def native_class_name(class_name: str) -> tuple[str, Family] | None:
    """``("Bert<head>", family)`` for a transformers class of the BERT family whose head is BERT's; None for a
    class that is not of the family.  Raises ``TypeError`` naming a family head with no native class."""
    reason = foreign_head_reason(class_name)
    if reason is not None:
        raise TypeError(
            f"transformers {class_name} has no bertfast native class ({reason}); bertfast.patch(model) runs it "
            "(a patched encoder under transformers' own head)"
        )
    for family in FAMILIES:
        if not class_name.startswith(family.prefix):
            continue
        head = class_name[len(family.prefix) :]
        if head in NATIVE_HEADS or family is BERT:
            return "Bert" + head, family
    return None


# Checkpoint names of each family -> bertfast's BERT names (substring renames, in order).
# The family's sequence-classification heads as BERT's pooler + classifier (see _classification_head_fields).
_CLASSIFIER_KEYS = (("classifier.dense.", "bert.pooler.dense."), ("classifier.out_proj.", "classifier."))
_ROBERTA_KEYS = (
    *_CLASSIFIER_KEYS,
    ("roberta.", "bert."),
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.decoder.", "cls.predictions.decoder."),
    ("lm_head.bias", "cls.predictions.bias"),
)
_KEY_RENAMES = {
    "roberta": _ROBERTA_KEYS,
    "xlm-roberta": _ROBERTA_KEYS,
    "camembert": _ROBERTA_KEYS,
    "electra": (
        *_CLASSIFIER_KEYS,
        ("electra.", "bert."),
        ("generator_predictions.dense.", "cls.predictions.transform.dense."),
        ("generator_predictions.LayerNorm.", "cls.predictions.transform.LayerNorm."),
        ("generator_lm_head.weight", "cls.predictions.decoder.weight"),
        ("generator_lm_head.bias", "cls.predictions.bias"),
    ),
    "distilbert": (
        ("pre_classifier.", "bert.pooler.dense."),
        ("distilbert.", "bert."),
        ("transformer.layer.", "encoder.layer."),
        (".attention.q_lin.", ".attention.self.query."),
        (".attention.k_lin.", ".attention.self.key."),
        (".attention.v_lin.", ".attention.self.value."),
        (".attention.out_lin.", ".attention.output.dense."),
        (".sa_layer_norm.", ".attention.output.LayerNorm."),
        (".ffn.lin1.", ".intermediate.dense."),
        (".ffn.lin2.", ".output.dense."),
        (".output_layer_norm.", ".output.LayerNorm."),
        ("vocab_transform.", "cls.predictions.transform.dense."),
        ("vocab_layer_norm.", "cls.predictions.transform.LayerNorm."),
        ("vocab_projector.weight", "cls.predictions.decoder.weight"),
        ("vocab_projector.bias", "cls.predictions.bias"),
    ),
}


def bert_state_dict(state: dict, model_type: str) -> dict:
    """A family checkpoint's tensors under bertfast's BERT names (BERT's own pass through).

    DistilBERT has no token types: the one-row type table BERT's embedding reads is zeros."""
    renames = _KEY_RENAMES.get(model_type)
    if not renames:
        return state
    renamed = {}
    for key, tensor in state.items():
        for old, new in renames:
            key = key.replace(old, new, 1)
        renamed[key] = tensor
    if model_type == "distilbert":
        word = next((t for k, t in renamed.items() if k.endswith("embeddings.word_embeddings.weight")), None)
        if word is not None:
            renamed["embeddings.token_type_embeddings.weight"] = word.new_zeros((1, word.shape[1]))
    return renamed
