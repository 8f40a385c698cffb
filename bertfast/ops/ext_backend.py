"""The "ext" backend: the C++/CUDA extension :mod:`bertfast._C` behind the op contract.

Each op is a ``torch.library.custom_op`` in the ``bertfast::`` namespace (``ext_layer_norm``,
``ext_embedding_layer_norm``, ``ext_bias_gelu``, ``ext_masked_softmax``) with a fake
(meta) implementation and an autograd formula whose backward is itself a custom op calling
the extension's backward kernels, so ``torch.compile(fullgraph=True)`` traces through
without a graph break.  Every gradient is returned, weights and biases included.

Attention is ``softmax(scale * q @ k^T, key mask) @ v`` with the two products as batched
GEMMs (``torch.matmul`` on ``(batch, heads, seq, head_dim)`` views) and the masked softmax
from the extension.  The scores and their gradient are fp32 for fp16/bf16 inputs, from the
product through the softmax; the probabilities are in the inputs' dtype.  There is no
variable-length attention here.

Kernels run on CPU tensors (float64, float32, float16, bfloat16) and, when the extension
was built with them, on CUDA tensors (float32, float16, bfloat16).  CUDA launches go to
the current stream of the tensor's device.  Weights whose dtype differs from the
activations are cast to the activation dtype (a differentiable cast).
"""

from __future__ import annotations

import functools
import re

import torch

from .. import _ext

SUPPORTS_ATTENTION_DROPOUT = False

_CPU_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# What this backend can run
# ------------------------------------------------------------------------------------------------


def availability() -> str | None:
    return _ext.unavailable_reason()


@functools.cache
def _arch_reason(archs: str, capability: tuple[int, int]) -> str | None:
    """Why kernels built for ``archs`` (e.g. "8.0;9.0+PTX") cannot run on ``capability``, or None."""
    major, minor = capability
    for arch in filter(None, re.split(r"[;,\s]+", archs)):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if match is None:
            continue
        built = (int(match[1]), int(match[2]))
        if match[4] and built <= capability:
            return None  # PTX is compiled for newer GPUs at load time
        if match[3] == "a" and built == capability:
            return None  # arch-specific code (sm_90a) runs on exactly that GPU
        if match[3] != "a" and built[0] == major and built[1] <= minor:
            return None  # a cubin (or family code, sm_120f) runs on later GPUs of the same major version
    return (
        f"bertfast._C has CUDA kernels for {archs!r}, none of which runs on this GPU (sm_{major}{minor}); "
        f"rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
    )


def _row_length(op: str, tensors) -> tuple[str, int] | None:
    """The row the CUDA row kernels keep in shared memory for ``op``, as (name, length)."""
    if op in ("layer_norm", "embedding_layer_norm"):
        return "hidden size", tensors[0].shape[-1]
    if op == "attention":
        return "key length", tensors[1].shape[1]
    return None


def unsupported(op: str, *tensors, **meta) -> str | None:
    built = _ext.facts()  # plain values: torch.compile traces this check without a call into the extension
    if built is None:
        return _ext.unavailable_reason()
    device = tensors[0].device
    if device.type == "cuda":
        if not built.has_cuda:
            return (
                "bertfast._C was built without CUDA kernels; rebuild it where torch has CUDA and nvcc is found "
                "(BERTFAST_CUDA=1 pip install -e . --no-build-isolation)"
            )
        reason = _arch_reason(built.cuda_archs, torch.cuda.get_device_capability(device))
        if reason is not None:
            return reason
        dtypes, where = _CUDA_DTYPES, "CUDA kernels"
    elif device.type == "cpu":
        dtypes, where = _CPU_DTYPES, "CPU kernels"
    else:
        return f"the ext backend runs on CPU or CUDA tensors, got {device}"
    for t in tensors:
        if t.dtype not in dtypes:
            return f"the ext {where} take {', '.join(str(d).replace('torch.', '') for d in dtypes)}; got {t.dtype}"
    row = _row_length(op, tensors)
    if device.type == "cuda" and row is not None and row[1] > built.cuda_max_row_elements:
        return f"the ext CUDA kernels take a {row[0]} of at most {built.cuda_max_row_elements}, got {row[1]}"
    return None


# ------------------------------------------------------------------------------------------------
# Argument checks, before any call into bertfast._C
# ------------------------------------------------------------------------------------------------
# Each op checks here what the binding checks (device, dtype, shape, the CUDA row limit, eps, ids
# in range, the mask): an error raised inside the extension must cross from C++ into Python, which
# killed the process on one GPU machine.  The binding's checks stay as the last line; contiguity
# needs no check, because every op passes contiguous tensors.


def _check_primary(fn: str, name: str, t: torch.Tensor) -> None:
    """The tensor that fixes the call's device and dtype."""
    if t.device.type == "cuda":
        built = _ext.facts()
        if built is not None and not built.has_cuda:
            raise ValueError(f"{fn}: {name} is on {t.device} but bertfast._C was built without CUDA kernels")
        dtypes, where = _CUDA_DTYPES, "CUDA kernels"
    elif t.device.type == "cpu":
        dtypes, where = _CPU_DTYPES, "CPU kernels"
    else:
        raise ValueError(f"{fn}: {name} must be a CPU or CUDA tensor, got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}; the ext {where} take {', '.join(map(str, dtypes))}")


def _check_like(fn: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def _check_shape(fn: str, name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_row(fn: str, what: str, length: int, primary: torch.Tensor) -> None:
    """The CUDA row kernels keep a row (hidden size, key length) in shared memory."""
    built = _ext.facts()
    if primary.is_cuda and built is not None and length > built.cuda_max_row_elements:
        raise ValueError(f"{fn}: {what} is {length}; the ext CUDA kernels take at most {built.cuda_max_row_elements}")


def _check_last_dim(fn: str, name: str, x: torch.Tensor) -> int:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn}: {name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    return x.shape[-1]


def _check_eps(fn: str, eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"{fn}: eps must be positive, got {eps}")


def _check_stats(fn: str, name: str, t: torch.Tensor, x: torch.Tensor, shape) -> None:
    if t.device != x.device or t.dtype != _stats_dtype(x.dtype):
        raise TypeError(f"{fn}: {name} must be {_stats_dtype(x.dtype)} on {x.device}, got {t.dtype} on {t.device}")
    _check_shape(fn, name, t, shape)


def _check_optional(fn: str, name: str, t: torch.Tensor | None, x: torch.Tensor, shape) -> None:
    if t is not None:
        _check_like(fn, name, t, "x", x)
        _check_shape(fn, name, t, shape)


def _check_layer_norm(fn, x, weight, residual, linear_bias, bias=None) -> int:
    _check_primary(fn, "x", x)
    hidden = _check_last_dim(fn, "x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_like(fn, name, t, "x", x)
            _check_shape(fn, name, t, (hidden,))
    _check_optional(fn, "residual", residual, x, x.shape)
    _check_optional(fn, "linear_bias", linear_bias, x, (hidden,))
    _check_row(fn, "x's last dimension (hidden)", hidden, x)
    return hidden


def _check_bias_gelu(fn, x, bias) -> None:
    _check_primary(fn, "x", x)
    hidden = _check_last_dim(fn, "x", x)
    _check_like(fn, "bias", bias, "x", x)
    _check_shape(fn, "bias", bias, (hidden,))
    if x.is_cuda and hidden > 2**31 - 1:  # the CUDA elementwise kernels index a row with a 32-bit int
        raise ValueError(f"{fn}: x's last dimension (hidden) is {hidden}; the ext CUDA kernels take at most 2**31 - 1")


def _check_embedding(fn, input_ids, position_ids, token_type_ids, word, position, token_type, weight) -> int:
    _check_primary(fn, "word_embeddings", word)
    if word.dim() != 2 or word.shape[1] < 1:
        raise ValueError(f"{fn}: word_embeddings must have shape (vocab, hidden), got {tuple(word.shape)}")
    hidden = word.shape[1]
    for name, table in (("position_embeddings", position), ("token_type_embeddings", token_type)):
        _check_like(fn, name, table, "word_embeddings", word)
        if table.dim() != 2 or table.shape[1] != hidden:
            raise ValueError(f"{fn}: {name} must have shape (rows, {hidden}), got {tuple(table.shape)}")
    _check_like(fn, "weight", weight, "word_embeddings", word)
    _check_shape(fn, "weight", weight, (hidden,))
    for name, ids, table in (
        ("input_ids", input_ids, word),
        ("position_ids", position_ids, position),
        ("token_type_ids", token_type_ids, token_type),
    ):
        if ids.dtype != torch.int64:
            raise TypeError(f"{fn}: {name} must have dtype torch.int64, got {ids.dtype}")
        if ids.device != word.device:
            raise ValueError(f"{fn}: {name} must be on the tables' device {word.device}, got {ids.device}")
        _check_shape(fn, name, ids, input_ids.shape)
        # On the CPU an id outside its table is an error; the CUDA kernels turn its row into NaN (no host read).
        if ids.device.type == "cpu" and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < table.shape[0]:
            raise ValueError(f"{fn}: {name} holds ids outside the table's rows [0, {table.shape[0]})")
    _check_row(fn, "the embedding width (hidden)", hidden, word)
    return hidden


def _check_softmax(fn, scores, mask, probs_name: str, probs_dtype: torch.dtype) -> None:
    _check_primary(fn, "scores", scores)
    dtypes = _CUDA_DTYPES if scores.is_cuda else _CPU_DTYPES
    if probs_dtype not in dtypes:
        raise TypeError(f"{fn}: {probs_name} has dtype {probs_dtype}; the ext kernels take {dtypes}")
    if scores.dtype != _stats_dtype(probs_dtype):
        raise TypeError(
            f"{fn}: scores must have dtype {_stats_dtype(probs_dtype)} for {probs_name} of dtype {probs_dtype}, "
            f"got {scores.dtype}"
        )
    if scores.dim() < 2:
        raise ValueError(f"{fn}: scores must have shape (batch, ..., seq_k), got {tuple(scores.shape)}")
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"{fn}: mask must have dtype torch.bool or torch.uint8, got {mask.dtype}")
        if mask.device != scores.device:
            raise ValueError(f"{fn}: mask must be on scores' device {scores.device}, got {mask.device}")
        _check_shape(fn, "mask", mask, (scores.shape[0], scores.shape[-1]))
    _check_row(fn, "scores' last dimension (seq_k)", scores.shape[-1], scores)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer (0 for CPU tensors)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# LayerNorm(x + linear_bias + residual)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("bertfast::ext_layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    linear_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, mean, rstd); mean and rstd (fp32, fp64 for fp64 inputs) are kept for the backward."""
    fn = "ext layer_norm"
    _check_layer_norm(fn, x, weight, residual, linear_bias, bias)
    _check_eps(fn, eps)
    return _ext.require().layer_norm_forward(
        x.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        _contiguous(residual),
        _contiguous(linear_bias),
        eps,
        _stream(x),
    )


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, linear_bias, eps):
    stats_shape, stats_dtype = x.shape[:-1], _stats_dtype(x.dtype)
    return (
        x.new_empty(x.shape),
        x.new_empty(stats_shape, dtype=stats_dtype),
        x.new_empty(stats_shape, dtype=stats_dtype),
    )


@torch.library.custom_op("bertfast::ext_layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    linear_bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias, dlinear_bias); dlinear_bias is empty when there is no linear_bias."""
    fn = "ext layer_norm backward"
    _check_layer_norm(fn, x, weight, residual, linear_bias)
    _check_like(fn, "dy", dy, "x", x)
    _check_shape(fn, "dy", dy, x.shape)
    _check_stats(fn, "mean", mean, x, x.shape[:-1])
    _check_stats(fn, "rstd", rstd, x, x.shape[:-1])
    dx, dweight, dbias, dlinear_bias = _ext.require().layer_norm_backward(
        dy.contiguous(),
        x.contiguous(),
        weight.contiguous(),
        _contiguous(residual),
        _contiguous(linear_bias),
        mean.contiguous(),
        rstd.contiguous(),
        _stream(x),
    )
    return dx, dweight, dbias, (x.new_empty(0) if dlinear_bias is None else dlinear_bias)


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, residual, linear_bias, mean, rstd):
    hidden = x.shape[-1]
    return (
        x.new_empty(x.shape),
        x.new_empty(hidden),
        x.new_empty(hidden),
        x.new_empty(hidden if linear_bias is not None else 0),
    )


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _bias, residual, linear_bias, _eps = inputs
    _y, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_linear_bias = linear_bias is not None
    ctx.save_for_backward(x, weight, residual, linear_bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, residual, linear_bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dlinear_bias = _layer_norm_backward_op(dy, x, weight, residual, linear_bias, mean, rstd)
    # h = x + linear_bias + residual, so the residual's gradient is dx itself.
    return (
        dx,
        dweight,
        dbias,
        dx if ctx.has_residual else None,
        dlinear_bias if ctx.has_linear_bias else None,
        None,
    )


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def layer_norm(x, weight, bias, eps, residual=None, linear_bias=None):
    if linear_bias is not None:
        linear_bias = linear_bias.to(x.dtype)  # the C++ kernels take one dtype
    y, _mean, _rstd = _layer_norm_op(x, weight.to(x.dtype), bias.to(x.dtype), residual, linear_bias, float(eps))
    return y


# ------------------------------------------------------------------------------------------------
# LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids])
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("bertfast::ext_embedding_layer_norm", mutates_args=())
def _embedding_layer_norm_op(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, mean, rstd); ids int64, the tables, weight and bias of one dtype."""
    fn = "ext embedding_layer_norm"
    hidden = _check_embedding(
        fn, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings, weight
    )
    _check_like(fn, "bias", bias, "word_embeddings", word_embeddings)
    _check_shape(fn, "bias", bias, (hidden,))
    _check_eps(fn, eps)
    return _ext.require().embedding_layer_norm_forward(
        input_ids.contiguous(),
        position_ids.contiguous(),
        token_type_ids.contiguous(),
        word_embeddings.contiguous(),
        position_embeddings.contiguous(),
        token_type_embeddings.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        eps,
        _stream(word_embeddings),
    )


@_embedding_layer_norm_op.register_fake
def _(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings, *rest):
    hidden, stats_dtype = word_embeddings.shape[1], _stats_dtype(word_embeddings.dtype)
    return (
        word_embeddings.new_empty((*input_ids.shape, hidden)),
        word_embeddings.new_empty(input_ids.shape, dtype=stats_dtype),
        word_embeddings.new_empty(input_ids.shape, dtype=stats_dtype),
    )


@torch.library.custom_op("bertfast::ext_embedding_layer_norm_backward", mutates_args=())
def _embedding_layer_norm_backward_op(
    dy: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dsum, dweight, dbias); dsum is the gradient of the summed embeddings."""
    fn = "ext embedding_layer_norm backward"
    hidden = _check_embedding(
        fn, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings, weight
    )
    _check_like(fn, "dy", dy, "word_embeddings", word_embeddings)
    _check_shape(fn, "dy", dy, (*input_ids.shape, hidden))
    _check_stats(fn, "mean", mean, word_embeddings, input_ids.shape)
    _check_stats(fn, "rstd", rstd, word_embeddings, input_ids.shape)
    return _ext.require().embedding_layer_norm_backward(
        dy.contiguous(),
        input_ids.contiguous(),
        position_ids.contiguous(),
        token_type_ids.contiguous(),
        word_embeddings.contiguous(),
        position_embeddings.contiguous(),
        token_type_embeddings.contiguous(),
        weight.contiguous(),
        mean.contiguous(),
        rstd.contiguous(),
        _stream(word_embeddings),
    )


@_embedding_layer_norm_backward_op.register_fake
def _(dy, input_ids, position_ids, token_type_ids, word_embeddings, *rest):
    hidden = word_embeddings.shape[1]
    return dy.new_empty(dy.shape), dy.new_empty(hidden), dy.new_empty(hidden)


def _embedding_setup_context(ctx, inputs, output):
    ids, position_ids, type_ids, word, position, token_type, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(ids, position_ids, type_ids, word, position, token_type, weight, mean, rstd)


def _embedding_backward(ctx, dy, _dmean, _drstd):
    ids, position_ids, type_ids, word, position, token_type, weight, mean, rstd = ctx.saved_tensors
    dsum, dweight, dbias = _embedding_layer_norm_backward_op(
        dy, ids, position_ids, type_ids, word, position, token_type, weight, mean, rstd
    )
    # Scatter-add dsum into each table (deterministic on CUDA: aten sorts the ids).
    table_grads = [
        torch.ops.aten.embedding_dense_backward(dsum, index, table.shape[0], -1, False)
        for index, table in ((ids, word), (position_ids, position), (type_ids, token_type))
    ]
    return (None, None, None, *table_grads, dweight, dbias, None)


_embedding_layer_norm_op.register_autograd(_embedding_backward, setup_context=_embedding_setup_context)


def embedding_layer_norm(
    input_ids,
    position_ids,
    token_type_ids,
    word_embeddings,
    position_embeddings,
    token_type_embeddings,
    weight,
    bias,
    eps,
):
    dtype = torch.promote_types(
        word_embeddings.dtype, torch.promote_types(position_embeddings.dtype, token_type_embeddings.dtype)
    )
    y, _mean, _rstd = _embedding_layer_norm_op(
        input_ids.long(),
        position_ids.long(),
        token_type_ids.long(),
        word_embeddings.to(dtype),
        position_embeddings.to(dtype),
        token_type_embeddings.to(dtype),
        weight.to(dtype),
        bias.to(dtype),
        float(eps),
    )
    return y


# ------------------------------------------------------------------------------------------------
# gelu_erf(x + bias)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("bertfast::ext_bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    _check_bias_gelu("ext bias_gelu", x, bias)
    return _ext.require().bias_gelu_forward(x.contiguous(), bias.contiguous(), _stream(x))


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bertfast::ext_bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, dbias)."""
    fn = "ext bias_gelu backward"
    _check_bias_gelu(fn, x, bias)
    _check_like(fn, "dy", dy, "x", x)
    _check_shape(fn, "dy", dy, x.shape)
    return _ext.require().bias_gelu_backward(dy.contiguous(), x.contiguous(), bias.contiguous(), _stream(x))


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), x.new_empty(bias.shape)


def _bias_gelu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_backward_op(dy, x, bias)


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


def bias_gelu(x, bias):
    return _bias_gelu_op(x, bias.to(x.dtype))


# ------------------------------------------------------------------------------------------------
# Attention: GEMM, masked softmax, GEMM
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("bertfast::ext_masked_softmax", mutates_args=())
def _masked_softmax_op(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, probs_dtype: torch.dtype
) -> torch.Tensor:
    """softmax(scores * scale) over the last dim -> probs of ``probs_dtype``; scores in its accumulation
    dtype (fp32, fp64 for fp64); mask (batch, seq_k), nonzero = keep."""
    _check_softmax("ext masked_softmax", scores, mask, "probs_dtype", probs_dtype)
    return _ext.require().masked_softmax_forward(
        scores.contiguous(), _contiguous(mask), scale, probs_dtype, _stream(scores)
    )


@_masked_softmax_op.register_fake
def _(scores, mask, scale, probs_dtype):
    return scores.new_empty(scores.shape, dtype=probs_dtype)


@torch.library.custom_op("bertfast::ext_masked_softmax_backward", mutates_args=())
def _masked_softmax_backward_op(
    dprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """-> dscores (the scores' dtype); the probabilities are recomputed from the scores in their dtype: rounded
    to fp16 they would lose the 1 - p of a dominant key, which every key's gradient depends on."""
    fn = "ext masked_softmax backward"
    _check_softmax(fn, scores, mask, "dprobs", dprobs.dtype)
    if dprobs.device != scores.device:
        raise ValueError(f"{fn}: dprobs must be on scores' device {scores.device}, got {dprobs.device}")
    _check_shape(fn, "dprobs", dprobs, scores.shape)
    return _ext.require().masked_softmax_backward(
        dprobs.contiguous(), scores.contiguous(), _contiguous(mask), scale, _stream(scores)
    )


@_masked_softmax_backward_op.register_fake
def _(dprobs, scores, mask, scale):
    return scores.new_empty(scores.shape)


def _masked_softmax_setup_context(ctx, inputs, output):
    scores, mask, scale, _probs_dtype = inputs
    ctx.scale = scale
    ctx.save_for_backward(scores, mask)


def _masked_softmax_backward(ctx, dprobs):
    scores, mask = ctx.saved_tensors
    return _masked_softmax_backward_op(dprobs, scores, mask, ctx.scale), None, None, None


_masked_softmax_op.register_autograd(_masked_softmax_backward, setup_context=_masked_softmax_setup_context)


def masked_softmax(scores, mask, scale, probs_dtype=None):
    """The extension's masked softmax on its own (used by :func:`attention`); mask nonzero = keep.
    Probabilities in ``probs_dtype`` (default: the scores' dtype); the scores are read in its
    accumulation dtype (fp32, fp64 for fp64), cast if needed, and their gradient has that dtype."""
    probs_dtype = scores.dtype if probs_dtype is None else probs_dtype
    if mask is not None and mask.dtype not in (torch.bool, torch.uint8):
        mask = mask != 0
    return _masked_softmax_op(scores.to(_stats_dtype(probs_dtype)), mask, float(scale), probs_dtype)


def attention(q, k, v, attention_mask, scale):
    """q, k, v: (batch, seq, heads, head_dim), possibly strided views; returns (batch, seq, heads, head_dim).

    For fp16/bf16 inputs the scores ``q @ k^T`` are formed and kept in fp32 up to the softmax,
    and so is their gradient: they can be large (q ~ 30, k ~ 40, head 64: scaled scores ~ 1e4)
    where fp16's spacing (8) or bf16's (64) would decide the softmax, and an unscaled fp16
    product would overflow (65504).  The probabilities are in the inputs' dtype, so the second
    product runs at the inputs' precision.
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    acc = _stats_dtype(q.dtype)
    scores = torch.matmul(qh.to(acc), kh.to(acc).transpose(-1, -2))
    probs = masked_softmax(scores, attention_mask, scale, q.dtype)
    return torch.matmul(probs, vh).transpose(1, 2)
