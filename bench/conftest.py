"""pytest-benchmark suites for bertfast (see bench/README.md).

On a GPU: ``pytest bench --benchmark-only --bench-save bench/results`` times everything
at BERT-large sizes and writes ``bench/results/<gpu-slug>/<date>-<commit>.json``.
Without a GPU, or with ``--benchmark-disable``, the same suites run each case once at a
tiny size inside the normal test run (without a GPU the Triton kernels run in Triton's
interpreter), so they never rot.
"""

import os

import torch

# Before anything imports triton: without a GPU the kernels run in Triton's interpreter.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from bench.suite import SuiteRun  # noqa: E402

_RUN = pytest.StashKey[SuiteRun]()


def pytest_addoption(parser):
    group = parser.getgroup("bertfast benchmarks")
    group.addoption(
        "--bench-save",
        metavar="DIR",
        default=None,
        help="write the run's results to DIR/<gpu-slug>/<date>-<commit>.json (e.g. bench/results)",
    )
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="fewer timed rounds and bf16 only (a quick look, not a stored baseline)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "bench_size(size): 'full' (BERT-large, timed on a GPU) or 'smoke' (tiny, run once: no GPU, "
        "or --benchmark-disable)",
    )
    # Without a GPU, or with timing disabled, every case runs once at a tiny size (on the GPU if there is one).
    smoke = not CUDA or bool(config.getoption("benchmark_disable", default=False))
    config.stash[_RUN] = SuiteRun(quick=bool(config.getoption("--bench-quick", default=False)), smoke=smoke)


def pytest_collection_modifyitems(config, items):
    run = config.stash.get(_RUN, None)
    if run is None:
        return
    if CUDA:
        full_skip = "BERT-large size: timed only when benchmarks are enabled (no --benchmark-disable)"
    else:
        full_skip = "BERT-large size: timed on a GPU only"
    smoke_skip = "smoke size: runs only without a GPU or with --benchmark-disable"
    for item in items:
        marker = item.get_closest_marker("bench_size")
        if marker is None:
            continue
        if marker.args[0] == "full" and run.smoke:
            item.add_marker(pytest.mark.skip(reason=full_skip))
        elif marker.args[0] == "smoke" and not run.smoke:
            item.add_marker(pytest.mark.skip(reason=smoke_skip))


@pytest.fixture(scope="session")
def bench_run(request) -> SuiteRun:
    return request.config.stash[_RUN]


def pytest_sessionfinish(session, exitstatus):
    root = session.config.getoption("--bench-save", default=None)
    run = session.config.stash.get(_RUN, None)
    if not root or run is None or not run.rows:
        return
    path = run.save(root)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"bertfast benchmark results written to {path}")
