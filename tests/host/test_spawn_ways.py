"""The three ways a command is started (sandbox/run/spawn.py) give it the same start.

    native   the C module's clone that shares the launcher's memory (sandbox/core/syscalls.c)
    ctypes   no C module: a fork born in the v2 cgroup through _ctypes' clone3
    fork     no C module and no clone3 (seccomp, Linux < 5.7): os.fork, then cgroup.procs

Each test runs the launcher in a fresh Python told which way to take (DRIVER); every other
host test takes the way an installed launcher takes here (native where scripts/install built
the module).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandbox.core import linux
from sandbox.core.errors import SandboxError
from sandbox.run.spawn import spawn
from tests.conftest import launcher_env, need_kernel_sandbox

WAYS = ("native", "ctypes", "fork")
DRIVER = """
import sys
way = sys.argv[1]
if way != "native":
    sys.modules["sandbox.core._syscalls"] = None  # as where it was never built
from sandbox.backends import cgroup
from sandbox.cli import exit_now, main
if way == "fork":
    cgroup._clone_into_works.clear()
exit_now(main(sys.argv[2:]))
"""


def launch(way: str, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    if way == "native" and linux.native_spawn is None:
        pytest.skip("sandbox/core/_syscalls is not built (scripts/install builds it with gcc)")
    return subprocess.run(
        [sys.executable, "-c", DRIVER, way, *args],
        env=launcher_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def cgroup_args() -> list[str]:
    if os.geteuid() != 0:  # others need a delegated cgroup, which the other host tests use
        pytest.skip("root only: --backend cgroup below the launcher's own cgroup")
    need_kernel_sandbox()
    return ["--backend", "cgroup", "--mem", "256M", "--"]


@pytest.mark.parametrize("way", WAYS)
def test_the_command_starts_in_every_cgroup_of_its_sandbox(way: str) -> None:
    """Born in the v2 cgroup or moved in: either way the command is in the sandbox's cgroup of
    every hierarchy it uses before it runs."""
    proc = launch(way, [*cgroup_args(), "cat", "/proc/self/cgroup"])
    assert proc.returncode == 0, proc.stderr
    placed = {}
    for line in proc.stdout.splitlines():
        _, controllers, path = line.split(":", 2)
        placed[controllers] = os.path.basename(path)
    used = [c for c in ("", "memory", "pids") if c in placed]
    names = {placed[c] for c in used}
    assert len(names) == 1 and names.pop().startswith("aero-sandbox-"), proc.stdout


@pytest.mark.parametrize("way", WAYS)
def test_signals_arrive_as_the_caller_left_them(way: str) -> None:
    """No signal blocked, none caught; SIGPIPE and SIGXFSZ ignored only where the caller had
    them ignored (the native entry says so in AERO_SANDBOX_CALLER_IGNORES)."""
    show = ["sh", "-c", "grep -E '^Sig(Blk|Ign|Cgt)' /proc/self/status"]
    default = launch(way, [*cgroup_args(), *show])
    kept = launch(way, [*cgroup_args(), *show], AERO_SANDBOX_CALLER_IGNORES="PIPE,XFSZ")
    for proc in (default, kept):
        assert proc.returncode == 0, proc.stderr
    fields = [dict(line.split(":\t") for line in p.stdout.splitlines()) for p in (default, kept)]
    pipe_and_xfsz = (1 << (13 - 1)) | (1 << (25 - 1))
    assert int(fields[0]["SigBlk"], 16) == 0 and int(fields[1]["SigBlk"], 16) == 0
    assert int(fields[0]["SigIgn"], 16) & pipe_and_xfsz == 0, fields[0]
    assert int(fields[1]["SigIgn"], 16) & pipe_and_xfsz == pipe_and_xfsz, fields[1]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("program", "code", "why"),
    [
        ("no-such-program-here", 127, "No such file or directory"),
        ("/etc/passwd", 126, "Permission denied"),
        ("/no/such/dir/program", 127, "No such file or directory"),
    ],
)
def test_what_cannot_be_run_is_told_apart(way: str, program: str, code: int, why: str) -> None:
    proc = launch(way, [*cgroup_args(), program])
    assert proc.returncode == code, proc.stderr
    assert f"cannot run {program!r}: {why}" in proc.stderr


@pytest.mark.parametrize("way", WAYS)
def test_a_file_without_an_interpreter_line_is_no_shell_script(way: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ENOEXEC is reported (126), as by the forking spawn: no execvp(3)-style retry with sh."""
    script = tmp_path / "no-shebang"
    script.write_text("echo ran\n")
    script.chmod(0o755)
    proc = launch(way, [*cgroup_args(), str(script)])
    assert proc.returncode == 126, (proc.stdout, proc.stderr)
    assert "ran" not in proc.stdout and "Exec format error" in proc.stderr


@pytest.mark.parametrize("way", WAYS)
def test_the_rlimit_backend_sets_its_limits_nice_and_marker(way: str) -> None:
    show = "ulimit -v; echo ${AERO_SANDBOX_TREE:-none}; cut -d' ' -f19 /proc/self/stat"
    proc = launch(way, ["--backend", "rlimit", "--mem", "1G", "--", "sh", "-c", show])
    assert proc.returncode == 0, proc.stderr
    address_space, marker, nice = proc.stdout.split()
    assert address_space != "unlimited" and int(address_space) >= 1024 * 1024, proc.stdout
    assert marker.startswith("aero-sandbox-"), proc.stdout
    assert int(nice) == os.getpriority(os.PRIO_PROCESS, 0)  # the caller's, not the watchdog's


def test_a_sandbox_file_that_does_not_open_starts_nothing_and_keeps_no_fd() -> None:
    """The native way opens the v1 `tasks` files before its clone: one that is gone (the cgroup
    removed meanwhile) is the launcher's error (125), with no child and no fd left open."""
    if linux.native_spawn is None:
        pytest.skip("sandbox/core/_syscalls is not built (scripts/install builds it with gcc)")

    class GoneCgroup:
        def child_plan(self) -> linux.ChildSetup:
            return linux.ChildSetup(joins=("/sys/fs/cgroup/no-such-aero-sandbox-cgroup/tasks",))

    before = fds_and_children()
    with pytest.raises(SandboxError, match="could not place the command in the sandbox"):
        spawn(["true"], GoneCgroup(), set())  # type: ignore[arg-type]
    assert fds_and_children() == before


def fds_and_children() -> tuple[list[str], str]:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return sorted(os.listdir("/proc/self/fd")), f.read()
