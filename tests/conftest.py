"""Suite-wide rules.

Under CI (the environment variable CI set to anything but "", "0" or "false"), a skipped test fails: every
prerequisite a test skips without (the official reference files beside the project, Java, Chromium and its driver,
the dev extra) is one `.ci/run` provides, so a skip there means a check silently stopped running. Locally a missing
prerequisite still skips, with its reason in the `-ra` summary.

Tests marked `gpu` need a CUDA device; without one they are deselected (counted as "deselected", never "skipped")
and the summary says why. FIORE_GPU_TEST_DEVICE=cpu runs them on the CPU instead (to check the tests themselves).
"""

from __future__ import annotations

import os

import pytest
import torch

# Models loaded by fiore.load run every inference strategy (fiore.model.inference), whatever calibration would pick
# on this machine: the suite exercises the same code everywhere. Calibration itself is tested on its own.
os.environ.setdefault("FIORE_STRATEGIES", "all")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("FIORE_GPU_TEST_DEVICE"):  # tests/test_gpu.py: a device override
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)
        config._fiore_gpu_deselected = len(gpu)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_fiore_gpu_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} gpu test(s) deselected: no CUDA device here (they run on a GPU machine)")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where .ci/run provides every prerequisite: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI, where .ci/run provides every prerequisite: {_skip_reason(report)}"
