"""Faults around a run that must not hide what the command did, and OOMs that must hit only the
sandbox the kernel chose (issues 10.5, 11.1, 11.5, 11.8). Real processes, real cgroups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.cgroups import cgroupfs
from sandbox.core import procfs
from tests.conftest import (
    LAUNCHER,
    ROOT,
    launcher_env,
    need_kernel_sandbox,
    pid_alive,
    read_report,
    run_launcher,
    sandbox_cgroups,
    wait_until,
)
from tests.host.conftest import launch_in
from tests.programs import ALLOCATE

PY = os.environ.get("AERO_TEST_PYTHON", "/usr/bin/python3")
if not os.path.exists(PY):
    PY = sys.executable


def test_a_closed_stderr_keeps_the_status_and_leaves_nothing(tmp_path: Path) -> None:
    """`2>&-`: the next fd the launcher opened (an eventfd) took number 2 and its first -v line
    was written into it: exit 1 and the sandbox's cgroups left behind. Now its lines go nowhere,
    the command still finds fd 2 closed, and the sandbox is removed."""
    report = tmp_path / "r.json"
    code = "import os, sys\ntry:\n    os.fstat(2)\nexcept OSError:\n    sys.exit(7)"
    proc = subprocess.run(
        [*LAUNCHER, "-v", "--report", str(report), "--", PY, "-c", code],
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(2),
        timeout=60,
    )
    assert proc.returncode == 7  # the command's own status: it found fd 2 closed
    assert read_report(report)["reason"] == "exited"


GUARDIAN_KILLER = """
import os, signal, sys
launcher = os.getppid()
with open(f"/proc/{launcher}/cmdline", "rb") as f:
    its_cmdline = f.read()
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in (os.getpid(), launcher):
        continue
    try:
        with open(f"/proc/{name}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{name}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        continue
    if ppid == launcher and cmdline == its_cmdline:  # the guardian: a fork of the launcher
        os.kill(int(name), signal.SIGKILL)
        sys.exit(3)
sys.exit(99)
"""


def test_a_guardian_killed_from_inside_keeps_the_status(tmp_path: Path) -> None:
    """The command kills its launcher's guardian: tear-down's write to it raised EPIPE (exit 1,
    no report). Now: the command's status, one line, and the report's cleanup_error."""
    report = tmp_path / "r.json"
    proc = run_launcher(["--report", str(report), "--", PY, "-c", GUARDIAN_KILLER])
    assert proc.returncode == 3, proc.stderr
    data = read_report(report)
    assert data["reason"] == "exited" and data["exit_code"] == 3
    assert "guardian" in str(data["cleanup_error"])
    assert "guardian" in proc.stderr and "died during the run" in proc.stderr


def test_a_normal_run_reports_no_cleanup_error(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert run_launcher(["--report", str(report), "--", "true"]).returncode == 0
    assert read_report(report)["cleanup_error"] is None


PIN = """
import os, subprocess
line = next(l for l in open("/proc/self/cgroup").read().splitlines() if l.split(":")[1] == "memory")
sub = "/sys/fs/cgroup/memory" + line.split(":", 2)[2] + "/pinned"
os.mkdir(sub)
subprocess.run(["mount", "-t", "tmpfs", "none", sub], check=True)
print(sub)
"""


def test_a_sandbox_that_cannot_be_removed_keeps_the_status(tmp_path: Path) -> None:
    """The command mounts a tmpfs on a cgroup of its own: rmdir fails (EBUSY) after the command
    exited 0. That was exit 125; BenchExec only warns, and so do we (cleanup_error)."""
    # Properties of this run, not capabilities the host lacks: skipped, never failed.
    if os.geteuid() != 0:
        pytest.skip("root only: mounts a tmpfs inside the sandbox's cgroup")
    if not _v1_memory():
        pytest.skip("a v1 memory controller (the test finds its cgroup by that line)")
    report = tmp_path / "r.json"
    proc = run_launcher(["--backend", "cgroup", "--report", str(report), "--", PY, "-c", PIN])
    pinned = proc.stdout.strip()
    try:
        assert proc.returncode == 0, proc.stderr
        data = read_report(report)
        assert data["reason"] == "exited"
        assert "could not remove the cgroup" in str(data["cleanup_error"])
        assert proc.stderr.count("could not remove the cgroup") == 1
    finally:
        if pinned:
            subprocess.run(["umount", pinned], check=False)
            os.rmdir(pinned)
            os.rmdir(os.path.dirname(pinned))


def _v1_memory() -> str | None:
    """Our own v1 memory cgroup's directory, None where memory is not a v1 controller."""
    found = (h.own for h in cgroupfs.discover() if h.version == 1 and "memory" in h.controllers)
    return next(found, None)


def test_an_oom_in_a_shared_parent_kills_only_the_sandbox_it_hit(
    tmp_path: Path, shared_parent: str
) -> None:
    """A holds 100M, B grows to 400M: their shared 300M parent runs out, the kernel kills B's
    process. v1 wakes both launchers; A used to kill itself too (reason oom, oom_kills 0)."""
    hold = ALLOCATE.format(size=100 << 20) + "; import time; time.sleep(4)"
    grow = ALLOCATE.format(size=400 << 20)

    def start(name: str, code: str) -> subprocess.Popen[bytes]:
        report = tmp_path / f"{name}.json"
        return launch_in(
            shared_parent, ["--mem", "1G", "--report", str(report), "--", PY, "-c", code]
        )

    a = start("a", hold)
    try:
        time.sleep(1.5)  # A holds its 100M
        b = start("b", grow)
        try:
            assert b.wait(60) == 137
        finally:
            b.kill()
        assert a.wait(60) == 0
    finally:
        a.kill()
    a_data, b_data = read_report(tmp_path / "a.json"), read_report(tmp_path / "b.json")
    assert a_data["reason"] == "exited" and a_data["oom_kills"] == 0
    assert b_data["reason"] == "oom" and (b_data["oom_kills"] or 0) >= 1


def test_an_oom_storm_counts_every_kill(tmp_path: Path) -> None:
    """Twelve sandboxes run out of memory at once: every report says oom with the kernel's kill
    counted (v1's eventfd fires before the kernel picks its victim; bench/oom_storm.py runs the
    3 x 40 version)."""
    need_kernel_sandbox()
    grow = ALLOCATE.format(size=200 << 20)
    procs = []
    for i in range(12):
        argv = [*LAUNCHER, "--mem", "64M", "--report", str(tmp_path / f"{i}.json")]
        procs.append(
            subprocess.Popen(
                [*argv, "--", PY, "-c", grow],
                env=launcher_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        codes = [proc.wait(120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    reports = [read_report(tmp_path / f"{i}.json") for i in range(12)]
    assert codes == [137] * 12
    assert [r["reason"] for r in reports] == ["oom"] * 12
    assert all((r["oom_kills"] or 0) >= 1 for r in reports), [r["oom_kills"] for r in reports]


# -- the caller's signal dispositions (issue 11.15) ----------------------------------------------
@pytest.fixture(scope="module")
def native_entry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bin/aero-sandbox.c built as scripts/native-entry builds it, in front of this checkout's
    Python entry script (PYTHONPATH, from launcher_env, finds this checkout's package)."""
    gcc = shutil.which("gcc")
    if gcc is None:  # a property of the install, not of the kernel: README says what changes
        pytest.skip("no C compiler: the native entry cannot be built, the Python entry stays")
    binary = str(tmp_path_factory.mktemp("entry") / "aero-sandbox")
    defines = [
        f'-DPYTHON="{sys.executable}"',
        f'-DSCRIPT="{ROOT / "bin" / "aero-sandbox"}"',
        f'-DENTRY="{binary}"',
    ]
    source = str(ROOT / "bin" / "aero-sandbox.c")
    warnings = ["-Wall", "-Wextra", "-Werror"]
    subprocess.run([gcc, "-O2", *warnings, *defines, "-o", binary, source], check=True, timeout=120)
    return binary


SHOW = "grep SigIgn /proc/self/status; env | grep -c AERO_SANDBOX_CALLER || true"


@pytest.mark.parametrize("backend", ["auto", "rlimit"])
@pytest.mark.parametrize("caller", ["ignores SIGPIPE", "default SIGPIPE", "stale variable"])
def test_a_callers_ignored_sigpipe_stays_ignored_in_the_command(
    native_entry: str, backend: str, caller: str
) -> None:
    """Python ignores SIGPIPE before any of its code runs; the native entry tells the launcher
    what the caller had. The command gets the caller's disposition, never the variable; a value
    the caller's environment already held (an outer launcher's caller's) does not count."""
    ignores = caller == "ignores SIGPIPE"
    stale = {"AERO_SANDBOX_CALLER_IGNORES": "PIPE,XFSZ"} if "stale" in caller else {}
    mask, count = sigign_of_a_command(native_entry, backend, ignores, launcher_env(**stale))
    assert bool(mask & (1 << (signal.SIGPIPE - 1))) == ignores, hex(mask)
    assert not mask & (1 << (signal.SIGXFSZ - 1)), "SIGXFSZ is not the caller's"
    assert count == "0", "the variable reached the command"


@pytest.mark.parametrize("backend", ["cgroup", "rlimit"])
def test_the_spawned_guardian_cleans_up_after_a_sigkilled_launcher(
    native_entry: str, backend: str
) -> None:
    """Behind the native entry the guardian is that binary, spawned: SIGKILL the launcher while
    its command and a setsid daemon of it run, and the guardian kills both and removes the
    cgroups (it execs the Python entry to do so, with what the launcher wrote it; the rlimit
    backend's shared memory comes as an fd)."""
    if backend == "cgroup":
        if os.geteuid() != 0:  # a property of this test run: others need a delegated cgroup
            pytest.skip("root only: --backend cgroup below the launcher's own cgroup")
        need_kernel_sandbox()
    command = "setsid sleep 300 & exec sleep 301"
    proc = subprocess.Popen(
        [native_entry, "--backend", backend, "--", "sh", "-c", command],
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    tree: list[int] = []
    try:
        ours = f"aero-sandbox-{proc.pid}-"

        def mine() -> set[str]:
            return {c for c in sandbox_cgroups() if os.path.basename(c).startswith(ours)}

        def sleepers() -> list[int]:
            return [pid for pid in procfs.pids() if _sleeper(pid)]

        assert wait_until(lambda: len(sleepers()) == 2, timeout=30), proc.stderr
        cgroups, tree = mine(), sleepers()
        assert bool(cgroups) == (backend == "cgroup"), cgroups
        guardian = next(
            pid
            for pid in procfs.pids()
            if _argv0(pid) == GUARDIAN and getattr(procfs.stat(pid), "ppid", 0) == proc.pid
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(map(pid_alive, tree)), timeout=10), tree
        assert wait_until(lambda: not any(os.path.exists(c) for c in cgroups), timeout=10), cgroups
        assert wait_until(lambda: not pid_alive(guardian), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=15)
        for pid in tree:  # what a failing guardian left (the setsid daemon outlives the group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _sleeper(pid: int) -> bool:
    """One of this test's sleeps (sleep 300 or 301), started by a launcher of this test run (its
    environment carries launcher_env()'s path)."""
    argv = procfs.read(f"/proc/{pid}/cmdline")
    if argv not in (b"sleep\0" + b"300\0", b"sleep\0" + b"301\0"):
        return False
    return str(ROOT).encode() in (procfs.read(f"/proc/{pid}/environ") or b"")


GUARDIAN = b"aero-sandbox-guardian"  # its argv[0] (its comm is the binary's file name)


def _argv0(pid: int) -> bytes:
    return (procfs.read(f"/proc/{pid}/cmdline") or b"").split(b"\0")[0]


def test_the_installed_entry_keeps_an_ignored_sigpipe() -> None:
    """What scripts/install (scripts/native-entry) put beside the venv's python."""
    entry = Path(sys.executable).parent / "aero-sandbox"
    if not entry.exists() or entry.read_bytes()[:4] != b"\x7fELF":
        pytest.skip(f"{entry} is not the native entry (installed without a C compiler)")
    mask, count = sigign_of_a_command(str(entry), "auto", True, launcher_env())
    assert mask & (1 << (signal.SIGPIPE - 1)) and count == "0", hex(mask)


def sigign_of_a_command(
    entry: str, backend: str, ignore_pipe: bool, env: dict[str, str]
) -> tuple[int, str]:
    """The command's SigIgn mask and how many AERO_SANDBOX_CALLER_* variables it saw, when its
    caller has SIGPIPE ignored or at default (SIGXFSZ at default: pytest's Python ignores both)."""
    disposition = signal.SIG_IGN if ignore_pipe else signal.SIG_DFL

    def callers_dispositions() -> None:
        signal.signal(signal.SIGPIPE, disposition)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

    proc = subprocess.run(
        [entry, "--backend", backend, "--", "sh", "-c", SHOW],
        env=env,
        capture_output=True,
        text=True,
        restore_signals=False,
        preexec_fn=callers_dispositions,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    mask, count = proc.stdout.split()[1:]
    return int(mask, 16), count
