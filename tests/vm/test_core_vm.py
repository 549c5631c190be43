"""The launcher core again, for real, on systemd + pure cgroup v2, in both modes (see conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LAUNCHER, pid_alive, read_report, sandbox_cgroups, wait_until
from tests.programs import ALLOCATE, DAEMON, FORK_BOMB, FORWARD, STUBBORN_TREE
from tests.vm.conftest import PY, Mode, process_states, units


def test_first_instruction_runs_in_the_sandbox(mode: Mode, tmp_path: Path) -> None:
    """The command's very first action already sees itself inside the sandbox's cgroup."""
    report = tmp_path / "r.json"
    proc = mode.run(["--report", str(report), "--", "cat", "/proc/self/cgroup"])
    assert proc.returncode == 0, proc.stderr
    data = mode.check_report(report)
    where = proc.stdout.strip().removeprefix("0::")
    assert "/aero-sandbox-" in where
    assert f"/sys/fs/cgroup{where}".startswith(data["sandbox"]["cgroups"]["memory"])  # type: ignore[index]


def test_allocation_over_the_limit_is_oom_killed(mode: Mode, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code = f"import time; {ALLOCATE.format(size=300 << 20)}; time.sleep(60)"
    proc = mode.run(["--mem", "100M", "--report", str(report), "--", PY, "-c", code])
    assert proc.returncode == 137, proc.stderr
    assert "killed for memory" in proc.stderr and "100.0 MiB limit" in proc.stderr
    data = mode.check_report(report)
    assert data["reason"] == "oom" and data["exit_code"] == 137
    # Kernel 6.1 has memory.peak: a systemd scope must not lose it when the command ends.
    assert isinstance(data["peak_memory_bytes"], int) and data["peak_memory_bytes"] >= 90 << 20
    assert isinstance(data["oom_kills"], int) and data["oom_kills"] >= 1
    assert isinstance(data["cpu_s"], float)


def test_allocation_under_the_limit_runs(mode: Mode, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = [
        "--mem",
        "300M",
        "--report",
        str(report),
        "--",
        PY,
        "-c",
        ALLOCATE.format(size=100 << 20),
    ]
    proc = mode.run(args)
    assert proc.returncode == 0 and proc.stdout == "allocated\n", proc.stderr
    data = mode.check_report(report)
    assert data["reason"] == "exited" and data["oom_kills"] == 0
    assert isinstance(data["peak_memory_bytes"], int) and data["peak_memory_bytes"] >= 100 << 20


def test_fork_bomb_stops_at_the_pids_limit(mode: Mode, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = mode.run(["--pids", "40", "--report", str(report), "--", PY, "-c", FORK_BOMB])
    forked, errno = map(int, proc.stdout.split())
    assert errno == 11 and forked < 40, proc.stdout  # EAGAIN before the 40th task
    data = mode.check_report(report)
    assert data["reason"] == "pids" and data["exit_code"] == 1
    assert isinstance(data["pids_limit_hits"], int) and data["pids_limit_hits"] >= 1
    assert "--pids limit of 40" in proc.stderr


def test_timeout_kills_a_tree_that_ignores_sigterm(
    mode: Mode, tmp_path: Path, pids_to_kill: list[int]
) -> None:
    pidfile, report = tmp_path / "pids", tmp_path / "r.json"
    args = ["--timeout", "2", "--kill-after", "0.5", "--report", str(report), "--"]
    proc = mode.run(args + [PY, "-c", STUBBORN_TREE, str(pidfile)])
    pids_to_kill += [int(p) for p in pidfile.read_text().split()]
    assert proc.returncode == 124, proc.stderr
    assert "timed out after 2s" in proc.stderr and "SIGKILL after 0.5s" in proc.stderr
    data = mode.check_report(report)
    assert data["reason"] == "timeout" and data["killed_after_grace"] is True
    assert not [p for p in pids_to_kill if pid_alive(p)]


def test_setsid_daemon_does_not_outlive_the_sandbox(
    mode: Mode, tmp_path: Path, pids_to_kill: list[int]
) -> None:
    pidfile = tmp_path / "daemon"
    proc = mode.run(["--", PY, "-c", DAEMON, str(pidfile)])
    daemon = int(pidfile.read_text())
    pids_to_kill.append(daemon)
    assert proc.returncode == 0, proc.stderr
    assert not pid_alive(daemon)


def test_launcher_killed_with_sigkill_leaves_nothing(
    mode: Mode, tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """No unit, no cgroup, no process of the sandbox within 2 s (the guardian's work)."""
    pidfile = tmp_path / "pids"
    cgroups_before, units_before = sandbox_cgroups(), units()
    launcher = mode.popen(["--", PY, "-c", STUBBORN_TREE, str(pidfile)])
    try:
        assert wait_until(pidfile.exists, timeout=60)
        tree = [int(p) for p in pidfile.read_text().split()]
        pids_to_kill += tree
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert wait_until(lambda: not [p for p in tree if pid_alive(p)], timeout=2.0)
        assert wait_until(lambda: not (sandbox_cgroups() - cgroups_before), timeout=2.0)
        assert wait_until(lambda: not (units() - units_before), timeout=2.0)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signals_are_forwarded_to_the_child(mode: Mode, signo: int) -> None:
    launcher = mode.popen(["--", PY, "-c", FORWARD], stdout=subprocess.PIPE)
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == "ready\n"
        launcher.send_signal(signo)
        try:
            code = launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end:\n{process_states(launcher.pid)}")
        assert code == 40 + signo
        assert launcher.stdout.read() == f"got {signo}\n"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


def test_nested_sandbox_inner_limit_applies(mode: Mode, tmp_path: Path) -> None:
    """aero-sandbox inside aero-sandbox: the inner one nests in the outer's cgroup (cgroup
    backend; a new systemd scope would be outside the outer limits) and its limit applies."""
    inner_report, outer_report = tmp_path / "inner.json", tmp_path / "outer.json"
    inner = LAUNCHER + ["--mem", "100M", "--report", str(inner_report), "--"]
    inner += [PY, "-c", ALLOCATE.format(size=200 << 20)]
    proc = mode.run(["--mem", "1G", "--report", str(outer_report), "--", *inner])
    assert proc.returncode == 137, proc.stderr
    outer, inner_data = mode.check_report(outer_report), read_report(inner_report)
    assert inner_data["backend"] == "cgroup" and inner_data["reason"] == "oom"
    inner_memory = inner_data["sandbox"]["cgroups"]["memory"]  # type: ignore[index]
    assert inner_memory.startswith(outer["sandbox"]["cgroups"]["memory"] + "/")  # type: ignore[index]
    assert outer["reason"] == "exited" and outer["exit_code"] == 137


def test_nested_sandbox_outer_limit_applies(mode: Mode, tmp_path: Path) -> None:
    report = tmp_path / "outer.json"
    inner = LAUNCHER + ["--mem", "1G", "--", PY, "-c", ALLOCATE.format(size=300 << 20)]
    proc = mode.run(["--mem", "150M", "--report", str(report), "--", *inner])
    assert proc.returncode == 137, proc.stderr
    assert mode.check_report(report)["reason"] == "oom"


def test_sixteen_sandboxes_at_once_leave_nothing(mode: Mode, tmp_path: Path) -> None:
    cgroups_before, units_before = sandbox_cgroups(), units()
    launchers = [
        mode.popen(
            ["--mem", "64M", "--report", str(tmp_path / f"{i}.json"), "--", "sh", "-c", "sleep 1"],
            stdout=subprocess.DEVNULL,
        )
        for i in range(16)
    ]
    try:
        codes = [p.wait(timeout=120) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    assert codes == [0] * 16
    reports = [mode.check_report(tmp_path / f"{i}.json") for i in range(16)]
    assert len({r["sandbox"]["cgroups"]["memory"] for r in reports}) == 16  # type: ignore[index]
    # Gone when the launchers returned, not some time later.
    assert not sandbox_cgroups() - cgroups_before
    assert not units() - units_before
