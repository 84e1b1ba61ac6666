"""Under CI=true a test that skips for want of Fashion-MNIST fails (tests/conftest.py)."""

from __future__ import annotations

import pytest

from .conftest import data_skip_failure


def test_data_skips_fail_only_under_ci():
    reason = "Skipped: Fashion-MNIST is not installed (make setup installs it)"
    assert data_skip_failure(reason, {}) is None
    assert data_skip_failure(reason, {"CI": "false"}) is None
    for ci in ("true", "1", "TRUE"):
        assert data_skip_failure(reason, {"CI": ci}).startswith("skipped for a missing data set under CI=true")
    assert data_skip_failure("needs a GPU", {"CI": "true"}) is None


def test_the_hook_turns_the_skip_into_a_failure(request):
    hook = request.config.pluginmanager.hook.pytest_runtest_makereport
    names = [impl.plugin_name for impl in hook.get_hookimpls()]
    assert any(name.endswith("conftest.py") for name in names)


@pytest.mark.skipif(True, reason="an ordinary skip (not about data) is left alone under CI=true too")
def test_an_ordinary_skip():
    raise AssertionError("never runs")
