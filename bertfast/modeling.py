"""BERT (post-LayerNorm encoder) whose compute goes through :mod:`bertfast.ops`.

Module and parameter names follow ``transformers.BertModel`` exactly, so ``state_dict()``
keys are Hugging Face's and checkpoints load both ways.  The modules only hold
parameters; every forward calls ``bertfast.ops`` with the model's backend:

    embeddings   LN(word[ids] + position[pos] + token_type[tt])        ops.embedding_layer_norm
    per layer    qkv = x @ [Wq; Wk; Wv]^T + b                            one GEMM
                 a   = attention(q, k, v, key-padding mask)             ops.attention
                 x   = LN(a @ Wo^T + bo + x)                            GEMM + ops.layer_norm (bias fused)
                 f   = gelu(x @ Wi^T + bi)                              GEMM + ops.bias_gelu
                 x   = LN(f @ Wf^T + bf + x)                            GEMM + ops.layer_norm (bias fused)
    pooler       tanh(x[:, 0] @ Wp^T + bp)

In training with hidden dropout the dense bias is added before the dropout, as in
Hugging Face: ``LN(dropout(a @ Wo^T + bo) + x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import BertConfig
from .errors import BackendUnavailable
from .mlm_loss import masked_lm_head_loss
from .outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    PreTrainingOutput,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .padding import PackedBatch, first_tokens, pack_mask, pad, unpad


def check_backend(name: str | None) -> str:
    """Validate a backend name for a model; an explicit backend must be able to run here."""
    name = ops.validate_backend_name(name)
    if name != "auto":
        reason = ops.backend_availability(name)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return name


def _like(t, ref):
    """``t`` in ``ref``'s dtype (differentiable; free when the dtypes already agree).

    Under torch.autocast the GEMMs return low precision while the parameters stay fp32, and
    the fused ops take one dtype.  As autocast does for PyTorch's own ops, bias-GELU runs in
    the GEMM's dtype and LayerNorm in the parameters' (so the residual stream stays fp32).
    """
    return None if t is None else t.to(ref.dtype)


def _hidden_dropout_active(module: nn.Module, p: float) -> bool:
    return module.training and p > 0.0


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, backend):
        x = ops.embedding_layer_norm(
            input_ids,
            position_ids,
            token_type_ids,
            self.word_embeddings.weight,
            self.position_embeddings.weight,
            self.token_type_embeddings.weight,
            self.LayerNorm.weight,
            self.LayerNorm.bias,
            self.LayerNorm.eps,
            backend=backend,
        )
        return self.dropout(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, attention_mask, backend):
        """``x``: ``(batch, seq, hidden)`` with a bool mask, or packed ``(total, hidden)`` with a PackedBatch."""
        # One GEMM for q, k and v; the attention op reads them as strided views of its output.
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        qkv = F.linear(x, weight, bias)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        dropout_p = self.dropout_prob if self.training else 0.0
        if isinstance(attention_mask, PackedBatch):
            packed = attention_mask
            out = ops.attention_varlen(
                q, k, v, packed.cu_seqlens, packed.max_seqlen, dropout_p=dropout_p, backend=backend, check=False
            )
        else:
            out = ops.attention(q, k, v, attention_mask, dropout_p=dropout_p, backend=backend)
        return out.flatten(-2)


class _DenseResidualLayerNorm(nn.Module):
    """LN(dropout(x @ W^T + b) + residual), the bias fused into the LayerNorm when it can be."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual, backend):
        ln = self.LayerNorm
        # The bias and the hidden dropout are both fused: LN(dropout(x @ W^T + b) + residual).
        h = F.linear(x, self.dense.weight)
        return ops.layer_norm(
            _like(h, ln.weight),
            ln.weight,
            ln.bias,
            ln.eps,
            residual=_like(residual, ln.weight),
            linear_bias=_like(self.dense.bias, ln.weight),
            dropout_p=self.dropout.p if _hidden_dropout_active(self, self.dropout.p) else 0.0,
            backend=backend,
        )


class BertSelfOutput(_DenseResidualLayerNorm):
    def __init__(self, config: BertConfig):
        super().__init__(config.hidden_size, config)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, attention_mask, backend):
        return self.output(self.self(x, attention_mask, backend), x, backend)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x, backend):
        h = F.linear(x, self.dense.weight)
        return ops.bias_gelu(h, _like(self.dense.bias, h), backend=backend)


class BertOutput(_DenseResidualLayerNorm):
    def __init__(self, config: BertConfig):
        super().__init__(config.intermediate_size, config)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, attention_mask, backend):
        x = self.attention(x, attention_mask, backend)
        return self.output(self.intermediate(x, backend), x, backend)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attention_mask, backend, output_hidden_states=False):
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, attention_mask, backend)
            if hidden_states is not None:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if hidden_states is not None else None)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token):
        """``first_token``: each sequence's position-0 hidden state, ``(batch, hidden)``."""
        return torch.tanh(self.dense(first_token))


class BertPreTrainedModel(nn.Module):
    """Shared by every model class: config, backend, weight init, loading."""

    # Checkpoint keys of every class but BertModel start with this prefix.
    base_model_prefix = "bert"

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
        positions of ``last_hidden_state``; the pooler reads position 0 from the packed
        tensor; ``packed_last_hidden_state`` and ``packed`` give the packed result and its
        ``cu_seqlens``).  ``"auto"`` unpads when the mask has padding and the backend has
        variable-length attention (with attention dropout when training); ``True``
        unpads whenever a mask is given (and raises if the backend cannot).  Outputs at
        valid positions equal the padded path.  Never under torch.compile (the packed size
        depends on the data).
        """
        if mode not in (True, False, "auto"):
            raise ValueError(f"unpad must be True, False or 'auto', got {mode!r}")
        for module in self.modules():
            if isinstance(module, BertModel):
                module.unpad = mode
        return self

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
        if hasattr(self, "tie_weights"):
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
        from .hf import from_hf

        return from_hf(cls, hf_model, backend)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` + ``model.safetensors`` in Hugging Face's format (tied tensors once)."""
        from .loading import save_pretrained

        save_pretrained(self, path)


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, ``num_hidden_layers`` post-LN layers, tanh pooler."""

    base_model_prefix = ""

    def __init__(
        self,
        config: BertConfig,
        backend: str | None = "auto",
        add_pooling_layer: bool = True,
        unpad: bool | str = "auto",
    ):
        super().__init__(config, backend)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.set_unpad(unpad)
        self.init_weights()

    def _use_unpadded(self, keep, weight) -> bool:
        if keep is None or self.unpad is False or torch.compiler.is_compiling():
            return False
        if self.unpad is True:
            return True
        if bool(keep.all()):
            return False
        probe = weight.new_empty((1, self.config.num_attention_heads, self.config.head_dim))
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        return ops.can_run("attention_varlen", self._backend, (probe, probe, probe), dropout_p=dropout_p)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        config = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if seq > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} is longer than max_position_embeddings ({config.max_position_embeddings})"
            )
        for name, t in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("position_ids", position_ids),
        ):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
            if t.device != input_ids.device:
                raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")
            if name != "attention_mask" and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.compiler.is_compiling() or capturing or input_ids.numel() == 0:
            return  # range checks read values back to the host: done in eager mode only
        ranges = [("input_ids", input_ids, config.vocab_size)]
        if token_type_ids is not None:
            ranges.append(("token_type_ids", token_type_ids, config.type_vocab_size))
        if position_ids is not None:
            ranges.append(("position_ids", position_ids, config.max_position_embeddings))
        bounds = torch.stack([torch.stack(torch.aminmax(t)).to(torch.int64) for _, t, _ in ranges]).tolist()
        for (name, _, limit), (low, high) in zip(ranges, bounds):
            if low < 0 or high >= limit:
                raise ValueError(f"{name} must be in [0, {limit}); got values in [{low}, {high}]")

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        self._check_inputs(input_ids, attention_mask, token_type_ids, position_ids)
        batch, seq = input_ids.shape
        device = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).expand(batch, seq)
        keep = None
        if attention_mask is not None:
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        backend = self._backend
        if batch == 0 or seq == 0:
            return self._empty_output(batch, seq, output_hidden_states)
        if self._use_unpadded(keep, self.embeddings.word_embeddings.weight):
            return self._forward_unpadded(input_ids, token_type_ids, position_ids, keep, output_hidden_states)
        x = self.embeddings(input_ids, token_type_ids, position_ids, backend)
        x, hidden_states = self.encoder(x, keep, backend, output_hidden_states)
        pooled = self.pooler(x[:, 0]) if self.pooler is not None else None
        return BaseModelOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)

    def _forward_unpadded(self, input_ids, token_type_ids, position_ids, keep, output_hidden_states):
        packed = pack_mask(keep)
        backend = self._backend
        # Gather ids, not hidden states: the embedding already runs on valid tokens only.
        x = self.embeddings(
            unpad(input_ids, packed), unpad(token_type_ids, packed), unpad(position_ids, packed), backend
        )
        x, hidden_states = self.encoder(x, packed, backend, output_hidden_states)
        pooled = self.pooler(first_tokens(x, packed, keep)) if self.pooler is not None else None
        if hidden_states is not None:
            hidden_states = tuple(pad(h, packed) for h in hidden_states)
        return BaseModelOutput(
            last_hidden_state=pad(x, packed),
            pooler_output=pooled,
            hidden_states=hidden_states,
            packed=packed,
            packed_last_hidden_state=x,
        )

    def _empty_output(self, batch, seq, output_hidden_states):
        weight = self.embeddings.word_embeddings.weight
        hidden = weight.new_zeros(batch, seq, self.config.hidden_size)
        pooled = weight.new_zeros(batch, self.config.hidden_size) if self.pooler is not None else None
        states = (hidden,) * (self.config.num_hidden_layers + 1) if output_hidden_states else None
        return BaseModelOutput(last_hidden_state=hidden, pooler_output=pooled, hidden_states=states)


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, backend):
        h = F.linear(x, self.dense.weight)
        h = ops.bias_gelu(h, _like(self.dense.bias, h), backend=backend)
        ln = self.LayerNorm
        return ops.layer_norm(_like(h, ln.weight), ln.weight, ln.bias, ln.eps, backend=backend)


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


def _mlm_loss(logits, labels):
    """Mean cross-entropy over the labelled tokens, 0 (not NaN) when there are none, as the fused loss."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)


class _WithEncoder(BertPreTrainedModel):
    """A head on top of ``self.bert``; the backend is shared with the encoder."""

    def __init__(self, config, backend, add_pooling_layer: bool):
        super().__init__(config, backend)
        self.bert = BertModel(config, backend=self._backend, add_pooling_layer=add_pooling_layer)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states):
        return self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)


class _TiedMLMMixin:
    def tie_weights(self) -> None:
        """Tie the MLM decoder to the word embeddings (one Parameter, as in Hugging Face)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def _logits_and_loss(self, encoded, labels, return_logits):
        """``(vocabulary logits or None, MLM loss or None)`` of the MLM head over ``encoded``.

        By default the logits are skipped only where nobody reads them: training with labels.
        Then the loss is fused and chunked on the labelled rows and no ``(tokens x vocab)``
        logits are ever formed; otherwise it is taken from the logits.  Padding-free runs
        compute on the packed rows: logits on real tokens only (zeros at padding), the loss
        over real tokens only (labels at padding positions are ignored).
        """
        want_logits = (labels is None or not self.training) if return_logits is None else bool(return_logits)
        packed = encoded.packed
        hidden = encoded.last_hidden_state if packed is None else encoded.packed_last_hidden_state
        if labels is not None and packed is not None:
            labels = unpad(labels, packed)
        if not want_logits:
            if labels is None:
                return None, None
            return None, masked_lm_head_loss(self.cls.predictions, hidden, labels, backend=self._backend)
        logits = self.cls.predictions(hidden, self._backend)
        loss = None if labels is None else _mlm_loss(logits, labels)
        return (logits if packed is None else pad(logits, packed)), loss


class BertForMaskedLM(_TiedMLMMixin, _WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        return_logits: bool | None = None,
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
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, loss = self._logits_and_loss(out, labels, return_logits)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForPreTraining(_TiedMLMMixin, _WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=True)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        next_sentence_label=None,
        output_hidden_states: bool = False,
        return_logits: bool | None = None,
    ) -> PreTrainingOutput:
        """MLM + NSP.  The loss needs both ``labels`` and ``next_sentence_label`` (as Hugging Face);
        ``prediction_logits`` follow :meth:`BertForMaskedLM.forward`'s ``return_logits`` rule."""
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        with_loss = labels is not None and next_sentence_label is not None
        prediction_logits, mlm_loss = self._logits_and_loss(out, labels if with_loss else None, return_logits)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if with_loss:
            loss = mlm_loss + F.cross_entropy(nsp_logits.float(), next_sentence_label.reshape(-1))
        return PreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=out.hidden_states,
        )


def _classifier_dropout(config: BertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class BertForSequenceClassification(_WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=True)
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def _loss(self, logits, labels):
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
                return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
            return F.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = self._loss(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForTokenClassification(_WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
    ) -> TokenClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForQuestionAnswering(_WithEncoder):
    def __init__(self, config: BertConfig, backend: str | None = "auto"):
        super().__init__(config, backend, add_pooling_layer=False)
        self.num_labels = config.num_labels
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
        output_hidden_states: bool = False,
    ) -> QuestionAnsweringOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.qa_outputs(out.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            # As in Hugging Face: positions outside the sequence are clamped and ignored.
            ignored = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        return QuestionAnsweringOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states
        )
