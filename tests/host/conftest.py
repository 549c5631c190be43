"""Host tests: the real kernel on this machine. Each test must leave no cgroup behind."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from sandbox.cgroups import cgroupfs
from sandbox.cgroups.enclosing import own_memory_cgroup
from sandbox.core import identity
from tests.conftest import LAUNCHER, launcher_env, sandbox_cgroups, wait_until


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
    own = own_memory_cgroup() or ""
    memory_root = "/sys/fs/cgroup/memory/"
    foreign = {
        os.path.basename(p)
        for p in paths
        if p.startswith(memory_root) and not p.startswith(own.rstrip("/") + "/")
    }
    return {p for p in paths if os.path.basename(p) not in foreign and not _foreign_launcher(p)}


def _foreign_launcher(path: str) -> bool:
    """The sandbox's launcher is another test run's: an aero-sandbox launcher that still runs
    and does not descend from this one. (A pid seen in a pid namespace may name anything here:
    only a live launcher process outside our tree counts as foreign.)"""
    pid = identity.launcher_pid(os.path.basename(path))
    if pid is None or pid <= 1:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"sandbox" not in f.read():
                return False
    except OSError:
        return False
    while pid > 1:
        if pid == os.getpid():
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return True


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def shared_parent() -> Iterator[str]:
    """A 300M v1 memory cgroup below ours that two launchers run in, so that their sandboxes are
    siblings under one shared limit (v1 lets a cgroup hold processes and children at once)."""
    # Properties of this run, not capabilities the host lacks: skipped, never failed.
    if os.geteuid() != 0:
        pytest.skip("root only: makes a cgroup next to the test's own")
    own = next(
        (h.own for h in cgroupfs.discover() if h.version == 1 and "memory" in h.controllers),
        None,
    )
    if own is None:
        # On v2 a cgroup with children holds no processes: the launchers could not run in it.
        pytest.skip("v1 only: launchers run in a parent cgroup beside their sandboxes")
    parent = os.path.join(own, f"aero-test-shared-{os.getpid()}-{os.urandom(2).hex()}")
    os.mkdir(parent)
    try:
        cgroupfs.write(parent + "/memory.limit_in_bytes", str(300 << 20))
        yield parent
    finally:
        for top, _dirs, _files in os.walk(parent, topdown=False):
            for _attempt in range(100):  # the launchers' last exits may still be settling
                try:
                    os.rmdir(top)
                    break
                except OSError:
                    time.sleep(0.05)


def launch_in(parent: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """A launcher (output discarded) started inside the v1 cgroup `parent`, so that its
    sandbox is created below `parent`, beside the sandboxes of the others started there."""
    return subprocess.Popen(
        [*LAUNCHER, *argv],
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: cgroupfs.write(parent + "/cgroup.procs", "0"),
    )
