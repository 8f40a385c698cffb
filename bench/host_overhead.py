"""Host overhead: the Python path of one eval forward, where compute is negligible.

A 24-layer BERT at hidden 32 (2 heads, FFN 128) on a ``2 x 8`` batch (the second row right-padded
after 6 tokens, so bertfast runs padding-free) does almost no
arithmetic, so on the CPU its forward time is the host's: Python calls, dispatch, checks,
allocations.  That is the time that bounds a GPU forward at small batches.  This row
times, side by side in one run (rounds interleaved, median of each, one intra-op thread):

- ``bertfast``: ``bertfast.BertModel`` on the ``reference`` backend (eval, ``no_grad``);
- ``hf-sdpa-patched``: the same weights in ``transformers.BertModel`` after ``bertfast.patch``;
- ``hf-sdpa``: the same weights in ``transformers.BertModel``, ``attn_implementation="sdpa"``.

and counts, per forward, the ATen ops that reach the dispatcher (a ``TorchDispatchMode``)
and the Python function calls (``sys.setprofile``).  Target: ``bertfast / hf-sdpa <= 0.9``.

    python -m bench.host_overhead [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TARGET_RATIO = 0.9
SHAPE = {"layers": 24, "hidden": 32, "heads": 2, "intermediate": 128, "batch": 2, "seq": 8}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(forward) -> tuple[int, dict[str, int]]:
    """ATen ops one call of ``forward()`` dispatches (total, per op name)."""
    with torch.no_grad(), _CountOps() as mode:
        forward()
    return mode.count, mode.names


def count_python_calls(forward) -> int:
    """Python function calls one call of ``forward()`` makes (C calls not counted)."""
    calls = 0

    def profiler(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    with torch.no_grad():
        sys.setprofile(profiler)
        try:
            forward()
        finally:
            sys.setprofile(None)
    return calls


def build(shape: dict | None = None, seed: int = 0):
    """``{impl: forward()}`` over one set of weights and one input batch."""
    import transformers

    import bertfast

    s = dict(SHAPE, **(shape or {}))
    torch.manual_seed(seed)
    config = bertfast.BertConfig(
        vocab_size=100,
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["intermediate"],
        max_position_embeddings=64,
    )
    native = bertfast.BertModel(config, backend="reference").eval()
    hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="sdpa")
    hf = transformers.BertModel(hf_config).eval()
    hf.load_state_dict(native.state_dict(), strict=False)
    patched = transformers.BertModel(hf_config).eval()
    patched.load_state_dict(native.state_dict(), strict=False)
    bertfast.patch(patched, backend="reference")
    ids = torch.randint(1, 100, (s["batch"], s["seq"]))
    mask = torch.ones_like(ids)
    mask[1:, s["seq"] - s["seq"] // 3 :] = 0  # padding in the batch, as served batches have: the padding-free path
    return {
        "bertfast": lambda: native(ids, attention_mask=mask),
        "hf-sdpa-patched": lambda: patched(ids, attention_mask=mask),
        "hf-sdpa": lambda: hf(ids, attention_mask=mask),
    }


def _time(forwards: dict, times: dict, rounds: int) -> None:
    """Interleaved rounds: each round times every impl once, so a load change hits them alike."""
    with torch.no_grad():
        for forward in forwards.values():  # warm-up
            forward()
            forward()
        for _ in range(rounds):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward()
                times[name].append((time.perf_counter() - start) * 1e3)


def run(rounds: int = 30, shape: dict | None = None) -> dict:
    """The row: median ms per impl, ratios to hf-sdpa, op counts per forward."""
    forwards = build(shape)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host path, not intra-op thread wake-ups (noise on a shared machine)
    try:
        _time(forwards, times, rounds)
    finally:
        torch.set_num_threads(threads)
    ms = {name: statistics.median(t) for name, t in times.items()}
    row = {"shape": dict(SHAPE, **(shape or {})), "rounds": rounds, "ms": ms}
    row["ratio"] = {name: ms[name] / ms["hf-sdpa"] for name in ms}
    row["aten_ops"] = {name: count_aten_ops(f)[0] for name, f in forwards.items()}
    row["python_calls"] = {name: count_python_calls(f) for name, f in forwards.items()}
    row["target_ratio"] = TARGET_RATIO
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    row = run(args.rounds)
    print(f"host overhead, eval forward {row['shape']}, CPU, reference backend, {row['rounds']} rounds")
    print(f"{'impl':<18}{'ms':>9}{'/ hf-sdpa':>11}{'aten ops':>10}{'py calls':>10}")
    for name, ms in row["ms"].items():
        print(
            f"{name:<18}{ms:>9.3f}{row['ratio'][name]:>11.2f}{row['aten_ops'][name]:>10}{row['python_calls'][name]:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
