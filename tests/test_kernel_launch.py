"""The Triton kernels' host-side launch paths (kernels/_launch.py) give what the custom ops give.

- The eager fast path (entry points calling their launchers directly, through an
  autograd.Function when a gradient is needed) matches the custom-op path bit for bit, outputs
  and every gradient, with and without dropout.
- Under torch.compile, a dispatch mode or fake tensors, the custom ops are what runs.
- After the first launch for a key, launches go through the compiled binary Triton chose, with
  exactly the arguments Triton's own path passes its launcher (a subprocess compiles the real
  kernels for sm_90 against a stand-in driver whose launcher records instead of launching).

Runs in Triton's interpreter on a machine without a GPU (the fast-path tests), plus the
subprocess (no GPU needed at all).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bertfast.kernels import attention, bias_gelu, layer_norm  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

MODULES = {"layer_norm": layer_norm, "bias_gelu": bias_gelu, "attention": attention, "attention_varlen": attention}
# What calls the launcher's _forward / _backward on each path.
OP_CALLERS = {
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "bias_gelu": ("bias_gelu_fwd", "bias_gelu_bwd"),
    "attention": ("_attention_fwd_op", "_attention_bwd_op"),
    "attention_varlen": ("_attention_varlen_fwd_op", "_attention_varlen_bwd_op"),
}


def _inputs(name: str, dropout_p: float):
    """(function of the leaves, leaves) for one entry point; the leaves require grad."""
    gen = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    if name == "layer_norm":
        leaves = [r(2, 5, 48), r(48), r(48), r(2, 5, 48), r(48)]  # x, weight, bias, residual, linear_bias
        return lambda x, w, b, res, lb: layer_norm.layer_norm(x, w, b, 1e-5, res, lb, dropout_p), leaves
    if name == "bias_gelu":
        return lambda x, b: bias_gelu.bias_gelu(x, b), [r(3, 7, 40), r(40)]
    if name == "attention":
        mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
        mask[1, 5:] = False
        qkv = r(2, 9, 3 * 2 * 16)

        def attend(qkv):
            q, k, v = qkv.view(2, 9, 3, 2, 16).unbind(2)
            return attention.attention(q, k, v, mask, 0.25, dropout_p)

        return attend, [qkv]
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)

    def attend_varlen(qkv):
        q, k, v = qkv.view(11, 3, 2, 16).unbind(1)
        return attention.attention_varlen(q, k, v, cu_seqlens, 7, 0.25, dropout_p)

    return attend_varlen, [r(11, 3 * 2 * 16)]


def _spy(monkeypatch, module):
    """Record the name of the function that calls ``module._forward`` / ``module._backward``."""
    callers = []
    for fname in ("_forward", "_backward"):
        real = getattr(module, fname)

        def spy(*args, _real=real, **kwargs):
            callers.append(sys._getframe(1).f_code.co_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fname, spy)
    return callers


def _run(fn, leaves, grad: bool):
    leaves = [t.detach().clone().requires_grad_(grad) for t in leaves]
    torch.manual_seed(5)  # the same dropout seeds on both paths
    out = fn(*leaves)
    if not grad:
        return out, []
    out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("name", list(MODULES))
def test_eager_fast_path_matches_custom_op(monkeypatch, name, dropout_p):
    if name == "bias_gelu" and dropout_p:
        pytest.skip("bias-GELU has no dropout")
    module = MODULES[name]
    fn, leaves = _inputs(name, dropout_p)
    callers = _spy(monkeypatch, module)
    fast = _run(fn, leaves, grad=True)
    fast_no_grad = _run(fn, leaves, grad=False)
    fast_callers = list(callers)

    callers.clear()
    monkeypatch.setattr(module, "eager_fast_path", lambda *tensors: False)
    op = _run(fn, leaves, grad=True)
    op_no_grad = _run(fn, leaves, grad=False)
    fwd_op, bwd_op = OP_CALLERS[name]
    assert callers == [fwd_op, bwd_op, fwd_op]  # the custom ops, forward and backward
    assert fwd_op not in fast_callers and bwd_op not in fast_callers
    assert len(fast_callers) == 3  # forward, backward, forward without autograd: all direct

    assert torch.equal(fast[0], op[0]) and torch.equal(fast_no_grad[0], op_no_grad[0])
    assert torch.equal(fast[0], fast_no_grad[0])
    for i, (got, want) in enumerate(zip(fast[1], op[1])):
        assert got is not None and torch.equal(got, want), f"gradient of input {i}"


def test_eager_fast_path_grad_of_weights_only():
    """x needs no gradient, the weights do: the autograd.Function still records the call."""
    x, weight, bias = torch.randn(4, 32, device=DEVICE), torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)
    weight.requires_grad_()
    y = layer_norm.layer_norm(x, weight, bias, 1e-5)
    assert y.requires_grad and "LayerNormFunction" in type(y.grad_fn).__name__
    y.sum().backward()
    assert weight.grad is not None and bias.grad is None
    with torch.no_grad():
        assert not layer_norm.layer_norm(x, weight, bias, 1e-5).requires_grad


def test_dispatch_modes_and_fake_tensors_take_the_custom_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, bias = torch.randn(3, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    with Log() as log:
        y = bias_gelu.bias_gelu(x, bias)
    assert "bertfast.bias_gelu_fwd.default" in log.ops
    assert torch.equal(y, bias_gelu.bias_gelu(x, bias))

    meta = torch.empty(2, 3, 64, device="meta")
    assert layer_norm.layer_norm(meta, meta[0, 0], meta[0, 0], 1e-5).shape == (2, 3, 64)

    with FakeTensorMode() as mode:
        fake_x, fake_w = mode.from_tensor(torch.randn(2, 3, 64)), mode.from_tensor(torch.randn(64))
        y = layer_norm.layer_norm(fake_x, fake_w, fake_w, 1e-5)
        assert y.shape == (2, 3, 64)


def test_jit_trace_records_the_custom_op():
    x, bias = torch.randn(3, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    traced = torch.jit.trace(lambda x, bias: bias_gelu.bias_gelu(x, bias), (x, bias))
    assert "bertfast::bias_gelu_fwd" in str(traced.graph)
    assert torch.equal(traced(x, bias), bias_gelu.bias_gelu(x, bias))


def test_torch_compile_traces_the_custom_ops():
    """Under torch.compile(fullgraph=True) the entry points put their custom ops in the graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, weight, bias, qkv, mask):
        h = layer_norm.layer_norm(x, weight, bias, 1e-5)
        h = bias_gelu.bias_gelu(h, bias)
        q, k, v = qkv.view(2, 9, 3, 2, 16).unbind(2)
        return h.sum() + attention.attention(q, k, v, mask, 0.25).sum()

    x, weight, bias = torch.randn(18, 32), torch.randn(32), torch.randn(32)
    qkv, mask = torch.randn(2, 9, 96), torch.ones(2, 9, dtype=torch.bool)
    args = [t.to(DEVICE) for t in (x, weight, bias, qkv, mask)]
    got = torch.compile(step, fullgraph=True, backend=backend)(*args)
    assert torch.equal(got, step(*args))
    nodes = [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    targets = {str(node.target).removesuffix(".default") for node in nodes}
    for op in ("layer_norm_fwd", "bias_gelu_fwd", "attention_fwd"):
        assert f"bertfast.{op}" in targets, (op, targets)


# ---------------------------------------------------------------------------------------------- cached launches

ROOT = Path(__file__).resolve().parents[1]

_CACHED_LAUNCH_SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from tools.gpu import standin_driver as sd

    print("triton", triton.__version__)

    sd.install()
    from bertfast.kernels import attention as attn, bias_gelu as gelu, layer_norm as ln

    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(torch.float16).requires_grad_()

    x, res, w, b, lb = r(2, 3, 32), r(2, 3, 32), r(32), r(32), r(32)
    buf = torch.randn(6 * 32 + 1, generator=gen).to(torch.float16)
    x_misaligned = buf[1:].view(6, 32).requires_grad_()  # 2 bytes off 16-byte alignment
    h, hb = r(5, 64), r(64)
    qkv = r(2, 16, 3 * 2 * 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 9:] = False
    packed = r(21, 3 * 2 * 16)
    cu = torch.tensor([0, 16, 21], dtype=torch.int32)

    def attend(qkv, p):
        q, k, v = qkv.view(2, 16, 3, 2, 16).unbind(2)
        return attn.attention(q, k, v, mask, 0.25, p)

    def attend_varlen(packed, p):
        q, k, v = packed.view(21, 3, 2, 16).unbind(1)
        return attn.attention_varlen(q, k, v, cu, 16, 0.25, p)

    ATTN = [attn._fwd_launch, attn._delta_launch, attn._dkdv_launch, attn._dq_launch]
    CASES = {
        "layer_norm": (lambda: ln.layer_norm(x, w, b, 1e-5, res, lb, 0.1), [ln._fwd_launch, ln._bwd_launch]),
        "layer_norm_plain": (lambda: ln.layer_norm(x, w, b, 1e-5), [ln._fwd_launch, ln._bwd_launch]),
        "layer_norm_misaligned": (lambda: ln.layer_norm(x_misaligned, w, b, 1e-5), [ln._fwd_launch, ln._bwd_launch]),
        "bias_gelu": (lambda: gelu.bias_gelu(h, hb), [gelu._fwd_launch, gelu._bwd_launch]),
        "attention": (lambda: attend(qkv, 0.0), ATTN),
        "attention_dropout": (lambda: attend(qkv, 0.2), ATTN),
        "attention_varlen": (lambda: attend_varlen(packed, 0.0), ATTN),
    }

    def describe(arg):
        if isinstance(arg, torch.Tensor):
            return ("tensor", arg.dtype, tuple(arg.shape), arg.stride(), arg.data_ptr() % 16)
        return arg

    for name, (fn, launches) in CASES.items():
        calls = []
        for _ in range(3):
            sd.LAUNCHES.clear()
            before = [launch.fast_launches for launch in launches]
            torch.manual_seed(1)
            y = fn()
            y.backward(torch.ones_like(y))
            cached = [launch.fast_launches - n for launch, n in zip(launches, before)]
            calls.append(([tuple(map(describe, args)) for args in sd.LAUNCHES], cached))
        for launch in launches:
            assert launch.enabled, (name, launch.name, launch.disabled_because)
        (first, first_cached), (second, second_cached), (third, third_cached) = calls
        assert first_cached == [0] * len(launches), (name, first_cached)  # Triton's path, remembered
        assert second_cached == third_cached == [1] * len(launches), (name, second_cached, third_cached)
        assert len(first) == len(launches), (name, len(first))
        assert first == second == third, name  # the launcher got exactly what Triton's path gives it
        print(name, "ok")
    print("all ok")
    """
)


def test_cached_launch_is_taken_and_passes_what_triton_passes(tmp_path):
    """Real kernels compiled for sm_90 against a stand-in driver; the launcher records instead of launching."""
    script = tmp_path / "cached_launch.py"
    script.write_text(_CACHED_LAUNCH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # tools.gpu
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert result.returncode == 0 and "all ok" in result.stdout, result.stdout + result.stderr[-4000:]


def test_cached_launch_stays_off_in_the_interpreter():
    if not INTERPRET:
        pytest.skip("interpreter only")
    fn, leaves = _inputs("layer_norm", 0.0)
    for _ in range(2):
        _run(fn, leaves, grad=True)
    assert not layer_norm._fwd_launch.enabled and layer_norm._fwd_launch.fast_launches == 0
