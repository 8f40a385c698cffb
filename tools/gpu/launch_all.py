"""Launch every kernel once, forward and backward, at small sizes: the program compute-sanitizer checks.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m tools.gpu.launch_all

Runs each op of :mod:`bertfast.ops` on the ``triton`` and ``ext`` backends in every dtype the
backend declares, in the variants that compile to different kernels: LayerNorm with and
without the fused residual and bias and with hidden dropout, at a vector-friendly and an odd
hidden size; the embedding LayerNorm; bias-GELU; mean pooling with and without its L2
normalisation (an empty sequence included); the FP8 quantizing ops (inference only: outputs, no
gradients; on GPUs from sm_89); attention padded with and without a mask,
with dropout, and variable-length with and without dropout (the attention autotuners try
every config of each key, so every config is launched).  On a GPU the Triton attention runs
every variant in bf16, the masked one in fp16, none in fp32 (each key compiles and runs every
config: minutes of compiling without a warm Triton cache, and fp32's configs compile slowest).
Each call's outputs and gradients must be finite.  Without a GPU it runs on the CPU (the Triton kernels then need
``TRITON_INTERPRET=1``; the extension's CPU kernels), which keeps the script from rotting.
Prints one line per call and a total; exit status 1 if a call raised or gave a non-finite value.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback

import torch

from bertfast import ops

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# (rows, hidden sizes, FFN widths, attention (seq, heads, head_dim)): BERT-large's widths on a GPU,
# tiny ones on the CPU (the interpreter is slow); odd sizes in both.
GPU_SIZES = (37, (1024, 1000), (4096, 1000), (77, 2, 64))
CPU_SIZES = (5, (64, 40), (96, 40), (13, 2, 16))


def _cases(device: torch.device, dtype: torch.dtype, backend: str):
    """``(name, op, make_args)``: ``make_args()`` -> ``(args, kwargs, differentiable inputs)``."""
    gen = torch.Generator().manual_seed(0)
    rows, hiddens, widths, (seq, heads, head_dim) = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    short = max(1, seq // 2)

    def randn(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=gen) * scale).to(device, dtype)
        return t.requires_grad_(grad)

    def layer_norm(hidden, fused, dropout):
        def make():
            x, w, b = randn(rows, hidden), randn(hidden, scale=0.1), randn(hidden, scale=0.1)
            kwargs = {"dropout_p": 0.1} if dropout else {}
            if fused:
                kwargs.update(residual=randn(rows, hidden), linear_bias=randn(hidden, scale=0.1))
            return (x, w, b), kwargs, [x, w, b, *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]

        return make

    def embedding():
        def make():
            ids = torch.randint(0, 50, (3, 29), generator=gen).to(device)
            pos = torch.arange(29).expand(3, 29).to(device)
            types = torch.randint(0, 2, (3, 29), generator=gen).to(device)
            tables = [randn(50, hiddens[0]), randn(64, hiddens[0]), randn(2, hiddens[0])]
            w, b = randn(hiddens[0], scale=0.1), randn(hiddens[0], scale=0.1)
            return (ids, pos, types, *tables, w, b), {}, [*tables, w, b]

        return make

    def bias_gelu(width):
        def make():
            x, b = randn(rows, width), randn(width, scale=0.1)
            return (x, b), {}, [x, b]

        return make

    def mean_pool(hidden, normalize):
        def make():
            lengths = [seq, 0, short, 1]  # an empty sequence and a single token too
            x = randn(sum(lengths), hidden)
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            return (x, cu, normalize), {}, [x]

        return make

    def attention(masked, dropout):
        def make():
            qkv = randn(2, seq, 3, heads, head_dim, grad=False).requires_grad_(True)
            q, k, v = qkv.unbind(2)
            mask = None
            if masked:
                mask = (torch.arange(seq)[None, :] < torch.tensor([seq, short])[:, None]).to(device)
            kwargs = {"dropout_p": 0.1} if dropout else {}
            return (q, k, v, mask), kwargs, [qkv]

        return make

    def varlen(dropout):
        def make():
            lengths = [seq, short, 1]
            qkv = randn(sum(lengths), 3, heads, head_dim, grad=False).requires_grad_(True)
            q, k, v = qkv.unbind(1)
            cu = torch.tensor([0, seq, seq + short, seq + short + 1], dtype=torch.int32, device=device)
            kwargs = {"dropout_p": 0.1} if dropout else {}
            return (q, k, v, cu, max(lengths)), kwargs, [qkv]

        return make

    for hidden in hiddens:
        for fused in (False, True):
            yield f"layer_norm h{hidden}{' fused' if fused else ''}", "layer_norm", layer_norm(hidden, fused, False)
        yield f"layer_norm h{hidden} fused dropout", "layer_norm", layer_norm(hidden, True, True)
    yield f"embedding_layer_norm h{hiddens[0]}", "embedding_layer_norm", embedding()
    for width in widths:
        yield f"bias_gelu w{width}", "bias_gelu", bias_gelu(width)

    def fp8(op, width, fused=False):  # inference-only: no gradient
        def make():
            x = randn(rows, width, grad=False)
            if op == "quantize_rows":
                return (x,), {}, []
            if op == "bias_gelu_fp8":
                return (x, randn(width, scale=0.1, grad=False)), {}, []
            w, b = randn(width, scale=0.1, grad=False), randn(width, scale=0.1, grad=False)
            kwargs = (
                dict(residual=randn(rows, width, grad=False), linear_bias=randn(width, grad=False)) if fused else {}
            )
            return (x, w, b), kwargs, []

        return make

    for hidden in hiddens:
        yield f"quantize_rows h{hidden}", "quantize_rows", fp8("quantize_rows", hidden)
        for fused in (False, True):
            yield (
                f"layer_norm_fp8 h{hidden}{' fused' if fused else ''}",
                "layer_norm_fp8",
                fp8("layer_norm_fp8", hidden, fused),
            )
    for width in widths:
        yield f"bias_gelu_fp8 w{width}", "bias_gelu_fp8", fp8("bias_gelu_fp8", width)
    for hidden in hiddens:
        for normalize in (False, True):
            yield f"mean_pool h{hidden}{' normalize' if normalize else ''}", "mean_pool", mean_pool(hidden, normalize)
    # The extension's attention in every dtype; the Triton attention as the module docstring says.
    gpu_triton = device.type == "cuda" and backend == "triton"
    if gpu_triton and dtype == torch.float32:
        return
    yield "attention mask", "attention", attention(True, False)
    if not gpu_triton or dtype == torch.bfloat16:
        yield "attention no mask", "attention", attention(False, False)
        yield "attention mask dropout", "attention", attention(True, True)
        yield "attention_varlen", "attention_varlen", varlen(False)
        yield "attention_varlen dropout", "attention_varlen", varlen(True)


def _probe_tensors(op: str, args: tuple) -> tuple:
    """The tensors :func:`bertfast.ops.can_run` is asked about for ``op``."""
    if op == "embedding_layer_norm":
        return (args[3], args[6], args[7])
    return tuple(a for a in args[:3] if isinstance(a, torch.Tensor))


def launch_all(device: torch.device, dtypes, backends=("triton", "ext")) -> tuple[int, list[str], list[str]]:
    """Returns ``(calls launched, skipped lines, failures)``."""
    launched, skipped, failures = 0, [], []
    for backend in backends:
        reason = ops.backend_availability(backend)
        if reason is not None:
            skipped.append(f"{backend}: {reason}")
            continue
        for dtype in dtypes:
            for name, op, make in _cases(device, dtype, backend):
                what = f"{backend} {str(dtype).removeprefix('torch.')} {name}"
                try:
                    args, kwargs, wrt = make()
                    meta = {"dropout_p": kwargs["dropout_p"]} if "dropout_p" in kwargs else {}
                    if not ops.can_run(op, backend, _probe_tensors(op, args), **meta):
                        skipped.append(f"{what}: not supported")
                        continue
                    if wrt:
                        out = getattr(ops, op)(*args, **kwargs, backend=backend)
                        grads = torch.autograd.grad(out, wrt, torch.randn_like(out), allow_unused=True)
                    else:  # an inference-only op (FP8): its outputs, as floats
                        with torch.no_grad():
                            outputs = getattr(ops, op)(*args, **kwargs, backend=backend)
                        out, grads = torch.cat([t.float().flatten() for t in outputs]), ()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    bad = [t for t in (out, *grads) if t is not None and not torch.isfinite(t).all()]
                    if bad:
                        failures.append(f"{what}: non-finite output or gradient")
                    launched += 1
                    print(f"ok {what}", flush=True)
                except Exception as exc:
                    traceback.print_exc()
                    failures.append(f"{what}: {type(exc).__name__}: {exc}")
    return launched, skipped, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.launch_all", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    # The Triton interpreter cannot multiply bf16 tiles; the CPU run keeps to float32.
    dtypes = GPU_DTYPES if cuda else (torch.float32,)
    launched, skipped, failures = launch_all(device, dtypes)
    for line in skipped:
        print(f"skipped {line}")
    for line in failures:
        print(f"FAILED {line}")
    print(
        f"launch_all on {device}: launched {launched} op calls (forward and backward), {len(skipped)} skipped, "
        f"{len(failures)} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
