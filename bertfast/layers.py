"""BERT's compute, written once: embeddings, encoder layers, pooler and MLM head transform.

Every face of the product runs these functions: the native classes (:mod:`bertfast.modeling`)
and patched transformers instances (:mod:`bertfast.patching`).  Both have Hugging Face's
attribute names (``embeddings.word_embeddings``, ``encoder.layer[i].attention.self.query``,
``pooler.dense``, ...), so one function walks either module tree; the rest of the BERT family
(RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT) differs only in what
:mod:`bertfast.family` describes (each layer's module names, the position-id rule, token types)::

    embeddings   LN(word[ids] + position[pos] + token_type[tt])      embedding_layer_norm
    per layer    qkv = x @ Wqkv^T + bqkv       one GEMM; q, k, v are strided views of qkv
                 a   = attention(q, k, v, key-padding mask or packed offsets)
                 x   = LN(dropout(a @ Wo^T + bo) + x)                 GEMM + layer_norm (bias, dropout fused)
                 f   = gelu(x @ Wi^T + bi)                             GEMM + bias_gelu
                 x   = LN(dropout(f @ Wf^T + bf) + x)                 GEMM + layer_norm (bias, dropout fused)
    pooler       tanh(x[:, 0] @ Wp^T + bp)       the model's own pooler module
    MLM head     LN(gelu(x @ Wt^T + bt))                               GEMM + bias_gelu + layer_norm

Dispatch is resolved once per forward: :func:`plan` picks, from the model's sizes, dtypes,
device and dropout, the backend function of every op (cached), and the layers call those
functions directly.  Arguments are validated once, at the model's boundary
(:func:`check_inputs`); the ops' own checks in :mod:`bertfast.ops` are for callers outside
the model.

Mixed precision (one policy, chosen by the bytes it moves).  The compute dtype is autocast's
when autocast is on, else the parameters'.  Activations (the residual stream included) are
kept in the compute dtype: under bf16 autocast each layer reads and writes 2-byte
activations, never 4-byte ones, and no cast kernel runs between ops.  The GEMMs run under
autocast as PyTorch's own do (it casts, and caches, the weights).  The fused ops read their
small parameters (LayerNorm weight and bias, the dense biases fused into LayerNorm and
bias-GELU) in their own dtype and keep every statistic and accumulator in fp32; their
outputs have the activations' dtype.  The one cast per forward is the embedding output
(fp32 tables) into the compute dtype.

In training LayerNorm keeps its input for the backward, not only its output (which the next
GEMM keeps anyway): ``xhat = (y - b) / w`` cannot be recovered where a weight is zero, and
pretrained models have such weights (all-MiniLM-L6-v2's last output LayerNorm has three
below 2e-9), nor precisely from a 16-bit output.  That costs one ``(tokens, hidden)``
tensor per LayerNorm, about 0.4 GB of BERT-large's bf16 training step at 32 x 128.

Padding-free execution (``unpad``, ``"auto"`` by default): the valid tokens are gathered once
before the embedding and every layer runs on the packed ``(total_tokens, hidden)`` tensor.

Host synchronisations: an eager forward reads back one small tensor, once, holding the
ids' value ranges (the boundary check) and the packed batch's token count and longest
row (the packed size and the attention grid depend on them).  None under ``torch.compile``,
``torch.jit.trace``, ``torch.func`` transforms or CUDA-graph capture (no range checks; the padded
path).  Inference on CUDA then replays the graph of the batch's token-budget bucket
(:func:`bucket_encoder`, :mod:`bertfast.cuda_graphs`), which reads nothing back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import cuda_graphs
from .buckets import dense_packed
from .errors import BackendUnavailable
from .family import (
    LayerParts,
    bert_layer_parts,
    default_position_ids,
    encoder_layers,
    encoder_module,
    layer_parts_function,
    longest_sequence,
    longest_sequence_message,
    separates_packed_sequences,
)
from .fp8 import GEMMS, check_fp8_linear, fp8_linear, is_fp8_linear, layer_gemms
from .ops import _dispatch
from .padding import (
    PackedBatch,
    pack_lengths,
    pack_mask,
    pad,
    sequence_lengths,
    sequence_starts,
    static_packing,
    tokens_of,
    unpad,
)

# --------------------------------------------------------------------------------------
# The plan: every op's backend function, chosen once
# --------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """The backend function of each op for one forward (``None``: no backend can run it)."""

    attention: Callable | None = None
    attention_qkv: Callable | None = None
    attention_varlen: Callable | None = None
    attention_varlen_qkv: Callable | None = None
    bias_gelu: Callable | None = None
    embedding_layer_norm: Callable | None = None
    layer_norm: Callable | None = None
    # FP8 inference (bertfast.fp8): resolved for a quantized encoder only
    quantize_rows: Callable | None = None
    layer_norm_fp8: Callable | None = None
    bias_gelu_fp8: Callable | None = None


_PLANS: dict[tuple, Plan] = {}


def _resolve(op: str, backend: str, tensors, dropout_p: float, optional: bool = False):
    try:
        module = _dispatch.resolve(op, backend, tensors, dropout_p=dropout_p)
    except BackendUnavailable:
        if optional:
            return None
        raise
    return getattr(module, op)


def plan(
    backend: str,
    like: torch.Tensor,
    dtype: torch.dtype,
    hidden: int,
    intermediate: int,
    heads: int = 0,
    head_dim: int = 0,
    attention_dropout: bool = False,
    hidden_dropout: bool = False,
    fp8: bool = False,
) -> Plan:
    """The ops for activations of ``dtype`` on ``like``'s device with parameters of ``like``'s dtype.

    ``heads == 0``: no attention (a head transform).  ``fp8``: the FP8 ops too (a quantized encoder,
    :mod:`bertfast.fp8`; raises if the backend has none).  Cached by every argument that can change a
    backend's answer.
    """
    dropout = (attention_dropout, hidden_dropout)
    key = (backend, like.device, like.dtype, dtype, hidden, intermediate, heads, head_dim, *dropout, fp8)
    # Under torch.compile the plan is traced, not cached: a guard on the cache's contents would
    # recompile the graph once the eager cache fills.
    compiling = torch.compiler.is_compiling()
    found = None if compiling else _PLANS.get(key)
    if found is not None:
        return found
    x = torch.empty((1, hidden), dtype=dtype, device=like.device)
    vector = torch.empty((hidden,), dtype=like.dtype, device=like.device)
    ffn = torch.empty((1, intermediate), dtype=dtype, device=like.device)
    functions = {
        "layer_norm": _resolve("layer_norm", backend, (x, vector, vector), 0.5 if hidden_dropout else 0.0),
        "bias_gelu": _resolve("bias_gelu", backend, (ffn, ffn[0].to(like.dtype)), 0.0),
    }
    if heads:
        table = torch.empty((1, hidden), dtype=like.dtype, device=like.device)
        functions["embedding_layer_norm"] = _resolve("embedding_layer_norm", backend, (table, vector, vector), 0.0)
        p = 0.5 if attention_dropout else 0.0
        probe = torch.empty((1, 1, heads, head_dim), dtype=dtype, device=like.device)
        functions["attention"] = _resolve("attention", backend, (probe, probe, probe), p)
        varlen = probe[0]
        functions["attention_varlen"] = _resolve("attention_varlen", backend, (varlen, varlen, varlen), p, True)
        # Packed-QKV variants (one gradient buffer for q, k and v), where the backend has them.
        functions["attention_qkv"] = _resolve("attention_qkv", backend, (probe, probe, probe), p, True)
        functions["attention_varlen_qkv"] = _resolve("attention_varlen_qkv", backend, (varlen, varlen, varlen), p, True)
    if fp8:
        functions["quantize_rows"] = _resolve("quantize_rows", backend, (x,), 0.0)
        functions["layer_norm_fp8"] = _resolve("layer_norm_fp8", backend, (x, vector, vector), 0.0)
        functions["bias_gelu_fp8"] = _resolve("bias_gelu_fp8", backend, (ffn, ffn[0].to(like.dtype)), 0.0)
    result = Plan(**functions)
    if not compiling:
        _PLANS[key] = result
    return result


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """Autocast's dtype when autocast is on for ``device``, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _encoder_plan(bert, backend: str, dtype: torch.dtype, parts_of) -> Plan:
    weight = bert.embeddings.word_embeddings.weight
    layers = encoder_layers(bert)
    attention_dropout = hidden_dropout = False
    # In eval only the first layer's sizes matter (a list of one, not a ModuleList slice: that builds a module).
    parts = [parts_of(module) for module in layers] if bert.training else [parts_of(layers[0])] if len(layers) else []
    if bert.training:  # the modules' own dropout rates (users may change them after building)
        attention_dropout = any(p.attention_dropout.p > 0 for p in parts)
        hidden_dropout = any(
            p.output_dropout.p > 0 or (p.attention_output_dropout is not None and p.attention_output_dropout.p > 0)
            for p in parts
        )
    hidden = weight.shape[1]
    if not parts:
        heads = bert.config.num_attention_heads
        return plan(backend, weight, dtype, hidden, hidden, heads, hidden // heads)
    first = parts[0]
    sizes = (hidden, first.intermediate.weight.shape[0], first.heads, first.head_dim)
    fp8 = is_fp8_linear(first.query)
    return plan(backend, weight, dtype, *sizes, attention_dropout, hidden_dropout, fp8)


# --------------------------------------------------------------------------------------
# Checks at the boundary
# --------------------------------------------------------------------------------------


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tracer() -> str | None:
    """The tracer or function transform recording this forward outside torch.compile, by name, or None.

    What such a forward decides from values (the padding-free layout, the ids' ranges) would hold for
    the example batch only: under torch.jit.trace it is baked into the trace, under a torch.func
    transform values cannot be read at all.  So they get the padded path, which reads none."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (grad, vmap, jacrev...)"
    return None


def values_checkable(device: torch.device) -> bool:
    """Whether reading values back to the host is allowed (eager mode: not compiling, tracing, under a
    function transform or capturing a CUDA graph)."""
    return not (torch.compiler.is_compiling() or _capturing(device) or tracer() is not None)


def check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=None):
    """Shapes and dtypes of a forward's inputs (no host sync); returns ``(batch, seq, device)``."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        device = input_ids.device
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must have shape (batch, seq, hidden), got {tuple(inputs_embeds.shape)}")
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
    if batch == 0 or seq == 0:
        # Hugging Face fails on it too; an empty forward would return the heads' biases as logits.
        raise ValueError(f"empty input: batch {batch} x sequence length {seq}; a forward needs at least one token")
    # Without ids every position counts (RoBERTa style too); with them only real tokens do, read in _host_read.
    limit = config.max_position_embeddings if input_ids is not None else longest_sequence(config)
    if position_ids is None and seq > limit:
        raise ValueError(longest_sequence_message(config, seq))
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"bertfast takes a (batch, seq) key-padding attention_mask, got a {attention_mask.dim()}-D mask of "
                f"shape {tuple(attention_mask.shape)} (custom 3-D/4-D masks are not supported)"
            )
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the input is {(batch, seq)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the input is on {device}")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != seq or t.shape[0] not in (1, batch):
            raise ValueError(f"{name} must have shape (batch, seq) or (1, seq) with seq={seq}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    return batch, seq, device


def _host_read(
    config,
    input_ids,
    token_type_ids,
    position_ids,
    attention_mask,
    lengths,
    lead_padded=None,
    positions_given=True,
    count_sequences=False,
):
    """The forward's one host read: the ids' ranges (raising if out of range) and the packed sizes.

    ``positions_given``: whether the user passed ``position_ids`` (else they were derived, and too high
    a position means too long a sequence, which the error says).

    Returns ``(total_tokens, longest_row, any_first_token_padded, sequences)`` when ``lengths`` is given, else
    ``None``; the third is read only when ``lead_padded`` (a bool scalar tensor) is given, else False; the
    last, the count of nonzero lengths, only when ``count_sequences``, else None.
    """
    ranges = []
    if input_ids is not None:
        ranges.append(("input_ids", input_ids, config.vocab_size))
    if token_type_ids is not None:
        ranges.append(("token_type_ids", token_type_ids, getattr(config, "type_vocab_size", 1)))
    if position_ids is not None:
        ranges.append(("position_ids", position_ids, config.max_position_embeddings))
    parts = [torch.stack(torch.aminmax(t)).to(torch.int64) for _, t, _ in ranges]
    float_mask = attention_mask is not None and attention_mask.dtype.is_floating_point
    if float_mask:
        parts.append(((attention_mask == 0) | (attention_mask == 1)).all().to(torch.int64).expand(2))
    if lead_padded is not None:
        parts.append(lead_padded.to(torch.int64).expand(2))
    if count_sequences:
        parts.append(lengths.count_nonzero().to(torch.int64).expand(2))
    if lengths is not None:
        parts.append(torch.stack((lengths.sum(), lengths.max())).to(torch.int64))
    if not parts:
        return None
    values = torch.stack(parts).tolist()
    for (name, _, limit), (low, high) in zip(ranges, values):
        if name == "position_ids" and not positions_given and high >= limit:
            raise ValueError(longest_sequence_message(config, high + 1 - (limit - longest_sequence(config))))
        if low < 0 or high >= limit:
            raise ValueError(f"{name} must be in [0, {limit}); got values in [{low}, {high}]")
    if float_mask and not values[len(ranges)][0]:
        raise ValueError(
            "a floating attention_mask must hold only 0 and 1 (bertfast takes a key-padding mask, not a bias)"
        )
    if lengths is None:
        return None
    return (
        *values[-1],
        bool(values[-2][0]) if lead_padded is not None else False,
        values[-2][0] if count_sequences else None,
    )


# --------------------------------------------------------------------------------------
# The modules' compute
# --------------------------------------------------------------------------------------


def embed(emb, input_ids, token_type_ids, position_ids, inputs_embeds, ops: Plan, dtype):
    """``dropout(LN(word[ids] (or inputs_embeds) + position[pos] + token_type[tt])))`` in ``dtype``.

    Without a token-type table (DistilBERT) the fused op reads a one-row table of zeros."""
    ln = emb.LayerNorm
    types = emb._modules.get("token_type_embeddings")
    word = emb.word_embeddings.weight
    type_table = word.new_zeros((1, word.shape[1])) if types is None else types.weight
    if inputs_embeds is None:
        tables = (word, emb.position_embeddings.weight, type_table)
        x = ops.embedding_layer_norm(input_ids, position_ids, token_type_ids, *tables, ln.weight, ln.bias, ln.eps)
    else:
        summed = inputs_embeds if types is None else inputs_embeds + F.embedding(token_type_ids, type_table)
        positions = F.embedding(position_ids, emb.position_embeddings.weight).to(summed.dtype)
        x = ops.layer_norm(summed, ln.weight, ln.bias, ln.eps, positions, None)
    x = emb.dropout(x)
    if not x.requires_grad and torch.is_grad_enabled() and wants_input_grads(emb._modules["word_embeddings"]):
        # What transformers' enable_input_require_grads hook does to the word embeddings' output (this path
        # never calls that module): with frozen embeddings, reentrant checkpointing needs an input that
        # requires grad, or every encoder gradient is silently None.
        x.requires_grad_(True)
    return x if x.dtype == dtype else x.to(dtype)


# Set by bertfast.patch on a base model whose head reads the first token's hidden state (RoBERTa's,
# ELECTRA's and DistilBERT's sequence classification): like a pooler, it needs position 0 computed.
FIRST_TOKEN_READ_ATTR = "_bertfast_reads_first_token"

# Set by bertfast.patch on a base model whose head reads hidden states at other positions than the first
# (ELECTRA's multiple-choice summary of the last token, the mean or cls_index): transformers computes them at
# padding too, and such a head reads them, so the encoder runs every batch with a mask padded.
PADDING_READ_ATTR = "_bertfast_reads_padding"

INPUT_GRADS_HOOK = "make_inputs_require_grads"  # transformers' PreTrainedModel.enable_input_require_grads


def wants_input_grads(word_embeddings) -> bool:
    """Whether transformers' input-requires-grad hook is on this embedding (it makes its output require grad)."""
    hooks = word_embeddings._forward_hooks
    return bool(hooks) and any(getattr(h, "__name__", "") == INPUT_GRADS_HOOK for h in hooks.values())


# The per-layer functions below read submodules and parameters from ``_modules`` / ``_parameters``
# directly: ``module.attr`` on an nn.Module is a Python-level ``__getattr__`` call, about 40 per layer.


def _dropout_kwargs(dropout, seed) -> dict:
    """The ``dropout_p`` and ``seed`` arguments of a fused op for dropout module ``dropout`` (None: none there)."""
    if dropout is None or not dropout.training or dropout.p == 0.0:
        return {}
    return {"dropout_p": dropout.p, "seed": seed}


def _dense_residual_layer_norm(dense, ln, dropout, h, residual, ops: Plan, seed, y=None):
    """``LN(dropout(h @ W^T + b) + residual)`` after attention or the FFN; bias and dropout fused.
    ``dropout``: the module's, or None (none there); ``seed``: its philox seed (see :func:`dropout_seeds`).
    ``y``: ``h @ W^T`` when the caller formed it."""
    dense = dense._parameters
    lnp = ln._parameters
    if y is None:
        y = F.linear(h, dense["weight"])
    extra = _dropout_kwargs(dropout, seed)
    return ops.layer_norm(y, lnp["weight"], lnp["bias"], ln.eps, residual, dense["bias"], **extra)


def qkv_projection(parts: LayerParts, x):
    """``x @ [Wq; Wk; Wv]^T + [bq; bk; bv]`` as one GEMM over the three ordinary parameters.

    The weights are concatenated on every call and nothing is kept between calls, so whatever
    changes a parameter (``.data``, ``copy_``, ``.to()``, an EMA, ``load_state_dict``, an FSDP
    all-gather, ``torch.func.functional_call``) is what the next forward reads.  The copy is 3 h^2
    elements per layer (6 MB in bf16 at BERT-large's size, under 2 % of a forward's memory traffic)
    and it keeps one GEMM forward and one in the backward, whose gradient the concatenation splits.
    """
    return F.linear(x, _qkv(parts, "_parameters", "weight"), _qkv(parts, "_parameters", "bias"))


def _qkv(parts: LayerParts, store: str, name: str):
    """The query's, key's and value's ``store`` (``_parameters`` or ``_buffers``) entry ``name``, concatenated."""
    return torch.cat([getattr(m, store)[name] for m in (parts.query, parts.key, parts.value)])


# Fused dropping ops per encoder layer: attention probabilities, attention output, FFN output.
SEEDS_PER_LAYER = 3


def dropout_seeds(bert, parts_of, device: torch.device) -> torch.Tensor | None:
    """The philox seeds of one training forward, drawn at once from torch's generator of ``device``:
    ``(layers, SEEDS_PER_LAYER, 2)`` int64 on the device (see ``bertfast.kernels._dropout``), or None
    when no layer drops.  One draw per forward, not per kernel call; under CUDA-graph capture the draw
    is captured and gives fresh seeds at each replay, and no value is read back to the host."""
    if not bert.training:
        return None
    layers = encoder_layers(bert)
    parts = [parts_of(module) for module in layers]
    drops = (d for p in parts for d in (p.attention_dropout, p.attention_output_dropout, p.output_dropout))
    if not any(_dropout_kwargs(d, None) for d in drops):
        return None
    # The layout bertfast.kernels._dropout.draw_seeds gives (not imported: Triton is optional).
    seeds = torch.randint(2**62, (len(layers) * SEEDS_PER_LAYER, 2), dtype=torch.int64, device=device)
    return seeds.view(len(layers), SEEDS_PER_LAYER, 2)


def attention(parts: LayerParts, qkv, mask, ops: Plan, seed=None):
    """Softmax attention of ``qkv`` (..., 3 x hidden), the projections side by side, under ``mask``
    (``None``, a bool ``(batch, seq)`` key-padding mask, or a PackedBatch); ``(..., heads, head_dim)``."""
    qkv = qkv.unflatten(-1, (3, parts.heads, parts.head_dim))
    extra = _dropout_kwargs(parts.attention_dropout, seed)
    scale = parts.head_dim**-0.5
    if isinstance(mask, PackedBatch):
        if ops.attention_varlen_qkv is not None:
            return ops.attention_varlen_qkv(qkv, mask.cu_seqlens, mask.max_seqlen, scale, **extra)
        return ops.attention_varlen(*qkv.unbind(-3), mask.cu_seqlens, mask.max_seqlen, scale, **extra)
    if ops.attention_qkv is not None:
        return ops.attention_qkv(qkv, mask, scale, **extra)
    return ops.attention(*qkv.unbind(-3), mask, scale, **extra)


def layer(module, x, mask, ops: Plan, seeds=None, parts_of=bert_layer_parts):
    """One post-LN encoder layer.  ``mask``: ``None``, a bool ``(batch, seq)`` mask, or a PackedBatch.
    ``seeds``: this layer's ``(SEEDS_PER_LAYER, 2)`` dropout seeds (:func:`dropout_seeds`; None in eval).
    ``parts_of``: reads the layer's modules (:mod:`bertfast.family`: BERT's names or DistilBERT's)."""
    parts = parts_of(module)
    qkv = qkv_projection(parts, x)
    seed = (None,) * SEEDS_PER_LAYER if seeds is None else (seeds[0, :1], seeds[1, :1], seeds[2, :1])
    a = attention(parts, qkv, mask, ops, seed[0])
    attention_out = (parts.attention_dense, parts.attention_norm, parts.attention_output_dropout)
    x = _dense_residual_layer_norm(*attention_out, a.flatten(-2), x, ops, seed[1])
    dense = parts.intermediate._parameters
    output = (parts.output_dense, parts.output_norm, parts.output_dropout)
    h = F.linear(x, dense["weight"])
    w, bias = parts.output_dense._parameters["weight"], dense["bias"]
    if torch.is_grad_enabled() and (h.requires_grad or bias.requires_grad or w.requires_grad):
        # torch.compile, torch.jit.trace and torch.func transforms (which need a setup_context Function
        # without nested autograd) keep the GELU output instead.
        if not (torch.compiler.is_compiling() or tracer() is not None):
            y = GeluDense.apply(h, bias, w, ops.bias_gelu)
            return _dense_residual_layer_norm(*output, None, x, ops, seed[2], y)
    return _dense_residual_layer_norm(*output, ops.bias_gelu(h, bias), x, ops, seed[2])


def _fp8_dense(linear, q, scale, bias=None):
    """``linear``'s GEMM on the FP8 rows ``q`` (tokens, K) with their ``scale`` (tokens, 1): bf16."""
    return fp8_linear(q, scale, linear._parameters["weight"], linear._buffers["weight_scale"], bias)


def layer_fp8(module, x, quantized, mask, ops: Plan, parts_of=bert_layer_parts, index: int = 0):
    """:func:`layer` with its four GEMMs in FP8 (:mod:`bertfast.fp8`; inference only).

    ``quantized``: ``(q, scale)``, ``x``'s rows in e4m3 with one scale each.  Returns the layer's output
    and its rows quantized the same way (by the last LayerNorm, in the same pass), for the next layer.
    ``index``: the layer's, for errors."""
    parts = parts_of(module)
    _check_fp8_gemms(parts, index)
    rows = x.reshape(-1, x.shape[-1])
    weight, bias = _qkv(parts, "_parameters", "weight"), _qkv(parts, "_parameters", "bias")
    qkv = fp8_linear(*quantized, weight, _qkv(parts, "_buffers", "weight_scale"), bias)
    a = attention(parts, qkv.view(*x.shape[:-1], -1), mask, ops)
    y = _fp8_dense(parts.attention_dense, *ops.quantize_rows(a.reshape(rows.shape)))
    rows, *quantized = _residual_layer_norm_fp8(parts.attention_dense, parts.attention_norm, y, rows, ops)
    h = _fp8_dense(parts.intermediate, *quantized)
    y = _fp8_dense(parts.output_dense, *ops.bias_gelu_fp8(h, parts.intermediate._parameters["bias"]))
    rows, *quantized = _residual_layer_norm_fp8(parts.output_dense, parts.output_norm, y, rows, ops)
    return rows.view(x.shape), quantized


def _residual_layer_norm_fp8(dense, norm, y, residual, ops: Plan):
    """``LN(y + dense's bias + residual)`` and its rows in FP8: ``(out, q, scale)``."""
    lnp = norm._parameters
    return ops.layer_norm_fp8(y, lnp["weight"], lnp["bias"], norm.eps, residual, dense._parameters["bias"])


def check_fp8_encoder(bert, dtype) -> None:
    """Raise where a quantized encoder cannot run at all: training, a compute dtype other than bf16 (the
    FP8 GEMMs' output).  Each layer checks its own weights (:func:`_check_fp8_gemms`)."""
    if dtype != torch.bfloat16:
        raise TypeError(
            f"this model's encoder is quantized to FP8 and computes in torch.bfloat16, not {dtype} (an autocast "
            "to another dtype, or parameters converted after quantization?)"
        )
    if bert.training:
        raise RuntimeError(
            "this model's encoder is quantized to FP8, which is inference-only: call model.eval() (FP8 layers have "
            "no dropout and no backward)"
        )


def _check_fp8_gemms(parts: LayerParts, index: int) -> None:
    """Raise where layer ``index``'s GEMM weights are no longer FP8 or require grad.  In the layer itself, so
    a replayed CUDA graph pays nothing (new parameters, as a conversion makes, are recaptured)."""
    grad = torch.is_grad_enabled()
    for name, linear in zip(GEMMS, layer_gemms(parts)):
        check_fp8_linear(linear, index, name)
        if grad and any(p.requires_grad for p in linear._parameters.values()):
            raise RuntimeError(
                f"layer {index}'s {name} has parameters that require grad, but FP8 layers have no backward: run "
                "the quantized model under torch.no_grad() or torch.inference_mode(), with frozen parameters"
            )


class GeluDense(torch.autograd.Function):
    """``y = gelu(h + bias) @ W^T`` (the FFN between its two GEMMs) keeping the pre-activation ``h``,
    not the ``(tokens, 4 x hidden)`` GELU output: the backward recomputes it from ``h``.

    ``bias_gelu``: the plan's op, differentiable; its own backward gives ``dh`` and ``dbias``.
    ``W`` is used in ``h``'s dtype (under autocast, the compute dtype) and its gradient returned in
    its own.  Backward, with ``g = gelu(h + bias)`` recomputed::

        dW = dy^T @ g        dg = dy @ W        (dh, dbias) = bias_gelu's backward of dg
    """

    @staticmethod
    def forward(ctx, h, bias, weight, bias_gelu):
        ctx.set_materialize_grads(False)
        weight_used = weight.to(h.dtype)  # autocast's cast of the weight, done once here
        ctx.save_for_backward(h, bias, weight_used)
        ctx.bias_gelu = bias_gelu
        ctx.weight_dtype = weight.dtype
        return F.linear(bias_gelu(h, bias), weight_used)

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        h, bias, weight = ctx.saved_tensors
        needs_h, needs_bias, needs_weight, _ = ctx.needs_input_grad
        with torch.enable_grad():
            h_leaf = h.detach().requires_grad_(needs_h)
            bias_leaf = bias.detach().requires_grad_(needs_bias)
            g = ctx.bias_gelu(h_leaf, bias_leaf)
        dweight = None
        if needs_weight:
            dweight = dy.flatten(0, -2).t().mm(g.detach().flatten(0, -2))
            dweight = dweight.to(ctx.weight_dtype)
        dh = dbias = None
        if needs_h or needs_bias:
            inputs = [t for t, needed in ((h_leaf, needs_h), (bias_leaf, needs_bias)) if needed]
            grads = iter(torch.autograd.grad(g, inputs, dy.matmul(weight)))
            dh = next(grads) if needs_h else None
            dbias = next(grads) if needs_bias else None
        return dh, dbias, dweight, None


def head_transform(transform, x, backend: str):
    """``LN(gelu(x @ W^T + b))`` of a BertPredictionHeadTransform, in the compute dtype."""
    dense, ln = transform.dense, transform.LayerNorm
    dtype = compute_dtype(x.device, dense.weight.dtype)
    hidden = dense.weight.shape[0]
    ops = plan(backend, dense.weight, dtype, hidden, hidden)
    h = F.linear(x, dense.weight)
    h = ops.bias_gelu(h if h.dtype == dtype else h.to(dtype), dense.bias)
    return ops.layer_norm(h, ln.weight, ln.bias, ln.eps, None, None)


def _checkpoint_function(bert, module):
    """The gradient-checkpointing function for ``module`` if it is enabled (and training), else None.

    transformers sets it on each layer (GradientCheckpointingLayer), bertfast's own classes on
    the encoder.
    """
    if not module.training:
        return None
    owner = next((m for m in (module, encoder_module(bert)) if getattr(m, "gradient_checkpointing", False)), None)
    if owner is None:
        return None
    fn = getattr(owner, "_gradient_checkpointing_func", None) or getattr(bert, "_gradient_checkpointing_func", None)
    return fn or functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


# --------------------------------------------------------------------------------------
# The whole encoder
# --------------------------------------------------------------------------------------


def _checked_static_packing(packed: PackedBatch, batch: int, seq: int, ops: Plan, backend: str) -> PackedBatch:
    if (packed.batch, packed.seq) != (batch, seq):
        raise ValueError(
            f"the prebuilt packing is for a {packed.batch} x {packed.seq} batch, the input is {batch} x {seq}"
        )
    if ops.attention_varlen is None:
        raise BackendUnavailable(
            f"a prebuilt packing needs variable-length attention; backend {backend!r} has none here"
        )
    return packed


def _sequences_by_position(lengths, sizes, batch: int, seq: int, ops: Plan, backend: str) -> PackedBatch | None:
    """The sequences that position ids pack into rows (:func:`bertfast.padding.sequence_lengths`), run as
    packed sequences with every token kept; None when each row is one sequence (the dense path).

    Eager, the host read gave their count and the longest; traced, the offsets keep a fixed size (empty
    sequences at the end) and the row length bounds the longest, so nothing depends on the values."""
    if sizes is not None:
        _, longest, _, count = sizes
        if count == batch:  # one sequence per row
            return None
        lengths = lengths[:count]
    else:
        longest = seq
    if ops.attention_varlen is None:
        raise BackendUnavailable(
            f"position_ids pack several sequences into a row, which needs variable-length attention; backend "
            f"{backend!r} has none here"
        )
    return pack_lengths(lengths, batch, seq, longest)


def encode(
    bert,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    output_hidden_states=False,
    *,
    backend: str = "auto",
    unpad_mode: bool | str = "auto",
):
    """Embeddings, every encoder layer and the pooler of ``bert`` (native or transformers), after
    :func:`check_inputs`.

    Returns ``(last_hidden_state, pooled or None, hidden_states list or None, packed or None,
    packed_last_hidden_state or None)``.
    """
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        raise NotImplementedError(
            "bertfast models cannot be traced by torch.fx symbolic tracing (its proxies hold no shapes or values, "
            "which the forward reads); torch.export.export gives a graph that serves every batch"
        )
    config = bert.config
    batch, seq, device = check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
    weight = bert.embeddings.word_embeddings.weight
    if weight.device != device:
        raise ValueError(
            f"the model is on {weight.device} but its inputs are on {device}: move the inputs (or the model) "
            "to one device"
        )
    dtype = compute_dtype(device, weight.dtype)
    parts_of = layer_parts_function(bert)
    ops = _encoder_plan(bert, backend, dtype, parts_of)
    if ops.layer_norm_fp8 is not None:
        check_fp8_encoder(bert, dtype)
    positions_given = position_ids is not None
    if not positions_given:  # from the padded ids, before any packing (RoBERTa counts real tokens only)
        position_ids = default_position_ids(config, input_ids, seq, device)
    position_ids = position_ids.expand(batch, seq)
    if token_type_ids is None or "token_type_embeddings" not in bert.embeddings._modules:
        # DistilBERT has no token types: a pair tokenizer's token_type_ids are ignored, as transformers does.
        token_type_ids = torch.zeros((batch, seq), dtype=torch.long, device=device)
    token_type_ids = token_type_ids.expand(batch, seq)

    keep = tokens_of(attention_mask) if attention_mask is not None else None
    static = static_packing()  # packed on the host (bertfast.TrainStep): nothing is read back here
    eager = values_checkable(device) and static is None
    reads_padding = keep is not None and getattr(bert, PADDING_READ_ATTR, False)
    if reads_padding and unpad_mode is True:
        raise ValueError(
            "unpad=True, but the head reads hidden states at padding positions (a summary of the last token, the "
            "mean or cls_index), which a padding-free forward never computes; use unpad='auto' (it runs such "
            "models padded)"
        )
    may_unpad = keep is not None and unpad_mode is not False and eager and not reads_padding
    if may_unpad and ops.attention_varlen is None:
        if unpad_mode is True:
            raise BackendUnavailable(f"unpad=True, but backend {backend!r} has no variable-length attention here")
        may_unpad = False
    lengths = keep.sum(dim=1, dtype=torch.int32) if may_unpad else None
    # Position ids without a mask may pack several sequences per row (transformers' padding-free format).
    by_positions = keep is None and positions_given and separates_packed_sequences(bert)
    if by_positions:
        if torch.jit.is_tracing():  # the reference attention would read the example's offsets into the trace
            raise NotImplementedError(
                "torch.jit.trace cannot record sequences packed by position_ids without an attention_mask: their "
                "offsets would be the example's; pass an attention_mask, or use torch.export.export"
            )
        lengths = sequence_lengths(sequence_starts(position_ids))
    # The pooler (or a head that reads the first token, see bertfast.patching) reads position 0 of every
    # row, which the packed path computes only where it is a token (rows that are all padding have no
    # meaningful pooled output either way).
    pooler = bert._modules.get("pooler")
    pools = may_unpad and (pooler is not None or getattr(bert, FIRST_TOKEN_READ_ATTR, False))
    lead_padded = (~keep[:, 0] & keep.any(dim=1)).any() if pools else None
    sizes = None
    if eager:
        ids = (input_ids, token_type_ids, position_ids)
        read = dict(positions_given=positions_given, count_sequences=by_positions)
        sizes = _host_read(config, *ids, attention_mask, lengths, lead_padded, **read)
    packed = None
    if static is not None:
        packed = _checked_static_packing(static.packed, batch, seq, ops, backend)
    elif by_positions:
        packed = _sequences_by_position(lengths, sizes, batch, seq, ops, backend)
    elif sizes is not None:
        total, longest, left_padded, _ = sizes
        if left_padded:  # left padding: position 0 is padding in some row, so the pooled output needs it computed
            if unpad_mode is True:
                raise ValueError(
                    "unpad=True, but some row starts with padding (left padding): the pooler (or a head reading "
                    "the first token) reads position 0, which a padding-free forward never computes; use "
                    "unpad='auto' (it runs such batches padded)"
                )
        elif unpad_mode is True or total < batch * seq:
            packed = pack_mask(keep, lengths, (total, longest))
        else:
            keep = None  # no padding: the dense path needs no mask
    x = states = None
    if (
        eager
        and (packed is not None or keep is None)
        and inputs_embeds is None
        and not output_hidden_states
        and unpad_mode is not False
        and ops.attention_varlen is not None
        and cuda_graphs.serves(bert, device)
    ):
        # Inference on the bucketed padding-free path (a CUDA graph per bucket); None: no bucket holds it.
        whole = packed if packed is not None else dense_packed(batch, seq, device)
        x = cuda_graphs.bucketed_encoder(bert, whole, input_ids, token_type_ids, position_ids, ops, dtype, parts_of)
        if x is not None and packed is None:  # no padding: the eager path's dense output, no packed fields
            x = x.view(batch, seq, -1)
    if x is None:
        inputs = (input_ids, token_type_ids, position_ids, inputs_embeds)
        if packed is not None:
            inputs = [None if t is None else unpad(t, packed) for t in inputs]
        x = embed(bert.embeddings, *inputs, ops, dtype)
        mask = keep if packed is None else packed
        states = [x] if output_hidden_states else None
        x = run_layers(bert, x, mask, ops, parts_of, states)
    packed_x = None
    if packed is not None:
        packed_x = x
        x = pad(x, packed)
        if states is not None:
            states = [pad(h, packed) for h in states]
    pooled = pooler(x) if pooler is not None else None
    return x, pooled, states, packed, packed_x


def run_layers(bert, x, mask, ops: Plan, parts_of, states=None):
    """Every encoder layer of ``bert`` on ``x`` (appending each output to ``states`` when given)."""
    if ops.layer_norm_fp8 is not None:
        quantized = ops.quantize_rows(x.reshape(-1, x.shape[-1]))
        for i, module in enumerate(encoder_layers(bert)):
            x, quantized = layer_fp8(module, x, quantized, mask, ops, parts_of, i)
            if states is not None:
                states.append(x)
        return x
    seeds = dropout_seeds(bert, parts_of, x.device)
    for i, module in enumerate(encoder_layers(bert)):
        # A native layer is called as a module, so its hooks run (FSDP2 gathers its shards in one).
        native = getattr(module, "runs_bertfast_layer", False)
        step = module if native else functools.partial(layer, module, parts_of=parts_of)
        checkpoint = _checkpoint_function(bert, module)
        layer_seeds = None if seeds is None else seeds[i]
        x = step(x, mask, ops, layer_seeds) if checkpoint is None else checkpoint(step, x, mask, ops, layer_seeds)
        if states is not None:
            states.append(x)
    return x


def modules_called(bert) -> tuple:
    """The modules :func:`bucket_encoder` calls as modules, so their hooks run: the embeddings' dropout and
    native layers (the rest is read as parameters)."""
    layers = tuple(m for m in encoder_layers(bert) if getattr(m, "runs_bertfast_layer", False))
    return (bert.embeddings._modules["dropout"], *layers)


def bucket_encoder(bert, static, ops: Plan, dtype, parts_of):
    """The embeddings and every layer on a bucket's packed inputs (:class:`bertfast.buckets.StaticPackedBatch`):
    what a CUDA graph of the bucket captures, and what runs eagerly in its place.  No host read."""
    x = embed(bert.embeddings, static.input_ids, static.token_type_ids, static.position_ids, None, ops, dtype)
    return run_layers(bert, x, static.mask, ops, parts_of)
