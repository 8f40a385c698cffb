"""tests/outcome_log.py: a pytest run stopped from outside still says which tests ran and which failed
(what gpu-check's test stages count when pytest never wrote its JUnit report)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """
import time, pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

def test_error(broken):
    pass

def test_hangs():
    time.sleep(600)
"""


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_a_killed_run_keeps_every_finished_outcome(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    outcomes = tmp_path / "outcomes.txt"
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_sample.py"), "-q", "-p", "no:cacheprovider"]
    command += ["-p", "tests.outcome_log", f"--outcome-log={outcomes}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if outcomes.exists() and len(outcomes.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "pytest ended before the hanging test: the sample did not run as planned"
    finally:
        proc.kill()  # no chance to write any report: only what was written as the tests ended remains
        proc.wait()
    lines = outcomes.read_text().splitlines()
    assert [line.split("::")[-1] for line in lines] == ["test_passes", "test_fails", "test_skipped", "test_error"]
    assert [line.split()[0] for line in lines] == ["PASSED", "FAILED", "SKIPPED", "ERROR"]

    counts = _gpu_check()._outcome_counts(outcomes)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["error"]) == (1, 1, 1, 1)
    assert [name.split("::")[-1] for name in counts["failed tests"]] == ["test_fails", "test_error"]
