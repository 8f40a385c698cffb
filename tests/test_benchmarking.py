"""bertfast.benchmarking: formulas, timing, result files, rendering, regression check, ``bertfast bench``.

Everything here runs on the CPU; the GPU paths share the same code (see bench/).
"""

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bertfast.cuda_graphs
import bertfast.modeling
from bench import compare, render, suite
from bench.kernels import kernel_case
from bertfast import BertModel, is_patched
from bertfast.benchmarking import command, formulas, schema, shapes
from bertfast.benchmarking.cases import Skip, run_case
from bertfast.benchmarking.device import environment, measure_peaks, slug
from bertfast.benchmarking.models import ModelBench, impl_spec
from bertfast.benchmarking.timing import (
    QUICK_GPU_PLAN,
    ROUND_MARKER,
    SMOKE_PLAN,
    SUITE_KERNEL_PLAN,
    SUITE_MODEL_PLAN,
    KernelTimer,
    Timing,
    TimingPlan,
    busy_ms_per_marker,
    busy_ms_per_round,
    measure,
    measure_with_pytest_benchmark,
)
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


@contextlib.contextmanager
def counted_matmuls():
    """A FLOP counter with SDPA on its math backend: the fused CPU kernel's products are not counted."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def test_bert_forward_flops_match_counted_matmuls():
    # FFN width deliberately not 4h, so the general formula is what is checked.
    config = shapes.tiny_config(hidden_size=48, intermediate_size=80, num_attention_heads=3)
    model = BertModel(config, backend="reference").eval()
    batch, seq = 3, 11
    ids = torch.randint(1, config.vocab_size, (batch, seq))
    with torch.no_grad(), counted_matmuls() as counter:
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


def test_varlen_flops_count_each_sequence_at_its_own_length():
    assert formulas.bert_varlen_forward_flops([128] * 4, 1024, 24) == formulas.bert_forward_flops(4, 128, 1024, 24)
    mixed = formulas.bert_varlen_forward_flops([10, 100], 64, 2, 100)
    assert mixed == formulas.bert_forward_flops(1, 10, 64, 2, 100) + formulas.bert_forward_flops(1, 100, 64, 2, 100)
    # Quadratic attention: two halves cost less than one sequence of both.
    assert mixed < formulas.bert_forward_flops(1, 110, 64, 2, 100)


def test_attention_flops_match_counted_matmuls():
    b, s, h, d = 2, 13, 3, 16
    q, k, v = torch.randn(3, b, s, h, d).unbind(0)
    with counted_matmuls() as counter:
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


def _cpu_range_is_the_kernel(event):
    return event.name == "fake_kernel"


def test_kernel_timer_counts_device_work_and_never_host_time():
    """A fake op that spends 30 ms on the host around 2 ms of "device work" (a CPU range standing in
    for a kernel: there is no GPU here) times as the 2 ms; the 30 ms are its host time."""

    def fake_op(work_ms):
        time.sleep(0.03)  # launch overhead, Python, a host wait: none of it is device time
        with torch.profiler.record_function("fake_kernel"):
            end = time.perf_counter() + work_ms / 1e3
            while time.perf_counter() < end:
                pass

    timer = KernelTimer(CPU, is_work=_cpu_range_is_the_kernel, activities=[torch.profiler.ProfilerActivity.CPU])
    plan = TimingPlan(min_warmup=1, warmup_ms=0.0, target_ms=0.0, min_rounds=4, max_rounds=4)
    timing = measure(fake_op, [(2.0,)], device=CPU, plan=plan, timer=timer)
    assert timing.clock == "kernel" and timing.rounds == 4
    assert 2.0 <= timing.median_ms < 6.0
    assert timing.host_ms >= 30.0

    idle = KernelTimer(CPU, is_work=_cpu_range_is_the_kernel, activities=[torch.profiler.ProfilerActivity.CPU])
    with pytest.raises(RuntimeError, match="device work in 0 of 4 rounds"):
        measure(lambda: time.sleep(0.01), [()], device=CPU, plan=plan, timer=idle)


def test_model_cases_run_round_robin_and_say_when_their_spread_is_not_readable():
    from bertfast.benchmarking.cases import BACK_TO_BACK, Case, run_interleaved

    order, slow = [], iter([0.001, 0.02] * 100)

    def case(impl, fn):
        return Case(name="m-fwd", impl=impl, dtype="fp32", batch=1, seq=1, device=CPU, fn=fn, input_sets=[()])

    steady = case("steady", lambda: (order.append("steady"), time.sleep(0.01)))
    drifting = case("drifting", lambda: (order.append("drifting"), time.sleep(next(slow))))
    plan = TimingPlan(min_warmup=1, warmup_ms=0.0, target_ms=0.0, min_rounds=4, max_rounds=4)
    rows = run_interleaved([steady, drifting], plan=plan)
    timed = order[2:]  # after one warm-up call each
    per_round = ["steady"] * (1 + BACK_TO_BACK) + ["drifting"] * (1 + BACK_TO_BACK)
    assert timed == per_round * 4  # each round takes every implementation in turn
    assert all(row["rounds"] == 4 and row["throughput_ms"] > 0 and row["host_ms"] > 0 for row in rows)
    assert "not readable" in rows[1]["note"]
    steady_spread = (rows[0]["p80_ms"] - rows[0]["p20_ms"]) / rows[0]["median_ms"]  # a loaded CPU may jitter
    assert ("not readable" in rows[0].get("note", "")) == (steady_spread >= 0.10)


def test_busy_time_per_round_is_the_union_of_the_work_that_starts_in_it():
    def event(name, start, end, device=torch.autograd.DeviceType.CPU):
        return types.SimpleNamespace(
            name=name, device_type=device, time_range=types.SimpleNamespace(start=start, end=end)
        )

    events = [
        event("k", 0.0, 50.0),  # before the first round: the warm-up or the flush, not counted
        event(ROUND_MARKER, 100.0, 400.0),
        event(ROUND_MARKER, 150.0, 330.0, torch.autograd.DeviceType.CUDA),  # the marker on the GPU's timeline
        event("k", 150.0, 160.0),
        event("k", 300.0, 330.0),  # a launch gap of 140 us between the two is not device time
        event(ROUND_MARKER, 1000.0, 1100.0),
        event("k", 1010.0, 1030.0),
        event("k", 1020.0, 1040.0),  # overlapping kernels count once
        event("k", 1050.0, 5000.0),  # ends after the marker: the device was still busy
    ]
    busy = busy_ms_per_round(events, is_work=lambda e: e.name == "k")
    assert busy == pytest.approx([0.040, 0.030 + 3.950])


def test_busy_time_of_interleaved_implementations_goes_to_the_call_that_started_it():
    """Model rows' GPU-busy ms: calls of two implementations alternate; each kernel belongs to the call
    whose marker started last before it, even one still running when the next call's marker starts."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, end, device=cuda):
        return types.SimpleNamespace(
            name=name, device_type=device, time_range=types.SimpleNamespace(start=start, end=end)
        )

    a, b = "bertfast.case.0", "bertfast.case.1"
    events = [
        event(a, 0.0, 100.0, cpu),
        event("k", 10.0, 60.0),
        event(b, 100.0, 300.0, cpu),
        event("k", 110.0, 130.0),
        event("k", 120.0, 400.0),  # outlives b's marker and starts before a's next: b's
        event(a, 300.0, 500.0, cpu),
        event("k", 410.0, 420.0),
    ]
    busy = busy_ms_per_marker(events, (a, b), is_work=lambda e: e.name == "k")
    assert busy == {a: pytest.approx([0.050, 0.010]), b: pytest.approx([0.290])}


def test_kernel_cases_are_timed_by_their_kernels():
    case = kernel_case("bias_gelu", "bertfast-reference", "fp32", shapes.SMOKE_BIAS_GELU_SHAPES[0], "fwd", CPU)
    assert case.kernel


# --- shapes, device --------------------------------------------------------------------


def test_padding_distribution():
    g = torch.Generator().manual_seed(3)
    lengths = shapes.padded_lengths(64, 129, g)
    assert lengths[0] == 129 and lengths.min() >= 65 and lengths.max() <= 129
    assert len(set(lengths.tolist())) > 10
    mask = shapes.key_padding_mask(lengths, 129)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths.tolist()
    assert not mask[1, lengths[1] :].any()


@pytest.mark.parametrize("dist", shapes.LENGTH_DISTRIBUTIONS, ids=lambda d: d.name)
@pytest.mark.parametrize("batch, seq", [(32, 128), (16, 512)])
def test_length_distributions(dist, batch, seq):
    def draw(seed, count):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([shapes.varlen_lengths(dist, batch, seq, g) for _ in range(count)])

    lengths = draw(5, 400)
    assert torch.equal(lengths, draw(5, 400)) and not torch.equal(lengths, draw(6, 400))  # seeded
    assert lengths.dtype == torch.int64 and lengths.min() >= 1 and lengths.max() <= seq
    fills = lengths.double().mean(dim=1) / seq
    assert abs(fills.mean().item() - dist.mean_fill) < 0.005  # the stated mean
    # Stratified draws: every batch is close to the mean, not just the average of many.
    assert (fills - dist.mean_fill).abs().max().item() < (0.05 if batch >= 32 else 0.08)
    assert len(set(lengths.flatten().tolist())) > seq // 4  # spread out, not a few values


def test_stated_length_distributions():
    uniform, text_like = shapes.LENGTH_DISTRIBUTIONS
    assert uniform.name == "uniform-0.2-1.0" and uniform.mean_fill == pytest.approx(0.6)
    assert text_like.name == "text-like" and 0.45 <= text_like.mean_fill <= 0.6
    assert text_like.mean_fill == pytest.approx(0.5051, abs=1e-4)  # the value in the docs
    assert text_like.truncated == pytest.approx(0.0916, abs=1e-4)
    # The closed form of the clipped log-normal's mean against the quantile function itself.
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    assert text_like.quantile(u).mean().item() == pytest.approx(text_like.mean_fill, abs=1e-4)
    assert shapes.length_distribution("text-like") is text_like
    assert "0.45" in text_like.description and "0.6" in text_like.description and "0.505" in text_like.description
    with pytest.raises(ValueError, match="unknown length distribution"):
        shapes.length_distribution("zipf")
    with pytest.raises(ValueError):
        shapes.UniformLengths(0.0, 1.0)
    with pytest.raises(ValueError):
        shapes.TextLikeLengths(0.5, 0.0)


def test_lengths_are_at_least_one_token():
    g = torch.Generator().manual_seed(0)
    tiny = shapes.TextLikeLengths(median=0.01, sigma=0.6)  # most fractions round to 0 tokens
    lengths = shapes.varlen_lengths(tiny, 64, 8, g)
    assert lengths.min() == 1 and (lengths == 1).sum() > 50
    assert shapes.varlen_lengths(shapes.UniformLengths(1.0, 1.0), 3, 7, g).tolist() == [7, 7, 7]
    with pytest.raises(ValueError):
        shapes.varlen_lengths(tiny, 0, 8, g)


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
        kernel_case("layer_norm", "bertfast-triton", "fp32", shapes.SMOKE_LAYER_NORM_SHAPES[0], "fwd", CPU)


@pytest.fixture(scope="module")
def tiny_bench():
    return ModelBench(shapes.tiny_config(), CPU, smoke=True)


def _count_packing(monkeypatch) -> list:
    """Record every time a bertfast model takes the padding-free path."""
    import bertfast.layers

    calls = []
    original = bertfast.layers.pack_mask

    def pack_mask(keep, *args):
        calls.append(keep.shape)
        return original(keep, *args)

    monkeypatch.setattr(bertfast.layers, "pack_mask", pack_mask)
    return calls


@pytest.mark.parametrize("impl, unpadded", [("bertfast", True), ("bertfast-padded", False)])
def test_varlen_forward_case(tiny_bench, monkeypatch, impl, unpadded):
    dist = shapes.LENGTH_DISTRIBUTIONS[0]
    shape = shapes.ModelShape(4, 13)
    case = tiny_bench.forward_case(impl, "fp32", shape, lengths=dist)
    packed = _count_packing(monkeypatch)
    row = run_case(case, plan=SMOKE_PLAN)
    assert bool(packed) == unpadded  # set_unpad(True) / set_unpad(False) is what ran
    assert (row["name"], row["lengths"]) == ("bert-tiny-fwd-varlen", "uniform-0.2-1.0")
    masks = [mask for _, mask, _ in case.input_sets]
    tokens = sum(int(m.sum()) for m in masks) / len(masks)
    assert row["fill"] == pytest.approx(tokens / (4 * 13)) and 0 < row["fill"] < 1
    assert row["tokens_per_s"] == pytest.approx(tokens / (row["median_ms"] * 1e-3))
    # Real work only: each set's sequences at their own lengths.
    config = tiny_bench.config
    expected = sum(
        formulas.bert_varlen_forward_flops(m.sum(1).tolist(), config.hidden_size, 2, config.intermediate_size)
        for m in masks
    ) / len(masks)
    assert row["tflops"] == pytest.approx(expected / (row["median_ms"] * 1e-3) / 1e12)
    assert row["max_error"] < 1e-5
    schema.validate(schema.new_result(ENV, PEAKS, [row]))


def test_varlen_training_gradient_is_zero_at_padding(tiny_bench):
    case = tiny_bench.train_case("bertfast", "fp32", shapes.ModelShape(4, 13), lengths=shapes.LENGTH_DISTRIBUTIONS[1])
    assert case.name == "bert-tiny-train-varlen" and case.lengths == "text-like"
    for _, mask, _, grad in case.input_sets:
        assert grad[mask == 0].abs().max() == 0 and grad[mask == 1].abs().min() > 0


def test_drop_in_and_amp_impls(tiny_bench):
    shape = shapes.SMOKE_FORWARD_SHAPES[0]
    row = run_case(tiny_bench.forward_case("hf-sdpa-patched", "fp32", shape), plan=SMOKE_PLAN)
    assert row["max_error"] < 1e-5
    # The patch is on a module tree of its own over the same weights: hf-sdpa stays Hugging Face's.
    patched, plain = tiny_bench.hf_patched("fp32"), tiny_bench.hf_model("fp32", "sdpa")
    assert is_patched(patched) and not is_patched(plain)
    assert patched.encoder.layer[0].intermediate.dense.weight is plain.encoder.layer[0].intermediate.dense.weight
    assert tiny_bench.skip_reason("bertfast-cudagraph") == (
        "CUDA graphs need a CUDA device (bertfast.CUDAGraphRunner refuses CPU tensors)"
    )
    with pytest.raises(Skip, match="CUDA graphs need a CUDA device"):
        tiny_bench.forward_case("bertfast-cudagraph", "bf16", shape)
    # AMP: float32 weights, the forward under autocast, the row in the autocast dtype.
    amp = tiny_bench.build("hf-sdpa-amp", "bf16")
    assert {p.dtype for p in amp.module.parameters()} == {torch.float32}
    case = tiny_bench.train_case("bertfast-amp", "bf16", shape)
    row = run_case(case, plan=SMOKE_PLAN)
    assert row["dtype"] == "bf16" and "autocast" in row["note"]
    assert impl_spec("bertfast-padded").unpad is False and impl_spec("bertfast-triton").backend == "triton"
    with pytest.raises(ValueError, match="unknown model implementation"):
        impl_spec("bertfast-fast")


def test_training_rows_state_their_recipe_and_first_light_pairs_them_like_for_like(tiny_bench, tmp_path):
    """A pure-bf16 row and an AMP row say which they are (optimizer, lr, dtype policy); first light times
    bertfast against hf-sdpa in each policy, never pure bf16 against AMP alone."""
    from bench import firstlight

    shape = shapes.ModelShape(2, 13)
    pure = tiny_bench.train_case("hf-sdpa", "bf16", shape).note
    amp = tiny_bench.train_case("hf-sdpa-amp", "bf16", shape).note
    assert "recipe: AdamW lr 1e-05; pure bf16" in pure and "master" not in pure
    assert "recipe: AdamW lr 1e-05; AMP: fp32 master weights and optimizer state, bf16 autocast" in amp
    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    trained = {(row["impl"], row["dtype"]) for row in light.identities("training")}
    assert {("bertfast", "fp32"), ("hf-sdpa", "fp32"), ("bertfast-amp", "bf16"), ("hf-sdpa-amp", "bf16")} <= trained


def test_cuda_graph_case_plumbing(tiny_bench, monkeypatch):
    """What a GPU runs for bertfast-cudagraph, on the CPU with a stand-in for the runner: one bucket of exactly
    the batch's shape, captured before timing, its memory counted, every timed call a replay."""
    reserved, made = [1000], []

    class FakeRunner:
        def __init__(self, model, batch_buckets, seq_buckets):
            self.model, self.buckets, self.captured, self.replays = model, (batch_buckets, seq_buckets), [], 0
            made.append(self)

        def capture(self, batch, seq, mask_dtype):
            self.captured.append((batch, seq, mask_dtype))
            reserved[0] += 4096  # the graph's pool

        def __call__(self, ids, mask, types):
            self.replays += 1
            with torch.no_grad():
                return self.model(ids, mask, types)

    monkeypatch.setattr(bertfast.cuda_graphs, "CUDAGraphRunner", FakeRunner)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved[0])
    monkeypatch.setattr(ModelBench, "skip_reason", lambda self, impl: None)
    shape = shapes.ModelShape(2, 13)
    case = tiny_bench.forward_case("bertfast-cudagraph", "fp32", shape)
    (runner,) = made
    assert runner.buckets == ((2,), (13,))
    assert runner.captured == [(2, 13, torch.int64)] and runner.model.unpad is False  # graphs replay the padded path
    params = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert case.resident_bytes == params + 4096
    row = run_case(case, plan=SMOKE_PLAN)
    assert runner.replays == 2 and row["max_error"] < 1e-5  # the error check, then the timed call
    assert "one CUDA graph bucket of exactly 2x13" in row["note"]


def test_suite_sections_plans_and_wall_time():
    assert [suite.section_of(n) for n in ("attention-bwd", "bert-large-fwd", "bert-large-train")] == [
        "kernels",
        "forward",
        "training",
    ]
    assert suite.section_of("bert-large-train-varlen") == suite.section_of("bert-large-fwd-varlen") == "padding-free"
    timed = suite.SuiteRun(device=CPU, smoke=False)
    assert timed.plan_for("kernels") == SUITE_KERNEL_PLAN and timed.plan_for("training") == SUITE_MODEL_PLAN
    assert suite.SuiteRun(device=CPU, smoke=False, quick=True).plan_for("forward") == QUICK_GPU_PLAN
    run = suite.SuiteRun(device=CPU, smoke=True)
    assert run.plan_for("forward") == SMOKE_PLAN
    shape = shapes.SMOKE_LAYER_NORM_SHAPES[0]
    identity = dict(name="layer_norm-fwd", impl="torch-layer_norm", dtype="fp32", batch=shape.batch, seq=shape.seq)
    row, reason = run.run(identity, lambda: kernel_case("layer_norm", "torch-layer_norm", "fp32", shape, "fwd", CPU))
    assert reason is None and row["rounds"] == 1
    assert run.seconds["kernels"] > 0 and run.seconds["forward"] == 0
    setup = run.result()["setup"]
    assert setup["sections"].startswith("wall time") and "kernels " in setup["sections"]
    assert "text-like" in setup["lengths"]


# --- result files ----------------------------------------------------------------------


def _row(impl="bertfast", ms=10.0, name="bert-large-fwd", dtype="bf16", batch=32, seq=128, flops=None, **extra):
    flops = flops or formulas.bert_forward_flops(batch, seq, 1024, 24)
    timing = Timing(ms, ms * 0.99, ms * 1.01, ms * 0.98, 20)
    row = schema.make_row(
        name=name, impl=impl, dtype=dtype, batch=batch, seq=seq, timing=timing, flops=flops, peaks=PEAKS
    )
    row.update({"peak_mem_mb": 900.0, "max_error": 0.01, **extra})
    return row


def _varlen_row(impl, ms, lengths="uniform-0.2-1.0", fill=0.6, kind="fwd", batch=32, seq=128, peak_mem_mb=900.0):
    """A padding-free row as the suites make it."""
    timing = Timing(ms, ms * 0.99, ms * 1.01, ms * 0.98, 20)
    flops = fill * formulas.bert_forward_flops(batch, seq, 1024, 24) * (3 if kind == "train" else 1)
    row = schema.make_row(
        name=f"bert-large-{kind}-varlen", impl=impl, dtype="bf16", batch=batch, seq=seq, timing=timing, flops=flops,
        peaks=PEAKS, tokens=fill * batch * seq, lengths=lengths,
    )  # fmt: skip
    row["peak_mem_mb"] = peak_mem_mb
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


def test_varlen_rows_round_trip(tmp_path):
    rows = [_varlen_row("bertfast", 5.0), _varlen_row("bertfast", 4.0, lengths="text-like", fill=0.5)]
    rows.append(_row("bertfast", 8.0, fill=0.75, tokens_per_s=0.75 * 32 * 128 / 8e-3))  # a padded row with fill
    skipped = [
        schema.skipped_row(
            name="bert-large-fwd-varlen",
            impl="hf-sdpa",
            dtype="bf16",
            batch=32,
            seq=128,
            reason="no",
            lengths="text-like",
        )
    ]
    data = schema.new_result(ENV, PEAKS, rows, skipped)
    path = schema.write_result(data, tmp_path)
    assert schema.read_result(path) == data
    uniform = data["results"][0]
    assert uniform["fill"] == pytest.approx(0.6) and uniform["lengths"] == "uniform-0.2-1.0"
    assert uniform["tokens_per_s"] == pytest.approx(0.6 * 32 * 128 / 5e-3)
    # The same row under two length distributions is two rows.
    assert schema.row_key(rows[0]) != schema.row_key(rows[1])
    assert schema.row_key(rows[2])[-1] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["results"][2].update(fill=1.5), "results[2].fill must be a number in (0, 1]"),
        (lambda d: d["results"][2].update(fill=0), "results[2].fill must be a number in (0, 1]"),
        (lambda d: d["results"][2].update(tokens_per_s=-3.0), "results[2].tokens_per_s must be a positive number"),
        (lambda d: d["results"][2].update(lengths=""), "results[2].lengths must be a non-empty string"),
        (lambda d: d["results"][2].pop("fill"), "results[2]: a row with 'lengths' (variable-length batches) must give"),
        (lambda d: d["results"][2].update(tokens_per_s=1.0), "results[2].tokens_per_s must be fill * batch * seq"),
        (lambda d: d["results"][0].update(tokens_per_s=1.0), "results[0]: 'tokens_per_s' needs 'fill'"),
        (lambda d: d["results"].append(dict(d["results"][2])), "results[4] repeats results[2]"),
        (lambda d: d["skipped"][0].update(lengths=3), "skipped[0].lengths must be a non-empty string"),
    ],
)
def test_schema_rejects_bad_varlen_fields(tmp_path, change, message):
    rows = [_row("bertfast"), _row("hf-sdpa"), _varlen_row("bertfast", 5.0), _varlen_row("bertfast", 5.0, "text-like")]
    skipped = [schema.skipped_row(name="x", impl="y", dtype="bf16", batch=1, seq=1, reason="z", lengths="text-like")]
    data = copy.deepcopy(schema.new_result(ENV, PEAKS, rows, skipped))
    change(data)
    with pytest.raises(schema.ResultSchemaError) as info:
        schema.write_result(data, tmp_path)
    assert message in str(info.value)


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


def test_result_files_of_the_old_op_names_read_with_todays_names():
    """The committed H200 run spells layer_norm ``layernorm`` and bias_gelu ``bias-gelu``."""
    old = os.path.join(
        os.path.dirname(__file__), "..", "bench", "results", "nvidia-h200", "20261127-182705-aea18b0.json"
    )
    data = schema.read_result(old)
    names = {row["name"] for row in data["results"]}
    assert {"layer_norm-fwd", "layer_norm-bwd", "bias_gelu-fwd", "bias_gelu-bwd"} <= names
    assert not any(name.startswith(("layernorm", "bias-gelu")) for name in names)
    assert "torch-layer_norm" in {row["impl"] for row in data["results"]}
    assert "layer_norm-fwd" in render.render_readme(data, old, [old], [])


# --- rendering -------------------------------------------------------------------------


def _synthetic_run(tmp_path):
    rows = []
    for dtype in ("bf16", "fp16"):
        for batch, seq in ((1, 128), (32, 128), (8, 512)):
            for impl, speed in (("bertfast", 1.5), ("bertfast-triton", 1.5), ("hf-eager", 0.7), ("hf-sdpa", 1.0)):
                ms = formulas.bert_forward_flops(batch, seq, 1024, 24) / (200e12 * speed) * 1e3
                rows.append(_row(impl, ms, dtype=dtype, batch=batch, seq=seq))
    rows.append(_row("bertfast", 30.0, name="bert-large-train"))
    rows.append(_row("bertfast", 48.0, name="bert-large-mlm-train"))
    rows.append(_row("hf-sdpa", 60.0, name="bert-large-mlm-train"))
    timing = Timing(0.05, 0.049, 0.051, 0.048, 100)
    nbytes = formulas.layer_norm_bytes(16384, 1024, 2)
    rows.append(
        schema.make_row(
            name="layer_norm-fwd", impl="torch-layer_norm", dtype="bf16", batch=128, seq=128, timing=timing,
            nbytes=nbytes, peaks=PEAKS, shape="16384x1024",
        )
    )  # fmt: skip
    skipped = [
        schema.skipped_row(name="layer_norm-fwd", impl="bertfast-ext", dtype="bf16", batch=128, seq=128, reason="no")
    ]
    data = schema.new_result(ENV, PEAKS, rows, skipped, {"padding": shapes.PADDING_DISTRIBUTION})
    return schema.write_result(data, tmp_path)


def test_render_readme_and_plots(tmp_path):
    path = _synthetic_run(tmp_path)
    folder = os.path.dirname(path)
    assert render.main([folder]) == 0
    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "# bertfast benchmarks on NVIDIA H100 80GB HBM3" in readme
    assert "python -m bench.render bench/results/nvidia-h100-80gb-hbm3" in readme
    assert "### bert-large inference (forward), bf16" in readme and "### bert-large training step" in readme
    assert "### bert-large-mlm training step (forward, backward, AdamW), bf16" in readme and "(1.25x)" in readme
    # speed-up over hf-sdpa in the summary table, GB/s and fraction of peak in the kernel table
    assert "(1.50x)" in readme and "(0.70x)" in readme
    gbps = nbytes_gbps = formulas.layer_norm_bytes(16384, 1024, 2) / 0.05e-3 / 1e9
    assert f"{nbytes_gbps:,.0f}" in readme and f"{gbps / 3000.0:.0%}" in readme
    assert "| bertfast-ext | no | 1 |" in readme
    assert "20251123-162000-abc1234.json" in readme
    for name in ("throughput.png", "speedup.png"):
        data = open(os.path.join(folder, name), "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def _goal_run(tmp_path):
    """Padding-free rows (speed-ups 1.75x / 2.50x at 60% fill) and training rows at 32 x 128."""
    rows = []
    for kind in ("fwd", "train"):
        for lengths, fill in (("uniform-0.2-1.0", 0.6), ("text-like", 0.505)):
            for impl, ms in (("bertfast", 4.0), ("bertfast-padded", 7.0), ("hf-sdpa", 10.0)):
                rows.append(_varlen_row(impl, ms * (3 if kind == "train" else 1), lengths, fill, kind))
    train = formulas.bert_train_flops(32, 128, 1024, 24)
    for impl, ms, mem in (
        ("bertfast", train / (0.55 * 700e12) * 1e3, 5000.0),  # 55% of the 700 TFLOP/s peak
        ("bertfast-amp", 30.0, 8000.0),
        ("hf-sdpa", 40.0, 7000.0),
        ("hf-sdpa-amp", 45.0, 10000.0),
        ("hf-compile-amp", 35.0, 9000.0),
    ):
        tokens_per_s = 0.75 * 32 * 128 / (ms * 1e-3)
        rows.append(
            _row(impl, ms, "bert-large-train", flops=train, peak_mem_mb=mem, fill=0.75, tokens_per_s=tokens_per_s)
        )
    data = schema.new_result(ENV, PEAKS, rows, setup={"lengths": shapes.lengths_description()})
    return schema.write_result(data, tmp_path)


def test_render_goals_and_padding_free_tables(tmp_path):
    path = _goal_run(tmp_path)
    readme = render.render_readme(schema.read_result(path), path, [path], [])
    assert "## Summary: the goals" in readme
    goals = readme.split("## Summary: the goals")[1].split("\n## ")[0]
    # Padding-free goals at ~60% fill only (the text-like rows, 50% fill, are in the tables, not the goals).
    assert (
        "| padding-free forward 32 x 128 bf16, uniform-0.2-1.0 (fill 60%): speed-up over bertfast-padded | 1.75x "
        "| >= 1.6x | yes |"
    ) in goals
    assert (
        "| padding-free training step 32 x 128 bf16, uniform-0.2-1.0 (fill 60%): speed-up over hf-sdpa | 2.50x" in goals
    )
    assert "| >= 2.0x | yes |" in goals and "text-like" not in goals
    # Training at seq 128: share of the peak, speed and memory against Hugging Face with and without AMP.
    assert (
        "bertfast model FLOP/s as a share of the measured bf16 matmul rate" in goals
        and "| 55% | >= 50% | yes |" in goals
    )
    hf_amp = 45.0 / (formulas.bert_train_flops(32, 128, 1024, 24) / (0.55 * 700e12) * 1e3)
    assert f"bertfast speed-up over hf-sdpa-amp | {hf_amp:.2f}x | >= 1.3x | yes |" in goals
    assert "bertfast peak memory / hf-sdpa-amp | 0.50 | <= 0.8 | yes |" in goals
    assert "bertfast peak memory / hf-sdpa | 0.71 | <= 0.8 | yes |" in goals
    assert "bertfast-amp speed-up over hf-sdpa-amp | 1.50x | >= 1.3x | yes |" in goals
    assert "bertfast-amp peak memory / hf-sdpa-amp | 0.80 | <= 0.8 | yes |" in goals
    # The padding-free tables: tokens/s per impl, fill, both speed-ups, for both distributions.
    assert "## BERT without padding (variable-length batches)" in readme
    assert "### bert-large padding-free inference (forward), variable-length batches, bf16" in readme
    assert "| bertfast / bertfast-padded | bertfast / hf-sdpa |" in readme
    uniform_tokens = f"{0.6 * 32 * 128 / 4e-3:,.0f}"
    assert f"| 32 x 128 | uniform-0.2-1.0 | 60% | {uniform_tokens} |" in readme
    assert "| 32 x 128 | text-like | 50% |" in readme and "| 1.75x | 2.50x |" in readme
    # The training table's memory summary, relative to hf-sdpa.
    assert "Peak memory (MB, lower is better)" in readme and "5,000 (0.71)" in readme
    # A goal whose rows are missing reads "-", never a made-up number.
    data = schema.read_result(path)
    data["results"] = [r for r in data["results"] if r["impl"] not in ("bertfast-padded", "bertfast")]
    rows = {g[0]: g for g in render.goal_rows(data["results"])}
    missing = "padding-free forward 32 x 128 bf16, uniform-0.2-1.0 (fill 60%): speed-up over bertfast-padded"
    assert rows[missing][1:] == ["-", ">= 1.6x", "-"]
    share = [g for name, g in rows.items() if "share of the measured bf16 matmul rate" in name]
    assert [g[1:] for g in share] == [["-", ">= 50%", "-"]]


def test_compare_tells_length_distributions_apart(tmp_path, capsys):
    old = _store(
        tmp_path, "2025-11-20T00:00:00Z", [_varlen_row("bertfast", 5.0), _varlen_row("bertfast", 4.0, "text-like")]
    )
    new = _store(
        tmp_path, "2025-11-21T00:00:00Z", [_varlen_row("bertfast", 5.0), _varlen_row("bertfast", 5.0, "text-like")]
    )
    assert compare.main([new, "--baseline", old]) == 1
    out = capsys.readouterr().out
    assert "bert-large-fwd-varlen [text-like]" in out and "+25.0%" in out and "1 REGRESSION, 0 improved, 1 ok" in out


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
    gpu = torch.cuda.is_available()  # then --cpu asks for the CPU, and the no-GPU notice is not shown
    args = _bench_args(
        "--model", "tiny", "--batch", "2", "--seq", "16", "--backends", "auto,reference", "--train", "--save",
        str(tmp_path), *(["--cpu"] if gpu else []),
    )  # fmt: skip
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert ("No CUDA GPU is visible" in out) != gpu
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
    for task in ("mlm", "cls"):  # TrainStep beside the eager step and Hugging Face; no AMP rows in fp32
        assert {impl for name, impl in got if name == f"bert-tiny-{task}-train"} == {
            "bertfast-trainstep", "bertfast", "hf-sdpa"
        }  # fmt: skip
    assert "masked-LM pre-training step" in out and "sequence-classification fine-tuning step" in out
    assert "recipe: AdamW lr 1e-05; pure fp32" in out and " n/a " in out  # no MFU on the CPU
    forward = [r for r in data["results"] if r["name"] == "bert-tiny-fwd"]
    assert all(r["batch"] == 2 and r["seq"] == 16 and r["rounds"] == 2 for r in forward)
    assert all(r["max_error"] < 1e-4 for r in forward)
    assert {r["impl"] for r in data["skipped"]} == {"hf-compile"}


def test_bench_command_builds_the_baseline_of_a_roberta_checkpoint_as_roberta(tmp_path, capsys):
    """A RoBERTa folder's Hugging Face baselines are its own class (positions start after the padding
    index), not a BERT built from its config: every check agrees with the bertfast reference."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(tmp_path / "roberta")
    args = _bench_args(
        "--checkpoint", str(tmp_path / "roberta"), "--batch", "2", "--seq", "16", "--backends", "reference", "--cpu"
    )  # fmt: skip
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "Check against the float32 reference" in out and "MISMATCH" not in out
    assert "hf-sdpa" in out and "hf-eager" in out


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
    args = _bench_args(
        "--model", "tiny", "--batch", "2", "--seq", "16", "--backends", f"reference,{broken_backend}", "--cpu"
    )  # fmt: skip  (fp32 on the CPU: a GPU's bf16 bound would hide the planted 1e-3)
    args.baselines, args.plain = False, True
    assert command.run(args) == 1
    out = capsys.readouterr().out
    assert "bertfast-broken" in out and "MISMATCH" in out and "not timing" in out


def test_bench_command_rejects_unknown_backend(capsys):
    assert command.run(_bench_args("--backends", "cudnn", "--plain")) == 2
    assert "unknown backend 'cudnn'" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Compiled baselines must run compiled code


def _recompile_limit_patch(limit: int):
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: limit})


def test_compiled_function_has_a_cache_of_its_own():
    from bertfast.benchmarking.cases import CompiledFunction

    def f(x):
        return torch.sin(x) * 2

    # More compiled baselines of one function than Dynamo's recompile limit: each keeps its own cache.
    with _recompile_limit_patch(2):
        for n in range(5):
            compiled = CompiledFunction(f, backend="eager", name="f")
            compiled(torch.randn(3 + n))
            compiled(torch.randn(3 + n))
            compiled.check()
            assert compiled.calls == 2 and compiled.eager_calls == 0


def test_a_compiled_baseline_that_falls_back_to_eager_fails_its_row():
    from bertfast.benchmarking.cases import Case, CompiledFunction, NotCompiled

    def f(x):
        return x * 2 + 1

    # Past the recompile limit Dynamo runs the Python: the check must notice it.
    compiled = CompiledFunction(f, backend="eager", fullgraph=False, name="f")
    sets = [(torch.randn(3),), (torch.randn(4),), (torch.randn(5),)]
    case = Case(
        name="op-fwd",
        impl="torch-compile",
        dtype="fp32",
        batch=1,
        seq=1,
        device=torch.device("cpu"),
        fn=compiled,
        input_sets=sets,
        check_compiled=compiled.check,
    )
    with _recompile_limit_patch(1), pytest.raises(NotCompiled, match="ran as eager Python"):
        run_case(case, plan=SMOKE_PLAN_FOR_TESTS)
    # With fullgraph (the default) Dynamo refuses outright: the row fails too.
    strict = CompiledFunction(f, backend="eager", name="f")
    with _recompile_limit_patch(1), pytest.raises(Exception):  # noqa: B017
        for (x,) in sets:
            strict(x)
    # Compilation disabled: every call is eager.
    with torch._dynamo.config.patch(disable=True):
        off = CompiledFunction(f, backend="eager", fullgraph=False, name="f")
        off(torch.randn(3))
    with pytest.raises(NotCompiled):
        off.check()


SMOKE_PLAN_FOR_TESTS = TimingPlan(min_warmup=1, warmup_ms=0.0, target_ms=0.0, min_rounds=3, max_rounds=3)


def test_torch_compile_kernel_rows_compile_once_per_case():
    shape = shapes.SMOKE_ATTENTION_SHAPES[0]
    # More cases of one op than the recompile limit: every one of them runs compiled code.
    with _recompile_limit_patch(2):
        for op in ("attention", "attention-nomask", "attention", "attention-nomask"):
            for direction in ("fwd", "bwd"):
                case = kernel_case(op, "torch-compile", "fp32", shape, direction, torch.device("cpu"), smoke=True)
                assert case.check_compiled is not None
                row = run_case(case, plan=SMOKE_PLAN_FOR_TESTS)
                assert row["max_error"] < 1e-5


def test_hf_compile_checks_that_it_ran_compiled(tiny_bench):
    pytest.importorskip("transformers")
    shape = shapes.ModelShape(2, 13)
    case = tiny_bench.forward_case("hf-compile", "fp32", shape)
    assert case.check_compiled is not None
    run_case(case, plan=SMOKE_PLAN_FOR_TESTS)
    (compiled,) = tiny_bench.hf_compiled("fp32")._bench_compiled
    assert compiled.calls > 0 and compiled.eager_calls == 0
    compiled.eager_calls = 1  # as if Dynamo had fallen back
    with pytest.raises(Exception, match="eager Python"):
        case.check_compiled()


def test_forced_sdpa_backends_run_or_skip_with_torchs_reason():
    shape = shapes.SMOKE_ATTENTION_SHAPES[0]
    for impl in ("torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn"):
        try:
            case = kernel_case("attention-nomask", impl, "fp32", shape, "fwd", torch.device("cpu"), smoke=True)
        except Skip as exc:
            assert str(exc)
            continue
        assert run_case(case, plan=SMOKE_PLAN_FOR_TESTS)["max_error"] < 1e-5


# --------------------------------------------------------------------------------------
# First light: the headline plan, the host probe, the autotune record, gpu-check's summary


def test_first_light_numbers_and_skipped_sections(tmp_path):
    from bench import firstlight

    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    names = [section.name for section in light.plan()]
    assert names[:3] == ["peaks", "forward 2x13", "host probe"]
    # Lowest priority, when time is left: sentence embeddings, then FP8 (after every training and graph row).
    assert names[-3:] == ["sentence embeddings", "fp8", "fp8 accuracy"]
    for section in light.plan()[1:]:
        if section.name in ("host probe", "sentence embeddings", "fp8 accuracy"):  # numbers, no result-file rows
            continue
        assert light.identities(section.name), section.name
    light.skip_section(next(s for s in light.plan() if s.name == "padding-free"), "out of time")
    assert all(row["reason"] == "out of time" for row in light.skipped)
    assert {row["lengths"] for row in light.skipped} == {d.name for d in shapes.LENGTH_DISTRIBUTIONS}
    rows = [
        {"name": "bert-large-fwd", "impl": "hf-sdpa", "batch": 32, "seq": 128, "median_ms": 10.0},
        {"name": "bert-large-fwd", "impl": "bertfast", "batch": 32, "seq": 128, "median_ms": 5.0},
        {"name": "attention-fwd", "impl": "bertfast-triton", "batch": 32, "seq": 128, "median_ms": 1.0, "tflops": 9.5},
    ]
    numbers = firstlight.key_numbers(rows, {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0}, {}, [], 0, None)
    assert numbers["fwd 32x128 speed-up vs hf-sdpa"] == {"hf-sdpa": 1.0, "bertfast": 2.0}
    assert "attention-fwd 32x128 bertfast-triton TFLOP/s" in numbers["kernels"]


def test_host_probe_on_the_cpu():
    from bench.firstlight import host_probe

    w = torch.randn(64, 64)
    numbers, table = host_probe(lambda x: torch.relu(x @ w), (torch.randn(8, 64),), torch.device("cpu"), rounds=3)
    assert numbers["host_ms"] > 0 and numbers["wall_ms"] >= numbers["host_ms"] * 0.5
    assert numbers["gpu_busy_ms"] is None and numbers["rounds"] == 3
    assert "aten::" in table


def test_autotune_record_and_schema(tmp_path):
    from bench.firstlight import _key_text, autotune_choices

    assert _key_text(["HEAD_DIM", "seq_bucket"], (64, 128, "torch.bfloat16")) == (
        "HEAD_DIM=64, seq_bucket=128, dtypes=(torch.bfloat16)"
    )
    assert isinstance(autotune_choices(), dict)
    data = _result(
        [_row("bertfast", 8.0)],
        autotune={"attention._fwd_kernel": {"HEAD_DIM=64": "BLOCK_M: 128, BLOCK_N: 64, num_warps: 4"}},
        host={"bert-large-fwd bertfast 32x128": {"host_ms": 9.1, "gpu_busy_ms": 4.0, "note": "x", "kernels": None}},
    )
    path = schema.write_result(data, tmp_path)
    assert schema.read_result(path)["autotune"]["attention._fwd_kernel"]
    bad = dict(data, autotune={"attention._fwd_kernel": {"HEAD_DIM=64": 3}})
    with pytest.raises(schema.ResultSchemaError, match="autotune"):
        schema.validate(bad)


def _gpu_check_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_summary_lists_every_stage_and_the_output_stays_small(tmp_path, monkeypatch):
    """Out of time at once: every stage is still listed (skipped, with the reason), in at most 8 flat files."""
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check.Check, "_build_estimate", lambda self: gpu_check.STAGES["build"][2])
    out, work = tmp_path / "out", tmp_path / "work"
    status = gpu_check.main(["--budget-s", "0", "--out", str(out), "--work", str(work)])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(gpu_check.STAGES)
    assert [s["stage"] for s in summary["stages"]] == ["a", "a", "b", "c", "d", "e"]
    for stage in summary["stages"]:
        assert stage["status"] == "skipped" and "out of time" in stage["reason"]
        assert stage["estimate_s"] > 0
    text = (out / "summary.txt").read_text()
    for name in gpu_check.STAGES:
        assert name in text
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files)
    assert {f.name for f in files} <= set(gpu_check.OUTPUT_FILES)


def test_first_light_skips_what_does_not_fit_and_still_writes_the_result(tmp_path):
    from bench import firstlight

    light = firstlight.FirstLight(tiny=True, budget_s=0, results=str(tmp_path), numbers=str(tmp_path / "n.json"))
    light.tiny = False  # the GPU's rule: sections past the budget are skipped (the peaks always run)
    assert light.run() == 0
    data = schema.read_result(light.path)
    assert data["results"] == [] and data["peaks"]["copy_gbps"] > 0
    assert all(row["reason"].startswith("out of time") for row in data["skipped"])
    sections = data["setup"]["sections"]
    assert "peaks: " in sections and "training: skipped (out of time" in sections
    assert json.loads((tmp_path / "n.json").read_text())["rows"] == 0


def _gpu_check(tmp_path, dry_run=False, budget_s=420):
    """A gpu-check driver on an imagined sm_90 GPU (its commands are replaced by the tests)."""
    gpu_check = _gpu_check_module()
    args = argparse.Namespace(
        dry_run=dry_run, budget_s=budget_s, out=str(tmp_path / "out"), work=str(tmp_path / "work"),
        python=sys.executable, triton_cache=None, prebuilt_ext=None, only=None, commit="abc1234",
    )  # fmt: skip
    check = gpu_check.Check(args)
    check.capability = (9, 0)
    return gpu_check, check


def test_gpu_check_dry_run_fails_on_a_stage_or_the_gpu_plan_not_on_a_busy_machine(tmp_path, monkeypatch):
    """Past its budget from the start (a busy machine), a dry run still runs every stage and passes; a failing
    stage fails it, and so do stages a-d whose H100 estimates could never fit the GPU budget."""
    gpu_check, check = _gpu_check(tmp_path, dry_run=True, budget_s=1)
    check.started -= 100
    verdicts = dict.fromkeys(gpu_check.STAGES, "ok")
    for name in gpu_check.STAGES:
        monkeypatch.setattr(check, f"stage_{name}", lambda stage, name=name: verdicts[name])
    assert check.main() == 0
    assert [s["status"] for s in check.stages] == ["ok"] * len(gpu_check.STAGES)
    assert all(s["timeout_s"] >= gpu_check.DRY_STAGE_MIN_TIMEOUT_S for s in check.stages)

    verdicts["smoke"] = "failed"
    assert check.main() == 1
    verdicts["smoke"] = "ok"
    assert gpu_check.gpu_plan_problem() is None and check.main() == 0
    monkeypatch.setitem(gpu_check.STAGES, "bench", ("c", "headline benchmarks", 400, 20))
    assert "past the 420 s budget" in gpu_check.gpu_plan_problem()
    assert check.main() == 1


def test_gpu_check_build_decisions(tmp_path, monkeypatch):
    """Reuse what fits (installed, in the tree, carried), else build for this GPU's arch only."""
    gpu_check, check = _gpu_check(tmp_path)
    assert check.env["BERTFAST_COMMIT"] == "abc1234"
    usable = {"installed": True, "built": True, "cuda_kernels": True, "cuda_archs": "9.0", "arch_reason": None}
    commands = []

    def fake_run(stage, name, command, timeout_s, env=None):
        commands.append((name, command, dict(env or check.env)))
        return 0

    monkeypatch.setattr(check, "run", fake_run)
    stage = {"name": "build", "numbers": {}, "timeout_s": 50}

    check._state = usable
    assert check._build_estimate() == gpu_check.REUSED_BUILD_S
    assert check.stage_build(stage) == "ok" and commands == []
    assert stage["numbers"]["action"] == "reused the installed build"

    # Built for another arch, nothing to reuse: build for sm_90 alone.
    check._state = dict(usable, arch_reason="built for 8.0 only")
    states = iter([usable])
    monkeypatch.setattr(check, "_build_state", lambda: next(states))
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # a tree without an extension in it
    (tmp_path / "bertfast").mkdir()
    assert check._build_estimate() == gpu_check.STAGES["build"][2]
    assert check.stage_build(dict(stage, numbers={})) == "ok"
    name, command, env = commands[-1]
    assert "pip" in command and env["BERTFAST_CUDA"] == "1" and env["TORCH_CUDA_ARCH_LIST"] == "9.0"

    # Not installed, a carried extension: install without building, copy it in, check that it loads.
    carried = tmp_path / "carried" / "_C.cpython-312-x86_64-linux-gnu.so"
    carried.parent.mkdir()
    carried.write_bytes(b"\0")
    check.prebuilt_ext = str(carried)
    check._state = {"installed": False}
    states = iter([{"installed": True, "built": False}, usable])
    commands.clear()
    assert check._build_estimate() == gpu_check.REUSED_BUILD_S + 12
    stage = dict(stage, numbers={})
    assert check.stage_build(stage) == "ok"
    assert [c[2].get("BERTFAST_BUILD_EXT") for c in commands] == ["0"]
    assert (tmp_path / "bertfast" / carried.name).exists()
    assert stage["numbers"]["action"].startswith("prebuilt extension")


@pytest.mark.parametrize("budget, skipped", [(420, ["rest"]), (300, ["bench"]), (60, ["smoke", "bench", "sanitizer"])])
def test_gpu_check_plan_on_a_gpu_budget(tmp_path, monkeypatch, budget, skipped):
    """Stages run in order while their estimate fits; each keeps the later a-d estimates back; e takes the rest."""
    gpu_check, check = _gpu_check(tmp_path)
    check.budget_s = budget
    check.deadline = check.started + budget
    timeouts = {}
    for name in gpu_check.STAGES:

        def handler(stage, name=name):
            timeouts[name] = stage["timeout_s"]
            check.deadline -= stage["estimate_s"]  # as if it took its estimate
            return "ok"

        monkeypatch.setattr(check, f"stage_{name}", handler)
    monkeypatch.setattr(check, "_build_estimate", lambda: gpu_check.REUSED_BUILD_S)
    check.main()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert [name for name, s in status.items() if s == "skipped"] == skipped
    if budget == 420:
        assert timeouts["bench"] >= 220 and timeouts["sanitizer"] >= 60
        assert timeouts["smoke"] <= budget - 220 - 60  # the bench and sanitizer estimates are kept back
    assert len(list((tmp_path / "out").iterdir())) <= 8


def test_first_light_records_a_row_with_a_nan_error_as_failed_and_goes_on(tmp_path, monkeypatch):
    """A NaN max error (a wrong output) fails its row, keeps its time in the reason, and costs no other row."""
    from bench import firstlight
    from bertfast.benchmarking import schema
    from bertfast.benchmarking.timing import Timing

    light = firstlight.FirstLight(tiny=True, budget_s=100, results=str(tmp_path))
    first, second = light.identities("forward 2x13")[:2]
    errors = iter([float("nan"), 0.01])

    def fake_case(case, plan, peaks=None, benchmark=None):
        return schema.make_row(
            **{k: v for k, v in identity.items() if k in ("name", "impl", "dtype", "batch", "seq")},
            timing=Timing.from_samples([7.84, 7.9, 8.0]),
            max_error=next(errors),
        )

    monkeypatch.setattr(suite, "run_case", fake_case)
    identity = first
    assert light.case(first, lambda: None, None) is None
    identity = second
    assert light.case(second, lambda: None, None) is not None
    assert len(light.rows) == 1 and len(light.failed) == 1
    assert "max_error" in light.failed[0] and "timed 7.900 ms" in light.failed[0]
    assert light.skipped[-1]["reason"].startswith("failed: not a valid result")
    assert schema.row_problems(light.rows[0]) == []


def test_bench_command_errors_come_first_and_in_one_line(tmp_path, capsys, monkeypatch):
    """A corrupt checkpoint and an unwritable --save say so at once; a run that timed no bertfast fails."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2}')
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert command.run(_bench_args("--checkpoint", str(corrupt), "--plain", "--cpu")) == 2
    out = capsys.readouterr().out
    assert f"error: cannot build the checkpoint '{corrupt}'" in out and "Traceback" not in out

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    timed = []
    monkeypatch.setattr(command, "run_interleaved", lambda *a, **k: timed.append(a))
    assert command.run(_bench_args("--model", "tiny", "--save", str(blocker / "results"), "--plain", "--cpu")) == 2
    assert "error: --save" in capsys.readouterr().out and timed == []
    monkeypatch.undo()

    # triton cannot run CPU tensors without the interpreter here: nothing of bertfast is timed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = command.run(
        _bench_args("--model", "tiny", "--batch", "1", "--seq", "8", "--backends", "triton", "--plain", "--cpu")
    )
    out = capsys.readouterr().out
    assert status == 1 and "no bertfast implementation was timed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels were compiled for the GPU: no interpreter")
def test_bench_command_says_what_ran_and_checks_the_timed_batch(capsys, monkeypatch):
    """auto is named with the backend it resolved to, the drop-in (patched) path is timed, interpreter
    timings are marked, and the check runs at the batch that is timed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ("--model", "tiny", "--batch", "2", "--seq", "8", "--backends", "auto,triton", "--plain", "--cpu")
    assert command.run(_bench_args(*args)) == 0
    out = capsys.readouterr().out
    assert "Check against the float32 reference (2 x 8, real tokens)" in out
    assert "bertfast (auto -> reference)" in out and "hf-sdpa-patched (auto -> reference)" in out
    assert "bertfast-triton [Triton interpreter]" in out


def test_bench_command_warns_when_the_rounds_spread_too_wide():
    rows = [
        {"impl": "bertfast", "name": "bert-tiny-fwd", "median_ms": 1.0, "p20_ms": 0.95, "p80_ms": 1.05},
        {"impl": "hf-sdpa", "name": "bert-tiny-fwd", "median_ms": 1.0, "p20_ms": 0.7, "p80_ms": 1.3},
    ]
    warnings = command._spread_warnings(rows, {"hf-sdpa": "hf-sdpa"})
    assert len(warnings) == 1 and "hf-sdpa (fwd)" in warnings[0] and "60%" in warnings[0]


def test_sentence_embedding_row_compares_patched_and_unpatched_on_the_same_sentences():
    pytest.importorskip("sentence_transformers")
    from bench import sentence_embeddings

    from .helpers import minilm_path

    texts = sentence_embeddings.sentences(200)
    words = [len(t.split()) for t in texts]
    assert min(words) >= 3 and max(words) <= 120 and 8 <= sorted(words)[100] <= 24  # median near 14
    assert sentence_embeddings.sentences(200) == texts  # seeded
    row = sentence_embeddings.run(minilm_path(), "cpu", count=12, batch_size=4, rounds=1)
    assert set(row["sentences_per_s"]) == {"sentence-transformers", "sentence-transformers-patched"}
    assert all(rate > 0 for rate in row["sentences_per_s"].values())
    assert row["max_cosine_gap"] <= 1e-5 and row["dtype"] == "float32"


def test_task_training_rows_time_bertfast_train_step_beside_the_eager_step_and_hugging_face(tiny_bench, monkeypatch):
    """bertfast-trainstep rows run bertfast.TrainStep (eager here, the graph on a GPU) over host micro-batches with
    the task's labels: its first step before timing, then one step per timed call; masked-LM pre-training and a
    classification fine-tuning step, each in the same recipe as the eager and Hugging Face rows beside it."""
    import bertfast.train_step

    calls = []
    real_call = bertfast.train_step.TrainStep.__call__

    def counted(self, micro_batches):
        calls.append({name: t.device.type for name, t in micro_batches.items()})
        return real_call(self, micro_batches)

    monkeypatch.setattr(bertfast.train_step.TrainStep, "__call__", counted)
    shape = shapes.ModelShape(2, 13)
    for task, label_shape in (("mlm", (2, 13)), ("cls", (2,))):
        case = tiny_bench.task_train_case(task, "bertfast-trainstep", "fp32", shape)
        (micro_batch,) = case.input_sets[0]
        assert micro_batch["labels"].shape == label_shape
        calls.clear()
        row = run_case(case, plan=SMOKE_PLAN)
        assert len(calls) == 2 and set(calls[0].values()) == {"cpu"}  # the first step, then the timed one
        assert row["name"] == f"bert-tiny-{task}-train" and "bertfast.TrainStep (run eagerly" in row["note"]
        assert "recipe: AdamW lr 1e-05; pure fp32" in row["note"]
        eager = tiny_bench.task_train_case(task, "bertfast", "fp32", shape)
        assert eager.flops == case.flops and "recipe: AdamW lr 1e-05; pure fp32" in eager.note
    amp = tiny_bench.task_train_case("cls", "bertfast-trainstep-amp", "bf16", shape)
    assert "AMP: fp32 master weights" in amp.note and run_case(amp, plan=SMOKE_PLAN)["dtype"] == "bf16"
    with pytest.raises(ValueError, match="training step of a task model"):
        tiny_bench.forward_case("bertfast-trainstep", "fp32", shape)
