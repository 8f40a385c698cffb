"""BERT (post-LayerNorm encoder): the native classes.

Module and parameter names follow ``transformers.BertModel`` exactly, so ``state_dict()``
keys are Hugging Face's and checkpoints load both ways.  The modules only hold parameters;
the compute is :mod:`bertfast.layers`, the same functions a patched transformers model runs.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import family, layers
from .config import BertConfig
from .forward_kwargs import check_forward_kwargs
from .head_losses import ignore_padding_labels, normalized_loss, span_logits, span_loss
from .mlm_loss import masked_lm_head_loss
from .ops import check_backend
from .outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    PreTrainingOutput,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .padding import pad, unpad


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.family != "distilbert":  # DistilBERT has no token types (its ids are ignored, as transformers does)
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)


class _DenseResidualLayerNorm(nn.Module):
    def __init__(self, in_features: int, config: BertConfig, dropout_p: float):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)


class BertSelfOutput(_DenseResidualLayerNorm):
    def __init__(self, config: BertConfig):
        p = config.attention_output_dropout_prob
        super().__init__(config.hidden_size, config, config.hidden_dropout_prob if p is None else p)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class BertOutput(_DenseResidualLayerNorm):
    def __init__(self, config: BertConfig):
        super().__init__(config.intermediate_size, config, config.hidden_dropout_prob)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    runs_bertfast_layer = True  # bertfast.layers.encode calls it as a module (its hooks run)

    def forward(self, x, mask, ops, seeds=None):
        return layers.layer(self, x, mask, ops, seeds)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False


_POOLER_ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig, sequence_classifier: bool = False):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # The family's sequence-classification head maps onto the pooler with its own activation and a dropout
        # before the dense layer; a base model's pooler is BERT's (RoBERTa's is the same).
        self.act, p, _ = family.sequence_classification_head(config) if sequence_classifier else ("tanh", None, None)
        self.dropout = nn.Dropout(p) if p is not None else None

    def forward(self, hidden_states):
        """``tanh(hidden_states[:, 0] @ W^T + b)``, as Hugging Face's pooler (the family's classification heads:
        their activation, their dropout first)."""
        first = hidden_states[:, 0]
        if self.dropout is not None:
            first = self.dropout(first)
        return _POOLER_ACTIVATIONS[self.act](self.dense(first))


def transformers_forward(forward):
    """Give a native ``forward`` the calling conventions transformers' Trainer and pipelines use.

    ``return_dict=False`` returns a tuple (``None`` follows ``config.return_dict``);
    ``output_attentions=True`` raises (the fused attention never forms the probabilities);
    other keywords go through :func:`bertfast.forward_kwargs.check_forward_kwargs`, so what
    cannot change the result (``use_cache``...) is accepted and anything else is refused.
    ``num_items_in_batch`` reaches the forwards that take it (those with a loss).
    """
    own_keywords = frozenset(inspect.signature(forward).parameters)

    @functools.wraps(forward)
    def wrapper(self, *args, return_dict=None, output_attentions=None, **kwargs):
        if output_attentions:
            raise NotImplementedError(
                "output_attentions=True is not supported by bertfast models (the fused attention never forms "
                "the probability matrix)"
            )
        extra = {k: kwargs.pop(k) for k in [k for k in kwargs if k not in own_keywords]}
        if extra:
            check_forward_kwargs(extra, f"bertfast.{type(self).__name__}", hint="see bertfast.forward_kwargs")
        out = forward(self, *args, **kwargs)
        if return_dict is None:
            return_dict = self.config.return_dict
        return out if return_dict else out.to_tuple()

    return wrapper


def _rows_like(table: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows drawn as transformers' ``_init_added_embeddings_weights_with_mean`` draws them: from a
    normal with ``table``'s row mean and 1e-9 x its row covariance, or the mean where that is not positive
    definite (no distribution to draw from)."""
    rows = table.detach().float()
    mean = rows.mean(dim=0)
    centered = rows - mean
    covariance = 1e-9 * (centered.T @ centered / rows.shape[0])
    if torch.distributions.constraints.positive_definite.check(covariance).all():
        drawn = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((count,))
    else:
        drawn = mean.expand(count, -1)
    return drawn.to(table.dtype)


class BertPreTrainedModel(nn.Module):
    """Shared by every model class: config, backend, weight init, loading.

    It also offers the part of transformers' ``PreTrainedModel`` that Trainer and pipelines
    use: ``device``, ``dtype``, ``get_input_embeddings``, ``resize_token_embeddings``,
    gradient checkpointing, ``save_pretrained(state_dict=...)`` and forwards that take
    transformers' keywords (:func:`transformers_forward`).
    """

    # Checkpoint keys of every class but BertModel start with this prefix.
    base_model_prefix = "bert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Trainer then passes num_items_in_batch; the heads normalise their loss by it.
    accepts_loss_kwargs = True

    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a bertfast.BertConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._backend = check_backend(backend)

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def base_model(self) -> BertModel:
        return self if isinstance(self, BertModel) else self.bert

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.base_model.embeddings.word_embeddings = embeddings
        self.tie_weights()

    def get_output_embeddings(self):
        return None

    def tie_weights(self) -> None:
        """Nothing to tie but in the masked-LM heads."""

    def resize_token_embeddings(self, new_num_tokens: int | None = None, mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary, as transformers 5 does: kept rows unchanged; new rows drawn from a
        normal with the old rows' mean and 1e-9 x their covariance (the old mean itself where that covariance
        is not positive definite), or N(0, initializer_range) with ``mean_resizing=False``; the MLM decoder
        (tied) and its bias (zeros for new tokens) resized with them; updates ``config.vocab_size``.  The
        random draws are transformers', in its order, so the same seed gives the same rows.  ``None`` returns
        the embedding unchanged."""
        old = self.get_input_embeddings()
        if new_num_tokens is None or new_num_tokens == old.num_embeddings:
            return old
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        padding_idx = old.padding_idx if old.padding_idx is not None and old.padding_idx < new_num_tokens else None
        # Built where the old table is (its initial draw consumes that device's generator, as in transformers).
        new = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        new.padding_idx = padding_idx
        kept = min(old.num_embeddings, new_num_tokens)
        added = new_num_tokens - kept
        with torch.no_grad():
            if added and mean_resizing:
                new.weight[kept:] = _rows_like(old.weight, added)
            elif added:
                nn.init.normal_(new.weight, mean=0.0, std=self.config.initializer_range)
            new.weight[:kept] = old.weight[:kept]
        self.config.vocab_size = new_num_tokens
        self.base_model.config.vocab_size = new_num_tokens
        output = self.get_output_embeddings()
        if output is not None:
            bias = torch.zeros(new_num_tokens, device=output.bias.device, dtype=output.bias.dtype)
            bias[:kept] = output.bias.detach()[:kept]
            self._set_decoder_bias(nn.Parameter(bias))
            output.out_features = new_num_tokens
        self.set_input_embeddings(new)
        return new

    def set_backend(self, name: str | None) -> BertPreTrainedModel:
        """Switch the backend of a built model ("auto", "reference", "triton", "ext")."""
        self._backend = check_backend(name)
        for module in self.modules():
            if isinstance(module, BertPreTrainedModel):
                module._backend = self._backend
        return self

    def set_unpad(self, mode: bool | str) -> BertPreTrainedModel:
        """Padding-free encoding: ``True``, ``False`` or ``"auto"`` (the default).

        Unpadded, the valid tokens are gathered once before the embedding and every layer
        runs on the packed ``(total_tokens, hidden)`` tensor, so GEMMs, LayerNorm and GELU
        never see padding; the result is scattered back at the end (zeros at padding
        positions of ``last_hidden_state``, which the pooler reads; ``packed_last_hidden_state``
        and ``packed`` give the packed result and its ``cu_seqlens``).  ``"auto"`` unpads
        when the mask has padding and the backend has variable-length attention (with
        attention dropout when training); ``True`` unpads whenever a mask is given (and
        raises if the backend cannot).  Outputs at valid positions equal the padded path.
        Never under torch.compile or CUDA-graph capture (the packed size depends on the data).
        """
        if mode not in (True, False, "auto"):
            raise ValueError(f"unpad must be True, False or 'auto', got {mode!r}")
        for module in self.modules():
            if isinstance(module, BertModel):
                module.unpad = mode
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder layer in the backward (non-reentrant ``torch.utils.checkpoint`` by default)."""
        import torch.utils.checkpoint

        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules() if isinstance(m, BertEncoder))

    def init_weights(self) -> None:
        """Hugging Face's initialisation: N(0, initializer_range), zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    @classmethod
    def from_pretrained(cls, path, backend: str | None = "auto", dtype=None, device=None, strict: bool = False):
        """Load a local Hugging Face-format folder (``config.json`` + weights); never the network.

        Weights: ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), or
        ``pytorch_model.bin`` (sharded too) read with ``weights_only=True``.  Missing
        encoder weights and mis-shaped tensors raise; missing head weights and unexpected
        tensors are reported by name in a warning (``strict=True`` raises for them too) and
        in ``model.loading_info``.
        """
        from .loading import load_pretrained

        return load_pretrained(cls, path, backend=backend, dtype=dtype, device=device, strict=strict)

    @classmethod
    def from_hf(cls, hf_model, backend: str | None = "auto"):
        """Build this bertfast class from a live Hugging Face model (weights copied)."""
        return from_hf(cls, hf_model, backend)

    def save_pretrained(self, path, state_dict: dict | None = None, is_main_process: bool = True) -> None:
        """Write ``config.json`` + ``model.safetensors`` in Hugging Face's format (tied tensors once).

        ``state_dict`` (default: the model's) and ``is_main_process`` (only it writes) as
        transformers' ``save_pretrained``, which Trainer calls with them.
        """
        from .fp8 import is_quantized
        from .loading import save_pretrained

        if is_quantized(self):
            raise ValueError(
                "an FP8-quantized model has no Hugging Face checkpoint format (transformers would load its FP8 "
                "weights without their scales): save model.state_dict() (safetensors works) and load it into a model "
                "quantized the same way, or save the model before bertfast.quantize"
            )
        if is_main_process:
            save_pretrained(self, path, state_dict)


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, ``num_hidden_layers`` post-LN layers, tanh pooler."""

    base_model_prefix = ""
    # Position ids without an attention_mask may pack several sequences per row (bertfast.family).
    separates_packed_sequences = True

    def __init__(
        self,
        config: BertConfig,
        backend: str | None = "auto",
        add_pooling_layer: bool | None = None,
        unpad: bool | str = "auto",
        sequence_classifier: bool = False,
    ):
        """``add_pooling_layer``: None for the family's (a pooler for BERT and RoBERTa style, none for ELECTRA and
        DistilBERT, as their base models); ``sequence_classifier``: the pooler is the family's classification head."""
        super().__init__(config, backend)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        if add_pooling_layer is None:
            add_pooling_layer = family.family_of_model_type(config.family).base_pooler
        self.pooler = BertPooler(config, sequence_classifier) if add_pooling_layer else None
        self.set_unpad(unpad)
        self.init_weights()

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
    ) -> BaseModelOutput:
        inputs = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        x, pooled, states, packed, packed_x = layers.encode(self, *inputs, backend=self._backend, unpad_mode=self.unpad)
        return BaseModelOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(states) if states is not None else None,
            packed=packed,
            packed_last_hidden_state=packed_x,
        )


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, backend):
        return layers.head_transform(self, x, backend)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x, backend):
        return self.decoder(self.transform(x, backend))


class BertOnlyMLMHead(nn.Module):
    """Holds the prediction head under Hugging Face's key names; the model calls ``predictions`` itself."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertPreTrainingHeads(nn.Module):
    """The MLM and NSP heads under Hugging Face's key names; the model calls each itself."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def _mlm_loss(logits, labels, num_items_in_batch=None):
    """Mean cross-entropy over the labelled tokens, 0 (not NaN) when there are none, as the fused loss;
    given ``num_items_in_batch``, the sum divided by it."""
    labels = labels.reshape(-1)
    count = (labels != -100).sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    return normalized_loss(F.cross_entropy, flat_logits, labels, count, ignore_index=-100)


class _WithEncoder(BertPreTrainedModel):
    """A head on top of ``self.bert``; the backend is shared with the encoder."""

    def __init__(self, config, backend, add_pooling_layer: bool, sequence_classifier: bool = False):
        super().__init__(config, backend)
        self.bert = BertModel(
            config, self._backend, add_pooling_layer=add_pooling_layer, sequence_classifier=sequence_classifier
        )

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds):
        args = (input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        return self.bert(*args, return_dict=True)


class _TiedMLMMixin:
    def tie_weights(self) -> None:
        """Tie the MLM decoder to the word embeddings (one Parameter, as in Hugging Face)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def _set_decoder_bias(self, bias: nn.Parameter) -> None:
        self.cls.predictions.bias = bias
        self.cls.predictions.decoder.bias = bias

    def _logits_and_loss(self, encoded, labels, attention_mask, return_logits, num_items_in_batch=None):
        """``(vocabulary logits or None, MLM loss or None)`` of the MLM head over ``encoded``.

        By default the logits are skipped only where nobody reads them: training with labels.
        Then the loss is fused and chunked on the labelled rows and no ``(tokens x vocab)``
        logits are ever formed; otherwise it is taken from the logits.  Padding-free runs
        compute on the packed rows: logits on real tokens only (zeros at padding).  Either way
        labels at padding positions are ignored (:mod:`bertfast.head_losses`).  ``num_items_in_batch``:
        the loss is the sum over labelled tokens divided by it (see :func:`bertfast.head_losses.normalized_loss`).
        """
        want_logits = (labels is None or not self.training) if return_logits is None else bool(return_logits)
        packed = encoded.packed
        hidden = encoded.last_hidden_state if packed is None else encoded.packed_last_hidden_state
        if labels is not None:
            labels = ignore_padding_labels(labels, attention_mask) if packed is None else unpad(labels, packed)
        if not want_logits:
            if labels is None:
                return None, None
            head_loss = functools.partial(masked_lm_head_loss, self.cls.predictions, backend=self._backend)
            return None, normalized_loss(head_loss, hidden, labels, num_items_in_batch)
        logits = self.cls.predictions(hidden, self._backend)
        loss = None if labels is None else _mlm_loss(logits, labels, num_items_in_batch)
        return (logits if packed is None else pad(logits, packed)), loss


class BertForMaskedLM(_TiedMLMMixin, _WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
        return_logits: bool | None = None,
        num_items_in_batch=None,
    ) -> MaskedLMOutput:
        """``labels``: token ids, ``-100`` where no loss is taken.

        In training with labels the loss is the fused chunked MLM loss (:mod:`bertfast.mlm_loss`)
        and ``logits`` is ``None``, unless ``return_logits=True``: the ``(batch, seq, vocab)``
        logits are the largest tensor of BERT training.  Otherwise the logits are computed and
        the loss, if any, is taken from them.  With no labelled token the loss is 0, not NaN.
        Padding-free runs (``unpad``) compute the logits on real tokens only: zeros at padding.
        The fused loss reads the labelled count back to the host (a graph break under
        torch.compile); ``return_logits=True`` compiles as one graph.
        """
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        logits, loss = self._logits_and_loss(out, labels, attention_mask, return_logits, num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForPreTraining(_TiedMLMMixin, _WithEncoder):
    # Its loss adds a per-sequence NSP mean to the per-token MLM loss: no one count normalises both,
    # so Trainer keeps dividing by the accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=True)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        next_sentence_label=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
        return_logits: bool | None = None,
        num_items_in_batch=None,
    ) -> PreTrainingOutput:
        """MLM + NSP.  The loss needs both ``labels`` and ``next_sentence_label`` (as Hugging Face);
        ``prediction_logits`` follow :meth:`BertForMaskedLM.forward`'s ``return_logits`` rule."""
        if num_items_in_batch is not None:
            raise ValueError(
                "BertForPreTraining cannot normalise its loss by num_items_in_batch: the loss adds a per-sequence "
                "next-sentence loss to the per-token masked-LM loss"
            )
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        with_loss = labels is not None and next_sentence_label is not None
        mlm_labels = labels if with_loss else None
        prediction_logits, mlm_loss = self._logits_and_loss(out, mlm_labels, attention_mask, return_logits)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)
        loss = mlm_loss + F.cross_entropy(nsp_logits.float(), next_sentence_label.reshape(-1)) if with_loss else None
        return PreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=out.hidden_states,
        )


class _WithClassifier(_WithEncoder):
    """A dropout (``classifier_dropout``, else the hidden rate) and a linear classifier on top of ``self.bert``."""

    def __init__(self, config: BertConfig, backend, add_pooling_layer: bool, classifier_dropout: float | None = None):
        super().__init__(config, backend, add_pooling_layer, sequence_classifier=classifier_dropout is not None)
        self.num_labels = config.num_labels
        p = config.classifier_dropout if classifier_dropout is None else classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


class BertForSequenceClassification(_WithClassifier):
    """The family's sequence-classification head (:func:`bertfast.family.sequence_classification_head`) as the
    pooler and the classifier."""

    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        dropout = family.sequence_classification_head(config)[2]
        super().__init__(config, backend, add_pooling_layer=True, classifier_dropout=dropout)

    def _loss(self, logits, labels, num_items):
        """Hugging Face's rule: regression, single-label or multi-label by problem_type/labels."""
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                logits, labels = logits.squeeze(), labels.squeeze()
            return normalized_loss(F.mse_loss, logits.float(), labels.float(), num_items)
        if problem == "single_label_classification":
            flat_logits = logits.view(-1, self.num_labels).float()
            return normalized_loss(F.cross_entropy, flat_logits, labels.view(-1), num_items)
        return normalized_loss(F.binary_cross_entropy_with_logits, logits.float(), labels.float(), num_items)

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
        num_items_in_batch=None,
    ) -> SequenceClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = self._loss(logits, labels, num_items_in_batch) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForTokenClassification(_WithClassifier):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
        num_items_in_batch=None,
    ) -> TokenClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:  # labels at padding positions are ignored (bertfast.head_losses)
            flat_logits = logits.view(-1, self.num_labels).float()
            flat_labels = ignore_padding_labels(labels, attention_mask).view(-1)
            loss = normalized_loss(F.cross_entropy, flat_logits, flat_labels, num_items_in_batch, ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForQuestionAnswering(_WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)
        self.num_labels = config.num_labels
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    @transformers_forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
        output_hidden_states: bool = False,
        inputs_embeds=None,
        num_items_in_batch=None,
    ) -> QuestionAnsweringOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds)
        logits = self.qa_outputs(out.last_hidden_state)
        # Padding is out of the span softmax (bertfast.head_losses): the same loss on every path.
        start_logits, end_logits = (span_logits(t.squeeze(-1), attention_mask) for t in logits.unbind(-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            positions = (start_positions, end_positions)
            loss = span_loss(start_logits, end_logits, *positions, attention_mask, num_items_in_batch)
        return QuestionAnsweringOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states
        )


# --------------------------------------------------------------------------------------
# Conversion from live transformers models
# --------------------------------------------------------------------------------------


# Hugging Face class name -> bertfast class name (the same names).
SUPPORTED_CLASSES = (
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
)


def config_from_hf(hf_config) -> BertConfig:
    """A :class:`BertConfig` with the Hugging Face config's fields; unknown ones land in ``extra``.

    Raises ``ValueError`` naming the field when bertfast cannot represent the model.
    """
    found = family.family_of_config(hf_config)
    if found is None:
        model_type = getattr(hf_config, "model_type", None)
        raise ValueError(
            f"expected a config of the BERT family (model_type 'bert', 'roberta', ...), got {model_type!r}"
        )
    reason = family.unsupported_config_reason(hf_config)
    if reason is not None:
        raise ValueError(f"cannot convert this Hugging Face model: {reason}")
    data = hf_config.to_dict()
    data["num_labels"] = hf_config.num_labels
    try:
        return BertConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot convert this Hugging Face BERT config: {exc}") from exc


def _hf_class_name(hf_model: nn.Module) -> str | None:
    """The bertfast class name of the supported Hugging Face class ``hf_model`` is (or derives from): the
    same name for BERT, ``Bert<head>`` for its family's (``RobertaForMaskedLM`` -> ``BertForMaskedLM``)."""
    for klass in type(hf_model).__mro__:
        if not klass.__module__.startswith("transformers."):
            continue
        native = family.native_class_name(klass.__name__)
        if native is not None and native[0] in SUPPORTED_CLASSES:
            return native[0]
    return None


def from_hf(cls, hf_model: nn.Module, backend: str | None = "auto"):
    """Build bertfast class ``cls`` from the live transformers model ``hf_model`` (weights copied).

    ``cls`` is a bertfast model class, or ``None`` to pick the one named like the Hugging
    Face class.  ``bertfast.BertModel`` also takes the encoder of any Hugging Face BERT head
    model (``hf_model.bert``); a head class must match the Hugging Face head.  The result
    has the Hugging Face model's dtype, device and train/eval mode.
    """
    from .loading import load_state_dict_checked

    if not isinstance(hf_model, nn.Module):
        raise TypeError(f"hf_model must be a transformers model, got {type(hf_model).__name__}")
    if isinstance(hf_model, BertPreTrainedModel):
        raise TypeError(f"{type(hf_model).__name__} is already a bertfast model")
    hf_name = _hf_class_name(hf_model)
    if hf_name is None:
        raise TypeError(
            f"{type(hf_model).__name__} is not a supported transformers BERT class; supported: "
            + ", ".join(SUPPORTED_CLASSES)
            + ", and the same heads of RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA and DistilBERT (see bertfast.family)"
        )
    if cls is None:
        cls = globals()[hf_name]
    if not (isinstance(cls, type) and issubclass(cls, BertPreTrainedModel)):
        raise TypeError(f"cls must be a bertfast model class, got {cls!r}")
    source = hf_model
    model_type = getattr(hf_model.config, "model_type", "bert")
    base_attr = (family.family_of_config(hf_model.config) or family.BERT).base_attr
    if issubclass(cls, BertModel):
        if hf_name != "BertModel":
            source = getattr(hf_model, base_attr)  # the encoder of a head model
    elif cls.__name__ != hf_name:
        raise TypeError(f"cannot build bertfast.{cls.__name__} from a transformers {hf_name}: the heads differ")

    config = config_from_hf(source.config)
    reason = family.non_gelu_activation(source)
    if reason is not None:
        raise ValueError(reason)
    backend = check_backend(backend)
    if issubclass(cls, BertModel):
        model = cls(config, backend=backend, add_pooling_layer=getattr(source, "pooler", None) is not None)
    else:
        model = cls(config, backend=backend)
    reference = source.get_input_embeddings().weight
    dtypes = {p.dtype for p in source.parameters()}
    if len(dtypes) > 1:
        warnings.warn(
            f"the Hugging Face model mixes parameter dtypes {sorted(map(str, dtypes))}; the bertfast model "
            f"holds every weight in {reference.dtype}",
            stacklevel=2,
        )
    model.to(device=reference.device, dtype=reference.dtype)
    # The family's names, MLM heads that store one of a tied pair, and an untied decoder (refused): the checked loader.
    load_state_dict_checked(model, source.state_dict(), True, model_type)
    return model.train(hf_model.training)


def convert(hf_model: nn.Module, backend: str | None = "auto"):
    """The bertfast model of the same class as the transformers model ``hf_model``, weights copied."""
    return from_hf(None, hf_model, backend)
