"""Accelerate a live Hugging Face BERT model in place: ``patch`` and ``unpatch``.

    model = transformers.BertForSequenceClassification.from_pretrained(...)
    bertfast.patch(model)            # this instance now computes through bertfast.layers
    ...
    bertfast.unpatch(model)          # back to Hugging Face's own forward, exactly

What changes, and what does not
-------------------------------
``patch`` sets an instance attribute ``forward`` on these modules of *this* model
(never a class attribute, so other instances and the ``transformers`` module are untouched;
``copy.deepcopy`` and pickling carry the patch along):

- the ``BertModel`` (``model`` itself or ``model.bert``; for the rest of the BERT family, see
  :mod:`bertfast.family`, the ``RobertaModel``/``XLMRobertaModel``/``CamembertModel`` at
  ``.roberta``, the ``ElectraModel`` at ``.electra``, the ``DistilBertModel`` at ``.distilbert``,
  while their heads keep transformers' own forward): :func:`bertfast.layers.encode` runs
  the embeddings, every encoder layer and the model's own pooler module, reading the
  model's own parameters: the same code, numbers and mixed-precision policy as bertfast's
  native classes (see :mod:`bertfast.layers`), padding-free by default (``unpad="auto"``).
  It is patched at the ``BertModel`` level because that is where the user's 2-D
  ``(batch, seq)`` padding mask is still visible (Hugging Face expands it to 4-D inside).
- every ``BertPredictionHeadTransform`` (the MLM heads): :func:`bertfast.layers.head_transform`.
- the head model itself when its loss reads token positions (masked LM, pre-training, token
  classification, question answering): its own forward runs, with padding kept out of the loss
  as in bertfast's native heads (:mod:`bertfast.head_losses`).

Parameters are used as they are (the same objects, names and storage; nothing is cached from
them between forwards), so ``state_dict``, ``save_pretrained``, optimizers and weight tying keep
working; outputs keep Hugging Face's types (``return_dict=False`` gives tuples); gradients flow
to every parameter;
``train()``/``eval()`` switch dropout (hidden and attention dropout, fused into the ops on
backends that declare them; ``backend="auto"`` picks such a backend, an explicit one
without raises ``BackendUnavailable``); fp32, fp16 and bf16 work, and so does
``torch.autocast`` (activations, the residual stream included, in the autocast dtype,
where Hugging Face keeps the residual stream in fp32); ``output_hidden_states`` (a flag,
or in transformers 5 an index or list of indices, laid out as the installed transformers
does) works; ``inputs_embeds`` works; gradient checkpointing
(``model.gradient_checkpointing_enable()``) is honoured; ``chunk_size_feed_forward`` is
ignored (chunking does not change the result).  Padding-free runs give zeros at padding
positions of ``last_hidden_state`` (Hugging Face gives values that depend on nothing).

Outputs at padding positions: a padded query still attends to the valid keys, exactly as
in Hugging Face, so only rows whose mask is all zeros differ (bertfast gives them zero
attention output, Hugging Face a uniform average); such rows are meaningless either way.

Containers
----------
``patch`` also takes any module holding BERT models (a sentence-transformers
``SentenceTransformer`` or ``CrossEncoder``, whose ``0.model`` is the transformers model, or a
container of your own): it patches every outermost BERT model inside and
:func:`patched_modules` lists their paths (also logged at INFO level).

What is not supported, and what happens
---------------------------------------
``patch`` never raises for a model it cannot run (only for mistakes in how it is called: a
bertfast model, a ``torch.compile`` wrapper, a bad ``backend`` or ``unpad``).  Whatever it
cannot patch is left unchanged, with a :class:`PatchWarning` naming the module's path in the
model passed and the reason (an int8 layer reads as ``bert.encoder.layer.0.attention.self.query
is torch.ao.nn.quantized.Linear, not torch.nn.Linear``); ``strict=True`` raises
:class:`PatchError` with every reason instead, before anything is patched.  Another model
family (any transformers model with no BERT inside) is named with its ``model_type``, and
when its attention calls transformers' registry and is bidirectional, the warning points to
:func:`bertfast.register_attention`, which runs that attention on bertfast's kernels.  A BERT
model is left unpatched when it is a decoder
(``is_decoder``/``add_cross_attention``), uses relative position embeddings
(``position_embedding_type`` other than ``"absolute"``), has ``hidden_act`` (DistilBERT:
``activation``) other than exactly ``"gelu"`` (the erf GELU), is an ELECTRA whose
``embedding_size`` differs from ``hidden_size`` (its ``embeddings_project`` is not BERT's),
when a Linear/LayerNorm/Embedding has been replaced by another type (adapters
such as LoRA, quantized layers) or is configured differently
(no bias, ``max_norm``...), or when a submodule carries module hooks or an instance-level
``forward`` of its own (accelerate's device hooks, another patch): the patched forward does
not call the submodules, so those would silently stop running.  The same changes made
*after* patching (a submodule replaced or wrapped, as LoRA or LN-tuning do; its type changed, as
a parametrization does; a hook registered on it, as ``torch.nn.utils.prune`` does; its parameters
renamed) make the patched forward raise :class:`PatchError` naming the module until
:func:`unpatch` (transformers' own hooks and gradient checkpointing pass; an instance-level
``forward`` set on a submodule afterwards is not detected, nor anything under ``torch.compile``).

The patched forwards show each module's own forward signature (``inspect.signature``, which
Trainer reads to keep the dataset columns) and bind positional arguments in its order;
DistilBERT's ignores ``token_type_ids``, as transformers' does.

At call time a clear error is raised (never a silently different answer) for
``output_attentions=True`` (argument or config default), ``head_mask``,
``encoder_hidden_states``/``encoder_attention_mask``, ``past_key_values``, an
``attention_mask`` that is not a plain ``(batch, seq)`` key-padding mask (3-D or 4-D masks,
a wrong shape, a floating mask with values other than 0 and 1), an unknown keyword
argument (the keywords transformers passes that cannot change an encoder's result, such as
Trainer's ``num_items_in_batch``, which the Hugging Face head's loss uses, and ``use_cache``,
are accepted: :data:`bertfast.forward_kwargs.IGNORED`), a sequence longer than
``max_position_embeddings``, and (in eager mode) ids out
of range.  The value checks read a few numbers back to the host; they are skipped under
``torch.compile`` and during CUDA-graph capture.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import warnings

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import family, head_losses, layers
from .forward_kwargs import check_forward_kwargs
from .ops import check_backend

__all__ = ["PatchError", "PatchWarning", "is_patched", "patch", "patched_modules", "unpatch"]

# The instance attributes holding the backend on every patched module, and the padding-free mode.
_BACKEND_ATTR = "_bertfast_backend"
_UNPAD_ATTR = "_bertfast_unpad"

_logger = logging.getLogger(__name__)


class PatchWarning(UserWarning):
    """``bertfast.patch`` left (part of) a model unpatched; the message says why."""


class PatchError(ValueError):
    """``bertfast.patch(..., strict=True)`` could not patch the model; the message says why."""


# --------------------------------------------------------------------------------------
# Finding the modules and deciding whether they can be patched
# --------------------------------------------------------------------------------------


def _refuse_misuse(model: nn.Module) -> None:
    """Mistakes in how patch() is called (not unsupported models): TypeError."""
    from .modeling import BertPreTrainedModel

    if isinstance(model, BertPreTrainedModel):
        raise TypeError(f"{type(model).__name__} is already a bertfast model; patch() takes a transformers BERT model")
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper: its compiled code would not see the patch
        raise TypeError("patch the model before torch.compile: bertfast.patch(model), then torch.compile(model)")


def _attention_registry_helps(model: nn.Module) -> bool:
    """Whether ``register_attention`` could run this transformers model's attention: it calls transformers'
    attention registry and is a bidirectional encoder (the bertfast attention has no causal mask)."""
    config = getattr(model, "config", None)
    if not getattr(type(model), "_supports_attention_backend", False) or config is None:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    return not any(getattr(m, "is_causal", False) is True for m in model.modules())


def _unsupported_model_reason(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reason = (
        f"its model_type {model_type!r} is not of the BERT family (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, "
        "DistilBERT), the architectures bertfast.patch runs"
    )
    if _attention_registry_helps(model):
        reason += (
            "; its attention can still run on bertfast's kernels: bertfast.register_attention(), then load it with "
            "attn_implementation='bertfast' (or model.set_attn_implementation('bertfast'))"
        )
    return reason


def _find_encoders(model: nn.Module):
    """The BERT models in ``model`` and the transformers models it holds that bertfast cannot run.

    Returns ``(targets, unsupported)``: ``targets`` lists ``(path, module, bert)`` for ``model``
    itself when it is a BERT model, else for the outermost BERT models inside it (a
    SentenceTransformer's or CrossEncoder's ``0.model``, any container's); ``unsupported`` lists
    ``(path, module, reason)`` for the other transformers models with no BERT model inside.
    """
    from transformers import PreTrainedModel

    from .modeling import BertPreTrainedModel

    targets, unsupported = [], []

    def visit(path: str, module: nn.Module) -> bool:
        base = family.find_base_model(module)  # the family base model it is or holds (.bert, .roberta, ...)
        if base is not None:
            targets.append((path, module, base[0]))
            return True
        if isinstance(module, BertPreTrainedModel):
            return True  # a native bertfast model: nothing to patch, nothing unsupported
        found = False
        for name, child in module.named_children():
            found |= visit(f"{path}.{name}" if path else name, child)
        if not found and isinstance(module, PreTrainedModel):
            unsupported.append((path, module, _unsupported_model_reason(module)))
            return True
        return found

    visit("", model)
    return targets, unsupported


def _is_hf_output_capturing_hook(hook) -> bool:
    # transformers 5 installs these lazily on BertLayer/BertSelfAttention to collect hidden states and
    # attentions; they are inactive unless its own forward runs.  Its input-requires-grad hook (gradient
    # checkpointing with frozen embeddings) is honoured by bertfast.layers.embed itself.
    return getattr(hook, "__name__", "") in ("output_capturing_hook", layers.INPUT_GRADS_HOOK)


def _foreign_call_machinery(module: nn.Module) -> str | None:
    if "forward" in module.__dict__:
        return "it has an instance-level forward (another patch or an accelerate hook)"
    if hasattr(module, "_hf_hook"):
        return "it carries an accelerate hook (device_map / offloading)"
    for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
        hooks = getattr(module, kind, {})
        if any(not _is_hf_output_capturing_hook(h) for h in hooks.values()):
            return f"it has {kind.strip('_').replace('_', ' ')} registered, which the patched forward would skip"
    return None


def _type_name(cls: type) -> str:
    """``cls``'s shortest public dotted name (``torch.ao.nn.quantized.Linear``, not its defining submodule)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if getattr(sys.modules.get(".".join(parts[:end])), cls.__name__, None) is cls:
            return f"{'.'.join(parts[:end])}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_linear(name: str, module: nn.Module) -> str | None:
    if type(module) is not nn.Linear:
        return f"{name} is {_type_name(type(module))}, not torch.nn.Linear (an adapter or a quantized layer?)"
    if module.bias is None:
        return f"{name} has no bias"
    return None


def _check_layer_norm(name: str, module: nn.Module, hidden: int) -> str | None:
    if type(module) is not nn.LayerNorm:
        return f"{name} is {_type_name(type(module))}, not torch.nn.LayerNorm"
    if tuple(module.normalized_shape) != (hidden,) or module.weight is None or module.bias is None:
        return f"{name} is not an affine LayerNorm over the last dimension ({hidden})"
    return None


def _check_embedding(name: str, module: nn.Module) -> str | None:
    if type(module) is not nn.Embedding:
        return f"{name} is {_type_name(type(module))}, not torch.nn.Embedding"
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        return f"{name} uses max_norm, scale_grad_by_freq or sparse gradients"
    return None


def _bert_model_reason(bert: nn.Module, path: str = "") -> str | None:
    """Why this transformers BertModel cannot be patched, or None.  Submodules are named from
    ``path``, the BertModel's own path in the model the user passed."""
    reason = family.unsupported_config_reason(bert.config)
    if reason is not None:
        return reason
    base = f"{path}." if path else ""
    emb = bert.embeddings
    if "embeddings_project" in bert._modules:
        return (
            f"embedding_size ({emb.word_embeddings.embedding_dim}) differs from hidden_size "
            f"({bert.config.hidden_size}): the embeddings_project layer is not BERT's; bertfast runs ELECTRA "
            "only with embedding_size == hidden_size"
        )
    hidden = bert.config.hidden_size
    checks = [
        _check_embedding(f"{base}embeddings.word_embeddings", emb.word_embeddings),
        _check_embedding(f"{base}embeddings.position_embeddings", emb.position_embeddings),
        _check_layer_norm(f"{base}embeddings.LayerNorm", emb.LayerNorm, hidden),
    ]
    if "token_type_embeddings" in emb._modules:
        checks.append(_check_embedding(f"{base}embeddings.token_type_embeddings", emb.token_type_embeddings))
    names = {id(module): f"{base}{name}" for name, module in bert.named_modules()}
    parts_of = family.layer_parts_function(bert)
    for layer in family.encoder_layers(bert):
        prefix = names[id(layer)]
        if getattr(layer.attention, "is_cross_attention", False) or hasattr(layer, "crossattention"):
            return f"{prefix} has cross-attention"
        parts = parts_of(layer)
        if getattr(parts.attention, "is_causal", False):
            return f"{names[id(parts.attention)]} is causal"
        if hasattr(parts.attention, "distance_embedding"):
            return f"{names[id(parts.attention)]} has relative position embeddings"
        for module in (parts.query, parts.key, parts.value, parts.attention_dense, parts.intermediate):
            checks.append(_check_linear(names[id(module)], module))
        checks += [
            _check_layer_norm(names[id(parts.attention_norm)], parts.attention_norm, hidden),
            _check_linear(names[id(parts.output_dense)], parts.output_dense),
            _check_layer_norm(names[id(parts.output_norm)], parts.output_norm, hidden),
        ]
    checks.append(family.non_gelu_activation(bert, path))
    for reason in checks:
        if reason is not None:
            return reason
    for name, module in bert.named_modules():
        if module is bert or name.startswith("pooler"):
            continue  # the pooler module is still called; hooks on it run
        reason = _foreign_call_machinery(module)
        if reason is not None:
            return f"{base}{name}: {reason}"
    if "forward" in bert.__dict__:
        return f"the {type(bert).__name__} already has an instance-level forward (another patch or an accelerate hook)"
    return None


def _head_transform_reason(transform: nn.Module, config) -> str | None:
    for reason in (
        _check_linear("dense", transform.dense),
        _check_layer_norm("LayerNorm", transform.LayerNorm, config.hidden_size),
        _foreign_call_machinery(transform),
        _foreign_call_machinery(transform.dense),
        _foreign_call_machinery(transform.LayerNorm),
        family.non_gelu_activation(transform),
    ):
        if reason is not None:
            return reason
    return None


# --------------------------------------------------------------------------------------
# The patched forwards
# --------------------------------------------------------------------------------------


def _selected_hidden_states(states: list, selection) -> tuple:
    """The hidden states as the installed transformers lays them out for ``output_hidden_states``.

    A flag gives all ``num_layers + 1``.  transformers 5 may select by index: since its
    ``selected_hidden_states`` helper (5.2x), an int or a list of indices, resolved modulo
    ``num_layers + 1``, the rest ``None``; before it (5.17), only a list/tuple/set selects,
    and it indexes the layers' outputs (no embedding output; no negative indices).
    """
    if isinstance(selection, bool):
        return tuple(states)
    try:
        from transformers.utils.output_capturing import selected_hidden_states
    except ImportError:  # 5.17
        if not isinstance(selection, (list, tuple, set)):
            return tuple(states)
        return tuple(h if i in selection else None for i, h in enumerate(states[1:]))
    count = len(states)
    keep = {i % count for i in selected_hidden_states(selection) if -count <= i < count}
    return tuple(h if i in keep else None for i, h in enumerate(states))


_SNAPSHOT_ATTR = "_bertfast_snapshot"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _Snapshot:
    """The submodules a patched forward reads directly (every one under the base model but the pooler, which
    it calls), as ``patch`` found them: what each parent holds, their types and parameter names, and
    torch's hook-handle counter.  A forward compares them in a few C-level passes (a hook registered anywhere
    moves the counter); only when one differs does :meth:`change` say what (a wrapper, a hook, a
    parametrization...) or find it harmless."""

    def __init__(self, bert: nn.Module):
        named = [
            (name, module)
            for name, module in bert.named_modules(remove_duplicate=False)
            if module is not bert and not name.startswith("pooler")
        ]
        self.hook_handles = RemovableHandle.next_id
        self.paths = [name for name, _ in named]
        self.children = [module for _, module in named]
        parents = dict(bert.named_modules(remove_duplicate=False))
        self.parents = [parents[path.rpartition(".")[0]]._modules for path in self.paths]
        self.names = [path.rpartition(".")[2] for path in self.paths]
        self.types = list(map(type, self.children))
        # The dicts are values in each module's __dict__: copies and pickles keep them shared with the module.
        self.parameter_dicts = [m._parameters for m in self.children if m._parameters]
        self.parameter_counts = list(map(len, self.parameter_dicts))
        self.parameters = [tuple(m._parameters) for m in self.children]

    def unchanged(self) -> bool:
        return (
            RemovableHandle.next_id == self.hook_handles
            and list(map(dict.get, self.parents, self.names)) == self.children
            and list(map(type, self.children)) == self.types
            and list(map(len, self.parameter_dicts)) == self.parameter_counts
        )

    def change(self) -> str | None:
        """What changed since ``patch`` that the patched forward would bypass, or None (only what it honours:
        transformers' own hooks, gradient-checkpointing attributes)."""
        for path, parent, name, module, kind, parameters in zip(
            self.paths, self.parents, self.names, self.children, self.types, self.parameters
        ):
            now = parent.get(name)
            if now is not module:
                replaced = "removed" if now is None else f"replaced by a {_type_name(type(now))}"
                return f"{path} was {replaced} after patch (an adapter such as LoRA or LN-tuning?)"
            if type(module) is not kind:
                return f"{path} is now a {_type_name(type(module))}, not the {_type_name(kind)} patch found"
            reason = _foreign_call_machinery(module)
            if reason is not None:
                return f"{path}: {reason} after patch (torch.nn.utils.prune, a hook of your own?)"
            if tuple(module._parameters) != parameters:
                return f"{path} now holds parameters {list(module._parameters)}, not {list(parameters)}"
        return None


def _check_unchanged_since_patch(bert: nn.Module) -> None:
    """Raise :class:`PatchError` for a submodule replaced, retyped, hooked or re-parametrised after ``patch``:
    the patched forward reads the parameters directly and would silently bypass it.  Not under torch.compile
    (the compiled graph is built from the modules as they were)."""
    if torch.compiler.is_compiling():
        return
    snapshot = bert.__dict__[_SNAPSHOT_ATTR]
    if snapshot.unchanged():
        return
    reason = snapshot.change()
    if reason is None:  # nothing the patched forward bypasses: compare against the new state from now on
        bert.__dict__[_SNAPSHOT_ATTR] = _Snapshot(bert)
        return
    raise PatchError(
        f"{reason}: the patched forward reads the parameters directly and would bypass it. Call "
        "bertfast.unpatch(model) to run the model with it, or patch after wrapping"
    )


def _patched_bert_model_forward(self, *args, **kwargs):
    """transformers ``BertModel.forward`` (or the family base model's) computed by :mod:`bertfast.layers`
    (see :mod:`bertfast.patching`); arguments bound by the original forward's signature."""
    return _encode_patched(self, **_bound_arguments(self, args, kwargs))


def _encode_patched(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
):
    # A class of the submodule, not ``from transformers import modeling_outputs``: under torch.compile
    # (torch 2.11) dynamo cannot import through transformers' lazy top-level module.
    from transformers.modeling_outputs import BaseModelOutput

    config = self.config
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions:
        raise NotImplementedError(
            "output_attentions=True is not supported by bertfast-patched BERT (the fused attention never forms "
            "the probability matrix); call bertfast.unpatch(model) to get attention probabilities"
        )
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)
    check_forward_kwargs(kwargs, "bertfast-patched BERT", hint="call bertfast.unpatch(model) to use it")
    _check_unchanged_since_patch(self)
    # As in transformers, a falsy selection (False, 0, []) returns no hidden states.
    inputs = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states))
    backend, unpad_mode = getattr(self, _BACKEND_ATTR), getattr(self, _UNPAD_ATTR, "auto")
    x, pooled, states, _, _ = layers.encode(self, *inputs, backend=backend, unpad_mode=unpad_mode)
    hidden_states = None if states is None else _selected_hidden_states(states, output_hidden_states)
    output_class = getattr(
        sys.modules[BaseModelOutput.__module__], (family.family_of_config(config) or family.BERT).output
    )
    with_pooler = "pooler_output" in output_class.__dataclass_fields__
    fields = {"pooler_output": pooled} if with_pooler else {}
    out = output_class(last_hidden_state=x, hidden_states=hidden_states, **fields)
    return out if return_dict else out.to_tuple()


def _patched_head_transform_forward(self, hidden_states):
    """transformers ``BertPredictionHeadTransform.forward``: ``LN(gelu(x @ W^T + b))`` by :mod:`bertfast.layers`."""
    return layers.head_transform(self, hidden_states, getattr(self, _BACKEND_ATTR))


# The heads whose loss reads token positions; their loss keeps padding out (bertfast.head_losses).
_TOKEN_LABEL_HEADS = ("ForMaskedLM", "ForPreTraining", "ForTokenClassification")
_SPAN_HEADS = ("ForQuestionAnswering",)


@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    # Once per class, not per call: inspect.signature unwraps transformers' decorators on every call.
    return inspect.signature(cls.forward)


@functools.cache
def _var_keyword(cls) -> str | None:
    return next((k for k, p in _forward_signature(cls).parameters.items() if p.kind is p.VAR_KEYWORD), None)


def _bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A patched call's arguments by the names of ``module``'s class forward (positional ones in its order,
    as transformers reads them), with what its ``**kwargs`` caught merged in."""
    arguments = _forward_signature(type(module)).bind(module, *args, **kwargs).arguments
    del arguments[next(iter(arguments))]  # the module itself
    caught = arguments.pop(_var_keyword(type(module)), {})
    return {**arguments, **caught}


def _patched_head_model_forward(self, *args, **kwargs):
    """The head model's own forward, with padding kept out of its loss as in bertfast's native heads."""
    arguments = _bound_arguments(self, args, kwargs)
    mask = arguments.get("attention_mask")
    if type(self).__name__.endswith(_TOKEN_LABEL_HEADS):
        arguments["labels"] = head_losses.ignore_padding_labels(arguments.get("labels"), mask)
        return type(self).forward(self, **arguments)
    start, end = arguments.pop("start_positions", None), arguments.pop("end_positions", None)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    out = type(self).forward(self, **arguments, return_dict=True)
    out.start_logits = head_losses.span_logits(out.start_logits, mask)
    out.end_logits = head_losses.span_logits(out.end_logits, mask)
    if start is not None and end is not None:
        out = type(out)(loss=head_losses.span_loss(out.start_logits, out.end_logits, start, end, mask), **out)
    return out if return_dict else out.to_tuple()


_PATCHED_FORWARDS = (_patched_bert_model_forward, _patched_head_transform_forward, _patched_head_model_forward)


class _PatchedForward(functools.partial):
    """A patched ``forward``: the function bound to its module, showing the module's own forward signature
    (``inspect.signature``, which Trainer reads to keep the dataset columns the model takes)."""

    @property
    def __signature__(self) -> inspect.Signature:
        signature = _forward_signature(type(self.args[0]))
        return signature.replace(parameters=list(signature.parameters.values())[1:])


def _patched_forward_of(module: nn.Module):
    forward = module.__dict__.get("forward")
    if isinstance(forward, _PatchedForward) and forward.func in _PATCHED_FORWARDS and forward.args[0] is module:
        return forward
    return None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def is_patched(model: nn.Module) -> bool:
    """Whether ``bertfast.patch`` has patched (a submodule of) ``model``."""
    return any(_patched_forward_of(m) is not None for m in model.modules())


def _set_forward(module: nn.Module, function, backend: str, unpad=None) -> None:
    setattr(module, _BACKEND_ATTR, backend)
    if unpad is not None:
        setattr(module, _UNPAD_ATTR, unpad)
    # A partial of a module-level function, not a bound method: it pickles (by reference to
    # the function) and deep-copies (rebound to the copy) with the module.
    module.forward = _PatchedForward(function, module)


# Heads that read the first token's hidden state; with left padding it is padding, whose hidden state
# transformers computes (and such a head reads), so the encoder runs those batches padded.
_FIRST_TOKEN_HEADS = ("ForSequenceClassification", "ForMultipleChoice")


def _summary_reads_padding(module: nn.Module) -> bool:
    """Whether a head summarises the sequence at other positions than the first (transformers' SequenceSummary,
    ELECTRA's multiple choice, with ``summary_type`` "last", "mean" or "cls_index"): at padding, in a padded batch."""
    return any(getattr(m, "summary_type", "first") != "first" for m in module.modules())


def _where(path: str, module: nn.Module) -> str:
    return f"{path} ({type(module).__name__})" if path else type(module).__name__


def patch(
    model: nn.Module, backend: str | None = "auto", strict: bool = False, unpad: bool | str = "auto"
) -> nn.Module:
    """Make the transformers BERT models in this model instance compute through :mod:`bertfast.layers`;
    returns ``model``.

    ``model``: a transformers ``BertModel`` or any ``BertFor...`` model (its ``.bert`` is
    patched, and the MLM heads' transform when present), or any module holding such models
    (a sentence-transformers ``SentenceTransformer`` or ``CrossEncoder``, a container of
    your own): every outermost BERT model inside is patched, and :func:`patched_modules`
    lists them (they are also logged at INFO level).  ``backend``: ``"auto"``,
    ``"reference"``, ``"triton"`` or ``"ext"``, as for bertfast models; an explicit backend
    must be available here.  ``unpad``: padding-free mode, as
    :meth:`bertfast.BertModel.set_unpad`.  Patching a patched model just switches its
    backend and mode.

    What is supported, and the errors and warnings for what is not, are listed in the
    module docstring of :mod:`bertfast.patching`.  What cannot be patched (an unsupported
    model family, a BERT with a quantized layer, ...) is left unchanged with a
    :class:`PatchWarning` naming the module path and the reason; with ``strict=True`` a
    :class:`PatchError` is raised instead, before anything is patched.
    """
    backend = check_backend(backend)
    if unpad not in (True, False, "auto"):
        raise ValueError(f"unpad must be True, False or 'auto', got {unpad!r}")
    modeling_bert = family.modeling_module(family.BERT)
    # transformers 5 wraps BERT's forward in its output-capturing decorators; before, outputs were laid out
    # otherwise (tuples with Nones, hidden states as a flag only), which the patched forward does not follow.
    if not hasattr(modeling_bert.BertModel.forward, "__wrapped__"):
        import transformers

        raise RuntimeError(f"bertfast.patch needs transformers 5 or newer, found {transformers.__version__}")
    _refuse_misuse(model)
    targets, unsupported = _find_encoders(model)
    refusals = [f"bertfast.patch left {_where(path, m)} unpatched: {reason}" for path, m, reason in unsupported]
    if not targets and not unsupported:
        refusals.append(
            f"bertfast.patch found no transformers BERT model in {type(model).__name__} (it takes a BertModel, a "
            "BertFor... model, or a module holding them, such as a SentenceTransformer)"
        )
    plans = []  # (module, its BERT model, head transforms, already patched)
    for path, module, bert in targets:
        if _patched_forward_of(bert) is not None:
            plans.append((module, bert, [m for m in module.modules() if _patched_forward_of(m) is not None], True))
            continue
        attribute = next((name for name, child in module.named_children() if child is bert), "")
        bert_path = path if bert is module else f"{path}.{attribute}" if path else attribute
        reason = _bert_model_reason(bert, bert_path)
        if reason is not None:
            refusals.append(f"bertfast.patch left {_where(path, module)} unpatched: {reason}")
            continue
        transforms = []
        for name, sub in module.named_modules(prefix=path):
            if isinstance(sub, modeling_bert.BertPredictionHeadTransform):
                reason = _head_transform_reason(sub, bert.config)
                if reason is None:
                    transforms.append(sub)
                else:  # the encoder is still patched; only this head keeps Hugging Face's forward
                    refusals.append(f"bertfast.patch left {name} ({type(sub).__name__}) unpatched: {reason}")
        plans.append((module, bert, transforms, False))
    if strict and refusals:
        raise PatchError("\n".join(refusals))
    for message in refusals:
        warnings.warn(message, PatchWarning, stacklevel=2)
    for module, bert, transforms, already in plans:
        if already:  # switch the backend and the mode only
            for module in transforms:
                setattr(module, _BACKEND_ATTR, backend)
            setattr(bert, _UNPAD_ATTR, unpad)
            continue
        _set_forward(bert, _patched_bert_model_forward, backend, unpad)
        setattr(bert, _SNAPSHOT_ATTR, _Snapshot(bert))
        head = type(module).__name__ if module is not bert else ""
        if head.endswith(_FIRST_TOKEN_HEADS):
            setattr(bert, layers.FIRST_TOKEN_READ_ATTR, True)
        if _summary_reads_padding(module):
            setattr(bert, layers.PADDING_READ_ATTR, True)
        for transform in transforms:
            _set_forward(transform, _patched_head_transform_forward, backend)
        if head.endswith(_TOKEN_LABEL_HEADS + _SPAN_HEADS):
            _set_forward(module, _patched_head_model_forward, backend)
    if plans:
        _logger.info("bertfast.patch patched %s", ", ".join(patched_modules(model)))
    return model


def patched_modules(model: nn.Module) -> list[str]:
    """The paths in ``model`` of the modules :func:`patch` patched (``""`` for ``model`` itself)."""
    return [name for name, module in model.named_modules() if _patched_forward_of(module) is not None]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every module's forward is its class's again, no attribute left behind."""
    from .fp8 import is_quantized

    if is_quantized(model):
        raise ValueError(
            "this model is quantized to FP8 (bertfast.quantize), which only bertfast's layers run: transformers' "
            "own forward cannot use FP8 weights and their scales. Load the model again to run it unpatched"
        )
    for module in model.modules():
        if _patched_forward_of(module) is not None:
            del module.forward
            for attr in (
                _BACKEND_ATTR,
                _UNPAD_ATTR,
                _SNAPSHOT_ATTR,
                layers.FIRST_TOKEN_READ_ATTR,
                layers.PADDING_READ_ATTR,
            ):
                module.__dict__.pop(attr, None)
    return model
