"""The Triton backend: adapts :mod:`bertfast.kernels` to the op contract.

Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) — the interpreter is for tests.
"""

from __future__ import annotations

import functools
import os

import torch

# The kernels draw their dropout masks with philox, seeded from torch's default generator.
SUPPORTS_ATTENTION_DROPOUT = True
SUPPORTS_HIDDEN_DROPOUT = True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if interpreter_on():
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on the CPU)"
    return None


def _device_reason(t: torch.Tensor) -> str | None:
    if interpreter_on():
        if t.device.type != "cpu":
            return f"Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors, got {t.device}"
        return None
    if t.device.type != "cuda":
        return f"the Triton kernels need CUDA tensors, got {t.device}"
    return None


# The ops that write FP8 (e4m3) activations for FP8 GEMMs (inference).
FP8_OPS = ("quantize_rows", "layer_norm_fp8", "bias_gelu_fp8")
FP8_MIN_CAPABILITY = (8, 9)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _fp8_reason(t: torch.Tensor) -> str | None:
    """Triton compiles e4m3 (``float8e4nv``) only for sm_89+; the interpreter converts it anywhere."""
    if t.device.type != "cuda" or interpreter_on():
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"FP8 e4m3 needs Ada or Hopper (sm_89+), got sm_{major}{minor} on {t.device}"
    return None


def unsupported(op: str, *tensors, **meta) -> str | None:
    first = tensors[0]
    reason = _device_reason(first)
    if reason is not None:
        return reason
    if op in FP8_OPS:
        reason = _fp8_reason(first)
        if reason is not None:
            return reason
        if op == "quantize_rows":
            from ..kernels import quantize_rows as kernel
        elif op == "bias_gelu_fp8":
            from ..kernels import bias_gelu

            return bias_gelu.unsupported_fp8(*tensors)
        else:
            from ..kernels import layer_norm as kernel
        return kernel.unsupported(*tensors)
    if op.startswith("attention"):
        from ..kernels import attention as kernel
    elif op == "bias_gelu":
        from ..kernels import bias_gelu as kernel
    elif op == "mean_pool":
        from ..kernels import mean_pool as kernel
    else:  # layer_norm and embedding_layer_norm both end in the LayerNorm kernel
        from ..kernels import layer_norm as kernel
    return kernel.unsupported(*tensors)


def layer_norm(x, weight, bias, eps, residual=None, linear_bias=None, dropout_p=0.0, seed=None):
    from ..kernels.layer_norm import layer_norm as kernel

    return kernel(x, weight, bias, eps, residual, linear_bias, dropout_p, seed)


def bias_gelu(x, bias):
    from ..kernels.bias_gelu import bias_gelu as kernel

    return kernel(x, bias)


def attention(q, k, v, attention_mask, scale, dropout_p=0.0, seed=None):
    from ..kernels.attention import attention as kernel

    return kernel(q, k, v, attention_mask, scale, dropout_p, seed)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    from ..kernels.attention import attention_varlen as kernel

    # bertfast.ops.attention_varlen has checked the offsets (or its caller vouched for them).
    return kernel(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, check=False, seed=seed)


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
    # The gathers are memory-bound copies PyTorch does well; the sum of the third table
    # and the normalisation are fused in the LayerNorm kernel (as its residual input).
    words = torch.nn.functional.embedding(input_ids, word_embeddings)
    words = words + torch.nn.functional.embedding(token_type_ids, token_type_embeddings)
    positions = torch.nn.functional.embedding(position_ids, position_embeddings)
    return layer_norm(words, weight, bias, eps, residual=positions)


def attention_qkv(qkv, attention_mask, scale, dropout_p=0.0, seed=None):
    from ..kernels.attention import attention_qkv as kernel

    return kernel(qkv, attention_mask, scale, dropout_p, seed)


def attention_varlen_qkv(qkv, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    from ..kernels.attention import attention_varlen_qkv as kernel

    # Only the model calls this, with offsets it built itself: no host read of them per layer.
    return kernel(qkv, cu_seqlens, max_seqlen, scale, dropout_p, check=False, seed=seed)


def mean_pool(x, cu_seqlens, normalize=False):
    from ..kernels.mean_pool import mean_pool as kernel

    return kernel(x, cu_seqlens, normalize)


def quantize_rows(x):
    from ..kernels.quantize_rows import quantize_rows as kernel

    return kernel(x)


def layer_norm_fp8(x, weight, bias, eps, residual=None, linear_bias=None):
    from ..kernels.layer_norm import layer_norm_fp8 as kernel

    return kernel(x, weight, bias, eps, residual, linear_bias)


def bias_gelu_fp8(x, bias):
    from ..kernels.bias_gelu import bias_gelu_fp8 as kernel

    return kernel(x, bias)
