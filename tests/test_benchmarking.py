"""bertfast.benchmarking: formulas, timing, result files, rendering, regression check, ``bertfast bench``.

Everything here runs on the CPU; the GPU paths share the same code (see bench/).
"""

import argparse
import copy
import json
import os
import sys
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bertfast import BertModel
from bertfast.benchmarking import command, compare, formulas, render, schema, shapes
from bertfast.benchmarking.cases import Skip, run_case
from bertfast.benchmarking.device import environment, measure_peaks, slug
from bertfast.benchmarking.kernels import kernel_case
from bertfast.benchmarking.timing import SMOKE_PLAN, Timing, TimingPlan, measure, measure_with_pytest_benchmark
from bertfast.ops import _dispatch, reference

CPU = torch.device("cpu")
PEAKS = {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0}
ENV = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "slug": "nvidia-h100-80gb-hbm3",
    "device_kind": "cuda",
    "capability": "9.0",
    "commit": "abc1234",
    "torch": "2.13.0",
    "triton": "3.9.0",
    "cuda": "13.0",
    "date": "2025-11-23T16:20:00Z",
}


# --- formulas --------------------------------------------------------------------------


def test_bert_forward_flops_match_counted_matmuls():
    # FFN width deliberately not 4h, so the general formula is what is checked.
    config = shapes.tiny_config(hidden_size=48, intermediate_size=80, num_attention_heads=3)
    model = BertModel(config, backend="reference").eval()
    batch, seq = 3, 11
    ids = torch.randint(1, config.vocab_size, (batch, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    pooler = 2 * batch * config.hidden_size**2  # left out of the formula on purpose
    expected = formulas.bert_forward_flops(
        batch, seq, config.hidden_size, config.num_hidden_layers, config.intermediate_size
    )
    assert counter.get_total_flops() - pooler == expected


def test_bert_large_flops_per_sequence():
    assert formulas.bert_forward_flops(1, 128, 1024, 24) == pytest.approx(78.9e9, rel=1e-3)
    assert formulas.bert_forward_flops(1, 512, 1024, 24) == pytest.approx(335e9, rel=2e-3)
    assert formulas.bert_train_flops(4, 128, 1024, 24) == 3 * formulas.bert_forward_flops(4, 128, 1024, 24)


def test_attention_flops_match_counted_matmuls():
    b, s, h, d = 2, 13, 3, 16
    q, k, v = torch.randn(3, b, s, h, d).unbind(0)
    with FlopCounterMode(display=False) as counter:
        reference.attention(q, k, v, torch.ones(b, s, dtype=torch.bool), d**-0.5)
    assert counter.get_total_flops() == formulas.attention_flops(b, h, s, d)
    assert formulas.attention_flops(b, h, s, d, "bwd") == 2.5 * formulas.attention_flops(b, h, s, d)
    assert formulas.attention_varlen_flops([s, s], h, d) == formulas.attention_flops(2, h, s, d)


def test_floor_is_the_larger_bound():
    peaks = {"bf16_matmul_tflops": 100.0, "copy_gbps": 1000.0}
    assert formulas.floor_ms(1e12, 1e6, peaks) == pytest.approx(10.0)  # compute-bound: 1 TFLOP at 100 TFLOP/s
    assert formulas.floor_ms(1e6, 1e9, peaks) == pytest.approx(1.0)  # memory-bound: 1 GB at 1000 GB/s
    assert formulas.floor_ms(None, None, peaks) is None
    assert formulas.layer_norm_bytes(10, 8, 2) == 3 * 10 * 8 * 2 + 3 * 8 * 2


# --- timing ----------------------------------------------------------------------------


def test_timing_quantiles():
    t = Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.min_ms, t.rounds) == (3.0, 1.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    with pytest.raises(ValueError):
        Timing.from_samples([])


def test_rounds_follow_the_plan():
    plan = TimingPlan(min_rounds=3, max_rounds=40, target_ms=100.0)
    assert plan.rounds_for(1.0) == 40
    assert plan.rounds_for(10.0) == 10
    assert plan.rounds_for(500.0) == 3


def test_measure_rotates_inputs_and_times_only_the_call():
    seen, prepared = [], []

    def prepare(tag):
        prepared.append(tag)
        time.sleep(0.02)  # untimed set-up must not show in the timing
        return (tag,)

    def fn(tag):
        seen.append(tag)
        time.sleep(0.002)

    plan = TimingPlan(min_warmup=1, warmup_ms=0.0, target_ms=0.0, min_rounds=5, max_rounds=5)
    timing = measure(fn, [("a",), ("b",), ("c",)], device=CPU, plan=plan, prepare=prepare)
    assert timing.rounds == 5
    assert seen == prepared == ["a", "b", "c", "a", "b", "c"]  # one warm-up call, then five rounds
    assert 2.0 <= timing.median_ms < 15.0


def test_pytest_benchmark_path_runs_the_timed_rounds():
    class FakeBenchmark:
        def pedantic(self, target, setup, rounds, iterations, warmup_rounds):
            assert iterations == 1 and warmup_rounds == 0
            self.rounds = rounds
            for _ in range(rounds):
                args, kwargs = setup()
                target(*args, **kwargs)

    calls = []
    plan = TimingPlan(min_warmup=2, warmup_ms=0.0, target_ms=0.0, min_rounds=4, max_rounds=4)
    bench = FakeBenchmark()
    timing = measure_with_pytest_benchmark(bench, calls.append, [(1,), (2,)], device=CPU, plan=plan)
    assert bench.rounds == timing.rounds == 4
    assert calls == [1, 2, 1, 2, 1, 2]


# --- shapes, device --------------------------------------------------------------------


def test_padding_distribution():
    g = torch.Generator().manual_seed(3)
    lengths = shapes.padded_lengths(64, 129, g)
    assert lengths[0] == 129 and lengths.min() >= 65 and lengths.max() <= 129
    assert len(set(lengths.tolist())) > 10
    mask = shapes.key_padding_mask(lengths, 129)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths.tolist()
    assert not mask[1, lengths[1] :].any()


def test_device_description_and_peaks_on_cpu():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("NVIDIA H200") == "nvidia-h200"
    with pytest.raises(ValueError):
        slug("  ")
    peaks = measure_peaks(CPU)
    assert peaks["bf16_matmul_tflops"] > 0 and peaks["copy_gbps"] > 0
    result = schema.new_result(environment(CPU), peaks, [])
    assert result["device_kind"] == "cpu" and result["capability"] == "cpu"


# --- kernel and model cases ------------------------------------------------------------


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_kernel_case_row(direction):
    shape = shapes.SMOKE_ATTENTION_SHAPES[0]
    case = kernel_case("attention", "torch-sdpa", "fp32", shape, direction, CPU)
    row = run_case(case, plan=SMOKE_PLAN, peaks=PEAKS)
    assert row["name"] == f"attention-{direction}" and row["impl"] == "torch-sdpa"
    assert (row["batch"], row["seq"], row["shape"]) == (shape.batch, shape.seq, shape.label)
    assert row["tflops"] > 0 and row["gbps"] > 0 and row["floor_ms"] > 0
    # fp32 against the float64 reference: tiny but measured.
    assert 0 < row["max_error"] < 1e-4
    schema.validate(schema.new_result(ENV, PEAKS, [row]))


def test_kernel_error_is_measured_against_what_the_impl_computes():
    shape = shapes.AttentionShape(2, 13, 3, 16)
    no_mask = kernel_case("attention", "torch-sdpa-nomask", "fp32", shape, "fwd", CPU)
    assert no_mask.max_error() < 1e-4  # compared with the unmasked reference, not the masked one
    masked = kernel_case("attention", "torch-sdpa", "fp32", shape, "fwd", CPU)
    assert masked.max_error() < 1e-4


def test_unavailable_backend_is_a_skip_with_its_reason(monkeypatch):
    monkeypatch.setattr("bertfast.ops.backend_availability", lambda name: f"{name} is not built here")
    with pytest.raises(Skip, match="triton is not built here"):
        kernel_case("layernorm", "bertfast-triton", "fp32", shapes.SMOKE_LAYER_NORM_SHAPES[0], "fwd", CPU)


# --- result files ----------------------------------------------------------------------


def _row(impl="bertfast", ms=10.0, name="bert-large-fwd", dtype="bf16", batch=32, seq=128, **extra):
    flops = formulas.bert_forward_flops(batch, seq, 1024, 24)
    timing = Timing(ms, ms * 0.99, ms * 1.01, ms * 0.98, 20)
    row = schema.make_row(
        name=name, impl=impl, dtype=dtype, batch=batch, seq=seq, timing=timing, flops=flops, peaks=PEAKS
    )
    row.update(peak_mem_mb=900.0, max_error=0.01, **extra)
    return row


def _result(rows, **header):
    return schema.new_result({**ENV, **header}, PEAKS, rows)


def test_result_round_trip(tmp_path):
    data = _result([_row("bertfast", 8.0), _row("hf-sdpa", 12.0)])
    path = schema.write_result(data, tmp_path)
    assert path == os.path.join(tmp_path, "nvidia-h100-80gb-hbm3", "20251123-162000-abc1234.json")
    assert schema.read_result(path) == data
    row = data["results"][0]
    assert row["seq_per_s"] == pytest.approx(32 / 8e-3)
    assert row["tflops"] == pytest.approx(32 * 78.9e9 / 8e-3 / 1e12, rel=1e-3)
    assert row["frac_peak_tflops"] == pytest.approx(row["tflops"] / 700.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("gpu"), "missing field 'gpu'"),
        (lambda d: d["results"][0].update(dtype="int8"), "results[0].dtype must be one of"),
        (lambda d: d["results"][0].update(median_ms=-1.0), "results[0].median_ms must be a positive number"),
        (lambda d: d["results"][0].update(batch=2.5), "results[0].batch must be a positive integer"),
        (lambda d: d["results"][1].update(medain_ms=1.0), "results[1]: unknown field 'medain_ms'"),
        (lambda d: d["results"].append(dict(d["results"][0])), "results[2] repeats results[0]"),
        (lambda d: d["peaks"].pop("copy_gbps"), "peaks.copy_gbps must be a positive number"),
        (lambda d: d.update(schema_version=99), "result.schema_version must be 1"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, change, message):
    data = copy.deepcopy(_result([_row("bertfast"), _row("hf-sdpa")]))
    change(data)
    with pytest.raises(schema.ResultSchemaError) as info:
        schema.write_result(data, tmp_path)
    assert message in str(info.value)
    assert not os.listdir(tmp_path)  # nothing written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(schema.ResultSchemaError, match="bad.json"):
        schema.read_result(bad)


def test_unreadable_result_files(tmp_path):
    with pytest.raises(schema.ResultSchemaError, match="does not exist"):
        schema.read_result(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(schema.ResultSchemaError, match="not valid JSON"):
        schema.read_result(broken)


# --- rendering -------------------------------------------------------------------------


def _synthetic_run(tmp_path):
    rows = []
    for dtype in ("bf16", "fp16"):
        for batch, seq in ((1, 128), (32, 128), (8, 512)):
            for impl, speed in (("bertfast", 1.5), ("bertfast-triton", 1.5), ("hf-eager", 0.7), ("hf-sdpa", 1.0)):
                ms = formulas.bert_forward_flops(batch, seq, 1024, 24) / (200e12 * speed) * 1e3
                rows.append(_row(impl, ms, dtype=dtype, batch=batch, seq=seq))
    rows.append(_row("bertfast", 30.0, name="bert-large-train"))
    timing = Timing(0.05, 0.049, 0.051, 0.048, 100)
    nbytes = formulas.layer_norm_bytes(16384, 1024, 2)
    rows.append(
        schema.make_row(
            name="layernorm-fwd", impl="torch-layernorm", dtype="bf16", batch=128, seq=128, timing=timing,
            nbytes=nbytes, peaks=PEAKS, shape="16384x1024",
        )
    )  # fmt: skip
    skipped = [
        schema.skipped_row(name="layernorm-fwd", impl="bertfast-ext", dtype="bf16", batch=128, seq=128, reason="no")
    ]
    data = schema.new_result(ENV, PEAKS, rows, skipped, {"padding": shapes.PADDING_DISTRIBUTION})
    return schema.write_result(data, tmp_path)


def test_render_readme_and_plots(tmp_path):
    path = _synthetic_run(tmp_path)
    folder = os.path.dirname(path)
    assert render.main([folder]) == 0
    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "# bertfast benchmarks on NVIDIA H100 80GB HBM3" in readme
    assert "python -m bertfast.benchmarking.render bench/results/nvidia-h100-80gb-hbm3" in readme
    assert "### bert-large inference (forward), bf16" in readme and "### bert-large training step" in readme
    # speed-up over hf-sdpa in the summary table, GB/s and fraction of peak in the kernel table
    assert "(1.50x)" in readme and "(0.70x)" in readme
    gbps = nbytes_gbps = formulas.layer_norm_bytes(16384, 1024, 2) / 0.05e-3 / 1e9
    assert f"{nbytes_gbps:,.0f}" in readme and f"{gbps / 3000.0:.0%}" in readme
    assert "| bertfast-ext | no | 1 |" in readme
    assert "20251123-162000-abc1234.json" in readme
    for name in ("throughput.png", "speedup.png"):
        data = open(os.path.join(folder, name), "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_render_errors(tmp_path, capsys):
    assert render.main([str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err
    (tmp_path / "20250101-000000-x.json").write_text('{"gpu": 1}')
    assert render.main([str(tmp_path)]) == 2
    assert "does not follow the result schema" in capsys.readouterr().err


# --- regression check ------------------------------------------------------------------


def _store(folder, date, rows, **header):
    return schema.write_result(_result(rows, date=date, **header), folder)


def test_compare_flags_a_regression(tmp_path, capsys):
    old = _store(tmp_path, "2025-11-20T00:00:00Z", [_row("bertfast", 10.0), _row("hf-sdpa", 12.0)])
    new = _store(tmp_path, "2025-11-21T00:00:00Z", [_row("bertfast", 10.8), _row("hf-sdpa", 12.1)])
    assert compare.main([new, "--baseline", old, "--threshold", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "+8.0%" in out and "FAIL: 1 row(s)" in out
    assert compare.main([new, "--baseline", old, "--threshold", "0.10"]) == 0  # within a looser threshold


def test_compare_passes_improvement_noise_and_new_rows(tmp_path, capsys):
    old = _store(tmp_path, "2025-11-20T00:00:00Z", [_row("bertfast", 10.0), _row("hf-eager", 20.0)])
    rows = [_row("bertfast", 8.0), _row("hf-eager", 20.6), _row("bertfast-ext", 9.0)]
    new = _store(tmp_path, "2025-11-21T00:00:00Z", rows)
    assert compare.main([new, "--baseline", old]) == 0
    out = capsys.readouterr().out
    assert "improved" in out and "-20.0%" in out and "+3.0%" in out and "new" in out
    assert "0 REGRESSION, 1 improved, 1 ok, 1 new" in out and "FAIL" not in out


def test_compare_finds_the_newest_stored_run_of_the_same_gpu(tmp_path, capsys):
    _store(tmp_path, "2025-11-19T00:00:00Z", [_row("bertfast", 20.0)])
    newest = _store(tmp_path, "2025-11-20T00:00:00Z", [_row("bertfast", 10.0)])
    new_path = _store(tmp_path / "incoming", "2025-11-21T00:00:00Z", [_row("bertfast", 11.0)])
    assert compare.main([new_path, "--results", str(tmp_path)]) == 1  # 10% slower than the newest, not faster
    assert os.path.basename(newest) in capsys.readouterr().out
    assert compare.find_baseline(newest) == os.path.join(os.path.dirname(newest), "20251119-000000-abc1234.json")


def test_compare_without_baseline(tmp_path, capsys):
    only = _store(tmp_path, "2025-11-21T00:00:00Z", [_row("bertfast", 10.0)])
    assert compare.main([only]) == 0
    assert "no baseline" in capsys.readouterr().out
    assert compare.main([only, "--require-baseline"]) == 2
    assert compare.main([only, "--baseline", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_refuses_runs_of_different_gpus(tmp_path, capsys):
    old = _store(tmp_path, "2025-11-20T00:00:00Z", [_row()], gpu="NVIDIA H200", slug="nvidia-h200")
    new = _store(tmp_path, "2025-11-21T00:00:00Z", [_row()])
    assert compare.main([new, "--baseline", old]) == 2
    assert "different devices" in capsys.readouterr().out


# --- bertfast bench --------------------------------------------------------------------


def _bench_args(*argv):
    parser = argparse.ArgumentParser(prog="bertfast bench")
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_command_end_to_end_on_cpu(tmp_path, capsys):
    args = _bench_args(
        "--model", "tiny", "--batch", "2", "--seq", "16", "--backends", "auto,reference", "--train", "--save",
        str(tmp_path),
    )  # fmt: skip
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU is visible" in out
    assert "Check against the float32 reference" in out and "MISMATCH" not in out
    assert "bert-tiny forward (inference), fp32, batch 2 x seq 16" in out
    assert "bert-tiny training step" in out and "vs hf-sdpa" in out
    assert "the torch.compile baseline is timed on a GPU only" in out
    (folder,) = os.listdir(tmp_path)
    (name,) = os.listdir(tmp_path / folder)
    data = schema.read_result(tmp_path / folder / name)
    got = {(r["name"], r["impl"]) for r in data["results"]}
    for kind in ("fwd", "train"):
        for impl in ("bertfast", "bertfast-reference", "hf-eager", "hf-sdpa"):
            assert (f"bert-tiny-{kind}", impl) in got
    forward = [r for r in data["results"] if r["name"] == "bert-tiny-fwd"]
    assert all(r["batch"] == 2 and r["seq"] == 16 and r["rounds"] == 2 for r in forward)
    assert all(r["max_error"] < 1e-4 for r in forward)
    assert {r["impl"] for r in data["skipped"]} == {"hf-compile"}


@pytest.fixture
def broken_backend(monkeypatch):
    """A backend that is the reference plus a small error in every LayerNorm."""
    module = types.ModuleType("bertfast_test_broken_backend")
    module.availability = lambda: None
    module.unsupported = lambda op, *tensors, **meta: None
    for op in ("bias_gelu", "attention", "attention_varlen", "embedding_layer_norm"):
        setattr(module, op, getattr(reference, op))
    module.layer_norm = lambda *args: reference.layer_norm(*args) + 1e-3
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(_dispatch.BACKENDS, "broken", module.__name__)
    yield "broken"
    # Forget the fake backend in the dispatcher's cache of loaded backends.
    loaded = getattr(_dispatch, "_LOADED", None)
    if isinstance(loaded, dict):
        loaded.pop("broken", None)
    if hasattr(_dispatch._load, "cache_clear"):
        _dispatch._load.cache_clear()


def test_bench_command_fails_loudly_on_a_mismatch(broken_backend, capsys):
    args = _bench_args("--model", "tiny", "--batch", "2", "--seq", "16", "--backends", f"reference,{broken_backend}")
    args.baselines, args.plain = False, True
    assert command.run(args) == 1
    out = capsys.readouterr().out
    assert "bertfast-broken" in out and "MISMATCH" in out and "not timing" in out


def test_bench_command_rejects_unknown_backend(capsys):
    assert command.run(_bench_args("--backends", "cudnn", "--plain")) == 2
    assert "unknown backend 'cudnn'" in capsys.readouterr().out
