"""The fused Triton attention kernels (kernels/attention.py) against the float64 reference.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors (bf16 is
skipped there: the interpreter cannot multiply bf16 tiles).  Every input is a strided view
of one fused QKV buffer, as the model produces them, and gradients are read from that buffer.
"""

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from bertfast.kernels import attention as kernel  # noqa: E402

import bertfast.ops  # noqa: E402
from bertfast.errors import BackendUnavailable  # noqa: E402
from bertfast.numerics import FP32_REL_TOL, assert_close, rel_error  # noqa: E402
from bertfast.ops import reference  # noqa: E402

from .ext_harness import CASE_IDS as EXT_CASE_IDS  # noqa: E402
from .ext_harness import CASES as EXT_CASES  # noqa: E402
from .ext_harness import C, check_op, ext, ext_ready, make_inputs  # noqa: E402, F401 (ext_ready: a fixture)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

LOWP_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="Triton's interpreter cannot run tl.dot in bfloat16; bf16 runs on a GPU"))]  # fmt: skip
PARTS = ("q", "k", "v")


@pytest.fixture(autouse=True)
def _poison_cuda_cache():
    """On a GPU, fill the caching allocator's free memory with NaN so an unwritten output element fails."""
    if DEVICE == "cuda":  # blocks of both allocator pools: small (< 1 MiB) and large
        poison = [torch.full((1 << 17,), float("nan"), device=DEVICE) for _ in range(64)]
        poison.append(torch.full((64 << 20,), float("nan"), device=DEVICE))
        del poison
    yield


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def fused_qkv(rows: tuple, heads: int, head_dim: int, dtype, gen) -> torch.Tensor:
    """A QKV projection output ``rows + (3 * heads * head_dim,)``, as ``x @ W.T`` returns it."""
    return torch.randn(*rows, 3 * heads * head_dim, generator=gen).to(DEVICE, dtype)


def split_padded(qkv: torch.Tensor, heads: int):
    """Strided (batch, seq, heads, head_dim) views of the fused buffer -- no copies."""
    batch, seq, width = qkv.shape
    return qkv.view(batch, seq, 3, heads, width // (3 * heads)).unbind(2)


def split_varlen(qkv: torch.Tensor, heads: int):
    total, width = qkv.shape
    return qkv.view(total, 3, heads, width // (3 * heads)).unbind(1)


def ragged_mask(lengths, seq: int) -> torch.Tensor:
    """Right padding: row i keeps its first lengths[i] tokens."""
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)


def mixed_mask(batch: int, seq: int, gen) -> torch.Tensor:
    """Right padding of random length, plus one row with holes and one left-padded row (batch >= 3)."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen).tolist()
    mask = ragged_mask(lengths, seq).cpu()
    if batch >= 3:
        mask[1] = torch.rand(seq, generator=gen) < 0.6
        mask[1, seq // 2] = True
        mask[2] = torch.arange(seq) >= seq - lengths[2]
    return mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Runs: kernel, float64 reference, PyTorch's own low-precision attention
# ----------------------------------------------------------------------------------------------


def run_padded(attend, qkv, heads, mask, scale, grad_out):
    """Forward and backward of ``attend`` on views of a fresh leaf copy of ``qkv``: (out, qkv.grad)."""
    leaf = qkv.detach().clone().requires_grad_()
    q, k, v = split_padded(leaf, heads)
    out = attend(q, k, v, mask, scale)
    out.backward(grad_out)
    return out.detach(), leaf.grad


def reference64(qkv, heads, mask, scale, grad_out):
    return run_padded(reference.attention, qkv.double(), heads, mask, scale, grad_out.double())


def sdpa_lowp(q, k, v, mask, scale):
    """PyTorch's scaled_dot_product_attention at the inputs' precision, with our all-padding semantics."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2)
    # A row with no valid key would be NaN in SDPA: let it see every key, then zero its output.
    any_valid = mask.any(dim=-1, keepdim=True)
    keep = (mask | ~any_valid)[:, None, None, :]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=scale).transpose(1, 2)
    return out * any_valid[:, None, :, None].to(out.dtype)


def assert_grads_close(grad, ref_grad, heads, torch_grad=None):
    """Compare the gradient of a fused (..., 3 * heads * head_dim) buffer part by part."""
    shape = grad.shape[:-1] + (3, heads, -1)
    parts = grad.view(shape).unbind(-3)
    ref_parts = ref_grad.view(shape).unbind(-3)
    lowp_parts = torch_grad.view(shape).unbind(-3) if torch_grad is not None else (None,) * 3
    for name, g, r, t in zip(PARTS, parts, ref_parts, lowp_parts):
        assert_close(g, r, direction="backward", torch_lowp=t, name=f"d{name}")


def check_padded(batch, seq, heads, head_dim, dtype, mask, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = fused_qkv((batch, seq), heads, head_dim, dtype, gen)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=gen).to(DEVICE, dtype)
    out, grad = run_padded(kernel.attention, qkv, heads, mask, scale, grad_out)
    ref_out, ref_grad = reference64(qkv, heads, mask, scale, grad_out)
    lowp_out = lowp_grad = None
    if dtype != torch.float32:
        lowp_out, lowp_grad = run_padded(sdpa_lowp, qkv, heads, mask, scale, grad_out)
    assert out.dtype == dtype
    assert_close(out, ref_out, torch_lowp=lowp_out, name="out")
    assert_grads_close(grad, ref_grad, heads, lowp_grad)
    return out, grad


# ----------------------------------------------------------------------------------------------
# Padded layout
# ----------------------------------------------------------------------------------------------

PADDED_SHAPES = [
    # (batch, seq, heads, head_dim): seq not a multiple of any block, odd head sizes
    (2, 1, 3, 16),
    (3, 33, 3, 40),
    (2, 130, 2, 64),
    (1, 33, 2, 128),
    (3, 20, 1, 72),
]


@pytest.mark.parametrize(
    "shape, masked",
    [(shape, masked) for shape in PADDED_SHAPES for masked in (False, True) if masked or shape[1] < 100],
    ids=lambda x: "b{}s{}h{}d{}".format(*x) if isinstance(x, tuple) else ("mask" if x else "nomask"),
)
def test_padded_fp32(shape, masked):
    batch, seq, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seq * 131 + head_dim)
    mask = mixed_mask(batch, seq, gen) if masked else None
    check_padded(batch, seq, heads, head_dim, torch.float32, mask, head_dim**-0.5, seed=seq + head_dim)


@pytest.mark.parametrize("dtype", LOWP_DTYPES)
@pytest.mark.parametrize("shape", [(3, 33, 3, 40), (1, 130, 2, 64)], ids=lambda s: "b{}s{}h{}d{}".format(*s))
def test_padded_low_precision(shape, dtype):
    batch, seq, heads, head_dim = shape
    gen = torch.Generator().manual_seed(7)
    check_padded(batch, seq, heads, head_dim, dtype, mixed_mask(batch, seq, gen), 0.3, seed=seq)


def test_padded_cross_lengths():
    """seq_q != seq_k (the op allows it): queries of one length over keys of another."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, head_dim, seq_q, seq_k = 2, 3, 24, 19, 45
    q = torch.randn(batch, seq_q, heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    kv = torch.randn(batch, seq_k, 2, heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    mask = ragged_mask([45, 13], seq_k)
    grad_out = torch.randn(batch, seq_q, heads, head_dim, generator=gen).to(DEVICE)
    out = kernel.attention(q, *kv.unbind(2), mask, 0.2)
    out.backward(grad_out)
    q64, kv64 = (t.detach().double().requires_grad_() for t in (q, kv))
    ref = reference.attention(q64, *kv64.unbind(2), mask, 0.2)
    ref.backward(grad_out.double())
    assert_close(out, ref)
    assert_close(q.grad, q64.grad, direction="backward", name="dq")
    assert_close(kv.grad, kv64.grad, direction="backward", name="dkv")


def test_logsumexp_is_stored():
    """The forward op's second output is logsumexp of the scaled, masked scores; +inf for a query with no key."""
    gen = torch.Generator().manual_seed(11)
    batch, seq, heads, head_dim, scale = 3, 37, 2, 32, 0.25
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    q, k, _ = split_padded(qkv, heads)
    mask = ragged_mask([37, 5, 0], seq)
    _, lse = torch.ops.bertfast.attention_fwd(*split_padded(qkv, heads), mask, scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    expected = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float32
    assert torch.isposinf(lse[2]).all()
    assert_close(lse[:2], expected[:2], name="lse")


def test_all_padding_sequence():
    """A sequence that is all padding: zero output, zero gradients, and the other sequences untouched."""
    gen = torch.Generator().manual_seed(5)
    batch, seq, heads, head_dim = 3, 33, 2, 24
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=gen).to(DEVICE)
    mask = ragged_mask([33, 0, 17], seq)
    check_padded(batch, seq, heads, head_dim, torch.float32, mask, 0.2, seed=5)
    out, grad = run_padded(kernel.attention, qkv, heads, mask, 0.2, grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    # The same two valid sequences alone give bit-identical results: programs are independent.
    keep = torch.tensor([0, 2], device=DEVICE)
    alone_out, alone_grad = run_padded(kernel.attention, qkv[keep], heads, mask[keep], 0.2, grad_out[keep])
    assert torch.equal(out[keep], alone_out)
    assert torch.equal(grad[keep], alone_grad)


def test_padding_does_not_leak():
    """Whatever sits at padded positions (here huge values) changes nothing it must not."""
    gen = torch.Generator().manual_seed(9)
    batch, seq, heads, head_dim = 3, 40, 1, 24
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=gen).to(DEVICE)
    mask = mixed_mask(batch, seq, gen)
    out, grad = run_padded(kernel.attention, qkv, heads, mask, 0.3, grad_out)
    grad = grad.view(batch, seq, 3, heads, head_dim)
    junk = 1e4 * torch.randn(qkv.shape, generator=gen).to(DEVICE)

    # Padded keys: no query sees them, forward or backward; their own k, v gradients are zero.
    keys_junk = qkv.clone().view(batch, seq, 3, heads * head_dim)
    keys_junk[:, :, 1:][~mask] = junk.view(batch, seq, 3, -1)[:, :, 1:][~mask]
    out2, grad2 = run_padded(kernel.attention, keys_junk.view(qkv.shape), heads, mask, 0.3, grad_out)
    grad2 = grad2.view(batch, seq, 3, heads, head_dim)
    assert torch.equal(out, out2)
    assert torch.equal(grad[:, :, 0], grad2[:, :, 0])
    assert torch.equal(grad[:, :, 1:][mask], grad2[:, :, 1:][mask])
    assert torch.equal(grad2[:, :, 1:][~mask], torch.zeros_like(grad2[:, :, 1:][~mask]))

    # Padded queries (and their upstream gradient): valid queries' outputs and dq are unchanged.
    queries_junk = qkv.clone().view(batch, seq, 3, heads * head_dim)
    queries_junk[:, :, 0][~mask] = junk.view(batch, seq, 3, -1)[:, :, 0][~mask]
    grad_out_junk = grad_out.clone()
    grad_out_junk[~mask] = 1e3
    out3, grad3 = run_padded(kernel.attention, queries_junk.view(qkv.shape), heads, mask, 0.3, grad_out_junk)
    grad3 = grad3.view(batch, seq, 3, heads, head_dim)
    assert torch.isfinite(out3).all() and torch.isfinite(grad3).all()
    assert torch.equal(out[mask], out3[mask])
    assert torch.equal(grad[:, :, 0][mask], grad3[:, :, 0][mask])


class LaunchRecorder:
    """Stands in for a jit kernel: records the arguments of every launch, then launches."""

    def __init__(self, jit_kernel):
        self.jit_kernel = jit_kernel
        self.launches = []

    def __getitem__(self, grid):
        launch = self.jit_kernel[grid]

        def record(*args, **kwargs):
            self.launches.append(args)
            return launch(*args, **kwargs)

        return record


def test_strided_views_are_read_in_place(monkeypatch):
    """The kernels get the fused buffer's views themselves (no copy) and give the same bits as on copies."""
    gen = torch.Generator().manual_seed(13)
    batch, seq, heads, head_dim = 2, 33, 3, 40
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen).requires_grad_()
    q, k, v = split_padded(qkv, heads)
    assert not any(t.is_contiguous() for t in (q, k, v))
    mask = ragged_mask([33, 20], seq)
    recorders = {name: LaunchRecorder(getattr(kernel, name)) for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(kernel, name, recorder)
    out = kernel.attention(q, k, v, mask, 0.2)
    out.sum().backward()
    for name, recorder in recorders.items():
        (args,) = recorder.launches
        for view, passed in zip((q, k, v), args[:3]):
            assert (passed.data_ptr(), passed.stride()) == (view.data_ptr(), view.stride()), name

    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out_from_copies = kernel.attention(*copies, mask, 0.2)
    out_from_copies.sum().backward()
    assert torch.equal(out, out_from_copies)
    grads = qkv.grad.view(batch, seq, 3, heads, head_dim).unbind(2)
    for name, grad, copy in zip(PARTS, grads, copies):
        assert torch.equal(grad, copy.grad), name


# ----------------------------------------------------------------------------------------------
# Variable-length layout
# ----------------------------------------------------------------------------------------------


def run_varlen(attend, qkv, heads, cu_seqlens, max_seqlen, scale, grad_out):
    leaf = qkv.detach().clone().requires_grad_()
    q, k, v = split_varlen(leaf, heads)
    out = attend(q, k, v, cu_seqlens, max_seqlen, scale)
    out.backward(grad_out)
    return out.detach(), leaf.grad


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize(
    "lengths, heads, head_dim",
    [([5, 0, 1, 33, 17], 3, 40), ([37], 2, 16), ([130, 1, 20], 1, 64), ([0, 2, 0], 1, 72)],
    ids=["mixed", "one", "long", "zeros"],
)
def test_varlen_fp32(lengths, heads, head_dim):
    gen = torch.Generator().manual_seed(sum(lengths) + head_dim)
    total = sum(lengths)
    qkv = fused_qkv((total,), heads, head_dim, torch.float32, gen)
    grad_out = torch.randn(total, heads, head_dim, generator=gen).to(DEVICE)
    cu_seqlens = cumulative(lengths)
    out, grad = run_varlen(kernel.attention_varlen, qkv, heads, cu_seqlens, max(lengths), 0.2, grad_out)
    ref_out, ref_grad = run_varlen(
        reference.attention_varlen, qkv.double(), heads, cu_seqlens, max(lengths), 0.2, grad_out.double()
    )
    assert_close(out, ref_out)
    assert_grads_close(grad, ref_grad, heads)


def varlen_sdpa_lowp(q, k, v, cu_seqlens, max_seqlen, scale):
    """PyTorch's low-precision SDPA run sequence by sequence."""
    offsets = cu_seqlens.tolist()
    pieces = [sdpa_lowp(q[None, a:b], k[None, a:b], v[None, a:b], None, scale)[0] for a, b in zip(offsets, offsets[1:])]
    return torch.cat(pieces)


@pytest.mark.parametrize("dtype", LOWP_DTYPES)
def test_varlen_low_precision(dtype):
    gen = torch.Generator().manual_seed(21)
    lengths, heads, head_dim = [40, 1, 0, 77], 3, 32
    total = sum(lengths)
    qkv = fused_qkv((total,), heads, head_dim, dtype, gen)
    grad_out = torch.randn(total, heads, head_dim, generator=gen).to(DEVICE, dtype)
    cu_seqlens = cumulative(lengths)
    args = (heads, cu_seqlens, max(lengths), 0.3)
    out, grad = run_varlen(kernel.attention_varlen, qkv, *args, grad_out)
    ref_out, ref_grad = run_varlen(reference.attention_varlen, qkv.double(), *args, grad_out.double())
    lowp_out, lowp_grad = run_varlen(varlen_sdpa_lowp, qkv, *args, grad_out)
    assert_close(out, ref_out, torch_lowp=lowp_out)
    assert_grads_close(grad, ref_grad, heads, lowp_grad)


def test_varlen_matches_padded():
    """The packed sequences give what the padded kernel gives on the same data with a padding mask."""
    gen = torch.Generator().manual_seed(17)
    lengths, heads, head_dim, seq = [33, 7, 1, 50], 1, 24, 50
    mask = ragged_mask(lengths, seq)
    padded_qkv = fused_qkv((len(lengths), seq), heads, head_dim, torch.float32, gen)
    grad_out = torch.randn(len(lengths), seq, heads, head_dim, generator=gen).to(DEVICE)
    grad_out[~mask] = 0.0  # padded queries do not exist in the packed layout
    out, grad = run_padded(kernel.attention, padded_qkv, heads, mask, 0.2, grad_out)
    packed_out, packed_grad = run_varlen(
        kernel.attention_varlen, padded_qkv[mask], heads, cumulative(lengths), seq, 0.2, grad_out[mask]
    )
    assert rel_error(packed_out, out[mask]) <= FP32_REL_TOL["forward"]
    assert rel_error(packed_grad, grad[mask]) <= FP32_REL_TOL["backward"]


def test_empty_inputs():
    """No tokens at all (an empty packed batch, a zero-length padded batch): empty results, no launch errors."""
    for shape, call in (
        ((0, 2, 16), lambda q, k, v: kernel.attention_varlen(q, k, v, cumulative([0, 0]), 0, 0.25)),
        ((2, 0, 2, 16), lambda q, k, v: kernel.attention(q, k, v, ragged_mask([0, 0], 0), 0.25)),
    ):
        q, k, v = (torch.zeros(shape, device=DEVICE, requires_grad=True) for _ in range(3))
        out = call(q, k, v)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape and k.grad.shape == shape


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, the public API
# ----------------------------------------------------------------------------------------------


def test_opcheck_padded():
    gen = torch.Generator().manual_seed(23)
    batch, seq, heads, head_dim = 2, 5, 2, 16
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    q, k, v = (t.requires_grad_() for t in split_padded(qkv, heads))
    mask = ragged_mask([5, 3], seq)
    torch.library.opcheck(torch.ops.bertfast.attention_fwd.default, (q, k, v, mask, 0.25))
    torch.library.opcheck(torch.ops.bertfast.attention_fwd.default, (q, k, v, None, 0.25), test_utils="test_faketensor")
    out, lse = (t.detach() for t in torch.ops.bertfast.attention_fwd(q, k, v, mask, 0.25))
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    # The backward op is not itself differentiable (no double backward): check it without grad inputs.
    args = (grad_out, *(t.detach() for t in (q, k, v)), out, lse, mask, 0.25)
    torch.library.opcheck(torch.ops.bertfast.attention_bwd.default, args)


def test_opcheck_varlen():
    gen = torch.Generator().manual_seed(29)
    lengths, heads, head_dim = [3, 0, 6], 2, 16
    qkv = fused_qkv((sum(lengths),), heads, head_dim, torch.float32, gen)
    q, k, v = (t.requires_grad_() for t in split_varlen(qkv, heads))
    cu_seqlens = cumulative(lengths)
    torch.library.opcheck(torch.ops.bertfast.attention_varlen_fwd.default, (q, k, v, cu_seqlens, 6, 0.25))
    out, lse = (t.detach() for t in torch.ops.bertfast.attention_varlen_fwd(q, k, v, cu_seqlens, 6, 0.25))
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    args = (grad_out, *(t.detach() for t in (q, k, v)), out, lse, cu_seqlens, 6, 0.25)
    torch.library.opcheck(torch.ops.bertfast.attention_varlen_bwd.default, args)


def test_torch_compile_fullgraph():
    """torch.compile traces the public functions, forward and backward, without a graph break."""
    gen = torch.Generator().manual_seed(31)
    batch, seq, heads, head_dim = 2, 9, 2, 16
    mask = ragged_mask([9, 4], seq)
    lengths = [4, 9]

    def loss(qkv, packed):
        padded = kernel.attention(*split_padded(qkv, heads), mask, 0.25)
        varlen = kernel.attention_varlen(*split_varlen(packed, heads), cumulative(lengths), 9, 0.25)
        return (padded * padded).sum() + varlen.square().sum()

    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    packed = fused_qkv((sum(lengths),), heads, head_dim, torch.float32, gen)
    eager_inputs = [t.clone().requires_grad_() for t in (qkv, packed)]
    compiled_inputs = [t.clone().requires_grad_() for t in (qkv, packed)]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=False)
    expected = loss(*eager_inputs)
    got = compiled(*compiled_inputs)
    expected.backward()
    got.backward()
    assert_close(got, expected.double())
    for eager, traced in zip(eager_inputs, compiled_inputs):
        assert_close(traced.grad, eager.grad.double(), direction="backward")


def test_public_api_dispatch():
    gen = torch.Generator().manual_seed(37)
    batch, seq, heads, head_dim = 2, 21, 3, 24
    qkv = fused_qkv((batch, seq), heads, head_dim, torch.float32, gen)
    q, k, v = split_padded(qkv, heads)
    mask = ragged_mask([21, 8], seq).long()  # the public API accepts any nonzero-is-token mask
    out = bertfast.ops.attention(q, k, v, mask, backend="triton")
    ref = bertfast.ops.attention(q.double(), k.double(), v.double(), mask, backend="reference")
    assert_close(out, ref)

    lengths = [21, 8]
    packed = torch.cat([qkv[0, :21], qkv[1, :8]])
    out = bertfast.ops.attention_varlen(*split_varlen(packed, heads), cumulative(lengths), 21, backend="triton")
    ref = bertfast.ops.attention_varlen(*split_varlen(packed.double(), heads), cumulative(lengths), 21,
                                        backend="reference")  # fmt: skip
    assert_close(out, ref)


def test_unsupported_reasons():
    gen = torch.Generator().manual_seed(41)
    q, k, v = split_padded(fused_qkv((1, 4), 1, 16, torch.float32, gen), 1)
    assert kernel.unsupported(q, k, v) is None
    q64 = q.double()
    assert "float64" in kernel.unsupported(q64, q64, q64)
    wide = torch.zeros(1, 4, 1, 160, device=DEVICE)
    assert "head_dim 160" in kernel.unsupported(wide, wide, wide)
    with pytest.raises(BackendUnavailable, match="float64"):
        bertfast.ops.attention(q64, q64, q64, backend="triton")
    if INTERPRET:
        q16 = q.bfloat16()
        assert "interpreter" in kernel.unsupported(q16, q16, q16)


def test_argument_checks_name_the_argument():
    gen = torch.Generator().manual_seed(43)
    q, k, v = split_padded(fused_qkv((2, 4), 1, 16, torch.float32, gen), 1)
    with pytest.raises(TypeError, match="attention_mask"):
        kernel.attention(q, k, v, torch.ones(2, 4, dtype=torch.int64, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        kernel.attention(q, k, v, torch.ones(2, 5, dtype=torch.bool, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="k and v"):
        kernel.attention(q, k, v[:, :3], None, 1.0)
    with pytest.raises(TypeError, match="cu_seqlens"):
        kernel.attention_varlen(q[0], k[0], v[0], torch.tensor([0, 4], device=DEVICE), 4, 1.0)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_packed_qkv_gives_the_same_output_and_one_gradient_buffer(layout):
    """attention_qkv / attention_varlen_qkv: the unpacked kernels' numbers, dq/dk/dv written into one buffer."""
    gen = torch.Generator().manual_seed(3)
    heads, head_dim, scale = 2, 16, 0.25
    if layout == "padded":
        qkv = fused_qkv((2, 7), heads, head_dim, torch.float32, gen).unflatten(-1, (3, heads, head_dim))
        mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3], device=DEVICE)
        packed_fn = lambda t: kernel.attention_qkv(t, mask, scale)  # noqa: E731
        unpacked_fn = lambda t: kernel.attention(*t.unbind(-3), mask, scale)  # noqa: E731
    else:
        qkv = fused_qkv((9,), heads, head_dim, torch.float32, gen).unflatten(-1, (3, heads, head_dim))
        cu_seqlens = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEVICE)
        packed_fn = lambda t: kernel.attention_varlen_qkv(t, cu_seqlens, 6, scale)  # noqa: E731
        unpacked_fn = lambda t: kernel.attention_varlen(*t.unbind(-3), cu_seqlens, 6, scale)  # noqa: E731
    grad_out = torch.randn(qkv.select(-3, 0).shape, generator=gen).to(DEVICE)
    results = []
    for fn in (packed_fn, unpacked_fn):
        leaf = qkv.detach().clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out_packed, grad_packed), (out_unpacked, grad_unpacked) = results
    assert torch.equal(out_packed, out_unpacked)
    assert torch.equal(grad_packed, grad_unpacked)


# ------------------------------------------------------------------------------------------------
# The extension's kernels (backend "ext", bertfast._C): against the float64 reference, every gradient
# ------------------------------------------------------------------------------------------------


def torch_attention(qkv, mask, heads, scale):
    q, k, v = split_qkv(qkv, heads)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    return reference._masked_softmax_attention(qh, kh, vh, mask, scale).transpose(1, 2)


def split_qkv(qkv, heads):
    """Strided (batch, seq, heads, head_dim) views of one fused QKV projection -- no copies."""
    batch, seq, width = qkv.shape
    return qkv.view(batch, seq, 3, heads, width // (3 * heads)).unbind(2)


@pytest.mark.parametrize(("device", "dtype"), EXT_CASES, ids=EXT_CASE_IDS)
@pytest.mark.parametrize("seq", [1, 33, 130])
@pytest.mark.parametrize("masked", [True, False], ids=["ragged", "nomask"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_attention_matches_float64_reference(device, dtype, seq, masked):
    heads, head_dim, batch = 3, 16, 3
    gen = torch.Generator().manual_seed(seq)
    floats = make_inputs({"qkv": (batch, seq, 3 * heads * head_dim)}, gen)
    lengths = [seq, max(1, seq // 2), 0]  # ragged, with one sequence that is all padding
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None] if masked else None
    scale = head_dim**-0.5

    def run_ext(qkv, mask):
        q, k, v = split_qkv(qkv, heads)
        assert not q.is_contiguous() or seq == 1
        return ext.attention(q, k, v, mask, scale)

    def run_ref(qkv, mask):
        return reference.attention(*split_qkv(qkv, heads), mask, scale)

    out = check_op(
        run_ext,
        run_ref,
        lambda qkv, mask: torch_attention(qkv, mask, heads, scale),
        floats,
        {"mask": mask},
        device,
        dtype,
        gen,
        "attention",
    )
    assert out.shape == (batch, seq, heads, head_dim)
    if masked:
        assert torch.all(out[2] == 0), "a sequence that is all padding must give zero outputs"


EXT_FP16_CASES = [EXT_CASES[2], EXT_CASES[5]]


@pytest.mark.parametrize(("device", "dtype"), EXT_FP16_CASES, ids=["cpu-fp16", "cuda-fp16"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_fp16_attention_scores_beyond_fp16_range_before_scaling(device, dtype):
    """|q . k| = 33 * 33 * 64 = 69696 > 65504 (fp16's largest), but scaled by 64 ** -0.5 it is
    8712: every key scores the same, so each query averages v over its valid keys.  Formed
    before the scale, the product overflows: inf - inf made NaN rows, and -inf everywhere
    read as "every key masked" (a zero row)."""
    batch, seq, heads, head_dim = 2, 9, 2, 64
    gen = torch.Generator().manual_seed(12)
    q = torch.full((batch, seq, heads, head_dim), 33.0)
    k = q * torch.tensor([1.0, -1.0])[:, None, None, None]  # batch 0: scores +8712, batch 1: -8712
    v = torch.randn(batch, seq, heads, head_dim, generator=gen)
    mask = torch.arange(seq)[None, :] < torch.tensor([seq, 5])[:, None]
    expected = torch.stack([v[b, : int(mask[b].sum())].mean(0) for b in range(batch)])[:, None].expand_as(v)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    for m in (None, mask.to(device)):
        out = bertfast.ops.attention(q, k, v, m, backend="ext")
        assert torch.isfinite(out).all(), "NaN rows: the scores overflowed before the scale"
        want = expected if m is not None else v.float().mean(1, keepdim=True).cpu().expand_as(v)
        torch.testing.assert_close(out.float().cpu(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(("device", "dtype"), EXT_FP16_CASES, ids=["cpu-fp16", "cuda-fp16"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_fp16_attention_with_large_q_and_k(device, dtype):
    """Random q, k around 40 (|q . k| ~ 1e5 > 65504) with scale 2 ** -10: the scaled scores
    (~100, spread ~2) are well inside fp16; output and every gradient meet the numerics
    policy against float64.  The yardstick is PyTorch's eager attention in fp16 with q scaled
    first, which rounds the scores to fp16 (ext keeps them in fp32: see the next test for the
    inputs where that decides)."""
    batch, seq, heads, head_dim = 2, 33, 3, 64
    scale = 2.0**-10
    gen = torch.Generator().manual_seed(13)
    shape = (batch, seq, heads, head_dim)
    floats = {
        "q": 40 + 4 * torch.randn(shape, generator=gen, dtype=torch.float64),
        "k": 40 + 4 * torch.randn(shape, generator=gen, dtype=torch.float64),
        "v": torch.randn(shape, generator=gen, dtype=torch.float64),
    }
    mask = torch.arange(seq)[None, :] < torch.tensor([seq, 20])[:, None]

    def run_torch(q, k, v, mask):  # eager: matmul, masked softmax, matmul, each rounding to q's dtype
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(qh * scale, kh.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), vh).transpose(1, 2)

    check_op(
        lambda q, k, v, mask: bertfast.ops.attention(q, k, v, mask, scale, backend="ext"),
        lambda q, k, v, mask: reference.attention(q, k, v, mask, scale),
        run_torch,
        floats,
        {"mask": mask},
        device,
        dtype,
        gen,
        "attention[fp16, large q and k]",
    )


EXT_LOWP_CASES = [EXT_CASES[2], EXT_CASES[3], EXT_CASES[5], EXT_CASES[6]]


@pytest.mark.parametrize(("device", "dtype"), EXT_LOWP_CASES, ids=["cpu-fp16", "cpu-bf16", "cuda-fp16", "cuda-bf16"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_lowp_attention_keeps_large_scores_in_fp32(device, dtype):
    """q ~ 30, k ~ 40, head 64, scale 1/8: the scaled scores are ~9600, where fp16's spacing is 8
    (bf16's 64), so scores rounded to the inputs' dtype lose the differences that decide the
    softmax: the output was off by more than 1 where PyTorch's fused attention errs by ~1e-3.
    Kept in fp32 from the product through the softmax (and the probabilities recomputed in fp32
    for the backward), output and every gradient meet the policy against float64, with
    PyTorch's fused attention at the same precision as the yardstick."""
    batch, seq, heads, head_dim = 3, 33, 2, 64
    gen = torch.Generator().manual_seed(14)
    shape = (batch, seq, heads, head_dim)
    floats = {
        "q": 30 + torch.randn(shape, generator=gen, dtype=torch.float64),
        "k": 40 + torch.randn(shape, generator=gen, dtype=torch.float64),
        "v": torch.randn(shape, generator=gen, dtype=torch.float64),
    }
    mask = torch.arange(seq)[None, :] < torch.tensor([seq, 17, 0])[:, None]  # odd lengths, one all padding
    scale = head_dim**-0.5
    check_op(
        lambda q, k, v, mask: bertfast.ops.attention(q, k, v, mask, scale, backend="ext"),
        lambda q, k, v, mask: reference.attention(q, k, v, mask, scale),
        lambda q, k, v, mask: reference.attention(q, k, v, mask, scale),  # fused SDPA below float64
        floats,
        {"mask": mask},
        device,
        dtype,
        gen,
        "attention[large scores]",
    )


@pytest.mark.parametrize(("device", "dtype"), EXT_CASES[:1] + EXT_CASES[4:5], ids=["cpu-fp32", "cuda-fp32"])
@pytest.mark.usefixtures("ext_ready")
def test_ext_masked_softmax_exact_zeros(device, dtype):
    """Masked keys get exactly 0, a fully masked row is all 0 (with zero gradient), uint8 masks work."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 5, 9, generator=gen).to(device, dtype).requires_grad_()
    keep = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0], [0] * 9], dtype=torch.uint8, device=device)
    probs = ext.masked_softmax(scores, keep, 0.7)
    assert torch.all(probs[:, :, :, keep[0] == 0][0] == 0)
    assert torch.all(probs[1] == 0)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(3, 5, device=device, dtype=dtype))
    expected = torch.softmax((scores[0] * 0.7).masked_fill(keep[0] == 0, float("-inf")), dim=-1)
    torch.testing.assert_close(probs[0], expected)
    (grad,) = torch.autograd.grad(probs, scores, torch.randn_like(probs))
    assert torch.all(grad[1] == 0) and torch.all(grad[0][:, :, keep[0] == 0] == 0)
    assert torch.isfinite(grad).all()
