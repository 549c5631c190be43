"""Shared test helpers.

The launcher is always run as a real subprocess (`python -m sandbox` from this checkout): click's
CliRunner cannot see a child process's output, and only a real process tree tests the kernel.
A test that needs a capability the host lacks is skipped with the reason; with
AERO_REQUIRE_CAPABILITIES=1 (the VM stage) such a skip is a failure instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, "-m", "sandbox"]
REQUIRE_ALL = os.environ.get("AERO_REQUIRE_CAPABILITIES") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (or, where every capability is required, fail) unless `condition` holds."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"missing capability (required here): {reason}")
    pytest.skip(reason)


def launcher_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AERO_") or k.startswith("AERO_TEST")
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_launcher(
    args: list[str], timeout: float = 60, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run aero-sandbox to the end, bounded; on overrun kill its whole process group."""
    proc = subprocess.Popen(
        LAUNCHER + args,
        env=env or launcher_env(),
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        text=kwargs.pop("text", True),
        start_new_session=True,
        **kwargs,  # type: ignore[arg-type]
    )
    return communicate(proc, timeout)


def communicate(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Wait for a launcher started in its own session, bounded; on overrun kill its group."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_report(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def sandbox_cgroups() -> set[str]:
    """Every aero-sandbox cgroup on the host (any hierarchy)."""
    found = set()
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):
        for name in dirs:
            if name.startswith("aero-sandbox-"):
                found.add(os.path.join(top, name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_in_terminal(
    argv: list[str],
    typed: bytes = b"",
    after: bytes = b"ready",
    rows: int = 40,
    cols: int = 100,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """Run argv as the foreground job of a new rows x cols pseudo-terminal, bounded; type
    `typed` once `after` shows. Returns (exit status, everything the terminal showed)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.environ.update(launcher_env())
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            if typed and after in output + chunk and after not in output:
                os.write(fd, typed)
            output += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # its guardian removes the sandbox
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output


_kernel_sandbox: tuple[bool, str] | None = None


def need_kernel_sandbox() -> None:
    """Skip unless `auto` enforces limits in the kernel here (a cgroup or a systemd scope, not
    the rlimit fallback): root on the development machine, anyone in the VM stage."""
    global _kernel_sandbox
    if _kernel_sandbox is None:
        probe = run_launcher(["--report", "/dev/stdout", "-q", "--", "true"], timeout=30)
        usable = probe.returncode == 0 and '"backend": "rlimit"' not in probe.stdout
        _kernel_sandbox = (usable, f"no cgroup or systemd backend here: {probe.stderr.strip()}")
    need(*_kernel_sandbox)


@pytest.fixture
def pids_to_kill():
    """Pids a test learned of (daemons it made); any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
