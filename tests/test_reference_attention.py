"""The reference padding-free attention runs a whole batch in a few large ops and equals the
per-sequence loop it replaced: outputs and every gradient, in float64, fp32 and bf16."""

import pytest
import torch

from bertfast.ops import reference

from .helpers import OpNames


def per_sequence_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    """The former reference: one attention call per sequence, rows outside every sequence 0."""
    out = torch.zeros_like(q)
    offsets = cu_seqlens.tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))
            probs = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
            out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


def attend_with_grads(attend, q, k, v, cu_seqlens, max_seqlen, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, cu_seqlens, max_seqlen, 0.3)
    out.backward(grad_out)
    return [out.detach()] + [leaf.grad for leaf in leaves]


CASES = {
    "mixed": ([5, 0, 1, 33, 17], 33),
    "one-token": ([1], 1),
    "wider-max": ([4, 9], 16),  # a bucket's max_seqlen above the longest sequence
    "empty-ends": ([0, 3, 0], 3),
    "many": ([9, 9, 9, 2, 0, 9], 9),
}


@pytest.mark.parametrize("layout", ["block-diagonal", "padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_batched_equals_per_sequence(case, dtype, layout, monkeypatch):
    monkeypatch.setattr(reference, "_block_diagonal", lambda *sizes: layout == "block-diagonal")
    lengths, max_seqlen = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    total, heads, head_dim = sum(lengths), 3, 8
    q, k, v, grad_out = (torch.randn(total, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(4))
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    expected = attend_with_grads(per_sequence_attention, q, k, v, cu_seqlens, max_seqlen, grad_out)
    got = attend_with_grads(
        reference.attention_varlen, *(t.to(dtype) for t in (q, k, v)), cu_seqlens, max_seqlen, grad_out.to(dtype)
    )
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert g.dtype == dtype
        # relative, except where the true gradient is 0 (dq of a one-token softmax): there fused SDPA leaves rounding
        err = (g.double() - e).norm() / e.norm().clamp(min=1.0)
        assert err <= tol, f"{name}: relative error {err:.2e}"


def test_layout_follows_the_score_count():
    assert reference._block_diagonal(total=14, sequences=2, max_seqlen=8)  # 196 <= 256 scores
    assert not reference._block_diagonal(total=38, sequences=6, max_seqlen=9)  # 1444 > 972


@pytest.mark.parametrize("layout", ["block-diagonal", "padded"])
def test_op_count_does_not_grow_with_sequences(layout, monkeypatch):
    """A batch is a fixed number of ops with no host read, not a loop over its sequences."""
    monkeypatch.setattr(reference, "_block_diagonal", lambda *sizes: layout == "block-diagonal")
    counts = []
    for sequences in (2, 40):
        q = torch.randn(3 * sequences, 2, 4)
        cu_seqlens = torch.arange(0, 3 * sequences + 1, 3, dtype=torch.int32)
        with OpNames() as counter:
            reference.attention_varlen(q, q, q, cu_seqlens, 3, 0.5)
        assert not {"_local_scalar_dense", "item", "nonzero"} & set(counter.ops), counter.ops
        counts.append(len(counter.ops))
    assert counts[0] == counts[1]
