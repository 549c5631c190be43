"""Host tests: the real kernel on this machine. Each test must leave no cgroup behind."""

from __future__ import annotations

import os

import pytest

from tests.conftest import sandbox_cgroups, wait_until


@pytest.fixture(autouse=True)
def no_leftover_cgroups():
    before = sandbox_cgroups()
    yield
    # A launcher's guardian may still be finishing a removal: allow it a moment.
    wait_until(lambda: not (sandbox_cgroups() - before), timeout=5)
    left = sandbox_cgroups() - before
    assert not left, f"cgroups left behind: {sorted(left)}"


def is_root() -> bool:
    return os.geteuid() == 0
