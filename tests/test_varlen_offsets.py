"""``cu_seqlens`` and ``max_seqlen`` are checked before any varlen kernel trusts them.

Bad offsets used to return uninitialised memory (offsets short of the token count), wrong
results (not starting at 0, decreasing, ``max_seqlen`` too small) or abort the process
(an offset past the token count, on Triton).  ``bertfast.ops.attention_varlen`` and the
Triton launcher now raise ``ValueError`` naming the problem; ``check=False`` skips the host
read for offsets the caller built itself.  The ext backend has no varlen attention.
"""

from __future__ import annotations

import pytest
import torch
from bertfast.kernels import attention as kernel

import bertfast
import bertfast.ops
from bertfast.numerics import assert_close
from bertfast.varlen import check_cu_seqlens

from .helpers import small_config, triton_device

HEADS, HEAD_DIM, TOTAL = 2, 16, 10
GOOD = ([0, 4, 10], 6)

# (offsets, max_seqlen, message): each breaks one rule of the contract, with TOTAL tokens.
BAD = {
    "short-of-total": ([0, 4, 8], 6, "last offset 8 stops short of it"),
    "past-total": ([0, 4, 12], 8, "last offset 12 runs past it"),
    "decreasing": ([0, 6, 4, 10], 6, r"non-decreasing, got cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 6"),
    "not-from-0": ([2, 6, 10], 4, r"start at 0, got cu_seqlens\[0\] = 2"),
    "max_seqlen-too-small": ([0, 4, 10], 5, r"max_seqlen \(5\) must be at least the longest sequence: sequence 1"),
}

TRITON = triton_device()
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param(
        "triton", TRITON, id="triton", marks=pytest.mark.skipif(TRITON is None, reason="no GPU and no interpreter")
    ),
]


def qkv(device: str):
    gen = torch.Generator().manual_seed(5)
    packed = torch.randn(TOTAL, 3, HEADS, HEAD_DIM, generator=gen).to(device)
    return packed.unbind(1)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_offsets_raise_before_any_kernel(backend, device, case):
    offsets, max_seqlen, message = BAD[case]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=message):
        bertfast.ops.attention_varlen(*qkv(device), cu_seqlens, max_seqlen, backend=backend)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_good_offsets_with_and_without_the_check(backend, device):
    cu_seqlens = torch.tensor(GOOD[0], dtype=torch.int32, device=device)
    q, k, v = qkv(device)
    checked = bertfast.ops.attention_varlen(q, k, v, cu_seqlens, GOOD[1], backend=backend)
    trusted = bertfast.ops.attention_varlen(q, k, v, cu_seqlens, GOOD[1], backend=backend, check=False)
    assert torch.equal(checked, trusted)
    ref = bertfast.ops.attention_varlen(
        *(t.double().cpu() for t in (q, k, v)), cu_seqlens.cpu(), GOOD[1], backend="reference"
    )
    assert_close(checked.cpu(), ref)
    # A max_seqlen above the longest sequence only sizes the grid.
    wider = bertfast.ops.attention_varlen(q, k, v, cu_seqlens, GOOD[1] + 3, backend=backend)
    assert_close(wider.cpu(), ref)


@pytest.mark.skipif(TRITON is None, reason="no GPU and no interpreter")
@pytest.mark.parametrize("case", sorted(BAD))
def test_triton_launcher_checks_offsets(case):
    from bertfast.kernels import attention as kernel

    offsets, max_seqlen, message = BAD[case]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=TRITON)
    with pytest.raises(ValueError, match=message):
        kernel.attention_varlen(*qkv(TRITON), cu_seqlens, max_seqlen, HEAD_DIM**-0.5)


def test_ext_has_no_varlen_attention():
    """Nothing to check on ext: it declares no varlen op, so dispatch never hands it offsets."""
    assert "attention_varlen" not in bertfast.ops.backend_capabilities("ext")["ops"]


def test_check_cu_seqlens_accepts_the_edge_cases():
    check_cu_seqlens(torch.tensor([0], dtype=torch.int32), 0, 0)  # an empty batch
    check_cu_seqlens(torch.tensor([0, 0, 3, 3], dtype=torch.int32), 3, 3)  # empty sequences
    with pytest.raises(ValueError, match="at least one offset"):
        check_cu_seqlens(torch.tensor([], dtype=torch.int32), 0, 0)


def test_the_model_never_reads_its_own_offsets_back_per_layer(monkeypatch):
    """The padding-free model built cu_seqlens itself: no per-layer host read (a GPU sync each) to check them."""
    reads = []
    for module in (bertfast.ops, kernel):
        monkeypatch.setattr(module, "check_cu_seqlens", lambda *args: reads.append(args))
    device = triton_device()
    model = bertfast.BertModel(small_config(num_hidden_layers=2), backend="triton").to(device).eval()
    ids = torch.randint(1, 50, (2, 9)).to(device)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5]).to(device)
    out = model(ids, mask)
    assert out.packed is not None, "the padded batch should run padding-free"
    assert reads == []
    bertfast.ops.attention_varlen(*(out.packed_last_hidden_state.new_zeros(3, 2, 8) for _ in range(3)),
                                  torch.tensor([0, 3], dtype=torch.int32, device=device), 3)  # fmt: skip
    assert len(reads) == 1  # a direct caller's offsets are checked
