"""`aero-sandbox list` and `gc` against real launchers, cgroups and registry files.

Other test sessions may run sandboxes on this machine at the same time: every check looks for
the sandboxes this test made (by launcher pid or path), never at the whole list.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import cgroupfs
from sandbox.core import identity
from sandbox.registry import store as registry
from tests.conftest import (
    LAUNCHER,
    launcher_env,
    need,
    need_kernel_sandbox,
    pid_alive,
    run_launcher,
    wait_until,
)

PY = sys.executable


@pytest.fixture(autouse=True)
def cgroups_usable() -> None:
    need_kernel_sandbox()


def listed() -> list[dict[str, Any]]:
    proc = run_launcher(["list", "--json"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def row_of(pid: int) -> dict[str, Any] | None:
    return next((row for row in listed() if row["launcher_pid"] == pid), None)


@contextlib.contextmanager
def sandbox(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A launcher running in the background; stopped by pid (SIGTERM, then SIGKILL) at the end."""
    proc = subprocess.Popen(
        [*LAUNCHER, *args],
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # forwarded to the command: the launcher cleans up
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=15)


def test_list_shows_a_running_sandbox() -> None:
    script = (
        "b = bytearray(40 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    )
    with sandbox("--mem", "256M", "--pids", "64", "--", PY, "-c", script) as proc:
        assert wait_until(
            lambda: (row := row_of(proc.pid)) is not None and row["memory_bytes"] >= 40 << 20,
            timeout=30,
        ), proc.stderr
        row = row_of(proc.pid)
        assert row is not None
        assert row["command"] == [PY, "-c", script]
        assert row["backend"] in ("cgroup", "systemd")  # systemd where it is PID 1 (VM stage)
        assert row["launcher_alive"] is True
        assert 40 << 20 <= row["memory_bytes"] <= 256 << 20
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 40 << 20
        assert row["memory_limit_bytes"] == 256 << 20
        assert row["limits"] == {"memory_bytes": 256 << 20, "pids": 64, "timeout_s": None}
        assert row["tasks"] >= 1
        assert row["age_s"] >= 0
        assert all(os.path.isdir(p) for p in row["cgroups"].values())
        table = run_launcher(["list"], timeout=30)
        assert table.returncode == 0
        line = next(x for x in table.stdout.splitlines() if x.startswith(f"{proc.pid} "))
        assert (
            row["backend"] in line
            and "256.0M" in line
            and line.endswith(shlex.join([PY, "-c", script]))
        )
    assert proc.returncode == 143  # SIGTERM forwarded, the command did not catch it
    assert row_of(proc.pid) is None
    assert not os.path.exists(row["registry"])


def test_list_shows_an_rlimit_sandbox_from_its_process_tree() -> None:
    probe = run_launcher(["--backend", "rlimit", "--", "true"], timeout=30)
    need(probe.returncode == 0, f"no rlimit backend in this version: {probe.stderr.strip()}")
    with sandbox("--backend", "rlimit", "--mem", "512M", "--", "sleep", "30") as proc:
        assert wait_until(lambda: row_of(proc.pid) is not None, timeout=30), proc.stderr
        row = row_of(proc.pid)
        assert row is not None
        assert row["backend"] == "rlimit" and row["command"] == ["sleep", "30"]
        assert row["memory_limit_bytes"] == 512 << 20
        assert row["memory_bytes"] is not None and row["memory_bytes"] > 0
        assert row["tasks"] is not None and row["tasks"] >= 1


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


@pytest.fixture
def private_parent() -> Iterator[str]:
    """A cgroup below our memory cgroup for fabricated leftovers: no other launcher's teardown
    (which removes stale sandboxes next to its own) looks in it, so nothing races the test."""
    if os.geteuid() != 0:  # a property of this test run, not a capability the host lacks
        pytest.skip("root only: fabricates cgroups next to the test's own")
    hierarchy = next((h for h in cgroupfs.discover() if "memory" in h.controllers), None)
    need(hierarchy is not None, "no memory controller in our cgroup")
    assert hierarchy is not None
    path = os.path.join(hierarchy.own, f"aero-test-gc-{os.getpid()}-{os.urandom(2).hex()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for top, _dirs, _files in os.walk(path, topdown=False):
            os.rmdir(top)


def fabricate_leftover(pid: int, cgroup_parent: str) -> tuple[str, str]:
    """What a launcher killed together with its guardian leaves: a cgroup and a registry file."""
    ident = os.urandom(3).hex()
    cgroup = os.path.join(cgroup_parent, f"{identity.PREFIX}{pid}-{ident}")
    os.mkdir(cgroup)
    directory = registry.own_directory()
    os.makedirs(directory, exist_ok=True)
    entry = os.path.join(directory, f"{pid}-{ident}")
    Path(entry).write_text(
        f"{registry.MAGIC}\npid {pid}\nstarted 1\nbackend cgroup\n"
        f"sandbox.cgroups.memory {cgroup}\narg sleep\narg 30\n"
    )
    return cgroup, entry


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    proc = run_launcher(["gc", *args], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_gc_removes_a_crashed_launchers_leftovers_and_leaves_a_live_one(
    private_parent: str,
) -> None:
    cgroup, entry = fabricate_leftover(dead_pid(), private_parent)
    # A cgroup with no registry entry at all (an older launcher, a registry on another /run):
    # found by its name's dead launcher pid, below the parent gc is told to look in.
    bare = os.path.join(private_parent, f"{identity.PREFIX}{dead_pid()}-{os.urandom(3).hex()}")
    os.mkdir(bare)
    try:
        with sandbox("--mem", "128M", "--", "sleep", "30") as proc:
            assert wait_until(lambda: row_of(proc.pid) is not None, timeout=30), proc.stderr
            live = row_of(proc.pid)
            assert live is not None
            dry = gc("--dry-run", "--parent", private_parent)
            assert f"would remove cgroup {cgroup}" in dry.stdout
            assert f"would remove cgroup {bare}" in dry.stdout
            assert f"would remove registry entry {entry}" in dry.stdout
            assert os.path.isdir(cgroup) and os.path.exists(entry) and os.path.isdir(bare)
            done = gc("--parent", private_parent)
            assert f"removed cgroup {cgroup}" in done.stdout
            assert f"removed cgroup {bare}" in done.stdout
            assert f"removed registry entry {entry}" in done.stdout
            assert not os.path.exists(cgroup) and not os.path.exists(entry)
            assert not os.path.exists(bare)
            # The live sandbox is untouched.
            assert os.path.exists(live["registry"])
            assert all(os.path.isdir(p) for p in live["cgroups"].values())
            assert proc.poll() is None and row_of(proc.pid) is not None
            for path in live["cgroups"].values():
                assert path not in done.stdout
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


def test_gc_keeps_a_dead_launchers_sandbox_whose_processes_still_run(
    private_parent: str, pids_to_kill: list[int]
) -> None:
    cgroup, entry = fabricate_leftover(dead_pid(), private_parent)
    sleeper = subprocess.Popen(["sleep", "30"])
    pids_to_kill.append(sleeper.pid)
    try:
        cgroupfs.write(f"{cgroup}/cgroup.procs", str(sleeper.pid))
        # list shows it (someone must decide), with the launcher marked gone.
        row = next(r for r in listed() if r["registry"] == entry)
        assert row["launcher_alive"] is False and row["tasks"] >= 1
        assert row["command"] == ["sleep", "30"]
        kept = gc()
        assert kept.stdout.count(f"kept {cgroup}: 1 process still runs in it") == 1
        assert os.path.isdir(cgroup) and os.path.exists(entry)
        sleeper.kill()
        sleeper.wait(timeout=10)
        assert wait_until(lambda: not cgroupfs.procs(cgroup), timeout=5)
        done = gc()
        assert f"removed cgroup {cgroup}" in done.stdout
        assert not os.path.exists(cgroup) and not os.path.exists(entry)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


def test_a_launcher_killed_with_sigkill_leaves_no_registry_entry() -> None:
    """Its guardian removes the sandbox and the entry; list stops showing it at once."""
    with sandbox("--", "sleep", "30") as proc:
        assert wait_until(lambda: row_of(proc.pid) is not None, timeout=30), proc.stderr
        row = row_of(proc.pid)
        assert row is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert row_of(proc.pid) is None  # the lock went with the launcher
        assert wait_until(lambda: not os.path.exists(row["registry"]), timeout=10)
        assert wait_until(
            lambda: not any(os.path.exists(p) for p in row["cgroups"].values()), timeout=10
        )
        assert wait_until(lambda: not pid_alive(row.get("guardian") or 0), timeout=10)


def test_list_with_nothing_running_of_ours_is_valid_json() -> None:
    assert isinstance(listed(), list)
    empty = run_launcher(["list"], timeout=30)
    assert empty.returncode == 0
    assert empty.stdout == "" or empty.stdout.startswith("PID ")


def test_a_starting_launcher_removes_leftovers_beside_its_sandbox() -> None:
    """gc's cheap part runs as soon as the command runs, not only when a launcher ends."""
    if os.geteuid() != 0:  # a property of this test run, not a capability the host lacks
        pytest.skip("root only: fabricates cgroups next to the launcher's")
    with sandbox("--backend", "cgroup", "--", "sleep", "30") as first:
        assert wait_until(lambda: row_of(first.pid) is not None, timeout=30), first.stderr
        row = row_of(first.pid)
        assert row is not None
        parents = {os.path.dirname(path) for path in row["cgroups"].values()}
        dead = dead_pid()
        stale = [os.path.join(p, f"{identity.PREFIX}{dead}-{os.urandom(3).hex()}") for p in parents]
        for path in stale:
            os.mkdir(path)
        entry = os.path.join(registry.own_directory(), f"{dead}-{os.urandom(3).hex()}")
        Path(entry).write_text(f"{registry.MAGIC}\npid {dead}\nstarted 1\nbackend cgroup\n")
        try:
            with sandbox("--backend", "cgroup", "--", "sleep", "30") as second:
                # While both still run (no teardown yet), the second one's start removed them.
                assert wait_until(lambda: row_of(second.pid) is not None, timeout=30)
                assert wait_until(
                    lambda: not any(map(os.path.exists, [*stale, entry])), timeout=10
                ), [p for p in [*stale, entry] if os.path.exists(p)]
                assert first.poll() is None and second.poll() is None
        finally:
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)
