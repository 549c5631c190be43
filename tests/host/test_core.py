"""The launcher core against the real kernel: OOM kills, fork bombs, timeouts, process trees.

These run with `--backend auto`, so on this development machine they exercise the cgroup
backend (hybrid v1+v2) and inside the VM stage the systemd backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    LAUNCHER,
    launcher_env,
    need_kernel_sandbox,
    pid_alive,
    read_report,
    run_in_terminal,
    run_launcher,
    sandbox_cgroups,
    wait_until,
)
from tests.programs import ALLOCATE, DAEMON, FORK_BOMB, FORWARD, STUBBORN_TREE

PY = sys.executable


@pytest.fixture(autouse=True)
def cgroups_usable() -> None:
    need_kernel_sandbox()


def test_allocation_over_the_limit_is_oom_killed(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code = f"import time; {ALLOCATE.format(size=300 << 20)}; time.sleep(30)"
    proc = run_launcher(["--mem", "100M", "--report", str(report), "--", PY, "-c", code])
    assert proc.returncode == 137, proc.stderr
    assert "killed for memory" in proc.stderr and "100.0 MiB limit" in proc.stderr
    data = read_report(report)
    assert data["reason"] == "oom" and data["exit_code"] == 137
    assert data["peak_memory_bytes"] is None or data["peak_memory_bytes"] >= 90 << 20
    assert data["limits"]["memory_bytes"] == 100 << 20


def test_allocation_under_the_limit_runs(tmp_path: Path) -> None:
    proc = run_launcher(["--mem", "300M", "--", PY, "-c", ALLOCATE.format(size=100 << 20)])
    assert proc.returncode == 0 and proc.stdout == "allocated\n", proc.stderr


def test_memory_limit_from_the_environment() -> None:
    env = launcher_env(AERO_MEM_LIMIT="100M")
    proc = run_launcher(["--", PY, "-c", ALLOCATE.format(size=300 << 20)], env=env)
    assert proc.returncode == 137




def test_fork_bomb_stops_at_the_pids_limit(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = run_launcher(["--pids", "50", "--report", str(report), "--", PY, "-c", FORK_BOMB])
    forked, errno = map(int, proc.stdout.split())
    assert errno == 11 and forked < 50, proc.stdout  # EAGAIN before the 50th task
    data = read_report(report)
    assert data["reason"] == "pids" and data["exit_code"] == 1
    assert data["pids_limit_hits"] and data["pids_limit_hits"] >= 1
    assert "--pids limit of 50" in proc.stderr




def test_timeout_kills_a_tree_that_ignores_sigterm(tmp_path: Path, pids_to_kill: list[int]) -> None:
    pidfile, report = tmp_path / "pids", tmp_path / "r.json"
    # 3 s: the tree must have started (and written its pids) before the timeout, which under
    # the VM stage's emulation on a busy host takes well over 1 s with a systemd scope.
    args = [
        "--timeout",
        "3",
        "--kill-after",
        "0.5",
        "--report",
        str(report),
        "--",
        PY,
        "-c",
        STUBBORN_TREE,
        str(pidfile),
    ]
    proc = run_launcher(args, timeout=30)
    pids_to_kill += [int(p) for p in pidfile.read_text().split()]
    assert proc.returncode == 124, proc.stderr
    assert "timed out after 3s" in proc.stderr and "SIGKILL after 0.5s" in proc.stderr
    assert read_report(report)["killed_after_grace"] is True
    assert not [p for p in pids_to_kill if pid_alive(p)]


def test_obedient_child_ends_with_sigterm(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = run_launcher(["--timeout", "0.5", "--report", str(report), "--", "sleep", "30"])
    assert proc.returncode == 124
    data = read_report(report)
    assert data["reason"] == "timeout" and data["signal_name"] == "SIGTERM"
    assert data["killed_after_grace"] is False




def test_setsid_daemon_does_not_outlive_the_sandbox(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    pidfile = tmp_path / "daemon"
    start = time.monotonic()
    proc = run_launcher(["--", PY, "-c", DAEMON, str(pidfile)], timeout=30)
    took = time.monotonic() - start
    daemon = int(pidfile.read_text())
    pids_to_kill.append(daemon)
    assert proc.returncode == 0
    assert not pid_alive(daemon)
    assert took < 30  # returned when the main process ended, not when the daemon would


def test_launcher_killed_with_sigkill_leaves_nothing(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    before = sandbox_cgroups()
    launcher = subprocess.Popen(
        LAUNCHER + ["--", PY, "-c", STUBBORN_TREE, str(pidfile)],
        env=launcher_env(),
        start_new_session=True,
    )
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout=20)
        tree = [int(p) for p in pidfile.read_text().split()]
        pids_to_kill += tree
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert wait_until(lambda: not [p for p in tree if pid_alive(p)], timeout=2.0)
        assert wait_until(lambda: not (sandbox_cgroups() - before), timeout=2.0)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)





@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT])
def test_signals_are_forwarded_to_the_child(signo: int) -> None:
    launcher = subprocess.Popen(
        LAUNCHER + ["--", PY, "-c", FORWARD],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == "ready\n"
        launcher.send_signal(signo)
        assert launcher.wait(timeout=10) == 40 + signo
        assert launcher.stdout.read() == f"got {signo}\n"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


def test_uncaught_forwarded_signal_gives_128_plus_n() -> None:
    launcher = subprocess.Popen(
        LAUNCHER + ["--", "sh", "-c", "echo ready; exec sleep 30"],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert launcher.stdout is not None and launcher.stdout.readline() == "ready\n"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "kill -SEGV $$"], 128 + signal.SIGSEGV),
        (["/nonexistent/program"], 127),
        (["no-such-program-anywhere"], 127),
    ],
)
def test_exit_statuses(command: list[str], expected: int) -> None:
    assert run_launcher(["-q", "--", *command]).returncode == expected


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    proc = run_launcher(["--", str(script)])
    assert proc.returncode == 126 and "Permission denied" in proc.stderr


def test_argv_environment_and_directory_pass_unchanged(tmp_path: Path) -> None:
    argv = ["", "two words", "quote'\"", "--mem", "ünïcødé", "*", "$HOME", "--"]
    code = (
        "import os, sys, json; print(json.dumps([sys.argv[1:], os.getcwd(), os.environ['MARK']]))"
    )
    proc = run_launcher(["--", PY, "-c", code, *argv], env=launcher_env(MARK="x y"), cwd=tmp_path)
    import json

    assert json.loads(proc.stdout) == [argv, str(tmp_path), "x y"]


def test_binary_stdin_and_stdout_pass_unchanged() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB with every byte value
    proc = subprocess.run(
        LAUNCHER + ["--", "cat"], input=data, capture_output=True, env=launcher_env(), timeout=30
    )
    assert proc.returncode == 0 and proc.stdout == data and proc.stderr == b""


def test_stdout_and_stderr_keep_their_order() -> None:
    code = (
        "import sys\n"
        "for i in range(2000):\n"
        "    print(i, file=sys.stderr if i % 3 else sys.stdout, flush=True)"
    )
    proc = subprocess.run(
        LAUNCHER + ["--", PY, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=launcher_env(),
        timeout=30,
        text=True,
    )
    assert proc.stdout.split() == [str(i) for i in range(2000)]





def test_a_terminal_stays_a_terminal() -> None:
    code = "import os; print(os.isatty(0), os.isatty(1), os.isatty(2))"
    status, output = run_in_terminal(LAUNCHER + ["--", PY, "-c", code])
    assert status == 0 and b"True True True" in output


COUNT_INTERRUPTS = """
import signal, time
count = [0]
signal.signal(signal.SIGINT, lambda *_: count.__setitem__(0, count[0] + 1))
print("ready", flush=True)
end = time.monotonic() + 1.5
while time.monotonic() < end:
    time.sleep(0.05)
print("interrupts", count[0], flush=True)
"""


@pytest.mark.parametrize("own_group", [False, True])
def test_a_typed_ctrl_c_reaches_the_command_once(own_group: bool) -> None:
    """The terminal sends ^C to its foreground group. A command in our group has it already
    (the launcher adds none: two SIGINTs can make tools force-quit); a command that moved to a
    group of its own gets it from the launcher."""
    code = ("import os; os.setpgid(0, 0)\n" if own_group else "") + COUNT_INTERRUPTS
    status, output = run_in_terminal(LAUNCHER + ["--", PY, "-c", code], typed=b"\x03")
    assert status == 0, output
    assert b"interrupts 1" in output


def test_nested_sandbox_inner_limit_applies(tmp_path: Path) -> None:
    inner_report = tmp_path / "inner.json"
    inner = LAUNCHER + [
        "--mem",
        "100M",
        "--report",
        str(inner_report),
        "--",
        PY,
        "-c",
        ALLOCATE.format(size=200 << 20),
    ]
    proc = run_launcher(["--mem", "1G", "--report", str(tmp_path / "outer.json"), "--", *inner])
    assert proc.returncode == 137
    inner_data, outer_data = read_report(inner_report), read_report(tmp_path / "outer.json")
    assert inner_data["reason"] == "oom"
    inner_memory = inner_data["sandbox"]["cgroups"]["memory"]  # type: ignore[index]
    outer_memory = outer_data["sandbox"]["cgroups"]["memory"]  # type: ignore[index]
    assert inner_memory.startswith(outer_memory + "/")
    assert outer_data["reason"] == "exited" and outer_data["exit_code"] == 137


def test_nested_sandbox_outer_limit_applies(tmp_path: Path) -> None:
    inner = LAUNCHER + ["--mem", "1G", "--", PY, "-c", ALLOCATE.format(size=300 << 20)]
    report = tmp_path / "outer.json"
    proc = run_launcher(["--mem", "150M", "--report", str(report), "--", *inner])
    assert proc.returncode == 137
    assert read_report(report)["reason"] == "oom"


def test_sixteen_sandboxes_at_once_leave_nothing(tmp_path: Path) -> None:
    before = sandbox_cgroups()
    launchers = [
        subprocess.Popen(
            LAUNCHER
            + [
                "--mem",
                "64M",
                "--report",
                str(tmp_path / f"{i}.json"),
                "--",
                "sh",
                "-c",
                "sleep 0.5; echo $$",
            ],
            env=launcher_env(),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in range(16)
    ]
    try:
        codes = [p.wait(timeout=60) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert codes == [0] * 16
    paths = {read_report(tmp_path / f"{i}.json")["sandbox"]["cgroups"]["memory"] for i in range(16)}  # type: ignore[index]
    assert len(paths) == 16  # unique names
    assert not (sandbox_cgroups() - before)


def test_a_later_run_removes_a_crashed_launchers_cgroup(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert run_launcher(["--report", str(report), "--", "true"]).returncode == 0
    if read_report(report)["backend"] != "cgroup":
        pytest.skip("systemd collects its own transient scopes: no cgroup of ours to sweep")
    memory_dir = Path(read_report(report)["sandbox"]["cgroups"]["memory"]).parent  # type: ignore[index]
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = memory_dir / f"aero-sandbox-{dead.pid}-0badc0"
    stale.mkdir()
    try:
        assert run_launcher(["--", "true"]).returncode == 0
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--mem", "12X", "--", "true"], "'12X'"),
        (["--mem", "-5G", "--", "true"], "'-5G'"),
        (["--timeout", "abc", "--", "true"], "'abc'"),
        (["--pids", "0", "--", "true"], "'0'"),
        ([], "no command"),
        (["--mem", "1G"], "no command"),
    ],
)
def test_bad_input_is_one_line_and_125(args: list[str], named: str) -> None:
    proc = run_launcher(args)
    assert proc.returncode == 125
    assert proc.stderr.count("\n") == 1 and named in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_report_on_every_ending(tmp_path: Path) -> None:
    for args in (
        ["--", "true"],
        ["--", "sh", "-c", "kill -KILL $$"],
        ["--timeout", "0.2", "--", "sleep", "5"],
    ):
        report = tmp_path / "r.json"
        run_launcher(["-q", "--report", str(report), *args])
        data = read_report(report)
        for key in (
            "backend",
            "exit_code",
            "signal",
            "reason",
            "wall_s",
            "cpu_s",
            "peak_memory_bytes",
            "oom_kills",
            "attempts",
            "limits",
            "sandbox",
            "backend_choice",
        ):
            assert key in data
        assert data["attempts"] == 1 and data["wall_s"] > 0
        report.unlink()
