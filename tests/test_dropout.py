"""Dropout inside the Triton kernels: attention probabilities (padded and varlen), hidden dropout
fused into the residual LayerNorm, and the model in train mode.

Philox masks cannot match PyTorch's bit for bit, so each kernel is checked against the float64
reference *under the kernel's own mask*, read back through a special input: attention with
one-hot value rows (``v[j] = e_j``) returns ``P * Z`` itself, and the LayerNorm's two input
gradients differ by exactly the mask (``dx = dresidual * Z``).  Then: reproducibility under
``torch.manual_seed``, the drop rate and the independence of masks (binomial bounds), the
expectation, a directional-derivative check of each backward under a fixed seed (shown to fail
when the backward draws another mask), opcheck, torch.compile, and the model in train mode.

Every statistical bound is 5 binomial standard deviations and every seed is fixed: the tests
are deterministic, and a wrong rate or a repeated mask misses the bound by far more.
"""

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from bertfast.kernels import attention as attn_kernel  # noqa: E402
from bertfast.kernels import layer_norm as ln_kernel  # noqa: E402
from torch.func import functional_call  # noqa: E402

import bertfast  # noqa: E402
import bertfast.ops as ops  # noqa: E402
from bertfast.errors import BackendUnavailable  # noqa: E402
from bertfast.numerics import FP32_REL_TOL, MODEL_FP32_REL_TOL, assert_close, rel_error  # noqa: E402
from bertfast.ops import triton_backend  # noqa: E402

from .helpers import OpNames, ragged_batch, small_config  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

P = 0.3  # the drop rate of most tests: far from 0 and 1, so masks are informative both ways
PARTS = ("q", "k", "v")


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def assert_rate(keep: torch.Tensor, p: float, what: str) -> None:
    """The dropped fraction of ``keep`` is ``p`` within 5 binomial standard deviations."""
    n = keep.numel()
    dropped = 1.0 - keep.double().mean().item()
    bound = 5.0 * (p * (1.0 - p) / n) ** 0.5
    assert abs(dropped - p) <= bound, f"{what}: dropped {dropped:.4f} of {n}, expected {p} +- {bound:.4f}"


def assert_independent(a: torch.Tensor, b: torch.Tensor, p: float, what: str) -> None:
    """Two independent masks agree on a fraction ``p^2 + (1-p)^2`` of positions (1 if repeated)."""
    expected = p * p + (1.0 - p) ** 2
    agree = (a == b).double().mean().item()
    bound = 5.0 * (expected * (1.0 - expected) / a.numel()) ** 0.5
    assert abs(agree - expected) <= bound, f"{what}: masks agree on {agree:.4f}, independent ones on {expected:.4f}"


def directional_check(f, inputs, seed: int, eps: float) -> tuple[float, float]:
    """(central difference of ``f`` along a random direction ``u``, ``<grad f, u>``).

    Every evaluation runs under ``torch.manual_seed(seed)``, so all of them see one dropout mask.
    An input ``f`` does not use (no gradient) contributes 0 to both.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    dirs = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in inputs]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    f(*leaves).backward()
    analytic = sum((leaf.grad.double() * u).sum().item() for leaf, u in zip(leaves, dirs) if leaf.grad is not None)
    with torch.no_grad():
        torch.manual_seed(seed)
        plus = f(*(t + eps * u for t, u in zip(inputs, dirs))).double()
        torch.manual_seed(seed)
        minus = f(*(t - eps * u for t, u in zip(inputs, dirs))).double()
    return (plus - minus).item() / (2.0 * eps), analytic


def derivative_matches(finite_difference: float, analytic: float, rtol: float = 3e-3) -> bool:
    return abs(finite_difference - analytic) <= rtol * abs(analytic)


def backward_with_another_seed(monkeypatch, module) -> None:
    """Make ``module``'s backward regenerate its mask from seed + 1: a deliberately wrong backward."""
    original = module._backward

    def shifted(*args):
        *rest, seed = args
        return original(*rest, seed + 1)

    monkeypatch.setattr(module, "_backward", shifted)


# ----------------------------------------------------------------------------------------------
# Attention: inputs, the kernel's mask read back, the reference under a given mask
# ----------------------------------------------------------------------------------------------


def random_qkv(rows: tuple, heads: int, head_dim: int, dtype, seed: int) -> torch.Tensor:
    """A fused QKV projection output ``rows + (3 * heads * head_dim,)`` (q, k, v are views of it)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*rows, 3 * heads * head_dim, generator=gen).to(DEVICE, dtype)


def split(qkv: torch.Tensor, heads: int):
    return qkv.unflatten(-1, (3, heads, -1)).unbind(-3)


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def padded_keep_mask(batch: int, seq: int, heads: int, key_mask, p: float, seed: int) -> torch.Tensor:
    """The keep mask ``(batch, seq_q, heads, seq_k)`` of a padded call under ``torch.manual_seed(seed)``.

    The mask depends on the seed and the (batch, head, query, key) index only, so a call with
    one-hot value rows (head_dim = seq) reads it back: its output row ``i`` is ``P[i, :] * Z[i, :]``
    and ``P > 0`` at every valid key.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    q = torch.randn(batch, seq, heads, seq, generator=gen).to(DEVICE)
    k = torch.randn(batch, seq, heads, seq, generator=gen).to(DEVICE)
    one_hot = torch.eye(seq, device=DEVICE)[None, :, None, :].expand(batch, seq, heads, seq)
    torch.manual_seed(seed)
    return attn_kernel.attention(q, k, one_hot, key_mask, seq**-0.5, p) != 0


def varlen_keep_mask(lengths, heads: int, p: float, seed: int) -> torch.Tensor:
    """The keep mask ``(total, heads, max_len)`` of a varlen call (key ``j`` of the token's own sequence)."""
    total, max_len = sum(lengths), max(lengths)
    gen = torch.Generator().manual_seed(seed + 1000)
    q = torch.randn(total, heads, max_len, generator=gen).to(DEVICE)
    k = torch.randn(total, heads, max_len, generator=gen).to(DEVICE)
    position = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    one_hot = F.one_hot(position, max_len).float()[:, None, :].expand(total, heads, max_len)
    torch.manual_seed(seed)
    return attn_kernel.attention_varlen(q, k, one_hot, cumulative(lengths), max_len, max_len**-0.5, p) != 0


def softmax_rows(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over keys where ``valid``; a row with no valid key is all zero."""
    scores = scores.masked_fill(~valid, float("-inf"))
    any_valid = valid.any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~any_valid, 0.0), dim=-1) * any_valid


def padded_reference(q, k, v, key_mask, scale, keep, p):
    """``(P * keep / (1 - p)) V``, P the key-masked softmax; ``keep`` is ``(batch, seq_q, heads, seq_k)``."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    valid = torch.ones_like(scores, dtype=torch.bool) if key_mask is None else key_mask[:, None, None, :]
    probs = softmax_rows(scores, valid.expand_as(scores))
    z = keep.transpose(1, 2).to(probs.dtype) / (1.0 - p)
    return torch.matmul(probs * z, vh).transpose(1, 2)


def varlen_reference(q, k, v, lengths, scale, keep, p):
    outs, start = [], 0
    for n in lengths:
        rows = slice(start, start + n)
        qh, kh, vh = (t[rows].transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
        z = keep[rows, :, :n].transpose(0, 1).to(probs.dtype) / (1.0 - p)
        outs.append(torch.matmul(probs * z, vh).transpose(0, 1))
        start += n
    return torch.cat(outs)


def run(attend, qkv, heads, grad_out, *args):
    """Forward and backward of ``attend(q, k, v, *args)`` on views of a leaf copy: (out, qkv.grad)."""
    leaf = qkv.detach().clone().requires_grad_()
    out = attend(*split(leaf, heads), *args)
    out.backward(grad_out)
    return out.detach(), leaf.grad


def assert_grads_close(grad, ref_grad, heads, lowp_grad=None):
    shape = grad.shape[:-1] + (3, heads, -1)
    lowp = lowp_grad.view(shape).unbind(-3) if lowp_grad is not None else (None,) * 3
    for name, g, r, t in zip(PARTS, grad.view(shape).unbind(-3), ref_grad.view(shape).unbind(-3), lowp):
        assert_close(g, r, direction="backward", torch_lowp=t, name=f"d{name}")


def mixed_key_mask(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Row 0 full, row 1 with holes, row 2 left-padded, row 3 all padding, the rest ragged."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(seq)[None, :] < torch.randint(1, seq + 1, (batch,), generator=gen)[:, None]
    mask[0] = True
    mask[1] = torch.rand(seq, generator=gen) < 0.6
    mask[2] = torch.arange(seq) >= seq // 3
    mask[3] = False
    return mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Attention: exact checks under the kernel's own mask
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, seq, heads, head_dim, dtype",
    # head_dim 80 in fp32: the forward's split into column blocks (every block draws the same mask)
    [(4, 37, 2, 24, torch.float32), (4, 21, 2, 80, torch.float32), (4, 20, 3, 16, torch.float16)],
    ids=["fp32", "fp32-split", "fp16"],
)
def test_padded_attention_dropout_is_the_reference_under_its_mask(batch, seq, heads, head_dim, dtype):
    key_mask = mixed_key_mask(batch, seq, seed=1)
    scale = head_dim**-0.5
    keep = padded_keep_mask(batch, seq, heads, key_mask, P, seed=7)
    valid = key_mask[:, None, None, :].expand_as(keep)
    assert_rate(keep[valid], P, "padded attention")
    assert not keep[~valid].any(), "padding keys get no probability, dropped or not"

    qkv = random_qkv((batch, seq), heads, head_dim, dtype, seed=2)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    torch.manual_seed(7)
    out, grad = run(attn_kernel.attention, qkv, heads, grad_out, key_mask, scale, P)
    ref_out, ref_grad = run(padded_reference, qkv.double(), heads, grad_out.double(), key_mask, scale, keep, P)
    lowp_out = lowp_grad = None
    if dtype != torch.float32:  # PyTorch's own error at this precision, under the same mask
        lowp_out, lowp_grad = run(padded_reference, qkv, heads, grad_out, key_mask, scale, keep, P)
    assert_close(out, ref_out, torch_lowp=lowp_out, name="out")
    assert_grads_close(grad, ref_grad, heads, lowp_grad)

    if dtype == torch.float32:  # lse stays that of the undropped softmax
        q, k, v = split(qkv, heads)
        seed = torch.tensor(1234, device=DEVICE)
        _, lse = torch.ops.bertfast.attention_fwd(q, k, v, key_mask, scale, P, seed)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        ref_lse = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).logsumexp(-1)
        has_key = key_mask.any(-1)
        assert_close(lse[has_key], ref_lse[has_key], name="lse")
        assert torch.isinf(lse[~has_key]).all()


def test_varlen_attention_dropout_is_the_reference_under_its_mask():
    lengths, heads, head_dim = [5, 0, 70, 18], 2, 40  # 70: several query and key blocks
    scale = head_dim**-0.5
    keep = varlen_keep_mask(lengths, heads, P, seed=11)
    sequence_length = torch.repeat_interleave(torch.tensor(lengths), torch.tensor(lengths)).to(DEVICE)
    own_keys = torch.arange(max(lengths), device=DEVICE)[None, None, :] < sequence_length[:, None, None]
    assert_rate(keep[own_keys.expand_as(keep)], P, "varlen attention")
    assert not keep[~own_keys.expand_as(keep)].any(), "keys of other sequences get no probability"

    qkv = random_qkv((sum(lengths),), heads, head_dim, torch.float32, seed=12)
    grad_out = torch.randn(sum(lengths), heads, head_dim, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    cu_seqlens = cumulative(lengths)
    torch.manual_seed(11)
    out, grad = run(attn_kernel.attention_varlen, qkv, heads, grad_out, cu_seqlens, max(lengths), scale, P)
    ref_out, ref_grad = run(varlen_reference, qkv.double(), heads, grad_out.double(), lengths, scale, keep, P)
    assert_close(out, ref_out, name="out")
    assert_grads_close(grad, ref_grad, heads)


def test_attention_masks_are_reproducible_and_independent():
    batch, seq, heads = 2, 30, 2
    key_mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    first = padded_keep_mask(batch, seq, heads, key_mask, P, seed=21)
    assert torch.equal(first, padded_keep_mask(batch, seq, heads, key_mask, P, seed=21)), "same seed, same mask"
    other = padded_keep_mask(batch, seq, heads, key_mask, P, seed=22)
    assert_independent(first, other, P, "two seeds")
    assert_independent(first[:, :, 0], first[:, :, 1], P, "two heads")
    assert_independent(first[0], first[1], P, "two batch elements")
    assert_independent(first[:, : seq // 2], first[:, seq // 2 :], P, "two halves of the query rows")
    assert_independent(first[..., : seq // 2], first[..., seq // 2 :], P, "two halves of the key columns")

    # Outputs and gradients on random inputs: equal under one seed, different under another.
    qkv = random_qkv((batch, seq), heads, 16, torch.float32, seed=23)
    grad_out = torch.randn(batch, seq, heads, 16, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        results.append(run(attn_kernel.attention, qkv, heads, grad_out, None, 0.25, P))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.allclose(results[0][0], results[2][0]) and not torch.allclose(results[0][1], results[2][1])


def test_zero_rate_is_the_plain_kernel_and_leaves_the_generator_alone():
    """p = 0 is the no-dropout kernel (the same bits); the dropout kernels dropping nothing give the same
    function: the same bits in the interpreter, and up to fp32 summation order on a GPU, where the dropout
    kernels are tuned on their own (HAS_DROPOUT is in the autotune key) and may take other tiles."""
    batch, seq, heads, head_dim = 2, 19, 2, 16
    qkv = random_qkv((batch, seq), heads, head_dim, torch.float32, seed=31)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=torch.Generator().manual_seed(32)).to(DEVICE)
    key_mask = torch.arange(seq, device=DEVICE)[None, :] < torch.tensor([19, 11], device=DEVICE)[:, None]
    lengths = [19, 11]
    packed = torch.cat([qkv[0, :19], qkv[1, :11]])
    packed_grad_out = torch.cat([grad_out[0, :19], grad_out[1, :11]])

    def plain_padded(q, k, v):
        return torch.ops.bertfast.attention_fwd(q, k, v, key_mask, 0.25)[0]

    def plain_varlen(q, k, v):
        return torch.ops.bertfast.attention_varlen_fwd(q, k, v, cumulative(lengths), seq, 0.25)[0]

    def padded(p):
        return lambda q, k, v: ops.attention(q, k, v, key_mask, 0.25, dropout_p=p, backend="triton")

    def varlen(p):
        cu_seqlens = cumulative(lengths)
        return lambda q, k, v: ops.attention_varlen(q, k, v, cu_seqlens, seq, 0.25, dropout_p=p, backend="triton")

    # 1e-9 compiles the dropout branch in, yet drops (almost surely) nothing and 1 / (1 - p) == 1 in fp32.
    for plain, with_dropout, inputs, grads in (
        (plain_padded, padded, qkv, grad_out),
        (plain_varlen, varlen, packed, packed_grad_out),
    ):
        expected = run(plain, inputs, heads, grads)
        rng_state = torch.cuda.get_rng_state if DEVICE == "cuda" else torch.get_rng_state  # the seed's device
        state = rng_state()
        at_zero = run(with_dropout(0.0), inputs, heads, grads)
        assert torch.equal(rng_state(), state), "p = 0 must not draw from the generator"
        tiny = run(with_dropout(1e-9), inputs, heads, grads)
        assert not torch.equal(rng_state(), state), "dropout draws its seed from the generator"
        assert torch.equal(at_zero[0], expected[0]) and torch.equal(at_zero[1], expected[1])
        if INTERPRET:
            assert torch.equal(tiny[0], expected[0]) and torch.equal(tiny[1], expected[1])
        else:
            assert rel_error(tiny[0], expected[0]) <= FP32_REL_TOL["forward"]
            assert rel_error(tiny[1], expected[1]) <= FP32_REL_TOL["backward"]


def test_attention_expectation_is_the_undropped_output():
    """Averaged over many masks, dropout(P) / (1 - p) V is P V (a missing 1 / (1 - p) fails by far)."""
    copies, seq, heads, head_dim = 64, 12, 1, 16
    q, k, v = split(random_qkv((1, seq), heads, head_dim, torch.float32, seed=41), heads)
    # One call, many independent masks: every batch element draws its own (the inputs repeat).
    q, k, v = (t.expand(copies, seq, heads, head_dim) for t in (q, k, v))
    torch.manual_seed(42)
    samples = attn_kernel.attention(q, k, v, None, head_dim**-0.5, P).double()
    expected = attn_kernel.attention(q[:1], k[:1], v[:1], None, head_dim**-0.5).double()[0]
    noise = samples.var(dim=0).sum().item() / copies  # E||mean - expected||^2 if unbiased
    error = (samples.mean(dim=0) - expected).square().sum().item()
    assert error <= 3.0 * noise, f"squared error of the mean {error:.3e}, its expectation {noise:.3e}"


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_attention_backward_is_the_derivative_of_the_forward(layout, monkeypatch):
    heads, head_dim = 2, 24
    if layout == "padded":
        batch, seq = 2, 37
        key_mask = torch.arange(seq, device=DEVICE)[None, :] < torch.tensor([37, 20], device=DEVICE)[:, None]
        qkv = random_qkv((batch, seq), heads, head_dim, torch.float32, seed=51)
        weight = torch.randn(batch, seq, heads, head_dim, generator=torch.Generator().manual_seed(52)).to(DEVICE)

        def f(x):
            return (attn_kernel.attention(*split(x, heads), key_mask, head_dim**-0.5, P) * weight).sum()

    else:
        lengths = [23, 1, 30]
        qkv = random_qkv((sum(lengths),), heads, head_dim, torch.float32, seed=53)
        weight = torch.randn(sum(lengths), heads, head_dim, generator=torch.Generator().manual_seed(54)).to(DEVICE)
        cu_seqlens = cumulative(lengths)

        def f(x):
            out = attn_kernel.attention_varlen(*split(x, heads), cu_seqlens, max(lengths), head_dim**-0.5, P)
            return (out * weight).sum()

    assert derivative_matches(*directional_check(f, [qkv], seed=55, eps=1e-2))
    if layout == "padded":  # the check has teeth: a backward with another mask fails it
        backward_with_another_seed(monkeypatch, attn_kernel)
        assert not derivative_matches(*directional_check(f, [qkv], seed=55, eps=1e-2))


# ----------------------------------------------------------------------------------------------
# LayerNorm with fused hidden dropout
# ----------------------------------------------------------------------------------------------


def ln_inputs(rows: int, hidden: int, dtype, seed: int, strided: bool = False):
    """x (optionally a strided slice of a wider buffer), residual, linear_bias, weight, bias."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)

    x = rand(rows, hidden + 7, offset=1.0)[:, 3 : 3 + hidden] if strided else rand(rows, hidden, offset=1.0)
    return x, rand(rows, hidden), rand(hidden, scale=0.5), rand(hidden, scale=0.3, offset=1.0), rand(hidden, scale=0.2)


def ln_run(fn, inputs, dy, names=("x", "residual", "linear_bias", "weight", "bias")):
    """Forward and backward of ``fn(x, weight, bias, residual, linear_bias)``: (y, {name: grad})."""
    leaves = {name: t.detach().requires_grad_() if t is not None else None for name, t in zip(names, inputs)}
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["residual"], leaves["linear_bias"])
    y.backward(dy.to(y.dtype))
    return y.detach(), {name: t.grad for name, t in leaves.items() if t is not None}


def ln_keep_mask(rows: int, hidden: int, p: float, seed: int) -> torch.Tensor:
    """The keep mask of a ``(rows, hidden)`` call under ``torch.manual_seed(seed)``, read back from
    the gradients: ``dx = dresidual * keep / (1 - p)`` exactly (dresidual is nonzero almost surely)."""
    x, residual, linear_bias, weight, bias = ln_inputs(rows, hidden, torch.float32, seed=seed + 1000)
    dy = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    torch.manual_seed(seed)
    _, grads = ln_run(
        lambda x, w, b, r, lb: ln_kernel.layer_norm(x, w, b, 1e-5, r, lb, p),
        (x, residual, linear_bias, weight, bias),
        dy,
    )
    keep = grads["x"] != 0
    ratio = grads["x"][keep] / grads["residual"][keep]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.0 / (1.0 - p)), rtol=1e-6, atol=0)
    return keep


def ln_reference(keep, p, eps):
    """``LayerNorm(dropout(x + linear_bias) + residual)`` with the given keep mask, in the inputs' dtype."""

    def reference(x, weight, bias, residual, linear_bias):
        h = x + linear_bias if linear_bias is not None else x
        h = h * keep.to(h.dtype) / (1.0 - p)
        if residual is not None:
            h = h + residual
        return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    return reference


@pytest.mark.parametrize(
    "rows, hidden, dtype, residual, linear_bias, strided",
    [
        (45, 300, torch.float32, True, True, True),
        (33, 1000, torch.float32, True, False, False),
        (9, 37, torch.float32, False, True, False),
        (20, 130, torch.float16, True, True, False),
    ],
)
def test_layer_norm_dropout_is_the_reference_under_its_mask(rows, hidden, dtype, residual, linear_bias, strided):
    eps = 1e-5
    keep = ln_keep_mask(rows, hidden, P, seed=61)
    assert_rate(keep, P, "hidden dropout")
    x, res, lin, weight, bias = ln_inputs(rows, hidden, dtype, seed=62, strided=strided)
    inputs = (x, res if residual else None, lin if linear_bias else None, weight, bias)
    dy = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(63)).to(DEVICE, dtype)

    def kernel(x, w, b, r, lb):
        return ln_kernel.layer_norm(x, w, b, eps, r, lb, P)

    torch.manual_seed(61)
    y, grads = ln_run(kernel, inputs, dy)
    wide = tuple(t.double() if t is not None else None for t in inputs)
    y64, grads64 = ln_run(ln_reference(keep, P, eps), wide, dy.double())
    y_lp, grads_lp = ln_run(ln_reference(keep, P, eps), inputs, dy) if dtype != torch.float32 else (None, {})
    assert_close(y, y64, torch_lowp=y_lp, name="y")
    assert set(grads) == set(grads64)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_close(grad, grads64[name], direction="backward", torch_lowp=grads_lp.get(name), name=f"d{name}")


def test_layer_norm_masks_are_reproducible_and_independent():
    rows, hidden = 24, 200
    first = ln_keep_mask(rows, hidden, P, seed=71)
    assert torch.equal(first, ln_keep_mask(rows, hidden, P, seed=71))
    assert_independent(first, ln_keep_mask(rows, hidden, P, seed=72), P, "two seeds")
    assert_independent(first[: rows // 2], first[rows // 2 :], P, "two halves of the rows")
    assert_independent(first[:, : hidden // 2], first[:, hidden // 2 :], P, "two halves of the columns")
    for p in (0.1, 0.5):
        assert_rate(ln_keep_mask(rows, hidden, p, seed=73), p, f"hidden dropout at p={p}")


def test_layer_norm_backward_is_the_derivative_of_the_forward(monkeypatch):
    x, residual, linear_bias, weight, bias = ln_inputs(21, 200, torch.float32, seed=81)
    out_weight = torch.randn(21, 200, generator=torch.Generator().manual_seed(82)).to(DEVICE)

    def f(x, residual, linear_bias, weight, bias):
        return (ln_kernel.layer_norm(x, weight, bias, 1e-5, residual, linear_bias, P) * out_weight).sum()

    inputs = [x, residual, linear_bias, weight, bias]
    assert derivative_matches(*directional_check(f, inputs, seed=83, eps=1e-2))
    backward_with_another_seed(monkeypatch, ln_kernel)
    assert not derivative_matches(*directional_check(f, inputs, seed=83, eps=1e-2))


# ----------------------------------------------------------------------------------------------
# Public ops, dispatch, registration
# ----------------------------------------------------------------------------------------------


def test_public_ops_run_dropout_where_declared(monkeypatch):
    x, residual, linear_bias, weight, bias = ln_inputs(6, 64, torch.float32, seed=91)
    q, k, v = split(random_qkv((12,), 2, 16, torch.float32, seed=92), 2)
    cu_seqlens = cumulative([5, 7])

    # The reference drops x + linear_bias (not the residual) with F.dropout: same generator draws.
    torch.manual_seed(93)
    got = ops.layer_norm(x, weight, bias, 1e-5, residual, linear_bias, dropout_p=P, backend="reference")
    torch.manual_seed(93)
    expected = F.layer_norm(F.dropout(x + linear_bias, P) + residual, (64,), weight, bias, 1e-5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for backend in ("reference", "triton"):
        out = ops.attention_varlen(q, k, v, cu_seqlens, 7, dropout_p=P, backend=backend)
        undropped = ops.attention_varlen(q, k, v, cu_seqlens, 7, backend=backend)
        assert out.shape == q.shape and torch.isfinite(out).all() and not torch.allclose(out, undropped)
        y = ops.layer_norm(x, weight, bias, 1e-5, residual, linear_bias, dropout_p=P, backend=backend)
        undropped = ops.layer_norm(x, weight, bias, 1e-5, residual, linear_bias, backend=backend)
        assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, undropped)
        assert ops.explain("layer_norm", x, weight, bias, dropout_p=P)[backend] is None

    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            ops.layer_norm(x, weight, bias, dropout_p=bad)
        with pytest.raises(ValueError, match="dropout_p"):
            ops.attention_varlen(q, k, v, cu_seqlens, 7, dropout_p=bad)
        with pytest.raises(ValueError, match="dropout_p"):
            ln_kernel.layer_norm(x, weight, bias, 1e-5, dropout_p=bad)

    # A backend that does not declare a dropout is refused, with the reason, and only when p > 0.
    monkeypatch.setattr(triton_backend, "SUPPORTS_HIDDEN_DROPOUT", False)
    monkeypatch.setattr(triton_backend, "SUPPORTS_ATTENTION_DROPOUT", False)
    assert "hidden dropout" in ops.explain("layer_norm", x, weight, bias, dropout_p=P)["triton"]
    assert ops.explain("layer_norm", x, weight, bias)["triton"] is None
    assert "attention-probability dropout" in ops.explain("attention_varlen", q, k, v, dropout_p=P)["triton"]
    with pytest.raises(BackendUnavailable, match="hidden dropout"):
        ops.layer_norm(x, weight, bias, dropout_p=P, backend="triton")
    with pytest.raises(BackendUnavailable, match="attention-probability dropout"):
        ops.attention_varlen(q, k, v, cu_seqlens, 7, dropout_p=P, backend="triton")


def test_opcheck_with_dropout():
    seed = torch.tensor(4321, device=DEVICE)
    qkv = random_qkv((1, 5), 1, 16, torch.float32, seed=101)  # one program per kernel: opcheck runs them often
    q, k, v = (t.requires_grad_() for t in split(qkv, 1))
    key_mask = torch.tensor([[True] * 3 + [False] * 2], device=DEVICE)
    torch.library.opcheck(torch.ops.bertfast.attention_fwd.default, (q, k, v, key_mask, 0.25, P, seed))
    out, lse = (t.detach() for t in torch.ops.bertfast.attention_fwd(q, k, v, key_mask, 0.25, P, seed))
    grad_out = torch.randn(out.shape).to(DEVICE)
    qkv_d = tuple(t.detach() for t in (q, k, v))
    bwd_args = (grad_out, *qkv_d, out, lse, key_mask, 0.25, P, seed)
    torch.library.opcheck(torch.ops.bertfast.attention_bwd.default, bwd_args)

    packed = random_qkv((9,), 1, 16, torch.float32, seed=102)
    q, k, v = (t.requires_grad_() for t in split(packed, 1))
    cu_seqlens = cumulative([3, 6])
    torch.library.opcheck(torch.ops.bertfast.attention_varlen_fwd.default, (q, k, v, cu_seqlens, 6, 0.25, P, seed))
    out, lse = (t.detach() for t in torch.ops.bertfast.attention_varlen_fwd(q, k, v, cu_seqlens, 6, 0.25, P, seed))
    bwd_args = (torch.randn(out.shape).to(DEVICE), *(t.detach() for t in (q, k, v)), out, lse, cu_seqlens, 6, 0.25)
    torch.library.opcheck(torch.ops.bertfast.attention_varlen_bwd.default, (*bwd_args, P, seed))

    x, residual, linear_bias, weight, bias = (t.requires_grad_() for t in ln_inputs(6, 16, torch.float32, seed=103))
    for r in (residual, None):
        args = (x, weight, bias, 1e-5, r, linear_bias, P, seed)
        torch.library.opcheck(torch.ops.bertfast.layer_norm_fwd.default, args)
    detached = [t.detach() for t in (x, weight, bias, residual, linear_bias)]
    _, mean, rstd = torch.ops.bertfast.layer_norm_fwd(*detached[:3], 1e-5, *detached[3:], P, seed)
    dy = torch.randn(6, 16).to(DEVICE)
    args = (dy, detached[0], detached[1], mean, rstd, detached[3], detached[4], P, seed)
    torch.library.opcheck(torch.ops.bertfast.layer_norm_bwd.default, args)


def test_torch_compile_fullgraph_with_dropout():
    """The seeds are drawn inside the graph: compiled and eager agree bit for bit under one seed."""
    heads, lengths = 2, [4, 9]
    key_mask = torch.arange(9, device=DEVICE)[None, :] < torch.tensor([9, 4], device=DEVICE)[:, None]
    ln_weight, ln_bias = (torch.randn(3 * heads * 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))

    def step(qkv, packed):
        padded = attn_kernel.attention(*split(qkv, heads), key_mask, 0.25, P)
        varlen = attn_kernel.attention_varlen(*split(packed, heads), cumulative(lengths), 9, 0.25, P)
        normed = ln_kernel.layer_norm(packed * 2.0, ln_weight.to(DEVICE), ln_bias.to(DEVICE), 1e-5, packed, None, P)
        return padded.square().sum() + varlen.square().sum() + normed.relu().sum()

    inputs = (random_qkv((2, 9), heads, 16, torch.float32, seed=111), random_qkv((13,), heads, 16, torch.float32, 112))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn, seed in ((step, 7), (compiled, 7), (compiled, 8)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(seed)
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (eager, eager_grads), (traced, traced_grads), (reseeded, _) = results
    assert torch.equal(traced, eager)
    for g, e in zip(traced_grads, eager_grads):
        assert torch.equal(g, e)
    assert not torch.equal(reseeded, eager), "each compiled call draws fresh masks"


# ----------------------------------------------------------------------------------------------
# The model in train mode
# ----------------------------------------------------------------------------------------------

DROPOUT_CONFIG = dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_hidden_layers=1)


def test_a_training_forward_draws_its_seeds_once_and_reads_nothing_back():
    """One generator call for every fused dropout of a forward (not one per kernel call), the seeds
    stay on the device (no host read), and the backward regenerates the forward's masks from them."""
    config = small_config(**{**DROPOUT_CONFIG, "num_hidden_layers": 3})
    model = bertfast.BertModel(config, backend="triton").train().to(DEVICE)
    model.embeddings.dropout.p = 0.0  # eager dropout draws from the generator on its own
    ids, types, mask = (t.to(DEVICE) for t in ragged_batch(config, [9, 9], seq=9))
    with OpNames() as counter:
        model(ids, mask, types).last_hidden_state.sum().backward()
    assert counter.ops.count("randint") == 1, counter.ops
    assert "_local_scalar_dense" not in counter.ops


def test_model_training_is_reproducible_and_differentiable_and_eval_is_exact():
    config = small_config(**DROPOUT_CONFIG)
    model = bertfast.BertModel(config, backend="triton").train().to(DEVICE)
    ids, types, mask = (t.to(DEVICE) for t in ragged_batch(config, [9, 4], seq=9))
    assert model(ids, mask, types).packed is not None, "training with padding now runs unpadded (varlen dropout)"
    out_weight = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(121)).to(DEVICE)
    params = {name: p.detach() for name, p in model.named_parameters()}
    names = list(params)

    def loss(*values):
        state = functional_call(model, dict(zip(names, values)), (ids, mask, types))
        return (state.last_hidden_state * out_weight).sum()

    # Under one seed every dropout mask (eager embedding dropout, fused kernels) is fixed, so the
    # backward is the derivative of the forward: a directional check over all parameters at once.
    assert derivative_matches(*directional_check(loss, list(params.values()), seed=122, eps=3e-4), rtol=1e-2)

    torch.manual_seed(123)
    first = model(ids, mask, types).last_hidden_state
    torch.manual_seed(123)
    again = model(ids, mask, types).last_hidden_state
    other = model(ids, mask, types).last_hidden_state
    assert torch.equal(first, again), "the same torch seed gives the same masks"
    assert not torch.allclose(first, other), "a new draw gives new masks"

    model.eval()  # every dropout off: exactly the model built without dropout
    plain = bertfast.BertModel(small_config(num_hidden_layers=1), backend="triton").eval().to(DEVICE)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        evaluated = model(ids, mask, types).last_hidden_state
        assert torch.equal(evaluated, plain(ids, mask, types).last_hidden_state)
        reference = model.set_backend("reference")(ids, mask, types).last_hidden_state
    valid = mask.bool()
    assert rel_error(evaluated[valid], reference[valid]) <= MODEL_FP32_REL_TOL
    assert not torch.allclose(first[valid], evaluated[valid]), "train mode applies dropout"


def test_model_train_mode_statistics_match_the_reference():
    """Masks differ between backends, so compare distributions: over seeds, the train-mode hidden
    states of the Triton model have the reference's mean (within the sampling noise) and spread.

    The embedding dropout (eager, the same draws on both backends) is turned off so the spread
    comes from the fused kernels alone.
    """
    config = small_config(**DROPOUT_CONFIG)
    model = bertfast.BertModel(config, backend="triton").train().to(DEVICE)
    model.embeddings.dropout.p = 0.0
    ids, types, mask = (t.to(DEVICE) for t in ragged_batch(config, [11, 6, 1], seq=11))
    samples = {}
    with torch.no_grad():
        for backend, first_seed in (("triton", 200), ("reference", 300)):  # distinct seeds: independent draws
            model.set_backend(backend)
            draws = []
            for seed in range(first_seed, first_seed + 6):
                torch.manual_seed(seed)
                draws.append(model(ids, mask, types).last_hidden_state[mask.bool()].double())
            samples[backend] = torch.stack(draws)
        model.eval()
        undropped = model(ids, mask, types).last_hidden_state[mask.bool()].double()
    ours, ref = samples["triton"], samples["reference"]
    count = ours.shape[0]
    noise = (ours.var(dim=0).sum() + ref.var(dim=0).sum()).item() / count
    error = (ours.mean(dim=0) - ref.mean(dim=0)).square().sum().item()
    assert error <= 3.0 * noise, f"means differ by {error:.3e}; sampling noise {noise:.3e}"
    spread = ours.var(dim=0).sum().item() / ref.var(dim=0).sum().item()
    assert 0.6 <= spread <= 1.6, f"train-mode spread is {spread:.2f}x the reference's"
    assert (ours - undropped).abs().amax(dim=1).min() > 0, "every train-mode draw differs from eval"
