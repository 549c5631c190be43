"""A sandbox thrashing at its memory limit ends as an OOM (137) within the pressure window, not
at the timeout; `--kill-after 0` sends SIGKILL at once.

The thrash is the one Chromium showed at --mem 150M: file pages (its own program text) that
the kernel can always drop and read back, so the OOM killer never fires. Here a program keeps
130 MiB of anonymous memory and reads an 80 MiB file it maps, in a loop, under --mem 150M.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import cgroupfs
from tests.conftest import (
    LAUNCHER,
    communicate,
    launcher_env,
    need,
    need_kernel_sandbox,
    read_report,
    run_launcher,
    wait_until,
)
from tests.host.conftest import launch_in

PY = sys.executable

THRASH = """
import mmap, os, sys
path = sys.argv[1]
with open(path, "wb") as f:
    for _ in range(80):
        f.write(os.urandom(1 << 20))
anon = bytearray(130 << 20)
anon[::4096] = b"x" * len(anon[::4096])
with open(path, "rb") as f:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("thrashing", flush=True)
while True:
    total = sum(pages[i] for i in range(0, len(pages), 4096))
"""


@pytest.fixture(autouse=True)
def cgroups_usable() -> None:
    need_kernel_sandbox()


def _psi_here() -> bool:
    try:
        with open("/proc/pressure/memory") as f:
            return "full" in f.read()
    except OSError:
        return False


def _thrash(tmp_path: Path, pressure: str, timeout: str) -> tuple[int, str, dict[str, Any]]:
    need(_psi_here(), "this kernel has no PSI (/proc/pressure/memory): no pressure watch")
    report = tmp_path / "r.json"
    args = ["--mem", "150M", "--oom-pressure", pressure, "--timeout", timeout, "--report"]
    args += [str(report), "--", PY, "-c", THRASH, str(tmp_path / "pages")]
    proc = run_launcher(args, timeout=float(timeout) + 30)
    return proc.returncode, proc.stderr, read_report(report)


def test_thrashing_at_the_limit_ends_as_oom_within_the_window(tmp_path: Path) -> None:
    code, stderr, data = _thrash(tmp_path, "15%/3s", "120")
    assert code == 137, (stderr, data)
    assert data["reason"] == "oom" and data["exit_code"] == 137
    assert data["oom_kills"] in (0, None)  # not the kernel's doing
    stall = data["memory_pressure"]
    assert stall is not None and stall["stall_pct"] >= 15 and stall["over_s"] >= 3
    assert stall["threshold_pct"] == 15 and stall["window_s"] == 3
    assert "killed for memory pressure" in stderr and "% of the last" in stderr
    # Ended within seconds of the window (the writing and the first stall take some), far
    # from the timeout.
    assert data["wall_s"] < 60, data["wall_s"]


def test_the_pressure_watch_can_be_turned_off(tmp_path: Path) -> None:
    code, stderr, data = _thrash(tmp_path, "off", "12")
    assert code == 124, (stderr, data)
    assert data["memory_pressure"] is None and data["limits"]["oom_pressure_pct"] is None


def test_a_healthy_run_is_not_touched(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code = "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"
    proc = run_launcher(["--mem", "1G", "--report", str(report), "--", PY, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert read_report(report)["memory_pressure"] is None


def test_kill_after_zero_sends_sigkill_at_once(tmp_path: Path) -> None:
    seen = tmp_path / "sigterm"
    code = (
        "import signal, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: pathlib.Path({str(seen)!r}).touch())\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = run_launcher(["--timeout", "1", "--kill-after", "0", "--", PY, "-c", code])
    assert proc.returncode == 124, proc.stderr
    assert "timed out after 1s; sent SIGKILL at once (--kill-after 0)" in proc.stderr
    assert not seen.exists()  # no SIGTERM first: 0 means no grace


def test_the_watch_costs_no_cpu_while_the_sandbox_runs_well() -> None:
    """The trigger always reads as POLLIN: polled for that directly, the launcher would spin
    (it did: sql.js took 2.5x its CPU time). It sleeps until the trigger fires."""
    need(_psi_here(), "this kernel has no PSI (/proc/pressure/memory): no pressure watch")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_launcher(["--mem", "1G", "--oom-pressure", "50%/10s", "--", "sleep", "3"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.8, f"launcher and sleep used {cpu:.2f} s of CPU in a 3 s run"


# Holds 20 MiB and rereads a 30 MiB file for 20 s: it stalls whenever a full shared limit has
# pushed its pages out, yet it fills nothing.
NEIGHBOUR = """
import os, sys, time
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(os.urandom(30 << 20))
anon = bytearray(20 << 20)
anon[::4096] = b"x" * len(anon[::4096])
end = time.monotonic() + 20
while time.monotonic() < end:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
"""


def test_only_the_sandbox_that_fills_a_shared_limit_is_ended_for_pressure(
    tmp_path: Path, shared_parent: str
) -> None:
    """Two sandboxes, --mem 1G each, under one 200M parent: A thrashes it, B only stalls beside
    A. Each launcher watches its own sandbox's stall; deciding on that alone ended both (a full
    budget lost 32 of 40 jobs so in bench/crowd.py). A, holding most of the parent, ends as oom;
    B runs to its end."""
    need(_psi_here(), "this kernel has no PSI (/proc/pressure/memory): no pressure watch")
    cgroupfs.write(shared_parent + "/memory.limit_in_bytes", str(200 << 20))

    def start(name: str, code: str) -> subprocess.Popen[bytes]:
        argv = ["--mem", "1G", "--oom-pressure", "15%/3s", "--timeout", "90"]
        argv += ["--report", str(tmp_path / f"{name}.json"), "--", PY, "-c", code]
        return launch_in(shared_parent, [*argv, str(tmp_path / f"{name}.pages")])

    b = start("b", NEIGHBOUR)
    try:
        a = start("a", THRASH)
        try:
            assert a.wait(120) == 137
        finally:
            a.kill()
        assert b.wait(60) == 0
    finally:
        b.kill()
    a_data, b_data = read_report(tmp_path / "a.json"), read_report(tmp_path / "b.json")
    assert a_data["reason"] == "oom" and a_data["memory_pressure"] is not None, a_data
    assert b_data["reason"] == "exited" and b_data["memory_pressure"] is None, b_data


def _pressure_fds(pid: int) -> list[str]:
    """The launcher's open memory.pressure files (a PSI trigger is one)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("/memory.pressure"):
            found.append(target)
    return found


def test_the_trigger_is_made_only_once_the_command_has_run_a_while() -> None:
    """Closing a PSI trigger waits for an RCU grace period (4-20 ms): a short command's run
    never makes one; a longer one gets it after PRESSURE_ARM_AFTER_S."""
    need(_psi_here(), "this kernel has no PSI (/proc/pressure/memory): no pressure watch")
    from sandbox.backends.cgroup import PRESSURE_ARM_AFTER_S

    proc = subprocess.Popen(
        [*LAUNCHER, "--mem", "1G", "--", "sleep", str(PRESSURE_ARM_AFTER_S + 2)],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        early = []
        deadline = time.monotonic() + PRESSURE_ARM_AFTER_S * 0.5
        while time.monotonic() < deadline:
            early += _pressure_fds(proc.pid)
            time.sleep(0.02)
        assert early == []
        assert wait_until(lambda: _pressure_fds(proc.pid), timeout=PRESSURE_ARM_AFTER_S + 1.5)
    finally:
        done = communicate(proc, 30)
    assert done.returncode == 0, done.stderr
