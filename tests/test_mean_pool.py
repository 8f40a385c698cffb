"""The Triton mean pooling over packed sequences (kernels/mean_pool.py) against the float64 reference.

Runs on a GPU when there is one, else in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bertfast.kernels import mean_pool  # noqa: E402

import bertfast.ops as ops  # noqa: E402
from bertfast import BackendUnavailable  # noqa: E402
from bertfast.numerics import assert_close  # noqa: E402
from bertfast.ops import reference  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"

# Ragged batches: an empty sequence, single tokens, prime and odd lengths.
LENGTHS = [[5, 0, 1, 33, 7], [130], [1, 1, 1], [0, 0, 9], [257, 2]]


def offsets(lengths) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(DEVICE)


def make_inputs(lengths, hidden, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(sum(lengths), hidden, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
    dy = torch.randn(len(lengths), hidden, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return x, offsets(lengths), dy


def run(fn, x, cu, dy, normalize, cast=None):
    """``(y, dx)`` of ``fn``; ``cast``: run on a copy of ``x`` in that dtype."""
    x = (x.detach().to(cast) if cast is not None else x.detach()).requires_grad_()
    y = fn(x, cu, normalize)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad


def torch_lowp(x, cu, normalize):
    """PyTorch's own segment mean (and F.normalize) at the input's precision.  F.normalize's eps (1e-12)
    underflows to 0 in fp16, so an empty sequence's zero mean would give NaN: the smallest normal instead."""
    lengths = (cu[1:] - cu[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    mean = x.new_zeros((lengths.numel(), x.shape[1])).index_add(0, rows, x) / lengths.clamp(min=1)[:, None].to(x.dtype)
    return F.normalize(mean, dim=-1, eps=torch.finfo(x.dtype).tiny) if normalize else mean


def check(x, cu, dy, normalize):
    y, dx = run(mean_pool.mean_pool, x, cu, dy, normalize)
    y64, dx64 = run(reference.mean_pool, x, cu, dy, normalize, cast=torch.float64)
    lowp = run(torch_lowp, x, cu, dy, normalize) if x.dtype != torch.float32 else (None, None)
    assert y.dtype == dx.dtype == x.dtype and y.shape == (cu.numel() - 1, x.shape[1]) and dx.shape == x.shape
    assert_close(y, y64, torch_lowp=lowp[0], name="y")
    assert_close(dx, dx64, direction="backward", torch_lowp=lowp[1], name="dx")


@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "mean+l2"])
@pytest.mark.parametrize("hidden", [384, 1000, 1024, 37])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_fp32_matches_float64_reference(lengths, hidden, normalize):
    check(*make_inputs(lengths, hidden, torch.float32), normalize)


@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "mean+l2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(dtype, normalize):
    check(*make_inputs([33, 0, 130, 1], 1000, dtype, seed=1), normalize)


def test_strided_rows_and_gradient():
    """x a row-strided slice of a wider buffer (a packed QKV's columns, say), dy strided too."""
    lengths = [7, 0, 33]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1100, generator=gen).to(DEVICE)[:, 50:1050]
    dy = torch.randn(3, 2000, generator=gen).to(DEVICE)[:, ::2]
    assert not x.is_contiguous() and dy.stride(-1) == 2
    for normalize in (False, True):
        check(x, offsets(lengths), dy, normalize)


def test_gpu_launch_configs(monkeypatch):
    """The GPU tile shapes (16 x 512 at hidden 384) give the same answer."""
    monkeypatch.setattr(mean_pool, "_config", lambda x: mean_pool.launch_config(x.shape[-1], gpu=True))
    assert mean_pool.launch_config(384, gpu=True)[:2] == (16, 512)
    check(*make_inputs([40, 3, 0, 17], 384, torch.float32, seed=3), True)


def test_a_zero_mean_normalizes_to_zero_with_finite_gradients():
    """F.normalize's clamp: a mean below eps (an empty sequence, or tokens that cancel) gives 0, not NaN."""
    x = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [3.0, 4.0]], device=DEVICE)
    cu = offsets([2, 0, 1])
    y = mean_pool.mean_pool(x, cu, True)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.6, 0.8]], device=DEVICE))
    check(x, cu, torch.randn(3, 2, device=DEVICE), True)


def test_matches_sentence_transformers_pooling_on_the_padded_batch():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    lengths, hidden = [5, 1, 12], 48
    x, cu, _ = make_inputs(lengths, hidden, torch.float32, seed=4)
    keep = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    padded = x.new_zeros(len(lengths), max(lengths), hidden)
    padded[keep.to(DEVICE)] = x
    features = {"token_embeddings": padded, "attention_mask": keep.long().to(DEVICE)}
    pooled = Pooling(hidden, pooling_mode="mean")(features)
    expected = Normalize()(pooled)["sentence_embedding"]
    torch.testing.assert_close(mean_pool.mean_pool(x, cu, True), expected, rtol=1e-6, atol=1e-6)


def test_opcheck():
    x, cu, dy = make_inputs([3, 0, 5], 16, torch.float32)
    for normalize in (False, True):
        torch.library.opcheck(torch.ops.bertfast.mean_pool_fwd.default, (x.requires_grad_(), cu, normalize))
        y, mean = torch.ops.bertfast.mean_pool_fwd(x.detach(), cu, normalize)
        torch.library.opcheck(torch.ops.bertfast.mean_pool_bwd.default, (dy, mean, cu, x.detach(), normalize))


def test_torch_compile_traces_without_graph_breaks():
    x, cu, dy = make_inputs([4, 9, 1], 48, torch.float32, seed=5)

    def pooled(x, cu, normalize):
        return mean_pool.mean_pool(x * 0.5, cu, normalize) * 3.0

    compiled = torch.compile(pooled, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(run(pooled, x, cu, dy, True), run(compiled, x, cu, dy, True)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_public_op_on_each_backend_checks_its_offsets():
    x, cu, dy = make_inputs([6, 2], 40, torch.float32, seed=6)
    y64, dx64 = run(reference.mean_pool, x, cu, dy, True, cast=torch.float64)
    for backend in ("reference", "triton"):
        y, dx = run(functools.partial(ops.mean_pool, backend=backend), x, cu, dy, True)
        assert_close(y, y64, name=f"y ({backend})")
        assert_close(dx, dx64, direction="backward", name=f"dx ({backend})")
    with pytest.raises(ValueError, match="must end at the number of packed tokens 8"):
        ops.mean_pool(x, offsets([6, 1]))
    with pytest.raises(TypeError, match="int32"):
        ops.mean_pool(x, cu.long())
    with pytest.raises(ValueError, match=r"\(total_tokens, hidden\)"):
        ops.mean_pool(x[None], cu)


def test_unsupported_explains_why():
    x, cu, _ = make_inputs([2], 8, torch.float32)
    assert mean_pool.unsupported(x, cu) is None
    assert "float64" in mean_pool.unsupported(x.double(), cu)
    with pytest.raises(BackendUnavailable, match="float64"):
        ops.mean_pool(x.double(), cu, backend="triton")
    with pytest.raises(BackendUnavailable, match="does not implement mean_pool"):
        ops.mean_pool(x, cu, backend="ext")
