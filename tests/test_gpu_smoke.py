"""GPU smoke tests: the first minutes on a GPU, at BERT-large's shapes (``pytest -m gpu_smoke``).

Stage b of ``scripts/gpu-check.sh``, sized for about 90 s on an H100 (most of it Triton's
autotuning of the attention keys below, less with a carried Triton cache):

- every op forward and backward (every gradient), bf16 and fp16, hidden 1024, 16 heads x 64,
  FFN 4096, seq 128 and 512, on the Triton kernels and the extension's CUDA kernels, against
  the float64 reference under the numerics policy (``bertfast/numerics.py``: at most 2x / 3x
  PyTorch's own low-precision error plus a floor); attention padded with a mask, without one,
  and variable-length; outputs poisoned with NaN before the kernels run;
- dropout's statistics (the kept fraction, the scale, reproducibility with the seed) in the
  attention and LayerNorm kernels;
- BERT-large in bf16 against Hugging Face sdpa on a padded batch, both against the float32 model;
- CUDA-graph capture and replay; one ``torch.compile(fullgraph=True)`` of the native model.

Without a GPU these tests skip, unless ``BERTFAST_GPU_SMOKE_TINY=1`` (the gpu-check dry run):
then the same tests run on the CPU at tiny sizes (one length) in fp16 (Triton's interpreter cannot
multiply bf16 tiles; the extension's CPU kernels), so the plan cannot rot.

Attention autotune keys this file reaches on a GPU (for a carried Triton cache): head_dim 64;
seq buckets 128 and 512; bf16 and fp16; padded with mask, padded without mask (seq 128),
varlen, and with dropout (padded with mask and varlen, seq 128, bf16).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import bertfast
from bertfast import ops
from bertfast.numerics import LOWP_FACTOR, LOWP_FLOOR, assert_close, max_abs_error
from bertfast.ops import reference

GPU = torch.cuda.is_available()
TINY = not GPU and os.environ.get("BERTFAST_GPU_SMOKE_TINY") == "1"
pytestmark = [
    pytest.mark.gpu_smoke,
    pytest.mark.skipif(
        not GPU and not TINY,
        reason="GPU smoke tests need a CUDA GPU (BERTFAST_GPU_SMOKE_TINY=1 runs them on the CPU at tiny sizes)",
    ),
]
DEVICE = "cuda" if GPU else "cpu"
if TINY:
    HIDDEN, HEADS, HEAD_DIM, FFN, SEQS, LAYERS = 48, 3, 16, 96, (29,), 2  # one length: the interpreter is slow
    DTYPES = (torch.float16,)
else:
    HIDDEN, HEADS, HEAD_DIM, FFN, SEQS, LAYERS = 1024, 16, 64, 4096, (128, 512), 24
    DTYPES = (torch.bfloat16, torch.float16)
# Token-wise ops see 2048 tokens per call at seq 512 (4 sequences), 1024 at seq 128 (8 sequences).
BATCH = dict(zip(SEQS, (8, 4))) if GPU else dict.fromkeys(SEQS, 2)
BACKENDS = ("triton", "ext")
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _poison():
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel never writes fails."""
    if GPU:
        poison = [torch.full((1 << 17,), float("nan"), device=DEVICE) for _ in range(64)]
        poison.append(torch.full((256 << 20,), float("nan"), device=DEVICE))
        del poison
    yield


def _need(backend: str) -> None:
    """On a GPU a missing backend is a failure (the build stage should have made it); on the CPU a skip."""
    reason = ops.backend_availability(backend)
    if reason is not None:
        if GPU:
            pytest.fail(f"backend {backend!r} is unavailable on the GPU machine: {reason}")
        pytest.skip(reason)


def _randn(*shape, dtype, gen, scale=1.0, shift=0.0):
    t = torch.randn(*shape, generator=gen) * scale + shift
    return t.to(DEVICE, dtype).requires_grad_(True)


def _check(outs, refs, lowps, direction_names):
    for out, ref, lowp, (direction, name) in zip(outs, refs, lowps, direction_names):
        assert_close(out, ref, direction=direction, torch_lowp=lowp, name=name)


def _run(fn, inputs, grad_out):
    """``fn(*inputs)`` and the gradient of every floating input (leaves of their own)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out.detach(), grads


def _as64(inputs):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]


# ----------------------------------------------------------------------------------------------
# Token-wise ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_layer_norm(backend, seq, dtype):
    _need(backend)
    gen = torch.Generator().manual_seed(seq)
    rows = BATCH[seq] * seq
    inputs = [
        _randn(rows, HIDDEN, dtype=dtype, gen=gen),
        _randn(HIDDEN, dtype=dtype, gen=gen, scale=0.1, shift=1.0),
        _randn(HIDDEN, dtype=dtype, gen=gen, scale=0.1),
        _randn(rows, HIDDEN, dtype=dtype, gen=gen),
        _randn(HIDDEN, dtype=dtype, gen=gen, scale=0.1),
    ]
    grad_out = torch.randn(rows, HIDDEN, generator=gen).to(DEVICE, dtype)

    def mine(x, w, b, r, lb):
        return ops.layer_norm(x, w, b, 1e-12, residual=r, linear_bias=lb, backend=backend)

    def ref(x, w, b, r, lb):
        return reference.layer_norm(x, w, b, 1e-12, r, lb)

    def torch_own(x, w, b, r, lb):
        return F.layer_norm(x + lb + r, (x.shape[-1],), w, b, 1e-12)

    out, grads = _run(mine, inputs, grad_out)
    ref_out, ref_grads = _run(ref, _as64(inputs), grad_out.double())
    low_out, low_grads = _run(torch_own, inputs, grad_out)
    names = [("forward", "y")] + [("backward", f"d{n}") for n in ("x", "weight", "bias", "residual", "linear_bias")]
    _check([out, *grads], [ref_out, *ref_grads], [low_out, *low_grads], names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_bias_gelu(backend, seq, dtype):
    _need(backend)
    gen = torch.Generator().manual_seed(seq + 1)
    rows = BATCH[seq] * seq
    inputs = [_randn(rows, FFN, dtype=dtype, gen=gen), _randn(FFN, dtype=dtype, gen=gen, scale=0.1)]
    grad_out = torch.randn(rows, FFN, generator=gen).to(DEVICE, dtype)
    out, grads = _run(lambda x, b: ops.bias_gelu(x, b, backend=backend), inputs, grad_out)
    ref_out, ref_grads = _run(reference.bias_gelu, _as64(inputs), grad_out.double())
    low_out, low_grads = _run(lambda x, b: F.gelu(x + b), inputs, grad_out)
    names = [("forward", "y"), ("backward", "dx"), ("backward", "dbias")]
    _check([out, *grads], [ref_out, *ref_grads], [low_out, *low_grads], names)


def test_embedding_layer_norm():
    for backend in BACKENDS:
        _need(backend)
    dtype, seq = DTYPES[0], SEQS[0]
    gen = torch.Generator().manual_seed(5)
    batch = BATCH[seq]
    ids = torch.randint(0, 1000, (batch, seq), generator=gen).to(DEVICE)
    pos = torch.arange(seq).expand(batch, seq).to(DEVICE)
    types = torch.randint(0, 2, (batch, seq), generator=gen).to(DEVICE)
    tables = [
        _randn(1000, HIDDEN, dtype=dtype, gen=gen),
        _randn(512, HIDDEN, dtype=dtype, gen=gen),
        _randn(2, HIDDEN, dtype=dtype, gen=gen),
        _randn(HIDDEN, dtype=dtype, gen=gen, scale=0.1, shift=1.0),
        _randn(HIDDEN, dtype=dtype, gen=gen, scale=0.1),
    ]
    grad_out = torch.randn(batch, seq, HIDDEN, generator=gen).to(DEVICE, dtype)

    def call(backend):
        return lambda w, p, t, g, b: ops.embedding_layer_norm(ids, pos, types, w, p, t, g, b, 1e-12, backend=backend)

    ref_out, ref_grads = _run(call("reference"), _as64(tables), grad_out.double())
    low_out, low_grads = _run(call("reference"), tables, grad_out)
    names = [("forward", "y")] + [("backward", f"d{n}") for n in ("word", "position", "token_type", "weight", "bias")]
    for backend in BACKENDS:
        out, grads = _run(call(backend), tables, grad_out)
        _check([out, *grads], [ref_out, *ref_grads], [low_out, *low_grads], [(d, f"{backend} {n}") for d, n in names])


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _lengths(batch: int, seq: int, gen) -> list[int]:
    """Ragged right padding: the first sequence full, the others between 1 and seq."""
    return [seq] + torch.randint(1, seq + 1, (batch - 1,), generator=gen).tolist()


def _sdpa_lowp(q, k, v, mask):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    keep = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep).transpose(1, 2)


def _split(qkv):
    return qkv.unbind(-3)


def _check_attention(fn, ref, lowp, qkv, grad_out):
    out, (grad,) = _run(lambda t: fn(*_split(t)), [qkv], grad_out)
    ref_out, (ref_grad,) = _run(lambda t: ref(*_split(t)), [qkv.double()], grad_out.double())
    low_out, (low_grad,) = _run(lambda t: lowp(*_split(t)), [qkv], grad_out)
    assert_close(out, ref_out, torch_lowp=low_out, name="out")
    for part, g, r, lo in zip("qkv", grad.unbind(-3), ref_grad.unbind(-3), low_grad.unbind(-3)):
        assert_close(g, r, direction="backward", torch_lowp=lo, name=f"d{part}")


@pytest.mark.parametrize("backend, masked", [("triton", True), ("ext", True), ("triton", False)])
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_attention(backend, masked, seq, dtype):
    _need(backend)
    if not masked and (seq != SEQS[0] or dtype != DTYPES[0]):
        pytest.skip("the unmasked kernel is checked at the first seq and dtype (one autotune key)")
    gen = torch.Generator().manual_seed(seq + 7)
    batch = BATCH[seq]
    qkv = _randn(batch, seq, 3, HEADS, HEAD_DIM, dtype=dtype, gen=gen)
    grad_out = torch.randn(batch, seq, HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    mask = (torch.arange(seq)[None, :] < torch.tensor(_lengths(batch, seq, gen))[:, None]).to(DEVICE)
    mask = mask if masked else None
    scale = HEAD_DIM**-0.5
    _check_attention(
        lambda q, k, v: ops.attention(q, k, v, mask, backend=backend),
        lambda q, k, v: reference.attention(q, k, v, mask, scale),
        lambda q, k, v: _sdpa_lowp(q, k, v, mask),
        qkv,
        grad_out,
    )


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_attention_varlen(seq, dtype):
    _need("triton")
    gen = torch.Generator().manual_seed(seq + 11)
    lengths = _lengths(BATCH[seq], seq, gen)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    qkv = _randn(offsets[-1], 3, HEADS, HEAD_DIM, dtype=dtype, gen=gen)
    grad_out = torch.randn(offsets[-1], HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    scale = HEAD_DIM**-0.5

    def lowp(q, k, v):
        pieces = [_sdpa_lowp(q[None, a:b], k[None, a:b], v[None, a:b], None)[0] for a, b in zip(offsets, offsets[1:])]
        return torch.cat(pieces)

    _check_attention(
        lambda q, k, v: ops.attention_varlen(q, k, v, cu, seq, backend="triton"),
        lambda q, k, v: reference.attention_varlen(q, k, v, cu, seq, scale),
        lowp,
        qkv,
        grad_out,
    )


# ----------------------------------------------------------------------------------------------
# Dropout: statistics and reproducibility
# ----------------------------------------------------------------------------------------------

DROPOUT_P = 0.1


def _within(observed: float, expected: float, sigma: float, what: str) -> None:
    assert abs(observed - expected) <= 5 * sigma, f"{what}: {observed:.5f}, expected {expected:.5f} +- 5 x {sigma:.2e}"


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_attention_dropout_statistics(varlen):
    """Equal scores (q = 0) and v = 1: each output is (kept keys / n) / (1 - p); its mean is 1."""
    _need("triton")
    dtype, seq = DTYPES[0], SEQS[0]
    batch = BATCH[seq]
    if varlen:
        q = torch.zeros(batch * seq, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=DEVICE)

        def call():
            return ops.attention_varlen(q, q, torch.ones_like(q), cu, seq, dropout_p=DROPOUT_P, backend="triton")

    else:
        q = torch.zeros(batch, seq, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)

        def call():
            return ops.attention(q, q, torch.ones_like(q), mask, dropout_p=DROPOUT_P, backend="triton")

    torch.manual_seed(1)
    first = call()[..., 0].float()
    torch.manual_seed(1)
    again = call()[..., 0].float()
    torch.manual_seed(2)
    other = call()[..., 0].float()
    assert torch.equal(first, again), "the same seed must give the same dropout mask"
    assert not torch.equal(first, other), "another seed must give another mask"
    # One output row averages n keep/(1-p) draws: mean 1, variance p / ((1 - p) n); rows are independent.
    samples = first.numel()
    sigma = (DROPOUT_P / ((1 - DROPOUT_P) * seq * samples)) ** 0.5 + 4e-3  # plus the rounding of low precision
    _within(first.mean().item(), 1.0, sigma, "mean of the dropped-out attention output")


def test_layer_norm_dropout_statistics():
    """LN(dropout(1)): kept positions share one (high) value, dropped ones another; p of them are dropped."""
    _need("triton")
    dtype = DTYPES[0]
    rows = BATCH[SEQS[0]] * SEQS[0]
    x = torch.zeros(rows, HIDDEN, device=DEVICE, dtype=dtype)
    ones = torch.ones(HIDDEN, device=DEVICE, dtype=dtype)
    zeros = torch.zeros(HIDDEN, device=DEVICE, dtype=dtype)

    def call():
        return ops.layer_norm(x, ones, zeros, 1e-12, linear_bias=ones, dropout_p=DROPOUT_P, backend="triton").float()

    torch.manual_seed(3)
    y = call()
    torch.manual_seed(3)
    assert torch.equal(y, call()), "the same seed must give the same dropout mask"
    dropped = (y < 0).float().mean().item()  # kept entries sit above the row mean, dropped ones below
    n = y.numel()
    _within(dropped, DROPOUT_P, (DROPOUT_P * (1 - DROPOUT_P) / n) ** 0.5, "dropped fraction")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def _config(layers: int = LAYERS) -> bertfast.BertConfig:
    if TINY:
        return bertfast.BertConfig(
            vocab_size=101,
            hidden_size=HIDDEN,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    return bertfast.BertConfig.bert_large(
        num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def _batch(config, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(_lengths(batch, seq, gen))
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen) * mask
    types = ((torch.arange(seq)[None, :] >= (lengths[:, None] // 2)) & mask.bool()).long()
    return ids.to(DEVICE), mask.to(DEVICE), types.to(DEVICE)


def test_bert_large_matches_hugging_face_sdpa():
    """bertfast (auto) in the low precision against the float32 model: within 2x Hugging Face sdpa's own error."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = _config()
    with torch.device(DEVICE):
        master = bertfast.BertModel(config, backend="reference").eval()
    ids, mask, types = _batch(config, 4, SEQS[0], seed=3)
    keep = mask.bool()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = master(ids, mask, types).last_hidden_state[keep].double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    dtype = DTYPES[0]
    with torch.device(DEVICE):
        hf = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="sdpa"))
    hf.load_state_dict(master.state_dict())
    hf = hf.to(dtype).eval()
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep]
    del hf
    ours = master.to(dtype).set_backend("auto")
    with torch.no_grad():
        out = ours(ids, mask, types).last_hidden_state[keep]
    assert torch.isfinite(out).all()
    bound = LOWP_FACTOR["forward"] * max_abs_error(hf_out, ref) + LOWP_FLOOR[dtype]
    err = max_abs_error(out, ref)
    assert err <= bound, f"bertfast {dtype} max error {err:.3e} > {bound:.3e} (2x Hugging Face sdpa's + floor)"


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    config = _config(layers=2)
    model = bertfast.BertModel(config).to(DEVICE, DTYPES[0]).eval().set_unpad(False)
    seq = SEQS[0]
    runner = bertfast.CUDAGraphRunner(model, batch_buckets=(4,), seq_buckets=(seq,))
    runner.capture(4, seq)
    for seed in (1, 2):  # the second replay with new inputs: the graph reads its static buffers again
        ids, mask, types = _batch(config, 4, seq, seed)
        out = runner(ids, mask, types).last_hidden_state
        with torch.no_grad():
            eager = model(ids, mask, types).last_hidden_state
        keep = mask.bool()
        assert torch.equal(out[keep], eager[keep]), "the replay must equal the eager padded forward bit for bit"
    assert runner.captured_buckets == [(4, seq)]


def test_torch_compile_fullgraph_native_model():
    """One whole-model compile (inductor on a GPU) of a 2-layer BERT-large-wide model, without a graph break."""
    torch.manual_seed(0)
    config = _config(layers=2)
    model = bertfast.BertModel(config).to(DEVICE, DTYPES[0]).eval()
    ids, mask, types = _batch(config, 4, SEQS[0], seed=4)
    with torch.no_grad():
        eager = model(ids, mask, types).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if GPU else "aot_eager")
        out = compiled(ids, mask, types).last_hidden_state
    keep = mask.bool()
    assert torch.isfinite(out[keep]).all()
    tol = 5e-2 if GPU else 1e-2
    torch.testing.assert_close(out[keep].float(), eager[keep].float(), rtol=tol, atol=tol)
