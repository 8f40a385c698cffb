"""Perf CI: compare a new run with a stored one and fail on a regression.

    python -m bench.compare NEW.json [--baseline OLD.json] [--threshold 0.05]

Without ``--baseline`` the baseline is the newest stored run of the same GPU: the newest
other file in ``<results>/<slug>/`` (``--results``, default: NEW's own folder).  Rows are
matched by ``(name, impl, dtype, batch, seq, lengths)`` (``lengths`` only on padding-free
rows); a row whose ``median_ms`` got worse by more than ``threshold`` (0.05 = 5%) is a
regression.  Prints one table of every matched row.

Exit status: 0 no regression (or no baseline yet: the first run on a GPU passes, and says
so; ``--require-baseline`` makes that an error), 1 at least one regression, 2 bad input
(an unreadable or invalid file, runs from different GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys

from bertfast.benchmarking.display import format_table
from bertfast.benchmarking.schema import ResultSchemaError, read_result, row_key, stored_runs

REGRESSION, IMPROVED, SAME, NEW, GONE = "REGRESSION", "improved", "ok", "new", "gone"


def find_baseline(new_path: str, results: str | None = None) -> str | None:
    """The newest stored run of the same GPU other than ``new_path`` (None if there is none)."""
    new = read_result(new_path)
    folder = os.path.join(results, new["slug"]) if results else os.path.dirname(os.path.abspath(new_path))
    candidates = [p for p in stored_runs(folder) if not _same_file(p, new_path)]
    return candidates[-1] if candidates else None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def compare_runs(old: dict, new: dict, threshold: float) -> list[dict]:
    """One entry per row key in either run, with the verdict."""
    old_rows = {row_key(r): r for r in old["results"]}
    new_rows = {row_key(r): r for r in new["results"]}
    entries = []
    for key in list(new_rows) + [k for k in old_rows if k not in new_rows]:
        before, after = old_rows.get(key), new_rows.get(key)
        entry = {"key": key, "old_ms": before and before["median_ms"], "new_ms": after and after["median_ms"]}
        if before is None:
            entry["verdict"], entry["change"] = NEW, None
        elif after is None:
            entry["verdict"], entry["change"] = GONE, None
        else:
            change = after["median_ms"] / before["median_ms"] - 1.0
            entry["change"] = change
            entry["verdict"] = REGRESSION if change > threshold else IMPROVED if change < -threshold else SAME
        entries.append(entry)
    return entries


def format_entries(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        name, impl, dtype, batch, seq, lengths = e["key"]
        rows.append(
            (
                name if lengths is None else f"{name} [{lengths}]",
                impl,
                dtype,
                f"{batch}x{seq}",
                "-" if e["old_ms"] is None else f"{e['old_ms']:.4f}",
                "-" if e["new_ms"] is None else f"{e['new_ms']:.4f}",
                "-" if e["change"] is None else f"{e['change']:+.1%}",
                e["verdict"],
            )
        )
    return format_table(None, ("name", "impl", "dtype", "shape", "old ms", "new ms", "change", "verdict"), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Compare a new benchmark run with a stored one; exit 1 on a regression.",
    )
    parser.add_argument("new", help="the new result file")
    parser.add_argument("--baseline", default=None, help="the result file to compare with (default: newest stored)")
    parser.add_argument("--results", default=None, help="results root holding <slug>/ folders (default: NEW's folder)")
    parser.add_argument(
        "--threshold", type=float, default=0.05, help="allowed slow-down of median_ms, 0.05 = 5%% (default)"
    )
    parser.add_argument("--require-baseline", action="store_true", help="fail (exit 2) when there is no baseline")
    args = parser.parse_args(argv)
    if not args.threshold >= 0:
        print(f"error: --threshold must be >= 0, got {args.threshold}", file=sys.stderr)
        return 2
    try:
        new = read_result(args.new)
        baseline = args.baseline or find_baseline(args.new, args.results)
        if baseline is None:
            where = os.path.join(args.results, new["slug"]) if args.results else os.path.dirname(args.new) or "."
            print(f"no baseline: no other stored run for {new['gpu']} in {where}; nothing to compare")
            return 2 if args.require_baseline else 0
        old = read_result(baseline)
    except ResultSchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if old["gpu"] != new["gpu"]:
        print(f"error: the runs are from different devices: {old['gpu']!r} (baseline) and {new['gpu']!r}")
        return 2
    entries = compare_runs(old, new, args.threshold)
    print(f"baseline: {baseline} (commit {old['commit']}, {old['date']})")
    print(f"new:      {args.new} (commit {new['commit']}, {new['date']})")
    print(format_entries(entries))
    regressions = [e for e in entries if e["verdict"] == REGRESSION]
    counts = {v: sum(e["verdict"] == v for e in entries) for v in (REGRESSION, IMPROVED, SAME, NEW, GONE)}
    print(", ".join(f"{n} {v}" for v, n in counts.items()) + f" (threshold {args.threshold:.1%} on median_ms)")
    if regressions:
        print(f"FAIL: {len(regressions)} row(s) slower than the baseline by more than {args.threshold:.1%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
