"""Host time per call of the Triton kernels' entry points, with the GPU launch stubbed out (runs on a CPU).

At small batches the model is bound by the host: each kernel call costs its Python (the
custom-op round trip, the launcher's checks and allocations, Triton's launch) while the
GPU waits.  This measures that Python on a machine without a GPU, two ways:

- ``--mode interpret``: ``TRITON_INTERPRET=1`` with the interpreter's launch replaced by a
  no-op: everything above ``kernel[grid](...)`` (custom op, autograd, launcher), nothing of
  Triton's own launch path;
- ``--mode compiled``: Triton's real compiler and launch path against a stand-in driver for
  an sm_90 GPU (``tools/gpu/standin_driver.py``: kernels compile to cubins here),
  with only the launcher object stubbed (on a GPU it packs the arguments in C and calls
  ``cuLaunchKernelEx``: a few microseconds that neither path here pays) and the binary
  loader.  With ``--real-launcher`` (triton 3.9) Triton's launcher and its C ``launch`` run
  too, against a stub libcuda whose ``cuLaunchKernelEx`` does nothing: the lowest level.  The
  stand-in's current-device and current-stream calls are free, so this slightly flatters
  both Triton's path and ours.  The first call of each case compiles (slow, cached
  on disk under ~/.triton/cache).

Times are the best over rounds of the mean per call, in microseconds, for the forward
without autograd (``fwd``), the forward recording autograd (``fwd+grad``) and forward plus
backward (``fwd+bwd``); ``bwd`` is their difference.  Tensors are small CPU tensors: with the
launch stubbed, sizes only matter through allocation.

    python -m tools.gpu.kernel_host_time --mode interpret
    python -m tools.gpu.kernel_host_time --mode compiled
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("interpret", "compiled"), default="interpret")
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="", help="comma list of case names to run")
    parser.add_argument(
        "--real-launcher",
        action="store_true",
        help="compiled mode: Triton's own launcher and C launch against a stub libcuda (triton 3.9, needs cc)",
    )
    return parser.parse_args()


ARGS = _parse()
if ARGS.mode == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

LAUNCHES = [0]


def _stub_interpreter() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, **kwargs):
        LAUNCHES[0] += 1

    InterpretedFunction.run = run


if ARGS.mode == "interpret":
    _stub_interpreter()
else:
    from tools.gpu import standin_driver

    standin_driver.install(real_launcher=ARGS.real_launcher)
    standin_driver.record_launches(False)

from bertfast.kernels import attention as attn  # noqa: E402
from bertfast.kernels import bias_gelu as gelu  # noqa: E402
from bertfast.kernels import layer_norm as ln  # noqa: E402

DTYPE = torch.float32 if ARGS.mode == "interpret" else torch.bfloat16


def _inputs(requires_grad: bool):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DTYPE).requires_grad_(requires_grad)

    batch, seq, heads, head_dim = 2, 16, 4, 16
    hidden = heads * head_dim
    qkv = r(batch, seq, 3, heads, head_dim)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 11:] = False
    lengths = torch.tensor([16, 11, 5], dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    total = int(lengths.sum())
    pqkv = r(total, 3, heads, head_dim)
    return {
        "x": r(batch * seq, hidden),
        "res": r(batch * seq, hidden),
        "w": r(hidden),
        "b": r(hidden),
        "lb": r(hidden),
        "inter": r(batch * seq, 4 * hidden),
        "ib": r(4 * hidden),
        "q": qkv[:, :, 0],
        "k": qkv[:, :, 1],
        "v": qkv[:, :, 2],
        "mask": mask,
        "pq": pqkv[:, 0],
        "pk": pqkv[:, 1],
        "pv": pqkv[:, 2],
        "cu": cu,
        "max_seqlen": int(lengths.max()),
        "scale": head_dim**-0.5,
    }


CASES = {
    "kernels.layer_norm": lambda t: ln.layer_norm(t["x"], t["w"], t["b"], 1e-12),
    "kernels.layer_norm+res+lb": lambda t: ln.layer_norm(t["x"], t["w"], t["b"], 1e-12, t["res"], t["lb"]),
    "kernels.bias_gelu": lambda t: gelu.bias_gelu(t["inter"], t["ib"]),
    "kernels.attention": lambda t: attn.attention(t["q"], t["k"], t["v"], t["mask"], t["scale"]),
    "kernels.attention_varlen": lambda t: attn.attention_varlen(
        t["pq"], t["pk"], t["pv"], t["cu"], t["max_seqlen"], t["scale"]
    ),
    "F.layer_norm": lambda t: F.layer_norm(t["x"], (t["x"].shape[-1],), t["w"], t["b"], 1e-12),
}
if ARGS.mode == "interpret":  # bertfast.ops runs the Triton backend only on CUDA tensors or in the interpreter
    import bertfast.ops as ops

    CASES.update(
        {
            "ops.layer_norm": lambda t: ops.layer_norm(t["x"], t["w"], t["b"], 1e-12, backend="triton"),
            "ops.bias_gelu": lambda t: ops.bias_gelu(t["inter"], t["ib"], backend="triton"),
            "ops.attention": lambda t: ops.attention(t["q"], t["k"], t["v"], t["mask"], backend="triton"),
        }
    )


def _backward_cases(t):
    """The backward launchers and their custom ops, called directly: ``{name: (launcher call, op call)}``."""
    x, w, b, res, lb = t["x"], t["w"], t["b"], t["res"], t["lb"]
    _, mean, rstd = ln._forward(x, w, b, 1e-12, res, lb)
    q, k, v, mask = t["q"], t["k"], t["v"], t["mask"]
    out, lse = attn._forward(q, k, v, mask, None, 0, t["scale"])
    pq, pk, pv, cu, max_seqlen = t["pq"], t["pk"], t["pv"], t["cu"], t["max_seqlen"]
    pout, plse = attn._forward(pq, pk, pv, None, cu, max_seqlen, t["scale"])
    dy, dh, do, dpo = torch.ones_like(x), torch.ones_like(t["inter"]), torch.ones_like(out), torch.ones_like(pout)
    ops = torch.ops.bertfast
    ln_args = (dy, x, w, mean, rstd, res, lb)
    gelu_args = (dh, t["inter"], t["ib"])
    attn_args = (do, q, k, v, out, lse, mask, t["scale"])
    varlen_args = (dpo, pq, pk, pv, pout, plse, cu, max_seqlen, t["scale"])
    return {
        "layer_norm_bwd+res+lb": (lambda: ln._backward(*ln_args), lambda: ops.layer_norm_bwd(*ln_args)),
        "bias_gelu_bwd": (lambda: gelu._backward(*gelu_args), lambda: ops.bias_gelu_bwd(*gelu_args)),
        "attention_bwd": (
            lambda: attn._backward(*attn_args[:7], None, 0, t["scale"]),
            lambda: ops.attention_bwd(*attn_args),
        ),
        "attention_varlen_bwd": (
            lambda: attn._backward(*varlen_args[:6], None, *varlen_args[6:]),
            lambda: ops.attention_varlen_bwd(*varlen_args),
        ),
    }


def _time(fn, calls: int, rounds: int) -> float:
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return min(per_call)


def _is_cached(obj) -> bool:
    return hasattr(obj, "fast_launches") and hasattr(obj, "entries")


def main() -> int:
    only = {name for name in ARGS.only.split(",") if name}
    plain, grad = _inputs(False), _inputs(True)
    mode = ARGS.mode + (" (real launcher, stub libcuda)" if ARGS.real_launcher else "")
    print(f"triton {triton.__version__}, torch {torch.__version__}, mode {mode}, {DTYPE}, µs per call")
    print(f"{'case':28s} {'fwd':>8s} {'fwd+grad':>9s} {'fwd+bwd':>8s} {'bwd':>8s}")
    for name, case in CASES.items():
        if only and name not in only:
            continue
        out = case(grad)  # warm-up: compiles, autotunes, fills every cache
        torch.autograd.backward(out, torch.ones_like(out))
        with torch.no_grad():
            case(plain)
        fwd = _time(lambda case=case: case(plain), ARGS.calls, ARGS.rounds)
        fwd_grad = _time(lambda case=case: case(grad), ARGS.calls, ARGS.rounds)
        ones = torch.ones_like(out)
        fwd_bwd = _time(
            lambda case=case, ones=ones: torch.autograd.backward(case(grad), ones), ARGS.calls // 2 or 1, ARGS.rounds
        )
        print(f"{name:28s} {fwd:8.1f} {fwd_grad:9.1f} {fwd_bwd:8.1f} {fwd_bwd - fwd_grad:8.1f}")
    # The bwd column above includes autograd's engine (F.layer_norm's row shows its share); the
    # backward launchers alone, and through their custom ops, are steadier numbers.
    print(f"{'backward, called directly':28s} {'launcher':>8s} {'op':>9s}")
    for name, (launcher, op) in _backward_cases(plain).items():
        if only and name not in only:
            continue
        launcher(), op()
        print(f"{name:28s} {_time(launcher, ARGS.calls, ARGS.rounds):8.1f} {_time(op, ARGS.calls, ARGS.rounds):9.1f}")
    cached = sum(
        launch.fast_launches for module in (ln, gelu, attn) for launch in vars(module).values() if _is_cached(launch)
    )
    launches = LAUNCHES[0] if ARGS.mode == "interpret" else standin_driver.launch_count()
    print(f"(stubbed launches: {launches}, of which through a cached binary: {cached})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
