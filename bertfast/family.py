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
import re
from typing import NamedTuple

import torch
from torch import nn


class LayerParts(NamedTuple):
    """One post-LN encoder layer's modules, whatever their names."""

    attention: nn.Module  # the module holding Wq, Wk, Wv (its flags say what bertfast cannot run)
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
    base_pooler: bool = True  # whether its base model has BERT's pooler (ELECTRA's and DistilBERT's have none)


BERT = Family(("bert",), "bert", "Bert", "bert")
_ROBERTA_STYLE = dict(base_attr="roberta", positions_count_real_tokens=True)
FAMILIES = (
    BERT,
    Family(("roberta",), "roberta", "Roberta", **_ROBERTA_STYLE),
    Family(("xlm-roberta",), "xlm_roberta", "XLMRoberta", **_ROBERTA_STYLE),
    Family(("camembert",), "camembert", "Camembert", **_ROBERTA_STYLE),
    Family(
        ("electra",),
        "electra",
        "Electra",
        "electra",
        output="BaseModelOutputWithPastAndCrossAttentions",
        base_pooler=False,
    ),
    Family(
        ("distilbert",),
        "distilbert",
        "DistilBert",
        "distilbert",
        activation_field="activation",
        output="BaseModelOutput",
        base_pooler=False,
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


def sequence_classification_head(config) -> tuple[str, float | None, float]:
    """``(pooler activation, dropout before the pooler's dense layer, classifier dropout)`` of the sequence-
    classification head of a native config's family, as BERT's pooler + classifier.

    BERT: tanh, none, ``classifier_dropout`` (else the hidden rate).  RoBERTa's (XLM-RoBERTa's, CamemBERT's)
    head: dropout, dense, tanh, dropout, out_proj on the first token, both dropouts at the classifier rate;
    ELECTRA's the same with GELU; DistilBERT's: pre_classifier, ReLU, dropout (its ``seq_classif_dropout``),
    classifier.  ``dense``/``pre_classifier`` are the pooler's dense layer, ``out_proj``/``classifier`` the
    classifier (see the key names below).  Decided by the family, never by a checkpoint's ``architectures``.
    """
    rate = config.classifier_dropout
    rate = config.hidden_dropout_prob if rate is None else rate
    if config.family == "distilbert":
        return "relu", None, config.extra.get("seq_classif_dropout", 0.2)
    if config.family == "bert":
        return "tanh", None, rate
    return ("gelu" if config.family == "electra" else "tanh"), rate, rate


def bert_config_fields(data: dict) -> dict:
    """A family ``config.json``'s fields under :class:`bertfast.BertConfig`'s names, ``model_type`` removed.

    ``family`` keeps the ``model_type``; RoBERTa style sets ``positions_from_input_ids``; DistilBERT's
    fields are renamed and it gets its fixed LayerNorm eps (and no token types: one type, no table); an
    ELECTRA whose ``embedding_size`` is not ``hidden_size`` raises ``ValueError``.
    """
    data = dict(data)
    model_type = data.pop("model_type", "bert")
    stale = sorted({"pooler_act", "pooler_input_dropout_prob"} & set(data))
    if stale:  # an earlier bertfast wrote a family's head this way under model_type "bert": which family is unknown
        raise ValueError(
            f"{stale} come from an earlier bertfast's BERT-layout save of a family model; the head is now chosen "
            "by the family: load the original checkpoint, or set model_type to its family and remove these fields"
        )
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
    data["family"] = model_type
    if model_type == "distilbert":
        for name, bert_name in _DISTILBERT_FIELDS.items():
            if name in data:
                data[bert_name] = data.pop(name)
        # DistilBERT's LayerNorms use a fixed 1e-12; its attention projection is not followed by dropout.
        data.update(type_vocab_size=1, layer_norm_eps=1e-12, attention_output_dropout_prob=0.0)
    return data


def family_config_fields(data: dict) -> dict:
    """:meth:`bertfast.BertConfig.to_dict`'s fields as its family's own ``config.json`` (the inverse of
    :func:`bert_config_fields`), so transformers builds the family's classes from it."""
    data = dict(data)
    model_type = data.pop("family", "bert")
    data["model_type"] = model_type
    if model_type == "bert":
        return data
    found = _BY_MODEL_TYPE[model_type]
    if found.positions_count_real_tokens:
        data.pop("positions_from_input_ids", None)  # the family's own rule
    if model_type == "electra":
        data["embedding_size"] = data["hidden_size"]
    if model_type == "distilbert":
        for name, bert_name in _DISTILBERT_FIELDS.items():
            data[name] = data.pop(bert_name)
        for fixed in ("type_vocab_size", "layer_norm_eps", "attention_output_dropout_prob"):
            data.pop(fixed, None)
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


# bertfast's names -> each family's, as exact tensor names or module paths (``*``: any layer number), so
# every name matches at most one rule and the same tables rename both ways.  Names outside a table keep their
# path under the base prefix (``bert.`` <-> ``roberta.``...).
_ROBERTA_HEADS = {
    "cls.predictions.bias": "lm_head.bias",
    "cls.predictions.transform.dense": "lm_head.dense",
    "cls.predictions.transform.LayerNorm": "lm_head.layer_norm",
    "cls.predictions.decoder": "lm_head.decoder",
}
_ELECTRA_HEADS = {
    "cls.predictions.bias": "generator_lm_head.bias",
    "cls.predictions.transform.dense": "generator_predictions.dense",
    "cls.predictions.transform.LayerNorm": "generator_predictions.LayerNorm",
    "cls.predictions.decoder": "generator_lm_head",
}
_DISTILBERT_NAMES = {
    "bert.encoder.layer.*.attention.self.query": "distilbert.transformer.layer.*.attention.q_lin",
    "bert.encoder.layer.*.attention.self.key": "distilbert.transformer.layer.*.attention.k_lin",
    "bert.encoder.layer.*.attention.self.value": "distilbert.transformer.layer.*.attention.v_lin",
    "bert.encoder.layer.*.attention.output.dense": "distilbert.transformer.layer.*.attention.out_lin",
    "bert.encoder.layer.*.attention.output.LayerNorm": "distilbert.transformer.layer.*.sa_layer_norm",
    "bert.encoder.layer.*.intermediate.dense": "distilbert.transformer.layer.*.ffn.lin1",
    "bert.encoder.layer.*.output.dense": "distilbert.transformer.layer.*.ffn.lin2",
    "bert.encoder.layer.*.output.LayerNorm": "distilbert.transformer.layer.*.output_layer_norm",
    "cls.predictions.bias": "vocab_projector.bias",
    "cls.predictions.transform.dense": "vocab_transform",
    "cls.predictions.transform.LayerNorm": "vocab_layer_norm",
    "cls.predictions.decoder": "vocab_projector",
}
_NAMES = {"roberta": _ROBERTA_HEADS, "xlm-roberta": _ROBERTA_HEADS, "camembert": _ROBERTA_HEADS}
_NAMES.update(electra=_ELECTRA_HEADS, distilbert=_DISTILBERT_NAMES)
# The sequence-classification head is BERT's pooler + classifier (see sequence_classification_head); these names
# apply to that class only (a token classifier's ``classifier`` is the family's ``classifier`` too).
_SEQUENCE_CLASSIFIER_NAMES = {"bert.pooler.dense": "classifier.dense", "classifier": "classifier.out_proj"}
_SEQUENCE_CLASSIFIER = {"distilbert": {"bert.pooler.dense": "pre_classifier"}}
_BASE_MODULES = ("embeddings", "encoder", "transformer", "pooler")  # a base model's own checkpoints start with these
_LAYER_NUMBER = re.compile(r"(?<=\.layer\.)\d+(?=\.)")


def _renamed(key: str, table: dict, prefix: tuple[str, str]) -> str:
    """``key`` under ``table`` (its exact name first, then its module path), else with ``prefix[0]`` replaced by
    ``prefix[1]``; layer numbers kept."""
    number = _LAYER_NUMBER.search(key)
    generic = _LAYER_NUMBER.sub("*", key, count=1)
    module, _, tensor = generic.rpartition(".")
    if generic in table:
        generic = table[generic]
    elif module in table:
        generic = f"{table[module]}.{tensor}"
    elif generic.startswith(prefix[0]):
        generic = prefix[1] + generic[len(prefix[0]) :]
    return generic.replace("*", number.group(), 1) if number else generic


def _family_names(model_type: str, sequence_classifier: bool) -> dict:
    names = dict(_NAMES.get(model_type, {}))
    if sequence_classifier:
        names.update(_SEQUENCE_CLASSIFIER.get(model_type, _SEQUENCE_CLASSIFIER_NAMES))
    return names


def bert_state_dict(state: dict, model_type: str) -> dict:
    """A family checkpoint's tensors under bertfast's BERT names (BERT's own pass through); a base model's
    checkpoint (names without the base prefix) comes out under ``bert.``."""
    found = _BY_MODEL_TYPE.get(model_type)
    if found is None or found is BERT:
        return state
    base = found.base_attr + "."
    inverse = {v: k for k, v in _family_names(model_type, sequence_classifier=True).items()}
    renamed = {}
    for key, tensor in state.items():
        if key.split(".", 1)[0] in _BASE_MODULES:
            key = base + key
        renamed[_renamed(key, inverse, (base, "bert."))] = tensor
    return renamed


def family_state_dict(state: dict, model_type: str, class_name: str) -> dict:
    """bertfast tensors of native ``Bert<head>`` ``class_name`` under the names of the family's ``<head>`` class
    (the inverse of :func:`bert_state_dict`): a base model's without the base prefix, as transformers saves it."""
    found = _BY_MODEL_TYPE[model_type]
    if found is BERT:
        return state
    base_model = class_name == "BertModel"
    names = _family_names(model_type, class_name == "BertForSequenceClassification")
    renamed = {}
    for key, tensor in state.items():
        key = _renamed("bert." + key if base_model else key, names, ("bert.", found.base_attr + "."))
        renamed[key.removeprefix(found.base_attr + ".") if base_model else key] = tensor
    return renamed


def family_class_name(class_name: str, model_type: str) -> str:
    """The transformers class of the family whose layout native ``class_name`` saves in (``BertForMaskedLM`` of
    RoBERTa: ``RobertaForMaskedLM``); ``ValueError`` for a native class the family has no class for."""
    found = _BY_MODEL_TYPE[model_type]
    name = found.prefix + class_name.removeprefix("Bert")
    head = name[len(found.prefix) :]
    if found is not BERT and (head not in NATIVE_HEADS or foreign_head_reason(name) is not None):
        raise ValueError(
            f"bertfast.{class_name} of a {model_type} model has no transformers class of that family to save as "
            f"({name} {foreign_head_reason(name) or 'does not exist'}); save the encoder (model.bert) instead"
        )
    return name
