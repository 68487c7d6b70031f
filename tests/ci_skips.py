"""Under CI=true a skipped test is a failure: CI must never be green because qemu, a kernel package or root was
missing. Loaded by tests/conftest.py (`pytest_plugins`); `-p tests.ci_skips` loads it anywhere else."""

import os

import pytest


def _strict() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped:  # a whole module skipped at import (importorskip, allow_module_level)
        _fail_skip(report)
