"""bertfast.ops: the only compute the model calls.

Each op checks its arguments once here (shapes and dtypes, independent of the backend),
then runs on the backend chosen by :mod:`bertfast.ops._dispatch`:

- ``backend=None`` or ``"auto"``: the best backend that can run these tensors;
- ``"reference"``: pure PyTorch, the yardstick every kernel is tested against;
- ``"triton"``: the Triton kernels in :mod:`bertfast.kernels`;
- ``"ext"``: the compiled C++/CUDA extension :mod:`bertfast._C`.

An explicit backend that cannot run the call raises :class:`bertfast.BackendUnavailable`.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailable, check_inference_only
from ..varlen import check_cu_seqlens
from ._dispatch import (
    AUTO_ORDER,
    BACKENDS,
    OPS,
    auto_backend_name,
    backend_availability,
    backend_capabilities,
    can_run,
    check_backend,
    explain,
    load_backends,
    resolve,
    validate_backend_name,
)

# Backends are imported here, once, so that torch.compile never has to trace an import.
load_backends()

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "OPS",
    "BackendUnavailable",
    "attention",
    "attention_varlen",
    "auto_backend_name",
    "backend_availability",
    "backend_capabilities",
    "bias_gelu",
    "bias_gelu_fp8",
    "can_run",
    "check_backend",
    "embedding_layer_norm",
    "explain",
    "layer_norm",
    "layer_norm_fp8",
    "mean_pool",
    "quantize_rows",
    "validate_backend_name",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def _check_dropout_p(dropout_p) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def layer_norm(
    x, weight, bias, eps: float = 1e-12, residual=None, linear_bias=None, dropout_p: float = 0.0, backend=None
):
    """``LayerNorm(dropout(x + linear_bias) + residual)`` over the last dimension.

    ``linear_bias`` (shape ``(hidden,)``) is the bias of the linear layer that produced
    ``x``, fused here so the GEMM can run without one; ``residual`` has ``x``'s shape.
    ``dropout_p``: hidden dropout (training) of the dense output ``x + linear_bias``, as in
    BERT's ``LN(dropout(dense(h)) + residual)``; the residual is not dropped.  Only backends
    that declare ``SUPPORTS_HIDDEN_DROPOUT`` run it.
    Statistics are computed in fp32 whatever the input dtype; output has ``x``'s dtype.
    """
    _check_dropout_p(dropout_p)
    _check_layer_norm_args(x, weight, bias, eps, residual, linear_bias)
    impl = resolve("layer_norm", backend, (x, weight, bias), dropout_p=dropout_p)
    if dropout_p > 0.0:
        return impl.layer_norm(x, weight, bias, float(eps), residual, linear_bias, dropout_p=float(dropout_p))
    return impl.layer_norm(x, weight, bias, float(eps), residual, linear_bias)


def _check_layer_norm_args(x, weight, bias, eps, residual, linear_bias) -> None:
    _check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    hidden = x.shape[-1]
    for name, t, shape in (("weight", weight, (hidden,)), ("bias", bias, (hidden,))):
        _check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if linear_bias is not None:
        _check_float("linear_bias", linear_bias)
        _check_same("linear_bias", linear_bias, "x", x)
        if tuple(linear_bias.shape) != (hidden,):
            raise ValueError(f"linear_bias must have shape ({hidden},), got {tuple(linear_bias.shape)}")
    if residual is not None:
        _check_float("residual", residual)
        _check_same("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"weight and bias must be on x's device {x.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def layer_norm_fp8(x, weight, bias, eps: float = 1e-12, residual=None, linear_bias=None, backend=None):
    """``(y, q, scale)``: :func:`layer_norm` without dropout (inference), ``y`` in ``x``'s dtype, and
    its fp32 result quantized per row to FP8 e4m3 as :func:`quantize_rows` does (from fp32, not from
    the rounded ``y``): the input of the next FP8 GEMM.  Inference only: inputs that require grad
    are refused while grad mode is on.
    """
    _check_layer_norm_args(x, weight, bias, eps, residual, linear_bias)
    check_inference_only("layer_norm_fp8", x, weight, bias, residual, linear_bias)
    impl = resolve("layer_norm_fp8", backend, (x, weight, bias))
    return impl.layer_norm_fp8(x, weight, bias, float(eps), residual, linear_bias)


def _check_bias_gelu_args(x, bias) -> None:
    _check_float("x", x)
    _check_float("bias", bias)
    _check_same("bias", bias, "x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")


def bias_gelu(x, bias, backend=None):
    """``gelu_erf(x + bias)`` with ``bias`` of shape ``(x.shape[-1],)``."""
    _check_bias_gelu_args(x, bias)
    impl = resolve("bias_gelu", backend, (x, bias))
    return impl.bias_gelu(x, bias)


def bias_gelu_fp8(x, bias, backend=None):
    """``(q, scale)``: ``gelu_erf(x + bias)`` computed in fp32 and quantized per row to FP8 e4m3 as
    :func:`quantize_rows` does (no output in ``x``'s dtype).  Inference only."""
    _check_bias_gelu_args(x, bias)
    check_inference_only("bias_gelu_fp8", x, bias)
    impl = resolve("bias_gelu_fp8", backend, (x, bias))
    return impl.bias_gelu_fp8(x, bias)


def quantize_rows(x, backend=None):
    """``(q, scale)``: ``x`` (..., K) quantized per row to FP8 e4m3 (``torch.float8_e4m3fn``, ``x``'s
    shape) with one fp32 scale per row (shape ``(..., 1)``), ``q * scale ~ x``::

        amax = max |x| per row;  scale = amax / 448;  q = e4m3(clamp(x * (448 / amax), -448, 448))

    rounded to nearest even, computed in fp32 (a row of zeros gets scale 1).  The row-wise scaled
    input of ``torch._scaled_mm``.  Inference only: an input that requires grad is refused while
    grad mode is on.
    """
    _check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_inference_only("quantize_rows", x)
    impl = resolve("quantize_rows", backend, (x,))
    return impl.quantize_rows(x)


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {t.stride()}")
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in heads and head_dim")


def _default_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    return float(scale)


def attention(q, k, v, attention_mask=None, scale=None, dropout_p: float = 0.0, backend=None):
    """Softmax attention with a key-padding mask.

    ``q, k, v``: ``(batch, seq, heads, head_dim)``; strided views into one fused QKV
    projection are accepted without a copy (only ``head_dim`` must be contiguous).
    ``attention_mask``: ``(batch, seq)``, nonzero = token, 0 = padding.  Masked keys get
    probability exactly 0; a query whose keys are all padding gets a zero output.
    ``dropout_p``: attention-probability dropout (training); only backends that declare
    ``SUPPORTS_ATTENTION_DROPOUT`` run it.
    Returns ``(batch, seq, heads, head_dim)`` in ``q``'s dtype.
    """
    _check_dropout_p(dropout_p)
    _check_qkv(q, k, v, 4, "(batch, seq, heads, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                f"attention_mask must have shape (batch, seq) = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
    impl = resolve("attention", backend, (q, k, v), dropout_p=dropout_p)
    scale = _default_scale(scale, q.shape[-1])
    if dropout_p > 0.0:
        return impl.attention(q, k, v, attention_mask, scale, dropout_p=float(dropout_p))
    return impl.attention(q, k, v, attention_mask, scale)


def _check_offsets(cu_seqlens, name: str, like: torch.Tensor) -> None:
    """Type, rank and device of a ``cu_seqlens`` argument (its values: :func:`check_cu_seqlens`)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be a 1-D torch.int32 tensor of cumulative sequence offsets")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if cu_seqlens.device != like.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {like.device}")


def attention_varlen(
    q, k, v, cu_seqlens, max_seqlen: int, scale=None, dropout_p: float = 0.0, backend=None, check: bool = True
):
    """Attention over packed variable-length sequences.

    ``q, k, v``: ``(total_tokens, heads, head_dim)``; ``cu_seqlens``: int32 ``(batch + 1,)``
    cumulative offsets starting at 0, non-decreasing and ending at ``total_tokens``; sequence
    ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only within itself.
    ``max_seqlen`` is at least the longest length (it sizes the launch grid).
    ``dropout_p``: attention-probability dropout, as in :func:`attention`.
    ``check``: read ``cu_seqlens`` back to the host once (on a GPU, a synchronisation) and
    raise ``ValueError`` naming the problem when the offsets or ``max_seqlen`` break the
    contract above (see :mod:`bertfast.varlen`); the kernels trust them, and bad ones read
    or write out of bounds.  Pass ``False`` only for offsets built by code that guarantees
    them (the padding-free model path, with :func:`bertfast.padding.pack_mask`).  Nothing is
    checked while ``torch.compile`` traces.
    """
    _check_dropout_p(dropout_p)
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same number of tokens, got {q.shape[0]} and {k.shape[0]}")
    _check_offsets(cu_seqlens, "q", q)
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if check:
        check_cu_seqlens(cu_seqlens, q.shape[0], int(max_seqlen))
    impl = resolve("attention_varlen", backend, (q, k, v), dropout_p=dropout_p)
    scale = _default_scale(scale, q.shape[-1])
    # Checked above (or vouched for by the caller): the backends do not read the offsets again.
    if dropout_p > 0.0:
        return impl.attention_varlen(q, k, v, cu_seqlens, int(max_seqlen), scale, dropout_p=float(dropout_p))
    return impl.attention_varlen(q, k, v, cu_seqlens, int(max_seqlen), scale)


def embedding_layer_norm(
    input_ids,
    position_ids,
    token_type_ids,
    word_embeddings,
    position_embeddings,
    token_type_embeddings,
    weight,
    bias,
    eps: float = 1e-12,
    backend=None,
):
    """``LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids])``.

    All three index tensors have the same shape (e.g. ``(batch, seq)``) and an integer
    dtype; the ids must be in range (the model checks them).  Returns ``ids.shape + (hidden,)``.
    """
    for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    hidden = word_embeddings.shape[-1]
    for name, t in (
        ("word_embeddings", word_embeddings),
        ("position_embeddings", position_embeddings),
        ("token_type_embeddings", token_type_embeddings),
    ):
        _check_float(name, t)
        if t.dim() != 2 or t.shape[1] != hidden:
            raise ValueError(f"{name} must have shape (rows, {hidden}), got {tuple(t.shape)}")
    impl = resolve("embedding_layer_norm", backend, (word_embeddings, weight, bias))
    return impl.embedding_layer_norm(
        input_ids,
        position_ids,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        weight,
        bias,
        float(eps),
    )


def mean_pool(x, cu_seqlens, normalize: bool = False, backend=None, check: bool = True):
    """Each packed sequence's mean token, L2-normalised when ``normalize``: sentence-transformers'
    mean ``Pooling`` (then ``Normalize``) over a padding-free encoder's output.

    ``x``: ``(total_tokens, hidden)``; ``cu_seqlens``: int32 ``(batch + 1,)`` offsets, as for
    :func:`attention_varlen` (``check``: validated with one host read).  Returns
    ``(batch, hidden)`` in ``x``'s dtype (sums and norms in fp32); an empty sequence gives
    zeros.  Normalisation divides by ``max(norm, 1e-12)``, as ``F.normalize`` does.
    """
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (total_tokens, hidden), got {tuple(x.shape)}")
    _check_offsets(cu_seqlens, "x", x)
    if check:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[0])
    impl = resolve("mean_pool", backend, (x, cu_seqlens))
    return impl.mean_pool(x, cu_seqlens, bool(normalize))
