"""Where a bertfast forward's time goes on a GPU: host against device, per kernel, per op.

    OUT=folder python scripts/profile_forward.py

BERT-large in bf16, eval, at 32x128 and 8x512 (bertfast padding-free and padded, Hugging Face
sdpa): the wall time of a synchronized forward, the host's time to return from the call, the
profiler's CUDA time and kernel count per forward; then single ops (attention, LayerNorm,
bias-GELU) against PyTorch, and the host cost of one op call. Writes profile_summary.txt and
profile_tables.txt (the profiler's top kernels per case) to $OUT (default: here).
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import bertfast
from bertfast import ops
from bertfast.benchmarking.models import hf_config
from bertfast.benchmarking.shapes import bert_large_config, key_padding_mask, padded_lengths

OUT = os.environ.get("OUT", ".")
DEVICE = "cuda"
DTYPE = torch.bfloat16
SHAPES = ((32, 128), (8, 512))
LINES: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    LINES.append(text)


def models():
    torch.manual_seed(0)
    config = bert_large_config()
    ours = bertfast.BertModel(config).to(DEVICE, DTYPE).eval()
    theirs = transformers.BertModel(hf_config(config, "sdpa"))
    theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()}, strict=False)
    return config, ours, theirs.to(DEVICE, DTYPE).eval()


def padded_batch(config, batch: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    mask = key_padding_mask(padded_lengths(batch, seq, gen), seq)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen)
    return ids.to(DEVICE), mask.long().to(DEVICE)


def median_ms(fn, rounds: int, sync_after: bool) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync_after:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def profiled(fn, calls: int = 3):
    """(CUDA kernel ms per call, kernels per call, profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / calls / 1e3
    return busy_ms, len(kernels) / calls, prof


def forward_cases(config, ours, theirs) -> None:
    def ours_padded(ids, mask):
        ours.set_unpad(False)
        try:
            return ours(ids, mask)
        finally:
            ours.set_unpad("auto")

    impls = (
        ("bertfast padding-free", lambda ids, mask: ours(ids, mask)),
        ("bertfast padded", ours_padded),
        ("hf-sdpa", lambda ids, mask: theirs(input_ids=ids, attention_mask=mask)),
    )
    for batch, seq in SHAPES:
        ids, mask = padded_batch(config, batch, seq)
        for name, impl in impls:
            fn = functools.partial(impl, ids, mask)
            wall = median_ms(fn, 20, sync_after=True)
            host = median_ms(fn, 10, sync_after=False)
            busy, kernels, prof = profiled(fn)
            say(
                f"{batch}x{seq} {name:22s} wall {wall:7.2f} ms  host-return {host:7.2f} ms  "
                f"GPU busy {busy:6.2f} ms  kernels/forward {kernels:5.0f}"
            )
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70)
            with open(os.path.join(OUT, "profile_tables.txt"), "a", encoding="utf-8") as f:
                f.write(f"\n===== {batch}x{seq} {name}\n{table}\n")


def attention_cases() -> None:
    heads, head_dim = 16, 64
    for batch, seq in SHAPES:
        qkv = torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.unbind(2)
        keep = key_padding_mask(padded_lengths(batch, seq, torch.Generator().manual_seed(2)), seq).to(DEVICE)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        flops = 4 * batch * heads * seq * seq * head_dim
        for label, fn in (
            ("triton attention, mask", functools.partial(ops.attention, q, k, v, keep, backend="triton")),
            ("triton attention", functools.partial(ops.attention, q, k, v, None, backend="triton")),
            ("sdpa, mask", functools.partial(F.scaled_dot_product_attention, qt, kt, vt, keep[:, None, None, :])),
            ("sdpa", functools.partial(F.scaled_dot_product_attention, qt, kt, vt)),
        ):
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            say(f"{batch}x{seq} {label:24s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:7.1f} TFLOP/s")


def row_op_cases() -> None:
    tokens, hidden, inner = 4096, 1024, 4096
    x, residual = (torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE) for _ in range(2))
    weight, bias = (torch.randn(hidden, device=DEVICE, dtype=DTYPE) for _ in range(2))
    h = torch.randn(tokens, inner, device=DEVICE, dtype=DTYPE)
    h_bias = torch.randn(inner, device=DEVICE, dtype=DTYPE)
    ln_bytes, gelu_bytes = 3 * x.numel() * 2, 2 * h.numel() * 2
    for label, fn, nbytes in (
        (
            "triton layer_norm",
            lambda: ops.layer_norm(x, weight, bias, 1e-12, residual=residual, linear_bias=bias, backend="triton"),
            ln_bytes,
        ),
        ("torch layer_norm", lambda: F.layer_norm(x + bias + residual, (hidden,), weight, bias, 1e-12), ln_bytes),
        ("triton bias_gelu", lambda: ops.bias_gelu(h, h_bias, backend="triton"), gelu_bytes),
        ("torch gelu", lambda: F.gelu(h + h_bias), gelu_bytes),
    ):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        say(f"{tokens} tokens {label:20s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.1f} GB/s")
    tiny = torch.randn(8, hidden, device=DEVICE, dtype=DTYPE)
    for label, fn in (
        ("ops.layer_norm, triton", lambda: ops.layer_norm(tiny, weight, bias, 1e-12, backend="triton")),
        ("F.layer_norm", lambda: F.layer_norm(tiny, (hidden,), weight, bias, 1e-12)),
        ("ops.bias_gelu, triton", lambda: ops.bias_gelu(tiny, weight, backend="triton")),
    ):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        say(f"host per call, 8 tokens: {label:24s} {(time.perf_counter() - start) / 500 * 1e6:7.1f} us")


def main() -> None:
    config, ours, theirs = models()
    with torch.no_grad():
        forward_cases(config, ours, theirs)
        attention_cases()
        row_op_cases()
    with open(os.path.join(OUT, "profile_summary.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
