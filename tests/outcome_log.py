"""A pytest plugin: each test's outcome goes to a file the moment it is known.

``python -m pytest -p tests.outcome_log --outcome-log PATH ...`` appends one line per test,
``OUTCOME nodeid`` (PASSED, FAILED, SKIPPED, ERROR, XFAIL, XPASS), flushed as it is written: a
run stopped from outside (a time budget, a crash of the process) still says which tests ran and
which failed, where the JUnit report comes only at the end.  Under pytest-xdist the controller
writes every worker's results (the workers write nothing).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--outcome-log", default=None, metavar="PATH", help="append 'OUTCOME nodeid' per test to PATH")


def _outcome(report) -> str | None:
    """The line's verdict for one phase's report, or None when the phase decides nothing."""
    if hasattr(report, "wasxfail"):
        if report.when == "call" or report.skipped:
            return "XFAIL" if report.skipped else "XPASS"
        return None
    if report.when == "call":
        return report.outcome.upper()
    if report.failed:
        return "ERROR"  # setup or teardown failed
    if report.skipped:
        return "SKIPPED"  # skipped in setup (a mark, a fixture)
    return None


class OutcomeLog:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: each line reaches the file

    def pytest_runtest_logreport(self, report):
        outcome = _outcome(report)
        if outcome is not None:
            self.file.write(f"{outcome} {report.nodeid}\n")

    def pytest_unconfigure(self, config):
        self.file.close()


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    path = config.getoption("outcome_log")
    if path and not hasattr(config, "workerinput"):  # an xdist worker: its controller writes
        config.pluginmanager.register(OutcomeLog(path), "outcome-log-writer")
