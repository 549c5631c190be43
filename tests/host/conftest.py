"""Host tests: the real kernel on this machine. Each test must leave no cgroup behind."""

from __future__ import annotations

import os

import pytest

from sandbox.cgroups.enclosing import own_memory_cgroup
from tests.conftest import sandbox_cgroups, wait_until


@pytest.fixture(autouse=True)
def no_leftover_cgroups():
    before = sandbox_cgroups()
    yield
    # A launcher's guardian may still be finishing a removal: allow it a moment.
    wait_until(lambda: not ours(sandbox_cgroups() - before), timeout=5)
    left = ours(sandbox_cgroups() - before)
    assert not left, f"cgroups left behind: {sorted(left)}"


def ours(paths: set[str]) -> set[str]:
    """The sandboxes of this test run, not another test run's on the same host: on a hybrid host
    whose processes sit in different v1 memory cgroups, a name found in another memory cgroup's
    tree (and not in ours) is someone else's sandbox."""
    own = own_memory_cgroup()
    memory_root = "/sys/fs/cgroup/memory/"
    if own is None or not own.startswith(memory_root):
        return paths
    foreign = {
        os.path.basename(p)
        for p in paths
        if p.startswith(memory_root) and not p.startswith(own.rstrip("/") + "/")
    }
    return {p for p in paths if os.path.basename(p) not in foreign}


def is_root() -> bool:
    return os.geteuid() == 0
