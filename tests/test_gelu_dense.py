"""The FFN's ``gelu(h + bias) @ W^T`` autograd function (bertfast.layers.GeluDense) against float64.

It keeps the pre-activation ``h`` and recomputes the GELU in its backward; every gradient
(``h``, ``bias``, ``W``) is checked, with the output read by a consumer that is not a plain
sum, on odd shapes, on the reference and Triton backends, in fp32 and (elementwise only, as
the Triton interpreter allows) in bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bertfast
from bertfast.layers import GeluDense
from bertfast.numerics import assert_close
from bertfast.ops import reference


def _bias_gelu(backend: str):
    probe = torch.empty(1, 8)
    if not bertfast.ops.can_run("bias_gelu", backend, (probe, probe[0])):
        pytest.skip(f"backend {backend!r} cannot run bias_gelu here")
    return lambda x, bias: bertfast.ops.bias_gelu(x, bias, backend=backend)


def _inputs(shape, out_features: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2.0
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64) * 0.5
    weight = torch.randn(out_features, shape[-1], generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
    probe = torch.randn(*shape[:-1], out_features, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (h, bias, weight)], probe


def _consumer(y, probe):
    """A loss whose gradient differs per element (a plain sum would hide a transposed dW)."""
    return (y * probe.to(y.dtype)).sum() + 0.5 * y.float().square().sum()


def _gradients(fn, tensors, probe, cast=None, requires=(True, True, True)):
    leaves = [
        (t.detach().to(cast) if cast is not None else t.detach()).requires_grad_(r) for t, r in zip(tensors, requires)
    ]
    y = fn(*leaves)
    _consumer(y, probe).backward()
    return y.detach(), [t.grad for t in leaves]


def _plain(h, bias, weight):
    return F.linear(reference.bias_gelu(h, bias), weight)


SHAPES = [((33, 37), 19), ((2, 5, 64), 24), ((1, 130), 7)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape,out_features", SHAPES)
def test_fp32_matches_float64(backend, shape, out_features):
    bias_gelu = _bias_gelu(backend)
    tensors, probe = _inputs(shape, out_features, torch.float32, seed=0)
    y, grads = _gradients(lambda *t: GeluDense.apply(*t, bias_gelu), tensors, probe)
    y64, grads64 = _gradients(_plain, tensors, probe, cast=torch.float64)
    assert_close(y, y64, name="y")
    for name, got, want in zip(("dh", "dbias", "dweight"), grads, grads64):
        assert got.dtype == torch.float32
        assert_close(got, want, direction="backward", name=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_pytorch_error(backend, dtype):
    bias_gelu = _bias_gelu(backend)
    tensors, probe = _inputs((33, 37), 19, dtype, seed=1)
    y, grads = _gradients(lambda *t: GeluDense.apply(*t, bias_gelu), tensors, probe)
    y64, grads64 = _gradients(_plain, tensors, probe, cast=torch.float64)
    lowp_y, lowp_grads = _gradients(lambda h, b, w: F.linear(F.gelu(h + b), w), tensors, probe)
    assert_close(y, y64, torch_lowp=lowp_y, name="y")
    for name, got, want, lowp in zip(("dh", "dbias", "dweight"), grads, grads64, lowp_grads):
        assert got.dtype == dtype
        assert_close(got, want, direction="backward", torch_lowp=lowp, name=name)


@pytest.mark.parametrize("requires", [(False, True, True), (True, False, False), (False, False, True)])
def test_only_the_gradients_asked_for(requires):
    """Each input may be frozen: the others' gradients are unchanged, a frozen one gets none."""
    bias_gelu = _bias_gelu("reference")
    tensors, probe = _inputs((9, 11), 5, torch.float32, seed=2)
    _, grads = _gradients(lambda *t: GeluDense.apply(*t, bias_gelu), tensors, probe, requires=requires)
    _, full = _gradients(lambda *t: GeluDense.apply(*t, bias_gelu), tensors, probe)
    for needed, got, want in zip(requires, grads, full):
        assert (got is None) == (not needed)
        if needed:
            assert torch.equal(got, want)


def test_weight_in_another_dtype_gets_its_gradient_in_its_own():
    """Autocast's layout: bf16 activations, an fp32 weight used in bf16, its gradient back in fp32."""
    bias_gelu = _bias_gelu("reference")
    (h, bias, weight), probe = _inputs((8, 16), 4, torch.bfloat16, seed=3)
    weight = weight.float().requires_grad_()
    h, bias = h.requires_grad_(), bias.requires_grad_()
    y = GeluDense.apply(h, bias, weight, bias_gelu)
    assert y.dtype == torch.bfloat16
    _consumer(y, probe).backward()
    assert weight.grad.dtype == torch.float32 and h.grad.dtype == bias.grad.dtype == torch.bfloat16


def test_training_layer_runs_gelu_dense():
    """A training forward records the FFN as one GeluDense node (no per-layer checkpoint wrapper)."""
    config = bertfast.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40
    )
    model = bertfast.BertModel(config, backend="reference").train()
    ids = torch.randint(0, 30, (2, 5))
    out = model(ids).last_hidden_state
    nodes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert sum(type(node).__name__ == "GeluDenseBackward" for node in nodes) == 1
