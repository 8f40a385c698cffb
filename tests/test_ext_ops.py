"""The C++/CUDA extension (bertfast._C, backend "ext") as a whole: its build and error probe, the backend
contract, the custom ops (opcheck, torch.compile), the bindings' own argument checks (called directly with bad
arguments), the Python checks in front of them, the GIL, and the CUDA kernels' launch paths.

Each op's numerics against the float64 reference live with the op's other backends, in tests/test_<op>.py
(the harness: tests/ext_harness.py).  The whole module skips when the extension is not built -- except under
``CI``, which builds it, where :func:`test_extension_is_built` fails instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bertfast.ops
from bertfast import _ext
from bertfast.errors import BackendUnavailable
from bertfast.numerics import assert_close
from bertfast.ops import reference

from .ext_harness import (
    GPU,
    C,
    check_op,
    ext,
    ext_ready,  # noqa: F401 (a fixture)
    make_inputs,
)

pytestmark = pytest.mark.usefixtures("ext_ready")


def test_extension_is_built():
    """CI builds the extension: a broken build must fail here, not skip every test silently."""
    if C is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI builds bertfast._C, but it is unusable: {_ext.unavailable_reason()}")
        pytest.skip(f"bertfast._C is not built: {_ext.unavailable_reason()}")
    assert bertfast.ops.backend_availability("ext") is None


def test_error_probe_tells_a_raise_from_a_crash(monkeypatch):
    assert _ext.errors_reach_python() is None  # the real probe: bad input raises RuntimeError here
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(_ext, "_ERROR_PROBE", crash)
    assert "kills the process (signal 11)" in _ext.errors_reach_python()
    assert "while torch's own do: rebuild" in _ext.errors_reach_python()  # torch's own errors reach Python here
    monkeypatch.setattr(_ext, "_TORCH_ERROR_PROBE", crash)
    assert "the environment loses C++ errors, not this build" in _ext.errors_reach_python()
    monkeypatch.setattr(_ext, "_ERROR_PROBE", "raise SystemExit('no RuntimeError came')")
    assert _ext.errors_reach_python() == "the error probe of bertfast._C ended with exit 1: no RuntimeError came"


# ------------------------------------------------------------------------------------------------
# The backend contract, the custom ops, torch.compile
# ------------------------------------------------------------------------------------------------


def test_backend_contract_through_public_ops():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 24, generator=gen)
    weight, bias = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    assert ext.unsupported("layer_norm", x, weight, bias) is None
    got = bertfast.ops.layer_norm(x, weight, bias, 1e-5, backend="ext")
    assert_close(got, reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5))
    assert not hasattr(ext, "attention_varlen")  # not declared, so dispatch never picks it
    qkv = torch.randn(6, 3 * 2 * 4, generator=gen)
    q, k, v = qkv.view(6, 3, 2, 4).unbind(1)
    with pytest.raises(BackendUnavailable, match="does not implement attention_varlen"):
        bertfast.ops.attention_varlen(q, k, v, torch.tensor([0, 2, 6], dtype=torch.int32), 4, backend="ext")
    assert "got torch.int32" in ext.unsupported("bias_gelu", x.to(torch.int32), bias.to(torch.int32))
    q4 = q.view(1, 6, 2, 4)
    with pytest.raises(BackendUnavailable, match="dropout"):
        bertfast.ops.attention(q4, q4, q4, dropout_p=0.1, backend="ext")


def test_missing_extension_is_reported():
    """Without bertfast._C the package imports and the backend says why it is unavailable."""
    script = (
        f"import sys; sys.modules[{_ext.module_name()!r}] = None\n"  # makes importing this torch's build fail
        "import torch, bertfast\n"
        "reason = bertfast.ops.backend_availability('ext')\n"
        "assert reason.startswith(f'bertfast._C is not built for torch {torch.__version__} (no module '), reason\n"
        "assert 'pip install -e . --no-build-isolation' in reason, reason\n"
        "x = torch.randn(2, 4)\n"
        "try:\n"
        "    bertfast.ops.bias_gelu(x, x[0], backend='ext')\n"
        "except bertfast.BackendUnavailable as exc:\n"
        "    assert 'not built' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('backend=ext ran without the extension')\n"
        "assert bertfast.ops.bias_gelu(x, x[0]).shape == x.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_arch_compatibility_rule():
    assert ext._arch_reason("8.0;9.0", (9, 0)) is None
    assert ext._arch_reason("8.0;9.0", (8, 6)) is None
    assert "sm_100" in ext._arch_reason("8.0;9.0", (10, 0))
    assert ext._arch_reason("8.0;9.0+PTX", (10, 0)) is None
    assert "sm_75" in ext._arch_reason("8.0", (7, 5))
    assert ext._arch_reason("9.0a", (9, 0)) is None and "sm_91" in ext._arch_reason("9.0a", (9, 1))


def test_build_info():
    info = _ext.build_info()
    assert info["built"] and info["built_with_torch"] == torch.__version__
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and C.cuda_max_row_elements() >= 1024
    else:
        assert info["cuda_archs"] == "" and C.cuda_max_row_elements() == 0


def _opcheck_samples(device: str) -> dict:
    """Small arguments for every custom op, forward and backward (fused and masked variants included).
    The backward ops have no autograd formula of their own (no double backward): no input of theirs needs grad."""
    gen = torch.Generator().manual_seed(2)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    ids = torch.randint(0, 5, (2, 3), generator=gen).to(device)
    mask = torch.tensor([[True, True, False], [False, False, False]], device=device)
    x, res, weight, lin = rnd(2, 3, 8, grad=False), rnd(2, 3, 8, grad=False), rnd(8, grad=False), rnd(8, grad=False)
    _, mean, rstd = ext._layer_norm_op(x, weight, weight, res, lin, 1e-5)
    tables = (rnd(5, 8, grad=False), rnd(3, 8, grad=False), rnd(2, 8, grad=False))
    _, emb_mean, emb_rstd = ext._embedding_layer_norm_op(ids, ids % 3, ids % 2, *tables, weight, weight, 1e-5)
    return {
        "layer_norm": (ext._layer_norm_op, (rnd(3, 8), rnd(8), rnd(8), None, None, 1e-5)),
        "layer_norm-fused": (ext._layer_norm_op, (rnd(2, 3, 8), rnd(8), rnd(8), rnd(2, 3, 8), rnd(8), 1e-5)),
        "layer_norm_backward": (
            ext._layer_norm_backward_op,
            (rnd(2, 3, 8, grad=False), x, weight, res, lin, mean, rstd),
        ),
        "embedding_layer_norm": (
            ext._embedding_layer_norm_op,
            (ids, ids % 3, ids % 2, rnd(5, 8), rnd(3, 8), rnd(2, 8), rnd(8), rnd(8), 1e-5),
        ),
        "embedding_layer_norm_backward": (
            ext._embedding_layer_norm_backward_op,
            (rnd(2, 3, 8, grad=False), ids, ids % 3, ids % 2, *tables, weight, emb_mean, emb_rstd),
        ),
        "bias_gelu": (ext._bias_gelu_op, (rnd(4, 7), rnd(7))),
        "bias_gelu_backward": (
            ext._bias_gelu_backward_op,
            (rnd(4, 7, grad=False), rnd(4, 7, grad=False), rnd(7, grad=False)),
        ),
        "masked_softmax": (ext._masked_softmax_op, (rnd(2, 2, 3, 3), mask, 0.5, torch.float32)),
        "masked_softmax-nomask": (ext._masked_softmax_op, (rnd(2, 2, 3, 3), None, 0.5, torch.float32)),
        "masked_softmax-bf16": (ext._masked_softmax_op, (rnd(2, 2, 3, 3), mask, 0.5, torch.bfloat16)),
        "masked_softmax_backward": (
            ext._masked_softmax_backward_op,
            (rnd(2, 2, 3, 3, grad=False).half(), rnd(2, 2, 3, 3, grad=False), mask, 0.5),
        ),
    }


OPCHECK_NAMES = [
    "layer_norm",
    "layer_norm-fused",
    "layer_norm_backward",
    "embedding_layer_norm",
    "embedding_layer_norm_backward",
    "bias_gelu",
    "bias_gelu_backward",
    "masked_softmax",
    "masked_softmax-nomask",
    "masked_softmax-bf16",
    "masked_softmax_backward",
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="no GPU"))])
@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(name, device):
    op, args = _opcheck_samples(device)[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """The custom ops trace without a graph break (aot_eager: no code generation, quick on a CPU)."""
    gen = torch.Generator().manual_seed(4)
    batch, seq, heads, head_dim = 2, 5, 2, 4
    hidden = heads * head_dim
    word, position, types = torch.randn(11, hidden, generator=gen), torch.randn(8, hidden), torch.randn(2, hidden)
    weights = [torch.randn(hidden, generator=gen, requires_grad=True) for _ in range(4)]
    qkv_weight = torch.randn(3 * hidden, hidden, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (batch, seq), generator=gen)
    positions = torch.arange(seq).expand(batch, seq)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)

    def block(word):
        h = ext.embedding_layer_norm(ids, positions, ids % 2, word, position, types, weights[0], weights[1], 1e-12)
        q, k, v = (h @ qkv_weight.t()).view(batch, seq, 3, heads, head_dim).unbind(2)
        a = ext.attention(q, k, v, mask, head_dim**-0.5).reshape(batch, seq, hidden)
        return ext.layer_norm(ext.bias_gelu(a, weights[2]), weights[3], weights[1], 1e-12, residual=h)

    word_eager = word.clone().requires_grad_()
    word_compiled = word.clone().requires_grad_()
    eager = block(word_eager)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(word_compiled)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), word_eager)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), word_compiled)
    torch.testing.assert_close(g_compiled, g_eager)


def test_a_model_on_ext_compiles_as_one_graph():
    """Resolving the backend reads the extension's build facts as plain values: no import or C call is traced."""
    import bertfast

    from .helpers import small_config

    model = bertfast.BertModel(small_config(), backend="ext").eval()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(ids, mask).last_hidden_state
        eager = model.set_unpad(False)(ids, mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(out[keep], eager[keep])


# ------------------------------------------------------------------------------------------------
# The bindings' argument checks name the argument
# ------------------------------------------------------------------------------------------------

META = torch.device("meta")


def _ln_forward():
    return dict(
        x=torch.randn(4, 8),
        weight=torch.randn(8),
        bias=torch.randn(8),
        residual=None,
        linear_bias=None,
        eps=1e-5,
        stream=0,
    )


def _ln_backward():
    x = torch.randn(4, 8)
    return dict(
        dy=torch.randn(4, 8),
        x=x,
        weight=torch.randn(8),
        residual=None,
        linear_bias=None,
        mean=torch.zeros(4),
        rstd=torch.ones(4),
        stream=0,
    )


def _embedding(backward=False):
    ids = torch.tensor([[1, 2, 3]])
    args = dict(
        input_ids=ids,
        position_ids=ids,
        token_type_ids=ids * 0,
        word_embeddings=torch.randn(10, 8),
        position_embeddings=torch.randn(4, 8),
        token_type_embeddings=torch.randn(2, 8),
        weight=torch.randn(8),
    )
    if backward:
        return dict(dy=torch.randn(1, 3, 8), **args, mean=torch.zeros(1, 3), rstd=torch.ones(1, 3), stream=0)
    return dict(**args, bias=torch.randn(8), eps=1e-12, stream=0)


def _gelu(backward=False):
    args = dict(x=torch.randn(3, 8), bias=torch.randn(8), stream=0)
    return dict(dy=torch.randn(3, 8), **args) if backward else args


def _softmax(backward=False):
    if backward:
        return dict(
            dprobs=torch.randn(2, 3, 4, 5).half(),
            scores=torch.randn(2, 3, 4, 5),
            mask=torch.ones(2, 5, dtype=torch.bool),
            scale=0.5,
            stream=0,
        )
    return dict(
        scores=torch.randn(2, 3, 4, 5),
        mask=torch.ones(2, 5, dtype=torch.bool),
        scale=0.5,
        probs_dtype=torch.bfloat16,
        stream=0,
    )


BAD_ARGUMENTS = [
    # (binding, valid arguments, replacements, expected message)
    ("layer_norm_forward", _ln_forward, {"x": torch.ones(4, 8, dtype=torch.int64)}, "x has dtype Long"),
    ("layer_norm_forward", _ln_forward, {"x": torch.randn(4, 8, device=META)}, "x must be a CPU or CUDA tensor"),
    ("layer_norm_forward", _ln_forward, {"x": torch.randn(8, 4).t()}, "x must be contiguous"),
    ("layer_norm_forward", _ln_forward, {"weight": torch.randn(8).double()}, "weight must have x's dtype Float"),
    ("layer_norm_forward", _ln_forward, {"bias": torch.randn(9)}, "bias must have shape [8]"),
    ("layer_norm_forward", _ln_forward, {"residual": torch.randn(4, 7)}, "residual must have shape [4, 8]"),
    ("layer_norm_forward", _ln_forward, {"linear_bias": torch.randn(8, device=META)}, "linear_bias must be on x's"),
    ("layer_norm_forward", _ln_forward, {"eps": 0.0}, "eps must be positive"),
    ("layer_norm_backward", _ln_backward, {"dy": torch.randn(4, 9)}, "dy must have shape [4, 8]"),
    ("layer_norm_backward", _ln_backward, {"mean": torch.zeros(4).double()}, "mean must have dtype Float"),
    ("layer_norm_backward", _ln_backward, {"rstd": torch.ones(5)}, "rstd must have shape [4]"),
    ("layer_norm_backward", _ln_backward, {"linear_bias": torch.randn(3)}, "linear_bias must have shape [8]"),
    (
        "embedding_layer_norm_forward",
        _embedding,
        {"input_ids": torch.tensor([[1, 2, 3]], dtype=torch.int32)},
        "input_ids must have dtype int64",
    ),
    (
        "embedding_layer_norm_forward",
        _embedding,
        {"position_ids": torch.tensor([1, 2, 3])},
        "position_ids must have shape [1, 3]",
    ),
    (
        "embedding_layer_norm_forward",
        _embedding,
        {"token_type_embeddings": torch.randn(2, 9)},
        "token_type_embeddings must have shape (types, 8)",
    ),
    (
        "embedding_layer_norm_forward",
        _embedding,
        {"position_embeddings": torch.randn(4, 8).half()},
        "position_embeddings must have word_embeddings's dtype",
    ),
    (
        "embedding_layer_norm_forward",
        _embedding,
        {"word_embeddings": torch.randn(8, 10).t()},
        "word_embeddings must be contiguous",
    ),
    ("embedding_layer_norm_forward", _embedding, {"bias": torch.randn(7)}, "bias must have shape [8]"),
    (
        "embedding_layer_norm_backward",
        lambda: _embedding(True),
        {"dy": torch.randn(1, 3, 7)},
        "dy must have shape [1, 3, 8]",
    ),
    ("embedding_layer_norm_backward", lambda: _embedding(True), {"rstd": torch.ones(3)}, "rstd must have shape"),
    ("bias_gelu_forward", _gelu, {"bias": torch.randn(3)}, "bias must have shape [8]"),
    ("bias_gelu_forward", _gelu, {"x": torch.randn(8, 3).t()}, "x must be contiguous"),
    ("bias_gelu_forward", _gelu, {"bias": torch.randn(8, device=META)}, "bias must be on x's device"),
    ("bias_gelu_backward", lambda: _gelu(True), {"dy": torch.randn(3, 8).half()}, "dy must have x's dtype"),
    ("masked_softmax_forward", _softmax, {"mask": torch.ones(2, 5)}, "mask must have dtype bool or uint8"),
    ("masked_softmax_forward", _softmax, {"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask must have shape [2, 5]"),
    ("masked_softmax_forward", _softmax, {"mask": torch.ones(5, 2, dtype=torch.bool).t()}, "mask must be contiguous"),
    ("masked_softmax_forward", _softmax, {"scores": torch.randn(5)}, "scores must have shape (batch, ..., seq_k)"),
    ("masked_softmax_forward", _softmax, {"scores": torch.randn(2, 3, 4, 5).int()}, "scores has dtype Int"),
    (
        "masked_softmax_forward",
        _softmax,
        {"scores": torch.randn(2, 3, 4, 5).half()},
        "scores must have dtype Float for probs_dtype of dtype BFloat16, got Half",
    ),
    ("masked_softmax_forward", _softmax, {"probs_dtype": torch.int64}, "probs_dtype has dtype Long"),
    (
        "masked_softmax_backward",
        lambda: _softmax(True),
        {"dprobs": torch.randn(2, 3, 4, 6).half()},
        "dprobs must have shape [2, 3, 4, 5]",
    ),
    (
        "masked_softmax_backward",
        lambda: _softmax(True),
        {"scores": torch.rand(2, 3, 5, 4).transpose(2, 3)},
        "scores must be contiguous",
    ),
    (
        "masked_softmax_backward",
        lambda: _softmax(True),
        {"dprobs": torch.randn(2, 3, 4, 5).double()},
        "scores must have dtype Double for dprobs of dtype Double, got Float",
    ),
    ("masked_softmax_backward", lambda: _softmax(True), {"mask": torch.ones(2, 4).bool()}, "mask must have shape"),
]


@pytest.mark.ext_raises
@pytest.mark.parametrize(
    ("binding", "valid", "replace", "message"),
    BAD_ARGUMENTS,
    ids=[f"{b[0]}-{next(iter(b[2]))}-{i}" for i, b in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_are_named(binding, valid, replace, message):
    function = getattr(C, binding)
    function(**valid())  # the valid call runs
    with pytest.raises(RuntimeError) as info:
        function(**{**valid(), **replace})
    text = str(info.value)
    assert f"bertfast._C.{binding}: " in text and message in text, text


# ------------------------------------------------------------------------------------------------
# Bad input stops in Python, before any call into bertfast._C
# ------------------------------------------------------------------------------------------------


# (custom op in _opcheck_samples, argument index, bad value from the valid one, expected message)
BAD_OP_INPUTS = [
    ("layer_norm", 0, lambda x: x.long(), "x has dtype torch.int64"),
    ("layer_norm", 0, lambda x: x[:, :0], "x must have a non-empty last dimension"),
    ("layer_norm", 1, lambda w: w.double(), "weight must have x's dtype"),
    ("layer_norm", 2, lambda b: b[:7], "bias must have shape (8,)"),
    ("layer_norm-fused", 3, lambda r: r[:, :, :7], "residual must have shape (2, 3, 8)"),
    ("layer_norm", 5, lambda eps: 0.0, "eps must be positive"),
    ("layer_norm", 5, lambda eps: float("nan"), "eps must be positive"),
    ("layer_norm_backward", 0, lambda dy: dy[:1], "dy must have shape (2, 3, 8)"),
    ("layer_norm_backward", 5, lambda mean: mean.double(), "mean must be torch.float32"),
    ("layer_norm_backward", 6, lambda rstd: rstd[:1], "rstd must have shape (2, 3)"),
    ("embedding_layer_norm", 0, lambda ids: ids + 5, "input_ids holds ids outside the table's rows [0, 5)"),
    ("embedding_layer_norm", 0, lambda ids: ids - 5, "input_ids holds ids outside the table's rows [0, 5)"),
    ("embedding_layer_norm", 1, lambda ids: ids.int(), "position_ids must have dtype torch.int64"),
    ("embedding_layer_norm", 2, lambda ids: ids[:, :1], "token_type_ids must have shape (2, 3)"),
    ("embedding_layer_norm", 4, lambda t: t.double(), "position_embeddings must have word_embeddings's dtype"),
    ("embedding_layer_norm", 5, lambda t: t[:, :7], "token_type_embeddings must have shape (rows, 8)"),
    ("embedding_layer_norm", 7, lambda b: b[:3], "bias must have shape (8,)"),
    ("embedding_layer_norm", 8, lambda eps: -1.0, "eps must be positive"),
    ("embedding_layer_norm_backward", 0, lambda dy: dy[:, :, :7], "dy must have shape (2, 3, 8)"),
    ("embedding_layer_norm_backward", 2, lambda ids: ids + 3, "position_ids holds ids outside the table's rows"),
    ("embedding_layer_norm_backward", 9, lambda rstd: rstd[0], "rstd must have shape (2, 3)"),
    ("bias_gelu", 0, lambda x: x.int(), "x has dtype torch.int32"),
    ("bias_gelu", 1, lambda b: b[:3], "bias must have shape (7,)"),
    ("bias_gelu_backward", 0, lambda dy: dy.half(), "dy must have x's dtype"),
    ("masked_softmax", 0, lambda s: s.half(), "scores must have dtype torch.float32 for probs_dtype"),
    ("masked_softmax", 0, lambda s: s[0, 0, 0], "scores must have shape (batch, ..., seq_k)"),
    ("masked_softmax", 1, lambda m: m.float(), "mask must have dtype torch.bool or torch.uint8"),
    ("masked_softmax", 1, lambda m: m[:1], "mask must have shape (2, 3)"),
    ("masked_softmax", 3, lambda dtype: torch.int64, "probs_dtype has dtype torch.int64"),
    ("masked_softmax_backward", 0, lambda dp: dp[..., :2], "dprobs must have shape (2, 2, 3, 3)"),
    ("masked_softmax_backward", 0, lambda dp: dp.double(), "scores must have dtype torch.float64 for dprobs"),
]


@pytest.fixture
def _no_call_into_the_extension(monkeypatch):
    """Every kernel binding of bertfast._C fails the test when called."""

    def refuse(name):
        def called(*args, **kwargs):
            pytest.fail(f"bertfast._C.{name} was called: the argument reached C++")

        return called

    for name in dir(C):
        if name.endswith(("_forward", "_backward")):
            monkeypatch.setattr(C, name, refuse(name))


@pytest.mark.parametrize(
    ("op", "index", "bad", "message"),
    BAD_OP_INPUTS,
    ids=[f"{op}-{index}-{i}" for i, (op, index, _, _) in enumerate(BAD_OP_INPUTS)],
)
def test_bad_input_is_named_before_the_extension_is_called(op, index, bad, message, request):
    function, args = _opcheck_samples("cpu")[op]
    function(*args)  # the valid call runs
    request.getfixturevalue("_no_call_into_the_extension")
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    args[index] = bad(args[index])
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        function(*args)


def test_devices_are_checked_before_the_extension(_no_call_into_the_extension):
    """A meta tensor stands for another device (the custom ops themselves send meta inputs to their fake)."""
    x, meta = torch.randn(3, 8), torch.randn(8, device=META)
    with pytest.raises(ValueError, match="x must be a CPU or CUDA tensor, got meta"):
        ext._check_layer_norm("ext layer_norm", x.to(META), meta, None, None)
    with pytest.raises(ValueError, match="linear_bias must be on x's device cpu, got meta"):
        ext._check_layer_norm("ext layer_norm", x, torch.randn(8), None, meta)
    with pytest.raises(ValueError, match="bias must be on x's device cpu, got meta"):
        ext._check_bias_gelu("ext bias_gelu", x, meta)
    with pytest.raises(ValueError, match="mask must be on scores' device cpu, got meta"):
        ext._check_softmax("ext masked_softmax", x, torch.ones(3, 8, dtype=torch.bool, device=META), "p", torch.float32)
    with pytest.raises(ValueError, match="position_ids must be on the tables' device cpu, got meta"):
        ids = torch.zeros(1, 2, dtype=torch.long)
        ext._check_embedding("ext embedding_layer_norm", ids, ids.to(META), ids, x, x, x, x[0])


def test_public_ops_stop_bad_input_before_the_extension(_no_call_into_the_extension):
    """What killed the process on a GPU machine (out-of-range ids on the CPU) is a ValueError raised in Python."""
    ids = torch.tensor([[1, 2, 10]])
    word, position, types = torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=re.escape("input_ids holds ids outside the table's rows [0, 10)")):
        bertfast.ops.embedding_layer_norm(
            ids, ids * 0, ids * 0, word, position, types, torch.ones(8), torch.zeros(8), backend="ext"
        )
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="ext layer_norm: eps must be positive"):
        ext.layer_norm(x, torch.ones(8), torch.zeros(8), 0.0)


@pytest.mark.ext_raises
def test_kernels_run_without_the_gil_and_errors_raise_with_it():
    """While a kernel runs, other Python threads run (the GIL is released around the kernel
    only); bad calls from several threads at once raise cleanly (the checks run, and the
    error is raised, while the GIL is held).  tests/test_cuda_sources.py checks the same
    order statically for the CUDA branches."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    x, weight, bias = torch.randn(1024, 4096), torch.randn(4096), torch.randn(4096)
    stamps, stop = [], threading.Event()

    def count():  # gives the GIL up between stamps, so it never has to ask for it
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(1e-4)

    interval = sys.getswitchinterval()
    # With a long switch interval the main thread keeps the GIL unless it releases it itself:
    # a stamp strictly inside one binding call proves that call released it.
    sys.setswitchinterval(1.0)
    counter = threading.Thread(target=count)
    counter.start()
    try:
        inside = 0
        for _ in range(20):
            start = time.perf_counter()
            C.layer_norm_forward(x, weight, bias, None, None, 1e-5, 0)
            end = time.perf_counter()
            inside += sum(start < t < end for t in stamps[-1000:])
            if inside:
                break
    finally:
        stop.set()
        counter.join()
        sys.setswitchinterval(interval)
    assert inside > 0, "no other Python thread ran while the kernels ran: the GIL was held"

    def misuse(i):
        for _ in range(50):
            with pytest.raises(RuntimeError, match="eps must be positive"):
                C.layer_norm_forward(x[:64], weight, bias, None, None, 0.0, 0)
            C.bias_gelu_forward(x[:64], weight, 0)
        return i

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sorted(pool.map(misuse, range(4))) == [0, 1, 2, 3]


@pytest.mark.ext_raises
@pytest.mark.skipif(not torch.cuda.is_available() or C is None or C.has_cuda(), reason="needs a GPU, no CUDA kernels")
def test_cuda_tensor_without_cuda_kernels_is_refused():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        C.bias_gelu_forward(x, torch.randn(8, device="cuda"), 0)
    assert "without CUDA kernels" in ext.unsupported("bias_gelu", x)


# ------------------------------------------------------------------------------------------------
# CUDA only: vector/scalar paths, large rows, reproducibility
# ------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU and the CUDA kernels")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_inputs_take_the_scalar_path(dtype):
    """Contiguous views that start one element in (not 16-byte aligned) still compute correctly."""
    gen = torch.Generator().manual_seed(6)
    rows, hidden = 9, 64
    buffer = torch.randn(rows * hidden + 1, generator=gen).to("cuda", dtype)
    x = buffer[1:].view(rows, hidden)
    weight, bias = (torch.randn(hidden, generator=gen).to("cuda", dtype) for _ in range(2))
    for got, want in (
        (ext.layer_norm(x, weight, bias, 1e-5), F.layer_norm(x.float(), (hidden,), weight.float(), bias.float(), 1e-5)),
        (ext.bias_gelu(x, bias), F.gelu(x.float() + bias.float())),
    ):
        tolerance = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.float(), want, **tolerance)


@needs_gpu
@pytest.mark.ext_raises
def test_cuda_long_rows_use_large_shared_memory():
    """Rows at the limit (64 KiB of fp32 cache; 128 KiB in the LayerNorm backward) run; longer ones are refused."""
    limit = C.cuda_max_row_elements()
    gen = torch.Generator().manual_seed(7)
    floats = make_inputs({"x": (3, limit), "weight": (limit,), "bias": (limit,)}, gen)
    check_op(
        lambda eps, **t: ext.layer_norm(eps=eps, **t),
        lambda eps, **t: reference.layer_norm(eps=eps, **t),
        None,
        floats,
        {"eps": 1e-5},
        "cuda",
        torch.float32,
        gen,
        "layer_norm[long rows]",
    )
    scores = torch.randn(1, 1, 2, limit, device="cuda")
    torch.testing.assert_close(ext.masked_softmax(scores, None, 1.0), torch.softmax(scores, -1))
    too_long = torch.randn(2, limit + 1, device="cuda")
    assert "at most" in ext.unsupported("layer_norm", too_long, too_long[0], too_long[0])
    with pytest.raises(
        RuntimeError, match=f"x's last dimension .hidden. is {limit + 1}; the CUDA kernels take at most"
    ):
        C.layer_norm_forward(too_long, too_long[0].contiguous(), too_long[0].contiguous(), None, None, 1e-5, 0)


@needs_gpu
def test_cuda_parameter_gradients_are_reproducible():
    gen = torch.Generator().manual_seed(8)
    x, res, dy = (torch.randn(1000, 1024, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    weight, lin = (torch.randn(1024, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    stream = torch.cuda.current_stream().cuda_stream
    _, mean, rstd = C.layer_norm_forward(x, weight, weight, res, lin, 1e-5, stream)
    first = C.layer_norm_backward(dy, x, weight, res, lin, mean, rstd, stream)
    second = C.layer_norm_backward(dy, x, weight, res, lin, mean, rstd, stream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    dx1, db1 = C.bias_gelu_backward(dy, x, lin, stream)
    dx2, db2 = C.bias_gelu_backward(dy, x, lin, stream)
    assert torch.equal(db1, db2) and torch.equal(dx1, dx2)


@needs_gpu
def test_cuda_embedding_ids_out_of_range_give_nan_rows():
    word, position, token_type = (torch.randn(n, 8, device="cuda") for n in (10, 4, 2))
    ids = torch.tensor([[1, 2, 10]], device="cuda")
    y, _, _ = C.embedding_layer_norm_forward(
        ids,
        ids * 0,
        ids * 0,
        word,
        position,
        token_type,
        torch.ones(8, device="cuda"),
        torch.zeros(8, device="cuda"),
        1e-12,
        torch.cuda.current_stream().cuda_stream,
    )
    assert torch.isfinite(y[0, :2]).all() and torch.isnan(y[0, 2]).all()
