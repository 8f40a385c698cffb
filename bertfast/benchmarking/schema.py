"""The result file: one JSON per run, ``<root>/<gpu-slug>/<date>-<commit>.json``.

    {
      "schema_version": 1,
      "gpu": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "device_kind": "cuda",
      "capability": "9.0", "commit": "6f6d858", "torch": "2.13.0", "triton": "3.9.0",
      "cuda": "13.0", "date": "2025-11-23T16:20:00Z",
      "peaks": {"bf16_matmul_tflops": 712.0, "copy_gbps": 2950.0},
      "setup": {"padding": "...", "timing": "..."},            # free-form descriptions
      "results": [                                              # measured rows
        {"name": "bert-large-fwd", "impl": "bertfast", "dtype": "bf16", "batch": 32, "seq": 128,
         "median_ms": 9.1, "seq_per_s": 3516.0, "tflops": 277.3, "peak_mem_mb": 1020.0,
         "max_error": 0.012, "p20_ms": 9.0, "p80_ms": 9.2, "rounds": 55}, ...],
      "skipped": [{"name": ..., "impl": ..., "dtype": ..., "batch": ..., "seq": ..., "reason": "..."}],
      "autotune": {"attention._fwd_kernel": {"HEAD_DIM=64, seq_bucket=128, ...": "BLOCK_M: 128, ..."}},  # optional
      "host": {"bert-large-fwd bertfast 32x128": {"host_ms": 9.8, "gpu_busy_ms": 6.1, ...}}         # optional
    }

Model rows also carry ``fill`` (the fraction of the ``batch x seq`` positions that are real
tokens, averaged over the timed input sets) and ``tokens_per_s`` (real tokens per second:
``fill * batch * seq / median``); the padding-free rows (``bert-large-fwd-varlen``, ...)
add ``lengths``, the name of the length distribution their batches were drawn from
(:data:`bertfast.benchmarking.shapes.LENGTH_DISTRIBUTIONS`).

A row is identified by ``(name, impl, dtype, batch, seq, lengths)`` (``lengths`` None when
absent); the regression check matches rows of two runs by it.  Files are validated when
written and when read, and every problem is reported with the file and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

from .timing import CLOCKS

SCHEMA_VERSION = 1
DTYPE_NAMES = ("bf16", "fp16", "fp32")
PEAK_KEYS = ("bf16_matmul_tflops", "copy_gbps")


class ResultSchemaError(ValueError):
    """A result file (or the data about to be written as one) does not follow the schema."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _is_number(value) and value > 0


def _non_negative(value) -> bool:
    return _is_number(value) and value >= 0


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _optional(check):
    return lambda value: value is None or check(value)


# field -> (check, what it must be)
HEADER_FIELDS = {
    "schema_version": (lambda v: v == SCHEMA_VERSION, f"{SCHEMA_VERSION}"),
    "gpu": (_text, "a non-empty string"),
    "slug": (_text, "a non-empty string"),
    "device_kind": (lambda v: v in ("cuda", "cpu"), "'cuda' or 'cpu'"),
    "capability": (_text, "a non-empty string such as '9.0' ('cpu' on the CPU)"),
    "commit": (_text, "a non-empty string"),
    "torch": (_text, "a non-empty string"),
    "triton": (_optional(_text), "a string or null"),
    "cuda": (_optional(_text), "a string or null"),
    "date": (_text, "an ISO date string"),
    "peaks": (lambda v: isinstance(v, dict), "an object"),
    "results": (lambda v: isinstance(v, list), "a list"),
}


def _object_of_objects(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())


def _autotune(value) -> bool:
    return _object_of_objects(value) and all(
        isinstance(k, str) and isinstance(c, str) for table in value.values() for k, c in table.items()
    )


def _host(value) -> bool:
    return _object_of_objects(value) and all(
        isinstance(k, str) and (isinstance(x, str) or _is_number(x) or x is None)
        for probe in value.values()
        for k, x in probe.items()
    )


OPTIONAL_HEADER_FIELDS = {
    "setup": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of strings"),
    "skipped": (lambda v: isinstance(v, list), "a list"),
    # Triton autotuning: kernel -> {autotune key -> the config it chose}, read from the autotuners after the run.
    "autotune": (_autotune, "an object: kernel -> {autotune key: chosen config}, all strings"),
    # Host-overhead probe: "<name> <impl> <shape>" -> {field: number or string}.
    "host": (_host, "an object: probe -> {field: number, string or null}"),
}
ROW_FIELDS = {
    "name": (_text, "a non-empty string"),
    "impl": (_text, "a non-empty string"),
    "dtype": (lambda v: v in DTYPE_NAMES, f"one of {DTYPE_NAMES}"),
    "batch": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "seq": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "median_ms": (_positive, "a positive number"),
    "seq_per_s": (_optional(_positive), "a positive number or null"),
    "tflops": (_optional(_non_negative), "a number >= 0 or null"),
    "peak_mem_mb": (_optional(_non_negative), "a number >= 0 or null"),
}
OPTIONAL_ROW_FIELDS = {
    "shape": (_text, "a non-empty string"),
    "p20_ms": (_positive, "a positive number"),
    "p80_ms": (_positive, "a positive number"),
    "min_ms": (_positive, "a positive number"),
    "rounds": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "gbps": (_optional(_non_negative), "a number >= 0 or null"),
    "frac_peak_tflops": (_optional(_non_negative), "a number >= 0 or null"),
    "frac_peak_gbps": (_optional(_non_negative), "a number >= 0 or null"),
    "floor_ms": (_optional(_positive), "a positive number or null"),
    "max_error": (_optional(_non_negative), "a number >= 0 or null"),
    "note": (_text, "a non-empty string"),
    "lengths": (_text, "a non-empty string (a length distribution's name)"),
    "fill": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "tokens_per_s": (_optional(_positive), "a positive number or null"),
    "clock": (lambda v: v in CLOCKS, f"one of {CLOCKS}"),
    "host_ms": (_positive, "a positive number"),
    "throughput_ms": (_positive, "a positive number (per call, calls back to back)"),
    "gpu_busy_ms": (_positive, "a positive number (the device's busy time per call, torch.profiler)"),
}
SKIPPED_FIELDS = {
    "name": ROW_FIELDS["name"],
    "impl": ROW_FIELDS["impl"],
    "dtype": ROW_FIELDS["dtype"],
    "batch": ROW_FIELDS["batch"],
    "seq": ROW_FIELDS["seq"],
    "reason": (_text, "a non-empty string"),
}
OPTIONAL_SKIPPED_FIELDS = {"shape": OPTIONAL_ROW_FIELDS["shape"], "lengths": OPTIONAL_ROW_FIELDS["lengths"]}
KEY_FIELDS = ("name", "impl", "dtype", "batch", "seq", "lengths")


def row_key(row: dict) -> tuple:
    """What identifies a row across runs: ``(name, impl, dtype, batch, seq, lengths or None)``."""
    return (row["name"], row["impl"], row["dtype"], row["batch"], row["seq"], row.get("lengths"))


def _row_consistency(row: dict, where: str, problems: list[str]) -> None:
    """Fields that follow from others must agree (a hand-edited or mis-assembled row fails here)."""
    if "lengths" in row and ("fill" not in row or "tokens_per_s" not in row):
        problems.append(f"{where}: a row with 'lengths' (variable-length batches) must give 'fill' and 'tokens_per_s'")
    tokens_per_s, fill = row.get("tokens_per_s"), row.get("fill")
    if tokens_per_s is not None and fill is None:
        problems.append(f"{where}: 'tokens_per_s' needs 'fill' (the share of real tokens it was computed from)")
    if tokens_per_s is not None and fill is not None:
        expected = fill * row["batch"] * row["seq"] / (row["median_ms"] * 1e-3)
        if not math.isclose(tokens_per_s, expected, rel_tol=1e-6):
            problems.append(
                f"{where}.tokens_per_s must be fill * batch * seq / median = {expected:.6g}, got {tokens_per_s!r}"
            )


def _check_object(obj, where: str, required: dict, optional: dict, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where} must be an object, got {type(obj).__name__}")
        return
    for field, (check, expected) in required.items():
        if field not in obj:
            problems.append(f"{where}: missing field {field!r}")
        elif not check(obj[field]):
            problems.append(f"{where}.{field} must be {expected}, got {obj[field]!r}")
    for field, value in obj.items():
        if field in required:
            continue
        if field not in optional:
            known = ", ".join(sorted({*required, *optional}))
            problems.append(f"{where}: unknown field {field!r} (known fields: {known})")
        elif not optional[field][0](value):
            problems.append(f"{where}.{field} must be {optional[field][1]}, got {value!r}")


def problems_in(data) -> list[str]:
    """Every way ``data`` departs from the schema (empty when it is valid)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return [f"the top level must be an object, got {type(data).__name__}"]
    _check_object(data, "result", HEADER_FIELDS, OPTIONAL_HEADER_FIELDS, problems)
    peaks = data.get("peaks")
    if isinstance(peaks, dict):
        for key in PEAK_KEYS:
            if not _positive(peaks.get(key)):
                problems.append(f"peaks.{key} must be a positive number, got {peaks.get(key)!r}")
    seen: dict[tuple, int] = {}
    for i, row in enumerate(data.get("results") or []):
        before = len(problems)
        _check_object(row, f"results[{i}]", ROW_FIELDS, OPTIONAL_ROW_FIELDS, problems)
        if len(problems) == before:
            _row_consistency(row, f"results[{i}]", problems)
            key = row_key(row)
            if key in seen:
                problems.append(f"results[{i}] repeats results[{seen[key]}] ({', '.join(KEY_FIELDS)}) = {key}")
            seen[key] = i
    for i, row in enumerate(data.get("skipped") or []):
        _check_object(row, f"skipped[{i}]", SKIPPED_FIELDS, OPTIONAL_SKIPPED_FIELDS, problems)
    return problems


def row_problems(row: dict) -> list[str]:
    """How one result row departs from the schema (empty when it is valid): e.g. a NaN ``max_error``,
    which means the implementation's output was not finite.  Callers record such a row as failed
    instead of losing the whole result file to it."""
    problems: list[str] = []
    _check_object(row, "row", ROW_FIELDS, OPTIONAL_ROW_FIELDS, problems)
    if not problems:
        _row_consistency(row, "row", problems)
    return problems


def validate(data, source: str = "result") -> dict:
    """Return ``data`` if it follows the schema, else raise :class:`ResultSchemaError`."""
    problems = problems_in(data)
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ResultSchemaError(f"{source} does not follow the result schema:\n  " + "\n  ".join(shown) + more)
    return data


def file_name(data: dict) -> str:
    """``<date>-<commit>.json`` with the date as ``YYYYMMDD-HHMMSS`` (sorts by time)."""
    compact = "".join(ch for ch in data["date"] if ch.isdigit())[:14]
    stamp = f"{compact[:8]}-{compact[8:14]}" if len(compact) >= 14 else compact
    commit = "".join(ch if ch.isalnum() else "-" for ch in data["commit"])
    return f"{stamp}-{commit}.json"


def write_result(data: dict, root: str | os.PathLike) -> str:
    """Validate and write ``data`` to ``<root>/<slug>/<date>-<commit>.json``; returns the path."""
    validate(data, "the result about to be written")
    folder = os.path.join(os.fspath(root), data["slug"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name(data))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path


# What result files written before one name per op called an op (row name prefix) or an implementation.
OLD_NAMES = {
    "layernorm": "layer_norm",
    "bias-gelu": "bias_gelu",
    "mean-pool": "mean_pool",
    "attention-varlen": "attention_varlen",
    "torch-layernorm": "torch-layer_norm",
}


def current_names(data: dict) -> dict:
    """``data`` with the op and implementation names of older result files replaced by today's."""
    for row in [*(data.get("results") or []), *(data.get("skipped") or [])]:
        if not isinstance(row, dict):
            continue
        for old, new in OLD_NAMES.items():
            if isinstance(row.get("name"), str) and row["name"].startswith(old + "-"):
                row["name"] = new + row["name"][len(old) :]
            if row.get("impl") == old:
                row["impl"] = new
    return data


def read_result(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ResultSchemaError(f"result file {path!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ResultSchemaError(f"result file {path!r} is not valid JSON: {exc}") from None
    return validate(current_names(data), f"result file {path!r}")


def stored_runs(folder: str | os.PathLike) -> list[str]:
    """Result files in one GPU's folder, oldest first (file names sort by date)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    return [os.path.join(folder, n) for n in names]


def make_row(
    *,
    name: str,
    impl: str,
    dtype: str,
    batch: int,
    seq: int,
    timing,
    flops: float | None = None,
    nbytes: float | None = None,
    peaks: dict[str, float] | None = None,
    peak_mem_mb: float | None = None,
    max_error: float | None = None,
    shape: str | None = None,
    note: str | None = None,
    tokens: float | None = None,
    lengths: str | None = None,
) -> dict:
    """A result row from a :class:`~bertfast.benchmarking.timing.Timing` and the op's work.

    ``tokens``: real (non-padding) tokens per call, averaged over the input sets (model
    rows); gives ``fill`` and ``tokens_per_s``.  ``lengths``: the length distribution of a
    padding-free row.
    """
    from .formulas import floor_ms

    seconds = timing.median_ms * 1e-3
    row = {
        "name": name,
        "impl": impl,
        "dtype": dtype,
        "batch": int(batch),
        "seq": int(seq),
        "median_ms": timing.median_ms,
        "seq_per_s": batch / seconds,
        "tflops": flops / seconds / 1e12 if flops else None,
        "peak_mem_mb": peak_mem_mb,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "min_ms": timing.min_ms,
        "rounds": timing.rounds,
    }
    if timing.clock:
        row["clock"] = timing.clock
    if timing.host_ms:
        row["host_ms"] = timing.host_ms
    if nbytes:
        row["gbps"] = nbytes / seconds / 1e9
    if peaks:
        if flops:
            row["frac_peak_tflops"] = row["tflops"] / peaks["bf16_matmul_tflops"]
        if nbytes:
            row["frac_peak_gbps"] = row["gbps"] / peaks["copy_gbps"]
        row["floor_ms"] = floor_ms(flops, nbytes, peaks)
    if max_error is not None:
        row["max_error"] = float(max_error)
    if shape:
        row["shape"] = shape
    if note:
        row["note"] = note
    if tokens is not None:
        row["fill"] = tokens / (batch * seq)
        row["tokens_per_s"] = row["fill"] * batch * seq / seconds  # the form the schema checks
    if lengths:
        row["lengths"] = lengths
    return row


def skipped_row(
    *,
    name: str,
    impl: str,
    dtype: str,
    batch: int,
    seq: int,
    reason: str,
    shape: str | None = None,
    lengths: str | None = None,
):
    row = {"name": name, "impl": impl, "dtype": dtype, "batch": int(batch), "seq": int(seq), "reason": reason}
    if shape:
        row["shape"] = shape
    if lengths:
        row["lengths"] = lengths
    return row


def new_result(
    environment: dict,
    peaks: dict[str, float],
    rows: Iterable[dict],
    skipped: Iterable[dict] = (),
    setup: dict[str, str] | None = None,
) -> dict:
    """Assemble (and validate) a result from its parts."""
    data = {"schema_version": SCHEMA_VERSION, **environment, "peaks": dict(peaks), "results": list(rows)}
    if setup:
        data["setup"] = dict(setup)
    skipped = list(skipped)
    if skipped:
        data["skipped"] = skipped
    return validate(data)
