"""Kernel-level cases: each op on each bertfast backend against PyTorch on the same device.

    op                 bertfast impls              PyTorch baselines
    layer_norm         LN(x + linear_bias + residual), hidden 1024
                       bertfast-<backend>          torch-layer_norm (F.layer_norm of the unfused sum),
                                                   torch-compile (torch.compile of the reference op)
    bias_gelu          gelu(x + bias), FFN 4096
                       bertfast-<backend>          torch-gelu (F.gelu(x + bias)), torch-compile
    attention          key-padding mask (see shapes.PADDING_DISTRIBUTION), q/k/v strided views of one QKV buffer
                       bertfast-<backend>          torch-sdpa (same mask), torch-sdpa-nomask (same shapes, no mask:
                                                   the fastest PyTorch kernel), torch-sdpa-<backend> (one SDPA
                                                   backend forced: flash, efficient, cudnn), torch-compile
    attention-nomask   no mask                     torch-sdpa, torch-sdpa-<backend>, torch-compile
    attention_varlen   the padded batch packed (no padding computed)
                       bertfast-<backend>
    mean_pool          mean pooling + L2 normalisation of the packed tokens of a padded batch (hidden 384, 1024)
                       bertfast-<backend>          sentence-transformers (what a padding-free encoder hands it today:
                                                   the tokens padded back to (batch, seq, hidden), then its Pooling
                                                   (mean) and Normalize modules), torch-compile

Each in ``fwd`` and ``bwd`` (the backward alone: the forward runs untimed in the round's
set-up; every gradient is computed).  Rows are named ``<op>-<direction>``;
an op is named as in :mod:`bertfast.ops`, ``attention-nomask`` is the attention op without a mask.
``torch-sdpa-<backend>`` runs under ``torch.nn.attention.sdpa_kernel`` with that backend
only; a backend that cannot run the case here (no such kernel in this torch, a mask the
flash kernel does not take) is recorded as skipped with PyTorch's reason.
``torch-compile`` compiles the reference op once per case (``dynamic=False``, ``fullgraph``,
its own Dynamo cache: :class:`~bertfast.benchmarking.cases.CompiledFunction`), and the row
fails if any call ran as eager Python instead of the compiled code.
Memory-bound ops report GB/s, attention TFLOP/s (:mod:`bertfast.benchmarking.formulas`);
``max_error`` is the max abs error against the op's reference in float64 (the max over
all gradients for ``bwd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast import ops
from bertfast.benchmarking import formulas
from bertfast.benchmarking.cases import (
    Case,
    CompiledFunction,
    Skip,
    compile_backend,
    compile_note,
    tensor_bytes,
    unavailable,
)
from bertfast.benchmarking.device import DTYPES
from bertfast.benchmarking.shapes import key_padding_mask, padded_lengths
from bertfast.benchmarking.timing import input_set_count
from bertfast.ops import reference

EPS = 1e-12
DIRECTIONS = ("fwd", "bwd")
BERTFAST_IMPLS = tuple(f"bertfast-{name}" for name in ops.BACKENDS)
# SDPA backends forced one at a time (torch.nn.attention.SDPBackend member names).
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
SDPA_BACKEND_IMPLS = tuple(f"torch-sdpa-{name}" for name in SDPA_BACKENDS)
KERNEL_IMPLS = {
    "layer_norm": BERTFAST_IMPLS + ("torch-layer_norm", "torch-compile"),
    "bias_gelu": BERTFAST_IMPLS + ("torch-gelu", "torch-compile"),
    "attention": BERTFAST_IMPLS + ("torch-sdpa", "torch-sdpa-nomask") + SDPA_BACKEND_IMPLS + ("torch-compile",),
    "attention-nomask": BERTFAST_IMPLS + ("torch-sdpa",) + SDPA_BACKEND_IMPLS + ("torch-compile",),
    "attention_varlen": BERTFAST_IMPLS,
    "mean_pool": BERTFAST_IMPLS + ("sentence-transformers", "torch-compile"),
}


# --- the ops, one signature per op ----------------------------------------------------
#   layer_norm:        (x, residual, weight, bias, linear_bias)
#   bias_gelu:         (x, bias)
#   attention(-nomask): (qkv, keep)  qkv (batch, seq, 3, heads, dim), keep (batch, seq) bool or None
#   attention_varlen:  (qkv, cu_seqlens, max_seqlen)  qkv (tokens, 3, heads, dim)
#   mean_pool:         (x, cu_seqlens, keep)  x (tokens, hidden) packed, keep (batch, seq) bool (its padded layout)


def _reference_layer_norm(x, residual, weight, bias, linear_bias):
    return reference.layer_norm(x, weight, bias, EPS, residual, linear_bias)


def _reference_bias_gelu(x, bias):
    return reference.bias_gelu(x, bias)


def _reference_attention(qkv, keep):
    q, k, v = qkv.unbind(2)
    return reference.attention(q, k, v, keep, q.shape[-1] ** -0.5)


def _reference_attention_varlen(qkv, cu_seqlens, max_seqlen):
    q, k, v = qkv.unbind(1)
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, q.shape[-1] ** -0.5)


def _reference_mean_pool(x, cu_seqlens, keep):
    return reference.mean_pool(x, cu_seqlens, True)


REFERENCE = {
    "layer_norm": _reference_layer_norm,
    "bias_gelu": _reference_bias_gelu,
    "attention": _reference_attention,
    "attention-nomask": _reference_attention,
    "attention_varlen": _reference_attention_varlen,
    "mean_pool": _reference_mean_pool,
}


def _bertfast_fn(op: str, backend: str):
    if op == "layer_norm":
        return lambda x, r, w, b, lb: ops.layer_norm(x, w, b, EPS, residual=r, linear_bias=lb, backend=backend)
    if op == "bias_gelu":
        return lambda x, b: ops.bias_gelu(x, b, backend=backend)
    if op == "mean_pool":
        # The offsets are built by the benchmark itself: no host read of them inside the timed call.
        return lambda x, cu_seqlens, keep: ops.mean_pool(x, cu_seqlens, True, backend=backend, check=False)
    if op in ("attention", "attention-nomask"):

        def attention(qkv, keep):
            q, k, v = qkv.unbind(2)
            return ops.attention(q, k, v, keep, backend=backend)

        return attention

    def attention_varlen(qkv, cu_seqlens, max_seqlen):
        q, k, v = qkv.unbind(1)
        # The offsets are built by the benchmark itself: no host read of them inside the timed call.
        return ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, backend=backend, check=False)

    return attention_varlen


def _torch_layer_norm(x, residual, weight, bias, linear_bias):
    return F.layer_norm(x + linear_bias + residual, (x.shape[-1],), weight, bias, EPS)


def _torch_gelu(x, bias):
    return F.gelu(x + bias)


class _SentenceTransformersPooling:
    """sentence-transformers' ``Pooling(mean)`` and ``Normalize`` on the packed tokens padded back to
    ``(batch, seq, hidden)`` (zeros at padding), as a padding-free encoder hands them to it."""

    def __init__(self):
        try:
            from sentence_transformers.base.modules import Normalize
            from sentence_transformers.sentence_transformer.modules import Pooling
        except ImportError as exc:
            raise Skip(f"sentence-transformers is not installed ({exc})") from exc
        self.pooling, self.normalize = Pooling, Normalize()
        self.modules = {}

    def __call__(self, x, cu_seqlens, keep):
        hidden = x.shape[-1]
        if hidden not in self.modules:
            self.modules[hidden] = self.pooling(hidden, pooling_mode="mean")
        padded = x.new_zeros((*keep.shape, hidden)).masked_scatter(keep[..., None], x)
        features = self.modules[hidden]({"token_embeddings": padded, "attention_mask": keep})
        return self.normalize(features)["sentence_embedding"]


def _torch_sdpa(qkv, keep):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, seq, dim) views
    mask = keep[:, None, None, :] if keep is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _torch_sdpa_nomask(qkv, keep):
    return _torch_sdpa(qkv, None)


def _sdpa_backend(name: str):
    """``(torch.nn.attention.sdpa_kernel, SDPBackend member)`` for a backend name, or a reason it is missing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return None, f"torch.nn.attention is missing in torch {torch.__version__} ({exc})"
    member = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if member is None:
        return None, f"torch {torch.__version__} has no SDPA backend {SDPA_BACKENDS[name]}"
    return (sdpa_kernel, member), None


def _torch_sdpa_forced(name: str):
    found, reason = _sdpa_backend(name)
    if found is None:
        raise Skip(reason)
    sdpa_kernel, member = found

    def forced(qkv, keep):
        with sdpa_kernel([member]):
            return _torch_sdpa(qkv, keep)

    return forced


def _sdpa_reason(fn, inputs: tuple) -> str | None:
    """Run a forced SDPA backend once: ``None`` if it runs, else PyTorch's reason (with its warnings)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                fn(*inputs)
        except RuntimeError as exc:
            text = str(exc).lower()
            if not any(k in text for k in ("available kernel", "viable backend", "not supported")):
                raise
            why = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught))[:400]
            return f"{str(exc).strip()}" + (f" ({why})" if why else "")
    return None


def _impl_fn(op: str, impl: str, compiler: str):
    if impl.startswith("bertfast-"):
        return _bertfast_fn(op, impl.removeprefix("bertfast-"))
    if impl == "torch-compile":
        # One compile per case, with a cache of its own: shared by every case, the reference op's
        # variants (dtypes x shapes x mask x grad mode) pass Dynamo's recompile limit and run eagerly.
        return CompiledFunction(REFERENCE[op], backend=compiler, dynamic=False, name=f"torch.compile({op})")
    if impl in SDPA_BACKEND_IMPLS:
        return _torch_sdpa_forced(impl.removeprefix("torch-sdpa-"))
    if impl == "sentence-transformers":
        return _SentenceTransformersPooling()
    table = {
        ("layer_norm", "torch-layer_norm"): _torch_layer_norm,
        ("bias_gelu", "torch-gelu"): _torch_gelu,
        ("attention", "torch-sdpa"): _torch_sdpa,
        ("attention", "torch-sdpa-nomask"): _torch_sdpa_nomask,
        ("attention-nomask", "torch-sdpa"): _torch_sdpa,
    }
    if (op, impl) not in table:
        raise ValueError(f"no implementation {impl!r} of kernel benchmark {op!r}")
    return table[(op, impl)]


# --- inputs -----------------------------------------------------------------------------


def _randn(shape, dtype, device, generator, scale=1.0, shift=0.0):
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).mul_(scale).add_(shift).to(dtype)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return cu_seqlens


def _make_inputs(op: str, shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> tuple:
    if op == "layer_norm":
        rows, hidden = shape.tokens, shape.features
        return (
            _randn((rows, hidden), dtype, device, generator),
            _randn((rows, hidden), dtype, device, generator),
            _randn((hidden,), dtype, device, generator, 0.1, 1.0),
            _randn((hidden,), dtype, device, generator, 0.1),
            _randn((hidden,), dtype, device, generator, 0.1),
        )
    if op == "bias_gelu":
        return (
            _randn((shape.tokens, shape.features), dtype, device, generator),
            _randn((shape.features,), dtype, device, generator, 0.1),
        )
    # Lengths are drawn on the host (the mask is built there) from a seed the device generator gives.
    seed = int(torch.randint(0, 2**31, (1,), generator=generator, device=device))
    lengths = padded_lengths(shape.batch, shape.seq, torch.Generator().manual_seed(seed))
    if op == "mean_pool":
        x = _randn((int(lengths.sum()), shape.features), dtype, device, generator)
        return x, _offsets(lengths).to(device), key_padding_mask(lengths, shape.seq).to(device)
    if op == "attention_varlen":
        total = int(lengths.sum())
        qkv = _randn((total, 3, shape.heads, shape.head_dim), dtype, device, generator)
        return qkv, _offsets(lengths).to(device), int(lengths.max())
    qkv = _randn((shape.batch, shape.seq, 3, shape.heads, shape.head_dim), dtype, device, generator)
    keep = key_padding_mask(lengths, shape.seq).to(device) if op == "attention" else None
    return qkv, keep


def _differentiable(op: str) -> tuple[int, ...]:
    """Positions of the inputs that get a gradient."""
    return (0, 1, 2, 3, 4) if op == "layer_norm" else (0, 1) if op == "bias_gelu" else (0,)


def _output_like(op: str, inputs: tuple) -> tuple[int, ...]:
    qkv = inputs[0]
    if op == "attention_varlen":
        return (qkv.shape[0], qkv.shape[2], qkv.shape[3])
    if op == "mean_pool":
        return (inputs[1].numel() - 1, qkv.shape[1])
    if op in ("attention", "attention-nomask"):
        return (qkv.shape[0], qkv.shape[1], qkv.shape[3], qkv.shape[4])
    return tuple(inputs[0].shape)


def _support_reason(op: str, impl: str, inputs: tuple) -> str | None:
    if not impl.startswith("bertfast-"):
        return None
    backend = impl.removeprefix("bertfast-")
    reason = ops.backend_availability(backend)
    if reason is not None:
        return reason
    if op in ("attention", "attention-nomask", "attention_varlen"):
        tensors = inputs[0].unbind(2 if op != "attention_varlen" else 1)
    elif op == "layer_norm":
        tensors = (inputs[0], inputs[2], inputs[3])
    elif op == "mean_pool":
        tensors = inputs[:2]
    else:
        tensors = inputs
    try:
        return ops.explain(op.split("-")[0], *tensors)[backend]  # attention-nomask is the attention op
    except Exception as exc:
        if unavailable(exc):
            return f"{type(exc).__name__}: {exc}"
        raise


# --- the work ---------------------------------------------------------------------------


def _work(op: str, shape, inputs: tuple, elem: int, direction: str) -> tuple[float | None, float]:
    if op == "layer_norm":
        return None, formulas.layer_norm_bytes(shape.tokens, shape.features, elem, direction)
    if op == "bias_gelu":
        return None, formulas.bias_gelu_bytes(shape.tokens, shape.features, elem, direction)
    if op == "mean_pool":
        return None, formulas.mean_pool_bytes(inputs[0].shape[0], shape.batch, shape.features, elem, direction)
    if op == "attention_varlen":
        cu = inputs[1].tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        flops = formulas.attention_varlen_flops(lengths, shape.heads, shape.head_dim, direction)
        return flops, formulas.attention_bytes(sum(lengths), shape.heads, shape.head_dim, elem, direction)
    flops = formulas.attention_flops(shape.batch, shape.heads, shape.seq, shape.head_dim, direction)
    return flops, formulas.attention_bytes(shape.batch * shape.seq, shape.heads, shape.head_dim, elem, direction)


def _max_error(op, impl, fn, inputs, grad_out, direction) -> float:
    """Max abs error against the float64 reference of what ``impl`` computes."""
    semantic_inputs = (inputs[0], None) if impl == "torch-sdpa-nomask" else inputs
    diff = _differentiable(op)

    def leaves(source, dtype=None):
        out = []
        for i, t in enumerate(source):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
                t.requires_grad_(direction == "bwd" and i in diff)
            out.append(t)
        return out

    mine, ref = leaves(inputs), leaves(semantic_inputs, torch.float64)
    with torch.set_grad_enabled(direction == "bwd"):
        out, expected = fn(*mine), REFERENCE[op](*ref)
    if direction == "fwd":
        return _max_abs(out, expected)
    got = torch.autograd.grad(out, [mine[i] for i in diff], grad_out)
    want = torch.autograd.grad(expected, [ref[i] for i in diff], grad_out.double())
    return max(_max_abs(a, b) for a, b in zip(got, want))


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def kernel_case(
    op: str, impl: str, dtype: str, shape, direction: str, device: torch.device, *, smoke: bool = False, seed: int = 0
) -> Case:
    """Build one kernel case; raises :class:`Skip` if ``impl`` cannot run it here.

    ``smoke``: the case only has to run (torch.compile then captures with Dynamo alone).
    """
    if impl not in KERNEL_IMPLS[op]:
        raise ValueError(f"{impl!r} is not an implementation of {op!r}; choose from {KERNEL_IMPLS[op]}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    torch_dtype = DTYPES[dtype]
    generator = torch.Generator(device=device).manual_seed(seed)
    first = _make_inputs(op, shape, torch_dtype, device, generator)
    reason = _support_reason(op, impl, first)
    if reason is not None:
        raise Skip(reason)
    compiler = compile_backend(device, smoke)
    fn = _impl_fn(op, impl, compiler)
    if impl in SDPA_BACKEND_IMPLS:
        reason = _sdpa_reason(fn, first)
        if reason is not None:
            raise Skip(reason)
    elem = first[0].element_size()

    def grad_for(inputs):
        return _randn(_output_like(op, inputs), torch_dtype, device, generator)

    per_set = tensor_bytes(*first) * (2 if direction == "bwd" else 1)
    sets = [first] + [
        _make_inputs(op, shape, torch_dtype, device, generator) for _ in range(input_set_count(per_set, device) - 1)
    ]
    flops, nbytes = _work(op, shape, first, elem, direction)
    diff = _differentiable(op)
    first_grad = grad_for(first) if direction == "bwd" else None

    def max_error():
        return _max_error(op, impl, fn, first, first_grad, direction)

    if direction == "fwd":
        prepare, input_sets = None, sets

        def timed(*inputs):
            with torch.no_grad():
                return fn(*inputs)

    else:
        for inputs in sets:
            for i in diff:
                inputs[i].requires_grad_(True)
        input_sets = [(*inputs, grad_for(inputs)) for inputs in sets]

        def prepare(*inputs_and_grad):
            *inputs, grad = inputs_and_grad
            return fn(*inputs), [inputs[i] for i in diff], grad

        def timed(out, wrt, grad):
            return torch.autograd.grad(out, wrt, grad)

    label = shape.label
    if op in ("attention_varlen", "mean_pool"):
        label = f"{shape.label} packed to {int(first[1][-1])} tokens"
    note = compile_note(compiler) if impl == "torch-compile" else None
    return Case(
        name=f"{op}-{direction}",
        impl=impl,
        dtype=dtype,
        batch=shape.batch,
        seq=shape.seq,
        device=device,
        fn=timed,
        input_sets=input_sets,
        prepare=prepare,
        flops=flops,
        nbytes=nbytes,
        shape=label,
        max_error=max_error,
        note=note,
        check_compiled=fn.check if isinstance(fn, CompiledFunction) else None,
        kernel=True,
    )


def kernel_shapes(op: str, smoke: bool) -> tuple:
    from bertfast.benchmarking import shapes

    if op == "layer_norm":
        return shapes.SMOKE_LAYER_NORM_SHAPES if smoke else shapes.LAYER_NORM_SHAPES
    if op == "bias_gelu":
        return shapes.SMOKE_BIAS_GELU_SHAPES if smoke else shapes.BIAS_GELU_SHAPES
    if op == "mean_pool":
        return shapes.SMOKE_MEAN_POOL_SHAPES if smoke else shapes.MEAN_POOL_SHAPES
    return shapes.SMOKE_ATTENTION_SHAPES if smoke else shapes.ATTENTION_SHAPES
