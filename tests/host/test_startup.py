"""What the start-up shortcuts must not break (speed itself is measured by bench/launch.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox.cgroups import warmup
from sandbox.core import linux
from tests.conftest import launcher_env, run_launcher

PY = sys.executable


def test_the_warm_up_thread_takes_no_signal() -> None:
    """Started before the supervisor blocks SIGCHLD, a thread with signals unblocked could be
    handed the child's SIGCHLD, which Python drops: the launcher then waits forever."""
    if os.geteuid() != 0:
        pytest.skip("root only: the warm-up writes a cgroup.procs file")
    before = set(os.listdir("/proc/self/task"))
    mask = signal.pthread_sigmask(signal.SIG_SETMASK, [])  # as a shell starts the launcher
    try:
        warmup.start()
        threads: list[str] = []
        for _ in range(200):
            threads = sorted(set(os.listdir("/proc/self/task")) - before)
            if threads:
                break
            time.sleep(0.001)
        masks = [m for m in map(_settled_mask, threads) if m is not None]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if not masks:
        pytest.skip("the warm-up found no cgroup.procs to write here (or it already ended)")
    for blocked in masks:
        for signo in (1, 2, 3, 10, 12, 15, 17):  # HUP INT QUIT USR1 USR2 TERM CHLD
            assert blocked & (1 << (signo - 1)), (signo, hex(blocked))


def _settled_mask(thread: str) -> int | None:
    """The thread's blocked signals once it waits in its write (while glibc starts a thread,
    it briefly blocks every signal); None if it ended first."""
    for _ in range(200):
        try:
            with open(f"/proc/self/task/{thread}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
        except FileNotFoundError:
            return None
        if not fields["State"].strip().startswith("R"):
            return int(fields["SigBlk"], 16)
        time.sleep(0.001)
    return None


def test_quick_commands_in_a_row_all_end() -> None:
    """Each run's SIGCHLD reaches the supervisor (a lost one is a launcher that never ends)."""
    for _ in range(30):
        proc = run_launcher(["-q", "--mem", "256M", "--", "true"], timeout=30)
        assert proc.returncode == 0, proc.stderr


def test_closed_output_streams_exit_cleanly() -> None:
    """Python sets sys.stdout to None when fd 1 is closed at start: nothing to flush at exit."""
    proc = subprocess.run(
        [PY, "-m", "sandbox", "-q", "--", "true"],
        env=launcher_env(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        timeout=60,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_installed_entry_reads_its_bundle_and_passes_on_no_fd_of_it() -> None:
    """scripts/install's bundle (sandbox/bundle.py): the entry serves our modules from it, and
    the file it keeps open is close-on-exec: the command has only the fds its caller gave."""
    bin_dir = os.path.dirname(sys.executable)
    entry = os.path.join(bin_dir, "aero-sandbox")
    if not os.path.exists(os.path.join(bin_dir, "aero-sandbox.bundle")):
        pytest.skip(f"no bundle beside {entry} (installed by pip alone, not scripts/install)")
    proc = subprocess.run(
        [entry, "--", "sh", "-c", "ls /proc/$$/fd"],
        env=launcher_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        close_fds=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split(), key=int) == ["0", "1", "2"], proc.stdout
    script = os.path.join(bin_dir, "aero-sandbox.py")
    script = script if os.path.exists(script) else entry  # without the native entry
    verbose = subprocess.run(  # -v: Python names each .pyc it loads
        [sys.executable, "-S", "-v", script, "--", "true"],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verbose.returncode == 0, verbose.stderr
    loaded = [
        line
        for line in verbose.stderr.splitlines()
        if line.startswith("# code object from") and ("/sandbox/" in line or "/fallback/" in line)
    ]
    # The package and the bundle module itself, found the usual way; the rest from the bundle.
    assert len(loaded) == 2, loaded
    doctor = subprocess.run(
        [entry, "doctor", "--json"], env=launcher_env(), capture_output=True, timeout=60
    )
    check = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "start-up")
    assert check["details"] == {"native_spawn": linux.native_spawn is not None, "bundle": True}
