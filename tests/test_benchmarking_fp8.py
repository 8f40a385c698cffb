"""The FP8 inference rows (issue 25) and the FP8 accuracy report, on the CPU.

The rows run for real where ``bertfast.fp8.unsupported("cpu")`` lets them (``torch._scaled_mm`` runs on the
CPU in recent torch); every test of the refusal forces it, so a device that cannot run FP8 is covered
everywhere: its rows are recorded with the reason, never left out.
"""

import argparse
import json
import os

import pytest
import torch

from bench import firstlight, fp8_accuracy, render
from bertfast.benchmarking import command, models, schema, shapes
from bertfast.benchmarking.cases import Skip
from bertfast.benchmarking.models import FP8_IMPL, FP8_IMPLS, ModelBench, fp8_reason

from .helpers import minilm_path

CPU = torch.device("cpu")
REFUSAL = "FP8 refused: no e4m3 GEMM on this test device"
ENV = {
    "gpu": "cpu",
    "slug": "cpu",
    "device_kind": "cpu",
    "capability": "cpu",
    "commit": "abc",
    "torch": "2",
    "triton": None,
    "cuda": None,
    "date": "2026-12-07T00:00:00Z",
}
PEAKS = {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0}


@pytest.fixture
def refused(monkeypatch):
    monkeypatch.setattr(models, "fp8_reason", lambda device: REFUSAL)


def _needs_fp8():
    reason = fp8_reason(CPU)
    if reason is not None:
        pytest.skip(f"FP8 does not run on this CPU: {reason}")


# --- shapes -------------------------------------------------------------------------------------------


def test_squad_like_lengths_are_stated_and_drawn_as_stated():
    dist = shapes.length_distribution("squad-like")
    assert dist is shapes.SQUAD_LIKE and dist not in shapes.LENGTH_DISTRIBUTIONS  # not a padding-free row
    assert 150 <= dist.mean_fill * shapes.SQUAD_MAX <= 180
    assert "SQuAD v1.1" in dist.description and "squad-like" in shapes.lengths_description()
    lengths = shapes.varlen_lengths(dist, 4096, shapes.SQUAD_MAX, torch.Generator().manual_seed(3)).float()
    assert lengths.mean().item() == pytest.approx(dist.mean_fill * shapes.SQUAD_MAX, rel=0.02)
    assert (lengths == shapes.SQUAD_MAX).float().mean().item() == pytest.approx(dist.truncated, abs=0.01)
    assert {s for s, lengths in shapes.FP8_SHAPES if lengths is None} == {
        shapes.ModelShape(32, 128),
        shapes.ModelShape(32, 384),
    }


# --- the impl ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench():
    return ModelBench(shapes.tiny_config(), CPU, smoke=True)


def test_fp8_impl_is_refused_with_the_reason(tiny_bench, refused):
    assert tiny_bench.skip_reason(FP8_IMPL) == REFUSAL
    with pytest.raises(Skip, match="no e4m3 GEMM"):
        tiny_bench.forward_case(FP8_IMPL, "fp32", shapes.ModelShape(2, 13))
    with pytest.raises(ValueError, match="inference-only"):
        tiny_bench.train_case(FP8_IMPL, "bf16", shapes.ModelShape(2, 13))


def test_fp8_forward_case_runs_the_quantized_model(tiny_bench):
    _needs_fp8()
    import bertfast.fp8
    from bertfast.benchmarking.cases import run_case
    from bertfast.benchmarking.timing import SMOKE_PLAN

    case = tiny_bench.forward_case(FP8_IMPL, "fp32", shapes.ModelShape(4, 13), lengths=shapes.SQUAD_LIKE)
    row = run_case(case, plan=SMOKE_PLAN)
    assert (row["dtype"], row["lengths"]) == ("bf16", "squad-like")  # FP8 rows are bf16 whatever was asked
    assert "e4m3" in row["note"] and 0 < row["fill"] < 1
    assert bertfast.fp8.is_quantized(tiny_bench.fp8_model())
    # Quantized from the float32 master: close to it, though not to the bf16 bound.
    assert row["max_error"] < 0.5
    schema.validate(schema.new_result(ENV, PEAKS, [row]))


# --- first light ------------------------------------------------------------------------------------------


def test_first_light_runs_the_fp8_section_last(tmp_path):
    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    names = [section.name for section in light.plan()]
    assert names[-2:] == ["fp8", "fp8 accuracy"]
    assert names.index("training") < names.index("fp8") and names.index("padding-free") < names.index("fp8")
    rows = light.identities("fp8")
    assert len(rows) == len(shapes.SMOKE_FP8_SHAPES) * len(FP8_IMPLS)
    assert {r["name"] for r in rows} == {"bert-tiny-fp8-fwd", "bert-tiny-fp8-fwd-varlen"}
    assert {r["dtype"] for r in rows if r["impl"] == FP8_IMPL} == {"bf16"}


def test_first_light_records_refused_fp8_rows_with_the_reason(tmp_path, refused, capsys):
    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    light.run_peaks()
    light.run_fp8()
    assert "FP8 rows not run: " + REFUSAL in capsys.readouterr().out
    assert not light.rows and not light.failed
    assert len(light.skipped) == len(light.identities("fp8"))
    for row in light.skipped:
        assert REFUSAL in row["reason"]
    path = light.save()
    assert {r["impl"] for r in schema.read_result(path)["skipped"]} == set(FP8_IMPLS)


def test_first_light_fp8_failure_is_recorded_and_first_light_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "fp8_reason", lambda device: None)

    def broken(*args, **kwargs):
        raise RuntimeError("scaled_mm exploded")

    monkeypatch.setattr("bertfast.benchmarking.models.ModelBench.fp8_model", broken)
    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    light.run_peaks()
    light.run_fp8()
    failed = [r for r in light.skipped if r["impl"] == FP8_IMPL]
    assert len(failed) == len(shapes.SMOKE_FP8_SHAPES) and all("scaled_mm exploded" in r["reason"] for r in failed)
    assert len(light.failed) == len(failed)
    # The bf16 rows beside it are still timed.
    assert {r["impl"] for r in light.rows} == {"bertfast", "hf-sdpa"}


def test_first_light_fp8_rows_state_their_ratios(tmp_path):
    _needs_fp8()
    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path), numbers=str(tmp_path / "n.json"))
    light.run_peaks()
    light.run_fp8()
    assert not light.failed, light.failed
    fp8 = [r for r in light.rows if r["impl"] == FP8_IMPL]
    assert len(fp8) == len(shapes.SMOKE_FP8_SHAPES)
    for row in fp8:
        assert "x bertfast (fp32) latency" in row["note"] and "of MLPerf v3.1 offline 9,100" in row["note"]
        assert row["throughput_ms"] > 0 and row["host_ms"] > 0
    schema.validate(schema.read_result(light.save()))
    numbers = json.loads((tmp_path / "n.json").read_text())
    assert set(numbers["fp8 fwd ms, seq/s back to back"]) == {"2x13", "4x13 squad-like"}


# --- render goals --------------------------------------------------------------------------------------------


def test_render_judges_the_fp8_goals():
    def row(impl, ms, batch=32, seq=384, lengths=None, throughput_ms=None):
        r = {"name": "bert-large-fp8-fwd" + ("-varlen" if lengths else ""), "impl": impl, "dtype": "bf16"}
        r.update(batch=batch, seq=seq, median_ms=ms, seq_per_s=batch / ms * 1e3, tflops=None, peak_mem_mb=None)
        if lengths:
            r.update(lengths=lengths, fill=0.45, tokens_per_s=0.45 * batch * seq / ms * 1e3)
        if throughput_ms:
            r["throughput_ms"] = throughput_ms
        return r

    rows = [
        row(FP8_IMPL, 10.0),
        row("bertfast", 15.0),
        row(FP8_IMPL, 14.0, batch=128, lengths="squad-like", throughput_ms=12.8),
    ]
    goals = {g[0]: g[1:] for g in render.goal_rows(rows)}
    speedup = goals["FP8 forward 32 x 384: bertfast-fp8 speed-up over bertfast (bf16)"]
    assert speedup[0] == "1.50x" and speedup[2] == "yes"
    rate = goals["FP8 forward 128 x 384, squad-like lengths: bertfast-fp8 sequences/s back to back"]
    assert rate[0] == "10,000" and rate[2] == "yes"


# --- bertfast bench --fp8 -----------------------------------------------------------------------------------


def _bench_args(*argv):
    parser = argparse.ArgumentParser(prog="bertfast bench")
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def _tiny_bench_args(tmp_path, *extra):
    gpu = torch.cuda.is_available()
    return _bench_args(
        "--model", "tiny", "--batch", "2", "--seq", "16", "--backends", "auto", "--no-baselines", "--fp8",
        "--save", str(tmp_path), *(["--cpu"] if gpu else []), *extra,
    )  # fmt: skip


def test_bench_command_fp8_refused_says_why(tmp_path, capsys, refused):
    assert command.run(_tiny_bench_args(tmp_path)) == 0  # the other rows still ran
    out = capsys.readouterr().out
    assert "--fp8: FP8 cannot run on" in out and REFUSAL in out
    (folder,) = os.listdir(tmp_path)
    (name,) = os.listdir(tmp_path / folder)
    data = schema.read_result(tmp_path / folder / name)
    assert [(r["impl"], r["dtype"], r["reason"]) for r in data["skipped"]] == [(FP8_IMPL, "bf16", REFUSAL)]


def test_bench_command_times_fp8_beside_bf16(tmp_path, capsys):
    _needs_fp8()
    assert command.run(_tiny_bench_args(tmp_path, "--train")) == 0
    out = capsys.readouterr().out
    assert "FP8: see python -m bench.fp8_accuracy" in out and "of MLPerf Inference v3.1 offline" in out
    (folder,) = os.listdir(tmp_path)
    (name,) = os.listdir(tmp_path / folder)
    data = schema.read_result(tmp_path / folder / name)
    fp8 = [r for r in data["results"] if r["impl"] == FP8_IMPL]
    assert [(r["name"], r["dtype"]) for r in fp8] == [("bert-tiny-fwd", "bf16")]  # inference only


# --- the accuracy report ---------------------------------------------------------------------------------------


def test_fp8_accuracy_split_and_metrics():
    calibration, queries = fp8_accuracy.split([f"line {i + 1}" for i in range(7)])
    assert calibration == [1, 3, 5] and queries == [0, 2, 4, 6]  # lines 2, 4, 6 and lines 1, 3, 5, 7
    reference = torch.nn.functional.normalize(torch.randn(7, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    same = fp8_accuracy.metrics(reference, reference.clone(), queries)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    shuffled = fp8_accuracy.metrics(reference, reference.flip(0), queries)
    assert shuffled["min_cosine"] < 0.99


def test_fp8_accuracy_report_on_a_slice(tmp_path, capsys, monkeypatch):
    """The report on the first 40 lines: its schema, bf16 near float32, and every FP8 variant measured or
    refused with the reason."""
    path = tmp_path / "report.json"
    assert fp8_accuracy.main(["--model", minilm_path(), "--limit", "40", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[fp8-accuracy] bf16:" in out and "masked-LM top-1: not measurable here" in out
    report = json.loads(path.read_text())
    assert (report["lines"], report["calibration_lines"], report["query_lines"]) == (40, 20, 20)
    assert "calibration = the even lines" in report["split"] and "queries = the odd lines" in report["split"]
    assert report["targets"] == {"mean_cosine": 0.998, "nn_agreement": 0.95}
    rows = {row["variant"]: row for row in report["variants"]}
    assert list(rows) == list(fp8_accuracy.VARIANTS)
    bf16 = rows["bf16"]
    assert bf16["mean_cosine"] > 0.999 and bf16["min_cosine"] > 0.998 and bf16["nn_agreement"] >= 0.9
    assert bf16["mean_cosine_met"] and bf16["queries"] == 20
    fp8_runs = fp8_reason(CPU) is None
    for name in ("fp8-rtn", "fp8-calibrated"):
        row = rows[name]
        if fp8_runs:
            assert "skipped" not in row
            assert 0.9 < row["mean_cosine"] <= 1.0 + 1e-6 and row["min_cosine"] <= row["mean_cosine"]
            assert 0 <= row["nn_agreement"] <= 1
        else:
            assert row["skipped"] and f"{name}: not run here" in out


def test_fp8_accuracy_refused_variants_say_why(refused):
    lines = []
    report = fp8_accuracy.run(minilm_path(), "cpu", limit=6, variants=("fp8-rtn",), log=lines.append)
    (row,) = report["variants"]
    assert row["variant"] == "fp8-rtn" and REFUSAL in row["skipped"]
    assert any("not run here" in line and REFUSAL in line for line in lines)
    assert "not run here: " in fp8_accuracy.format_report(report)
