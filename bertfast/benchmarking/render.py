"""Render a GPU's results folder: ``README.md`` (tables) and PNG plots, from the JSON alone.

    python -m bertfast.benchmarking.render bench/results/<gpu-slug> [--file RUN.json]

Reads the newest run in the folder (or ``--file``), validates it, and (re)writes in the
folder:

- ``README.md``: the run's header (device, versions, commit, measured peaks), BERT
  forward and training tables (sequences/s and speed-up over Hugging Face sdpa; then every
  number), kernel tables (time, TFLOP/s or GB/s, fraction of the measured peak, time
  over floor, error), what was skipped and why, and the list of stored runs;
- ``throughput.png``: BERT forward sequences/s against batch x sequence length, per dtype;
- ``speedup.png``: speed-up of each implementation over Hugging Face sdpa, per shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from .schema import ResultSchemaError, read_result, stored_runs

BASELINE = "hf-sdpa"
# Column order in the tables and plots; other implementations follow, sorted.
IMPL_ORDER = (
    "bertfast",
    "bertfast-triton",
    "bertfast-ext",
    "bertfast-reference",
    "hf-eager",
    "hf-sdpa",
    "hf-compile",
    "torch-sdpa",
    "torch-sdpa-nomask",
    "torch-layernorm",
    "torch-gelu",
    "torch-compile",
)
KERNEL_ORDER = ("layernorm", "bias-gelu", "attention", "attention-nomask", "attention-varlen")


def _impl_rank(impl: str) -> tuple:
    return (IMPL_ORDER.index(impl), "") if impl in IMPL_ORDER else (len(IMPL_ORDER), impl)


def _is_model_row(row: dict) -> bool:
    return row["name"].startswith("bert-")


def _model_kind(row: dict) -> str:
    return row["name"].rsplit("-", 1)[1]  # "fwd" or "train"


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


def _model_sections(rows: list[dict]) -> list[str]:
    out = []
    groups = defaultdict(list)
    for row in rows:
        groups[(row["name"], row["dtype"])].append(row)
    for (name, dtype), group in sorted(groups.items(), key=lambda kv: (_model_kind(kv[1][0]) != "fwd", kv[0])):
        what = "inference (forward)" if _model_kind(group[0]) == "fwd" else "training step (forward, backward, AdamW)"
        impls = sorted({r["impl"] for r in group}, key=_impl_rank)
        shapes = sorted({(r["seq"], r["batch"]) for r in group})
        by_key = {(r["seq"], r["batch"], r["impl"]): r for r in group}
        out += [f"### {name.removesuffix('-fwd').removesuffix('-train')} {what}, {dtype}", ""]
        out += [f"Sequences/s (higher is better); in brackets the speed-up over {BASELINE}.", ""]
        table = []
        for seq, batch in shapes:
            base = by_key.get((seq, batch, BASELINE))
            cells = [f"{batch} x {seq}"]
            for impl in impls:
                r = by_key.get((seq, batch, impl))
                if r is None:
                    cells.append("-")
                    continue
                cell = _fmt(r["seq_per_s"], ",.1f")
                if base is not None:
                    cell += f" ({base['median_ms'] / r['median_ms']:.2f}x)"
                cells.append(cell)
            table.append(cells)
        out += _markdown_table(["batch x seq", *impls], table) + [""]
        detail = []
        for seq, batch in shapes:
            for impl in impls:
                r = by_key.get((seq, batch, impl))
                if r is None:
                    continue
                detail.append(
                    [
                        f"{batch} x {seq}",
                        impl,
                        f"{r['median_ms']:.3f}",
                        f"{_fmt(r.get('p20_ms'), '.3f')}-{_fmt(r.get('p80_ms'), '.3f')}",
                        _fmt(r["seq_per_s"], ",.1f"),
                        _fmt(r["tflops"], ".1f"),
                        _fmt(r.get("frac_peak_tflops"), ".0%"),
                        _fmt(r["peak_mem_mb"], ",.0f"),
                        _fmt(r.get("max_error"), ".2e"),
                    ]
                )
        columns = ["batch x seq", "impl", "median ms", "p20-p80 ms", "seq/s", "TFLOP/s", "of peak", "peak MB"]
        out += ["<details><summary>All numbers</summary>", ""]
        out += _markdown_table([*columns, "max error"], detail) + ["", "</details>", ""]
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
                _fmt(r["tflops"], ".1f"),
                _fmt(r.get("gbps"), ",.0f"),
                _fmt(r.get("frac_peak_tflops") if r["tflops"] else r.get("frac_peak_gbps"), ".0%"),
                _fmt(r["median_ms"] / r["floor_ms"] if r.get("floor_ms") else None, ".2f"),
                _fmt(r.get("max_error"), ".2e"),
            ]
            for r in group
        ]
        columns = ["shape", "dtype", "impl", "median ms", "TFLOP/s", "GB/s", "of peak", "time / floor", "max error"]
        out += _markdown_table(columns, table) + [""]
    return out


def render_readme(data: dict, path_of_run: str, runs: list[str], plots: list[str]) -> str:
    slug = data["slug"]
    peaks = data["peaks"]
    lines = [
        f"# bertfast benchmarks on {data['gpu']}",
        "",
        "Generated from the JSON by `python -m bertfast.benchmarking.render "
        f"bench/results/{slug}`; do not edit by hand.",
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
        "`4*b*h*s^2*d`, backward 2.5x), padded tokens included; GB/s counts the fewest bytes the op must move; "
        '"of peak" divides by the peaks above and "time / floor" is the median over the larger of the two '
        "bounds.",
        "",
    ]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    model_rows = [r for r in data["results"] if _is_model_row(r)]
    kernel_rows = [r for r in data["results"] if not _is_model_row(r)]
    if model_rows:
        lines += ["## BERT", ""] + _model_sections(model_rows)
    if kernel_rows:
        lines += ["## Kernels", ""] + _kernel_sections(kernel_rows)
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


def _forward_rows(data: dict) -> dict[str, list[dict]]:
    by_dtype = defaultdict(list)
    for row in data["results"]:
        if _is_model_row(row) and _model_kind(row) == "fwd":
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
        prog="python -m bertfast.benchmarking.render",
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
