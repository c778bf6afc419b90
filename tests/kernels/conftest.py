"""Kernel-test setup: reset the Pallas interpreters' global state after a test that raised inside one."""

import pytest


@pytest.fixture(autouse=True)
def _reset_interpreters(request):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        from pallas_kernels import compat

        compat.reset_tpu_interpreter()
        compat.reset_gpu_interpreter()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
