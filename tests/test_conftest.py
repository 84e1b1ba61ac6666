"""Under CI=true a test that skips for want of Fashion-MNIST fails (tests/conftest.py)."""

from __future__ import annotations

import pytest

from .conftest import data_skip_failure

pytest_plugins = ["pytester"]

INNER_TESTS = """
import pytest

def test_needs_data():
    pytest.skip("Fashion-MNIST is not installed (make setup installs it)")

def test_needs_a_gpu():
    pytest.skip("needs a GPU")

@pytest.mark.skipif(True, reason="Fashion-MNIST is not installed")
def test_marked_skip_for_data():
    pass

def test_passes():
    pass
"""


def test_data_skips_fail_only_under_ci():
    reason = "Skipped: Fashion-MNIST is not installed (make setup installs it)"
    assert data_skip_failure(reason, {}) is None
    assert data_skip_failure(reason, {"CI": "false"}) is None
    for ci in ("true", "1", "TRUE"):
        assert data_skip_failure(reason, {"CI": ci}).startswith("skipped for a missing data set under CI=true")
    assert data_skip_failure("needs a GPU", {"CI": "true"}) is None


@pytest.mark.parametrize("ci", ["true", "false"])
def test_the_hook_fails_data_skips_in_a_real_session(pytester, monkeypatch, ci):
    # A pytest session of its own with this suite's hook: under CI=true the two skips for a
    # missing data set (one by call, one by marker: a setup error) fail, the ordinary skip stays.
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1)  # the marker skips at setup
        result.stdout.fnmatch_lines(["*skipped for a missing data set under CI=true*"])
    else:
        result.assert_outcomes(passed=1, skipped=3)
