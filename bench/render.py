"""Render a GPU's results folder: ``README.md`` (tables) and PNG plots, from the JSON alone.

    python -m bench.render bench/results/<gpu-slug> [--file RUN.json]

Reads the newest run in the folder (or ``--file``), validates it, and (re)writes in the
folder:

- ``README.md``: the run's header (device, versions, commit, measured peaks); a summary
  of the project's goals against this run (:func:`goal_rows`: padding-free speed-ups,
  the training step's share of the matmul peak, speed and memory against Hugging Face);
  BERT forward and training tables (sequences/s and speed-up over Hugging Face sdpa,
  training peak memory; then every number); padding-free tables (real tokens/s per
  implementation, the speed-up of the unpadded encoder over the padded one and over
  Hugging Face sdpa); kernel tables (time, TFLOP/s or GB/s, fraction of the measured
  peak, time over floor, error); what was skipped and why; the list of stored runs;
- ``throughput.png``: BERT forward sequences/s against batch x sequence length, per dtype;
- ``speedup.png``: speed-up of each implementation over Hugging Face sdpa, per shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from bertfast.benchmarking.models import FP8_IMPL as FP8
from bertfast.benchmarking.models import MLPERF_OFFLINE_SEQ_PER_S as FP8_SEQ_PER_S
from bertfast.benchmarking.schema import ResultSchemaError, read_result, stored_runs
from bertfast.benchmarking.shapes import SQUAD_LIKE

BASELINE = "hf-sdpa"
UNPADDED, PADDED = "bertfast", "bertfast-padded"  # in the padding-free rows
# Column order in the tables and plots; other implementations follow, sorted.
IMPL_ORDER = (
    "bertfast",
    "bertfast-triton",
    "bertfast-ext",
    "bertfast-reference",
    "bertfast-padded",
    "bertfast-triton-padded",
    "bertfast-cudagraph",
    "bertfast-fp8",
    "bertfast-amp",
    "hf-eager",
    "hf-sdpa",
    "hf-compile",
    "hf-sdpa-patched",
    "hf-sdpa-patched-compile",
    "hf-sdpa-amp",
    "hf-compile-amp",
    "torch-sdpa",
    "torch-sdpa-nomask",
    "torch-sdpa-flash",
    "torch-sdpa-efficient",
    "torch-sdpa-cudnn",
    "torch-layer_norm",
    "torch-gelu",
    "torch-compile",
)
KERNEL_ORDER = ("layer_norm", "bias_gelu", "attention", "attention-nomask", "attention_varlen")

# The goals each run is held against (shown, not asserted).
# Padding-free encoder: at about 60% real tokens, unpadded vs the padded path and vs Hugging Face sdpa.
GOAL_FILL = (0.55, 0.65)
PADDING_FREE_TARGETS = ((PADDED, 1.6), (BASELINE, 2.0))
# BERT training step at this sequence length and dtype: share of the measured bf16 matmul rate (model FLOPs),
# speed-up and peak-memory ratio against Hugging Face (with AMP, as it is usually trained, and in pure bf16).
TRAIN_GOAL_SEQ, TRAIN_GOAL_DTYPE = 128, "bf16"
TRAIN_PEAK_FRACTION, TRAIN_SPEEDUP, TRAIN_MEMORY_RATIO = 0.5, 1.3, 0.8
TRAIN_COMPARISONS = (("bertfast", "hf-sdpa-amp"), ("bertfast", BASELINE), ("bertfast-amp", "hf-sdpa-amp"))
# FP8 inference (issue 25; targets on an H100): bertfast-fp8 against our bf16 default at 32 x 384 (the FP8 section's
# interleaved rows, ``<model>-fp8-fwd``), and its back-to-back throughput on SQuAD-like lengths against MLPerf
# Inference v3.1's offline figure.
FP8_GOAL_SHAPE, FP8_SPEEDUP = (32, 384), 1.4
FP8_LENGTHS = SQUAD_LIKE.name


def _impl_rank(impl: str) -> tuple:
    return (IMPL_ORDER.index(impl), "") if impl in IMPL_ORDER else (len(IMPL_ORDER), impl)


def _is_model_row(row: dict) -> bool:
    return row["name"].startswith("bert-")


def _is_varlen(row: dict) -> bool:
    """A padding-free row (``<model>-fwd-varlen``, ``<model>-train-varlen``)."""
    return "lengths" in row or row["name"].endswith("-varlen")


def _kind_of(name: str) -> str:
    """``"fwd"`` or ``"train"`` for a model row name (``bert-large-train-varlen`` -> ``"train"``)."""
    return name.removesuffix("-varlen").rsplit("-", 1)[1]


def _model_kind(row: dict) -> str:
    return _kind_of(row["name"])


def _model_stem(name: str) -> str:
    """``bert-large-fwd-varlen`` -> ``bert-large``."""
    return name.removesuffix("-varlen").removesuffix("-fwd").removesuffix("-train")


def _color(impl: str):
    """The same colour for an implementation in every plot."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
    rank = _impl_rank(impl)[0]
    return palette[rank % len(palette)] if rank < len(IMPL_ORDER) else palette[hash(impl) % len(palette)]


def _seq_separators(ax, shapes) -> None:
    """Thin vertical lines between sequence lengths (the x axis is sorted by seq, then batch)."""
    for i in range(1, len(shapes)):
        if shapes[i][0] != shapes[i - 1][0]:
            ax.axvline(i - 0.5, color="grey", linewidth=0.6, linestyle=":")


def _shape_rank(row: dict) -> tuple:
    return (row["seq"], row["batch"])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _number(value: float) -> str:
    """Three significant digits, thousands separated: 712.4 -> "712", 0.0123 -> "0.0123"."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _markdown_table(columns, rows) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _ratio(numerator, denominator) -> float | None:
    return None if numerator is None or denominator is None or denominator == 0 else numerator / denominator


def _speedup(row: dict | None, over: dict | None) -> float | None:
    """How many times faster ``row`` is than ``over`` (the same work: a ratio of median times)."""
    return None if row is None or over is None else _ratio(over["median_ms"], row["median_ms"])


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _detail_table(group_rows: list[tuple[str, dict]]) -> list[str]:
    """Every number of the model rows, each labelled by its first cell."""
    detail = [
        [
            label,
            r["impl"],
            f"{r['median_ms']:.3f}",
            f"{_fmt(r.get('p20_ms'), '.3f')}-{_fmt(r.get('p80_ms'), '.3f')}",
            _fmt(r["seq_per_s"], ",.1f"),
            _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(r.get("fill"), ".0%"),
            _fmt(r["tflops"], ".1f"),
            _fmt(r.get("frac_peak_tflops"), ".0%"),
            _fmt(r["peak_mem_mb"], ",.0f"),
            _fmt(r.get("max_error"), ".2e"),
        ]
        for label, r in group_rows
    ]
    columns = ["case", "impl", "median ms", "p20-p80 ms", "seq/s", "tokens/s", "fill", "TFLOP/s", "of peak", "peak MB"]
    out = ["<details><summary>All numbers</summary>", ""]
    return out + _markdown_table([*columns, "max error"], detail) + ["", "</details>", ""]


def _model_sections(rows: list[dict]) -> list[str]:
    out = []
    groups = defaultdict(list)
    for row in rows:
        groups[(row["name"], row["dtype"])].append(row)
    for (name, dtype), group in sorted(groups.items(), key=lambda kv: (_model_kind(kv[1][0]) != "fwd", kv[0])):
        training = _model_kind(group[0]) == "train"
        what = "training step (forward, backward, AdamW)" if training else "inference (forward)"
        impls = sorted({r["impl"] for r in group}, key=_impl_rank)
        shapes = sorted({(r["seq"], r["batch"]) for r in group})
        by_key = {(r["seq"], r["batch"], r["impl"]): r for r in group}
        out += [f"### {_model_stem(name)} {what}, {dtype}", ""]
        out += [f"Sequences/s (higher is better); in brackets the speed-up over {BASELINE}.", ""]

        def throughput_cell(r, base):
            if r is None:
                return "-"
            return _fmt(r["seq_per_s"], ",.1f") + ("" if base is None else f" ({_times(_speedup(r, base))})")

        out += _shape_table(shapes, impls, by_key, throughput_cell)
        if training and any(r["peak_mem_mb"] is not None for r in group):  # (none on the CPU)
            out += [f"Peak memory (MB, lower is better); in brackets the ratio to {BASELINE}.", ""]

            def memory_cell(r, base):
                mem = None if r is None else r["peak_mem_mb"]
                ratio = _ratio(mem, None if base is None else base["peak_mem_mb"])
                return _fmt(mem, ",.0f") + (f" ({ratio:.2f})" if ratio is not None else "")

            out += _shape_table(shapes, impls, by_key, memory_cell)
        ordered = [
            (f"{batch} x {seq}", by_key[(seq, batch, impl)])
            for seq, batch in shapes
            for impl in impls
            if (seq, batch, impl) in by_key
        ]
        out += _detail_table(ordered)
    return out


def _shape_table(shapes, impls, by_key, cell) -> list[str]:
    """One row per ``(seq, batch)``, one column per impl; ``cell(row or None, baseline row or None)``."""
    table = []
    for seq, batch in shapes:
        base = by_key.get((seq, batch, BASELINE))
        table.append([f"{batch} x {seq}", *(cell(by_key.get((seq, batch, impl)), base) for impl in impls)])
    return _markdown_table(["batch x seq", *impls], table) + [""]


def _varlen_groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``(name, dtype, seq, batch, lengths) -> {impl: row}`` for the padding-free rows."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if _is_model_row(row) and _is_varlen(row):
            groups[(row["name"], row["dtype"], row["seq"], row["batch"], row.get("lengths", "-"))][row["impl"]] = row
    return groups


def _fill_of(group: dict[str, dict]) -> float | None:
    fills = [r["fill"] for r in group.values() if r.get("fill") is not None]
    return sum(fills) / len(fills) if fills else None


def _varlen_sections(rows: list[dict]) -> list[str]:
    out = []
    sections = defaultdict(dict)
    for key, group in _varlen_groups(rows).items():
        sections[key[:2]][key[2:]] = group
    for (name, dtype), cases in sorted(sections.items(), key=lambda kv: (_kind_of(kv[0][0]) != "fwd", kv[0])):
        training = _kind_of(name) == "train"
        what = "training step" if training else "inference (forward)"
        impls = sorted({impl for group in cases.values() for impl in group}, key=_impl_rank)
        out += [f"### {_model_stem(name)} padding-free {what}, variable-length batches, {dtype}", ""]
        out += [
            "Real (non-padding) tokens/s, higher is better; `fill` is the share of the padded batch that is real "
            f"tokens. `{UNPADDED}` runs unpadded (`set_unpad(True)`), `{PADDED}` computes the padding "
            f"(`set_unpad(False)`), {BASELINE} takes the same mask; the last columns are the speed-ups of the "
            "unpadded encoder on the same batches. TFLOP/s in the details count real tokens only.",
            "",
        ]
        table = []
        for seq, batch, lengths in sorted(cases):
            group = cases[(seq, batch, lengths)]
            cells = [f"{batch} x {seq}", lengths, _fmt(_fill_of(group), ".0%")]
            cells += [_fmt(group[i].get("tokens_per_s"), ",.0f") if i in group else "-" for i in impls]
            unpadded = group.get(UNPADDED)
            cells += [_times(_speedup(unpadded, group.get(PADDED))), _times(_speedup(unpadded, group.get(BASELINE)))]
            table.append(cells)
        columns = ["batch x seq", "lengths", "fill", *impls, f"{UNPADDED} / {PADDED}", f"{UNPADDED} / {BASELINE}"]
        out += _markdown_table(columns, table) + [""]
        ordered = [
            (f"{batch} x {seq}, {lengths}", cases[(seq, batch, lengths)][impl])
            for seq, batch, lengths in sorted(cases)
            for impl in impls
            if impl in cases[(seq, batch, lengths)]
        ]
        out += _detail_table(ordered)
    return out


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "-"
    return "yes" if (value >= target if at_least else value <= target) else "no"


def goal_rows(rows: list[dict]) -> list[list[str]]:
    """``[goal, measured, target, met]`` for each goal this run has the rows to judge (see the constants above)."""
    out = []
    for (name, dtype, seq, batch, lengths), group in sorted(_varlen_groups(rows).items()):
        fill, unpadded = _fill_of(group), group.get(UNPADDED)
        if fill is None or not GOAL_FILL[0] <= fill <= GOAL_FILL[1]:
            continue
        what = "forward" if _kind_of(name) == "fwd" else "training step"
        for other, target in PADDING_FREE_TARGETS:
            speedup = _speedup(unpadded, group.get(other))
            goal = f"padding-free {what} {batch} x {seq} {dtype}, {lengths} (fill {fill:.0%}): speed-up over {other}"
            out.append([goal, _times(speedup), f">= {target:.1f}x", _verdict(speedup, target, True)])
    train = defaultdict(dict)
    for row in rows:
        if (
            _is_model_row(row)
            and not _is_varlen(row)
            and _model_kind(row) == "train"
            and (row["seq"], row["dtype"]) == (TRAIN_GOAL_SEQ, TRAIN_GOAL_DTYPE)
        ):
            train[(row["name"], row["batch"])][row["impl"]] = row
    for (name, batch), group in sorted(train.items()):
        where = f"{_model_stem(name)} training step {batch} x {TRAIN_GOAL_SEQ} {TRAIN_GOAL_DTYPE}"
        ours = group.get("bertfast") or {}
        fraction = ours.get("frac_peak_tflops")
        fill = f"; {ours['fill']:.0%} of it real tokens" if ours.get("fill") is not None else ""
        out.append(
            [
                f"{where}: bertfast model FLOP/s as a share of the measured bf16 matmul rate (FLOPs of the padded "
                f"batch{fill})",
                _fmt(fraction, ".0%"),
                f">= {TRAIN_PEAK_FRACTION:.0%}",
                _verdict(fraction, TRAIN_PEAK_FRACTION, True),
            ]
        )
        for mine, theirs in TRAIN_COMPARISONS:
            a, b = group.get(mine), group.get(theirs)
            if a is None and b is None:
                continue
            speedup = _speedup(a, b)
            memory = _ratio(a and a["peak_mem_mb"], b and b["peak_mem_mb"])
            out.append(
                [
                    f"{where}: {mine} speed-up over {theirs}",
                    _times(speedup),
                    f">= {TRAIN_SPEEDUP:.1f}x",
                    _verdict(speedup, TRAIN_SPEEDUP, True),
                ]
            )
            out.append(
                [
                    f"{where}: {mine} peak memory / {theirs}",
                    _fmt(memory, ".2f"),
                    f"<= {TRAIN_MEMORY_RATIO:.1f}",
                    _verdict(memory, TRAIN_MEMORY_RATIO, False),
                ]
            )
    return out + _fp8_goals(rows)


def _fp8_goals(rows: list[dict]) -> list[list[str]]:
    out = []
    section = [r for r in rows if r["name"].endswith(("-fp8-fwd", "-fp8-fwd-varlen")) and r["impl"] == FP8]
    for fp8 in sorted(section, key=lambda r: (r.get("lengths") or "", r["seq"], r["batch"])):
        batch, seq = fp8["batch"], fp8["seq"]
        if fp8.get("lengths") is None and (batch, seq) == FP8_GOAL_SHAPE:
            bf16 = next(
                (r for r in rows if r["name"] == fp8["name"] and r["impl"] == "bertfast" and (r["batch"], r["seq"])
                 == (batch, seq) and r.get("lengths") is None),
                None,
            )  # fmt: skip
            speedup = _speedup(fp8, bf16)
            goal = f"FP8 forward {batch} x {seq}: {FP8} speed-up over bertfast ({bf16['dtype'] if bf16 else 'bf16'})"
            out.append([goal, _times(speedup), f">= {FP8_SPEEDUP:.1f}x (H100)", _verdict(speedup, FP8_SPEEDUP, True)])
        if fp8.get("lengths") == FP8_LENGTHS:
            rate = batch / (fp8.get("throughput_ms") or fp8["median_ms"]) * 1e3
            goal = f"FP8 forward {batch} x {seq}, {FP8_LENGTHS} lengths: {FP8} sequences/s back to back"
            target = f">= {FP8_SEQ_PER_S:,.0f} (H100, MLPerf v3.1 offline)"
            out.append([goal, f"{rate:,.0f}", target, _verdict(rate, FP8_SEQ_PER_S, True)])
    return out


def _kernel_sections(rows: list[dict]) -> list[str]:
    out = []
    groups = defaultdict(list)
    for row in rows:
        groups[row["name"]].append(row)

    def rank(name: str) -> tuple:
        op, direction = name.rsplit("-", 1)
        return (KERNEL_ORDER.index(op) if op in KERNEL_ORDER else len(KERNEL_ORDER), op, direction != "fwd")

    for name in sorted(groups, key=rank):
        group = sorted(groups[name], key=lambda r: (r["dtype"], r["seq"], r["batch"], _impl_rank(r["impl"])))
        out += [f"### {name}", ""]
        table = [
            [
                r.get("shape", f"{r['batch']} x {r['seq']}"),
                r["dtype"],
                r["impl"],
                f"{r['median_ms']:.4f}",
                r.get("clock", "events"),
                _fmt(r.get("host_ms"), ".4f"),
                _fmt(r["tflops"], ".1f"),
                _fmt(r.get("gbps"), ",.0f"),
                _fmt(r.get("frac_peak_tflops") if r["tflops"] else r.get("frac_peak_gbps"), ".0%"),
                _fmt(r["median_ms"] / r["floor_ms"] if r.get("floor_ms") else None, ".2f"),
                _fmt(r.get("max_error"), ".2e"),
            ]
            for r in group
        ]
        columns = ["shape", "dtype", "impl", "median ms", "clock", "host ms", "TFLOP/s", "GB/s", "of peak"]
        out += _markdown_table(columns + ["time / floor", "max error"], table) + [""]
    return out


def render_readme(data: dict, path_of_run: str, runs: list[str], plots: list[str]) -> str:
    slug = data["slug"]
    peaks = data["peaks"]
    lines = [
        f"# bertfast benchmarks on {data['gpu']}",
        "",
        f"Generated from the JSON by `python -m bench.render bench/results/{slug}`; do not edit by hand.",
        "",
        f"- run: `{os.path.basename(path_of_run)}`, {data['date']}, commit `{data['commit']}`",
        f"- device: {data['gpu']} (capability {data['capability']}); torch {data['torch']}, "
        f"triton {data['triton'] or '-'}, CUDA {data['cuda'] or '-'}",
        f"- peaks measured in this run: bf16 matmul {_number(peaks['bf16_matmul_tflops'])} TFLOP/s, "
        f"device-to-device copy {_number(peaks['copy_gbps'])} GB/s",
    ]
    for key, text in (data.get("setup") or {}).items():
        lines.append(f"- {key}: {text}")
    lines += [
        "- TFLOP/s counts matmul work only (BERT forward `L*s*(24h^2+4sh)` per sequence, training 3x; attention "
        "`4*b*h*s^2*d`, backward 2.5x), padded tokens included except in the padding-free rows, which count real "
        "tokens only; tokens/s counts real tokens; GB/s counts the fewest bytes the op must move; "
        '"of peak" divides by the peaks above and "time / floor" is the median over the larger of the two '
        "bounds.",
        "",
    ]
    goals = goal_rows(data["results"])
    if goals:
        lines += ["## Summary: the goals", ""]
        lines += [
            "Shown, not asserted: each goal against the rows of this run (`-` where a row is missing). Speed-ups are "
            "ratios of median times on the same inputs; peak memory as in the tables below.",
            "",
        ]
        lines += _markdown_table(["goal", "measured", "target", "met"], goals) + [""]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    model_rows = [r for r in data["results"] if _is_model_row(r) and not _is_varlen(r)]
    varlen_rows = [r for r in data["results"] if _is_model_row(r) and _is_varlen(r)]
    kernel_rows = [r for r in data["results"] if not _is_model_row(r)]
    if model_rows:
        lines += ["## BERT", ""] + _model_sections(model_rows)
    if varlen_rows:
        lines += ["## BERT without padding (variable-length batches)", ""] + _varlen_sections(varlen_rows)
    if kernel_rows:
        lines += ["## Kernels", ""] + _kernel_sections(kernel_rows)
    lines += _host_section(data.get("host") or {}) + _autotune_section(data.get("autotune") or {})
    skipped = data.get("skipped") or []
    if skipped:
        reasons = defaultdict(list)
        for row in skipped:
            reasons[(row["impl"], row["reason"])].append(f"{row['name']} {row['dtype']} {row['batch']}x{row['seq']}")
        lines += ["## Skipped", ""]
        lines += _markdown_table(
            ["impl", "reason", "cases"],
            [[impl, reason.replace("|", "\\|"), len(cases)] for (impl, reason), cases in sorted(reasons.items())],
        )
        lines.append("")
    lines += ["## Stored runs", ""]
    lines += [f"- `{os.path.basename(run)}`" for run in reversed(runs)]
    lines.append("")
    return "\n".join(lines)


HOST_FIELDS = ("host_ms", "wall_ms", "gpu_busy_ms", "host_over_gpu", "kernels", "launches", "syncs", "memcpy_calls")


def _host_section(host: dict) -> list[str]:
    """The host-overhead probe: time to issue one forward against the GPU's busy time."""
    if not host:
        return []
    rows = []
    for probe, numbers in host.items():
        if "host_ms" not in numbers:
            rows.append([probe, *(["-"] * (len(HOST_FIELDS) - 1)), str(next(iter(numbers.values()), "-"))[:80]])
            continue
        cells = [_fmt(numbers.get(f), ".3g") if isinstance(numbers.get(f), (int, float)) else "-" for f in HOST_FIELDS]
        rows.append([probe, *cells])
    out = ["## Host overhead", ""]
    out += [
        "Per forward: `host_ms` the CPU time to issue it without synchronizing, `wall_ms` synchronized, "
        "`gpu_busy_ms` the sum of its kernel times (torch.profiler); launches and synchronizing calls counted by the "
        "profiler. `host_ms` near `wall_ms` and above `gpu_busy_ms`: the GPU waits for the host.",
        "",
    ]
    return out + _markdown_table(["probe", *HOST_FIELDS], rows) + [""]


def _autotune_section(autotune: dict) -> list[str]:
    if not autotune:
        return []
    rows = [
        [kernel, key, config] for kernel, table in sorted(autotune.items()) for key, config in sorted(table.items())
    ]
    out = ["## Triton autotuning", "", "The config each autotuner chose, per key, in this run.", ""]
    return out + _markdown_table(["kernel", "key", "config"], rows) + [""]


def _forward_rows(data: dict) -> dict[str, list[dict]]:
    by_dtype = defaultdict(list)
    for row in data["results"]:
        if _is_model_row(row) and not _is_varlen(row) and _model_kind(row) == "fwd":
            by_dtype[row["dtype"]].append(row)
    return dict(sorted(by_dtype.items()))


def render_plots(data: dict, folder: str) -> list[str]:
    """Write the PNGs; returns their file names (none when there are no forward rows)."""
    by_dtype = _forward_rows(data)
    if not by_dtype:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title = f"{data['gpu']}, commit {data['commit']}"

    # Throughput against (batch x) sequence length.
    fig, axes = plt.subplots(1, len(by_dtype), figsize=(6.5 * len(by_dtype), 4.8), squeeze=False)
    for ax, (dtype, rows) in zip(axes[0], by_dtype.items()):
        shapes = sorted({(r["seq"], r["batch"]) for r in rows})
        positions = {shape: i for i, shape in enumerate(shapes)}
        for impl in sorted({r["impl"] for r in rows}, key=_impl_rank):
            mine = sorted((r for r in rows if r["impl"] == impl), key=_shape_rank)
            ax.plot(
                [positions[(r["seq"], r["batch"])] for r in mine],
                [r["seq_per_s"] for r in mine],
                "-" if impl.startswith("bertfast") else "--",
                marker="o",
                markersize=9 if impl == "bertfast" else 5,
                markerfacecolor="none" if impl == "bertfast" else None,
                linewidth=2.2 if impl == "bertfast" else 1.3,
                color=_color(impl),
                label=impl,
            )
        _seq_separators(ax, shapes)
        ax.set_xticks(range(len(shapes)), [f"{b}x{s}" for s, b in shapes])
        ax.set_yscale("log")
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel("sequences / s (log)")
        ax.set_title(f"BERT forward throughput, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "throughput.png"), dpi=110)
    plt.close(fig)
    written.append("throughput.png")

    # Speed-up over Hugging Face sdpa.
    fig, axes = plt.subplots(1, len(by_dtype), figsize=(6.5 * len(by_dtype), 4.8), squeeze=False)
    have_baseline = False
    for ax, (dtype, rows) in zip(axes[0], by_dtype.items()):
        base = {(r["seq"], r["batch"]): r["median_ms"] for r in rows if r["impl"] == BASELINE}
        shapes = sorted(base)
        impls = [i for i in sorted({r["impl"] for r in rows}, key=_impl_rank) if i != BASELINE]
        if not shapes or not impls:
            ax.set_axis_off()
            continue
        have_baseline = True
        by_key = {(r["seq"], r["batch"], r["impl"]): r for r in rows}
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, (seq, batch) in enumerate(shapes):
                r = by_key.get((seq, batch, impl))
                if r is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(base[(seq, batch)] / r["median_ms"])
            ax.bar(xs, ys, width, label=impl, color=_color(impl))
        ax.axhline(1.0, color="black", linewidth=0.8)
        _seq_separators(ax, shapes)
        ax.set_xticks(range(len(shapes)), [f"{b}x{s}" for s, b in shapes])
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel(f"speed-up over {BASELINE} (higher is better)")
        ax.set_title(f"BERT forward, {dtype}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if have_baseline:
        fig.savefig(os.path.join(folder, "speedup.png"), dpi=110)
        written.append("speedup.png")
    plt.close(fig)
    return written


def render(folder: str, file: str | None = None) -> list[str]:
    """Regenerate ``README.md`` and the plots in ``folder``; returns the paths written."""
    runs = stored_runs(folder)
    path = file or (runs[-1] if runs else None)
    if path is None:
        raise ResultSchemaError(f"no result files (*.json) in {folder!r}")
    data = read_result(path)
    os.makedirs(folder, exist_ok=True)
    plots = render_plots(data, folder)
    readme = os.path.join(folder, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(render_readme(data, path, runs, plots))
    return [readme] + [os.path.join(folder, p) for p in plots]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.render",
        description="Regenerate README.md and the PNG plots of one GPU's results folder from its JSON.",
    )
    parser.add_argument("folder", help="bench/results/<gpu-slug>")
    parser.add_argument("--file", default=None, help="render this result file instead of the newest in the folder")
    args = parser.parse_args(argv)
    try:
        written = render(args.folder, args.file)
    except ResultSchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
