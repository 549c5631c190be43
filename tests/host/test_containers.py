"""aero-sandbox as a container's entrypoint, and inside a container's cgroup, on this machine.

A container is played with namespaces: `unshare --pid --fork --mount-proc` makes the launcher
PID 1; `unshare --cgroup --mount` with the cgroup hierarchies mounted afresh inside makes a
private cgroup namespace whose root is a cgroup we made for the test (the container's own
cgroup), writable or remounted read-only (Docker's default for unprivileged containers).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.backends.cgroup import READ_ONLY_REMEDY
from sandbox.backends.selection import systemd_running
from sandbox.cgroups import cgroupfs
from sandbox.core import identity
from tests.conftest import LAUNCHER, launcher_env, need, wait_until
from tests.host.conftest import is_root
from tests.programs import FORWARD, ORPHANS

PY = sys.executable

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/bin/unshare") and not os.path.exists("/bin/unshare"),
    reason="needs unshare (util-linux)",
)

def unshare_pid(args: list[str]) -> list[str]:
    return ["unshare", "--pid", "--fork", "--mount-proc", *LAUNCHER, *args]


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=launcher_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(autouse=True)
def root_only() -> None:
    # A property of this test run, not a capability the host lacks: a plain skip.
    if not is_root():
        pytest.skip("root only: making pid and cgroup namespaces needs root")


# -- PID 1 ------------------------------------------------------------------------------------
# auto is the cgroup backend on the development host; in the VM stage it may be rlimit, when the
# pid namespace shares a v2 cgroup with the host (test_pid_namespace_sharing_its_cgroup_...).
# rlimit is also what a container with a read-only cgroupfs gets.
BACKENDS = ["auto", "rlimit"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pid1_reaps_orphans_and_exits_with_the_childs_status(backend: str) -> None:
    proc = run(unshare_pid(["--backend", backend, "--", PY, "-c", ORPHANS]))
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.split() == ["parent", "1", "zombies", "0"], proc.stdout


def test_subreaper_reaps_orphans_when_not_pid1() -> None:
    proc = run([*LAUNCHER, "--", PY, "-c", ORPHANS])
    assert proc.returncode == 7, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "parent" and words[1] != "1" and words[2:] == ["zombies", "0"]


@contextlib.contextmanager
def started(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A background process, killed (its whole session) if the test leaves it running."""
    proc = subprocess.Popen(
        argv,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def ns_child(unshare_pid: int) -> int:
    """The host pid of unshare's child: the process that is PID 1 in the new namespace."""
    path = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
    assert wait_until(lambda: path.read_text().split(), timeout=10)
    return int(path.read_text().split()[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pid1_forwards_sigterm_from_outside_like_docker_stop(backend: str) -> None:
    with started(unshare_pid(["--backend", backend, "--", PY, "-c", FORWARD])) as proc:
        assert read_line(proc) == "ready\n"
        launcher = ns_child(proc.pid)
        os.kill(launcher, signal.SIGTERM)
        proc.wait(timeout=20)
        assert proc.returncode == 40 + signal.SIGTERM, proc.stderr and proc.stderr.read()


def test_pid1_forwards_sigterm_sent_from_inside_the_namespace() -> None:
    """`kill 1` inside a container: PID 1 has no default actions, yet the signal is forwarded."""
    code = FORWARD.replace('print("ready", flush=True)', "import os; os.kill(1, 15)")
    proc = run(unshare_pid(["--", PY, "-c", code]), timeout=30)
    assert proc.returncode == 40 + signal.SIGTERM, proc.stderr


def test_pid1_child_killed_by_a_signal_gives_128_plus_n() -> None:
    proc = run(unshare_pid(["--", "sh", "-c", "kill -USR1 $$"]))
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr
    assert "SIGUSR1" in proc.stderr


# -- a container's own cgroup -----------------------------------------------------------------
def used_hierarchies() -> list[cgroupfs.Hierarchy]:
    return [h for h in cgroupfs.discover() if h.version == 2 or h.controllers & {"memory", "pids"}]


def _delegates_memory(hierarchies: list[cgroupfs.Hierarchy]) -> bool:
    """Whether a cgroup made below our own gets the memory controller."""
    return any(
        (h.version == 1 and "memory" in h.controllers)
        or (h.version == 2 and "memory" in cgroupfs.read_words(h.own + "/cgroup.subtree_control"))
        for h in hierarchies
    )


@contextlib.contextmanager
def delegated() -> Iterator[list[tuple[cgroupfs.Hierarchy, str]]]:
    """(hierarchy, directory) pairs below which the test makes cgroups with memory and pids.

    Our own cgroups where that works (this hybrid host: v1 memory and pids reach any child).
    On pure v2 with our own cgroup holding processes (a service, as in the VM stage) it cannot
    give controllers to a child: there, a scope systemd delegates to us (Delegate=yes), its
    holder process moved into a leaf so that the scope may enable memory and pids.
    """
    hierarchies = used_hierarchies()
    if _delegates_memory(hierarchies):
        yield [(h, h.own) for h in hierarchies]
        return
    v2 = next((h for h in hierarchies if h.version == 2), None)
    need(
        v2 is not None and systemd_running() and shutil.which("systemd-run") is not None,
        "no cgroup below ours gets the memory controller, and no systemd to delegate one",
    )
    assert v2 is not None
    name = f"aero-test-holder-{os.getpid()}-{os.urandom(2).hex()}"
    holder = subprocess.Popen(
        ["systemd-run", "--quiet", "--scope", "-p", "Delegate=yes", "--unit", name]
        + ["sleep", "300"]
    )
    leaf = None
    try:

        def scope() -> str | None:
            try:
                text = Path(f"/proc/{holder.pid}/cgroup").read_text()
            except OSError:
                return None
            path = next((x[3:] for x in text.splitlines() if x.startswith("0::")), "")
            return path if path.endswith(f"/{name}.scope") else None

        assert wait_until(lambda: scope() is not None, timeout=20), "no delegated scope"
        base = os.path.normpath(f"{v2.mount}/{scope()}")
        leaf = f"{base}/holder"
        os.mkdir(leaf)
        cgroupfs.write(f"{leaf}/cgroup.procs", str(holder.pid))
        cgroupfs.write(f"{base}/cgroup.subtree_control", "+memory +pids")
        yield [(v2, base)]
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if leaf is not None:
            remove_cgroup_tree(leaf)


@contextlib.contextmanager
def container_cgroups() -> Iterator[list[tuple[cgroupfs.Hierarchy, str]]]:
    """One new cgroup in each hierarchy the launcher uses: the container's own cgroup."""
    name = f"aero-test-ctr-{os.getpid()}-{os.urandom(2).hex()}"
    made: list[tuple[cgroupfs.Hierarchy, str]] = []
    with delegated() as bases:
        try:
            for hierarchy, base in bases:
                path = os.path.join(base, name)
                os.mkdir(path)
                made.append((hierarchy, path))
            yield made
        finally:
            for _hierarchy, path in made:
                remove_cgroup_tree(path)


def remove_cgroup_tree(path: str) -> None:
    deadline = time.monotonic() + 10
    for top, _dirs, _files in os.walk(path, topdown=False):
        while True:
            try:
                os.rmdir(top)
                break
            except FileNotFoundError:  # systemd removed a scope's tree itself
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def has_memory(made: list[tuple[cgroupfs.Hierarchy, str]]) -> bool:
    for hierarchy, path in made:
        if hierarchy.version == 1 and "memory" in hierarchy.controllers:
            return True
        if hierarchy.version == 2 and "memory" in cgroupfs.read_words(path + "/cgroup.controllers"):
            return True
    return False


# The container runtime, played in Python: the parent joins the container's cgroups, makes a
# pid namespace and forks the container's PID 1, then leaves the container's cgroups again, as
# a runtime's own processes do (on cgroup v2 the container's init must be able to move every
# process of the container's cgroup into a leaf). The child waits for that, then makes its
# cgroup namespace (rooted at the container's cgroup) and mount namespace, and runs the script.
RUNTIME = r"""
import ctypes, os, sys
NEWNS, NEWCGROUP, NEWPID = 0x00020000, 0x02000000, 0x20000000
libc = ctypes.CDLL(None, use_errno=True)
def unshare(flags):
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
def move(directories, pid):
    for directory in directories:
        with open(directory + "/cgroup.procs", "w") as f:
            f.write(str(pid))
join, leave, script = sys.argv[1].split("\n"), sys.argv[2].split("\n"), sys.argv[3]
move(join, os.getpid())
unshare(NEWPID)
ready, go = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go)
    os.read(ready, 1)
    unshare(NEWCGROUP | NEWNS)
    os.execvp("sh", ["sh", "-c", script])
os.close(ready)
move(leave, os.getpid())
os.close(go)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
sys.exit(code if code >= 0 else 128 - code)
"""


def in_container(
    made: list[tuple[cgroupfs.Hierarchy, str]], script: str, read_only: bool = False
) -> list[str]:
    """argv that runs `script` as PID 1 of a container whose own cgroups are `made`: private
    pid, mount and cgroup namespaces, each hierarchy mounted afresh (its root is the
    container's cgroup), read-only if asked (Docker's default)."""
    # Private first: on a systemd host / is a shared mount, and an umount would reach the host.
    steps = ["mount --make-rprivate /", "mount -t proc proc /proc"]
    for hierarchy, _path in made:
        mount = hierarchy.mount
        kind = (
            "-t cgroup2"
            if hierarchy.version == 2
            else f"-t cgroup -o {','.join(sorted(hierarchy.controllers))}"
        )
        steps.append(f"umount -l {mount} && mount {kind} none {mount}")
        if read_only:
            steps.append(f"mount -o remount,bind,ro {mount}")
    inner = " && ".join([*steps, f"exec {script}"])
    join = "\n".join(path for _h, path in made)
    leave = "\n".join(h.own for h in used_hierarchies())
    return [PY, "-c", RUNTIME, join, leave, inner]


def launcher(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in [*LAUNCHER, *args])


def memory_of(made: list[tuple[cgroupfs.Hierarchy, str]]) -> tuple[cgroupfs.Hierarchy, str]:
    return next(
        (h, p)
        for h, p in made
        if "memory" in h.controllers or "memory" in cgroupfs.read_words(p + "/cgroup.controllers")
    )


def limit_file(hierarchy: cgroupfs.Hierarchy) -> str:
    return "memory.max" if hierarchy.version == 2 else "memory.limit_in_bytes"


def test_private_cgroupns_nests_in_the_containers_own_cgroup(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    with container_cgroups() as made:
        need(has_memory(made), "no memory controller for a cgroup below ours")
        hierarchy, container = memory_of(made)
        child = "cat /proc/self/cgroup; sleep 3"
        argv = in_container(
            made, launcher("--mem", "64M", "--report", str(report), "--", "sh", "-c", child)
        )
        with started(argv) as proc:
            # Seen from the host, the sandbox is a child of the container's cgroup.
            pattern = f"{container}/{identity.PREFIX}*"
            assert wait_until(lambda: glob.glob(pattern), timeout=20), proc.stderr
            (sandbox,) = glob.glob(pattern)
            assert cgroupfs.read_int(f"{sandbox}/{limit_file(hierarchy)}") == 64 << 20
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        # Seen from inside, it sits at the root of the namespace: `/aero-sandbox-1-...`.
        lines = [line.split(":", 2)[2] for line in out.splitlines() if line.count(":") >= 2]
        assert any(p.startswith(f"/{identity.PREFIX}1-") for p in lines), out
        data = json.loads(report.read_text())
        assert data["backend"] == "cgroup"
        assert data["launcher_pid"] == 1
        assert not glob.glob(pattern)


def test_container_limit_below_mem_is_said_once_and_reported(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    with container_cgroups() as made:
        need(has_memory(made), "no memory controller for a cgroup below ours")
        hierarchy, container = memory_of(made)
        cgroupfs.write(f"{container}/{limit_file(hierarchy)}", str(256 << 20))
        argv = in_container(made, launcher("--mem", "1G", "--report", str(report), "--", "true"))
        proc = run(argv)
        assert proc.returncode == 0, proc.stderr
        warning = "the effective limit is 256.0 MiB"
        assert proc.stderr.count(warning) == 1, proc.stderr
        data = json.loads(report.read_text())
        assert data["effective_memory_bytes"] == 256 << 20
        assert data["enclosing_memory"]["bytes"] == 256 << 20
        assert data["limits"]["memory_bytes"] == 1 << 30


def test_container_limit_warning_is_silenced_by_q() -> None:
    with container_cgroups() as made:  # a fresh container: a runtime never reuses a cgroup
        need(has_memory(made), "no memory controller for a cgroup below ours")
        hierarchy, container = memory_of(made)
        cgroupfs.write(f"{container}/{limit_file(hierarchy)}", str(256 << 20))
        quiet = run(in_container(made, launcher("-q", "--mem", "1G", "--", "true")))
        assert quiet.returncode == 0 and quiet.stderr == ""


def test_enclosing_limit_warning_on_the_host(tmp_path: Path) -> None:
    """A parent cgroup with a small limit, the launcher inside it, a bigger --mem."""
    report = tmp_path / "r.json"
    with delegated() as bases:
        hierarchy, base = next(
            (h, b)
            for h, b in bases
            if "memory" in h.controllers
            or "memory" in cgroupfs.read_words(b + "/cgroup.subtree_control")
        )
        parent = os.path.join(base, f"aero-test-enclosing-{os.getpid()}")
        os.mkdir(parent)
        try:
            cgroupfs.write(f"{parent}/{limit_file(hierarchy)}", str(200 << 20))
            script = f'echo $$ > {parent}/cgroup.procs && exec "$@"'
            argv = ["sh", "-c", script, "sh", *LAUNCHER, "--mem", "1G", "--report", str(report)]
            proc = run([*argv, "--", "true"])
            assert proc.returncode == 0, proc.stderr
            assert proc.stderr.count("--mem 1.0 GiB is more than the 200.0 MiB") == 1, proc.stderr
            assert parent in proc.stderr
            assert json.loads(report.read_text())["effective_memory_bytes"] == 200 << 20
        finally:
            remove_cgroup_tree(parent)


def test_read_only_cgroupfs_falls_back_or_names_the_run_flag(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    with container_cgroups() as made:
        memory = next(((h, p) for h, p in made if "memory" in h.controllers), None)
        if memory is not None:  # the container's own limit, which the fallback must mention
            cgroupfs.write(f"{memory[1]}/{limit_file(memory[0])}", str(256 << 20))
        run_it = launcher("--mem", "1G", "--report", str(report), "--", "true")
        auto = run(in_container(made, run_it, read_only=True))
        if auto.returncode == 0:  # the rlimit fallback ran it
            data = json.loads(report.read_text())
            assert data["backend"] == "rlimit"
            assert "--cgroupns=private" in auto.stderr, auto.stderr
            if memory is not None:
                assert auto.stderr.count("the effective limit is 256.0 MiB") == 1, auto.stderr
                assert data["effective_memory_bytes"] == 256 << 20
        else:  # no fallback in this version: 125 and the remedy
            assert auto.returncode == 125, auto.stderr
            assert READ_ONLY_REMEDY in auto.stderr
        forced = run(
            in_container(made, launcher("--backend", "cgroup", "--", "true"), read_only=True)
        )
        assert forced.returncode == 125
        assert "Read-only file system" in forced.stderr
        assert "--cgroupns=private" in forced.stderr and "unmask=/sys/fs/cgroup" in forced.stderr
        assert forced.stderr.count("\n") == 1


def make_parent_script(made: list[tuple[cgroupfs.Hierarchy, str]], name: str, limit: int) -> str:
    """Inside the container: what an admin does for a shared budget (docs/containers.md)."""
    steps = []
    for hierarchy, _path in made:
        top, parent = hierarchy.mount, f"{hierarchy.mount}/{name}"
        if hierarchy.version == 2 and "memory" in cgroupfs.read_words(
            _path + "/cgroup.controllers"
        ):
            # No internal processes: the container's init moves to a leaf, then delegates.
            steps += [
                f"mkdir {top}/init",
                f"echo $$ > {top}/init/cgroup.procs",
                f'echo "+memory +pids" > {top}/cgroup.subtree_control',
                f"mkdir {parent}",
                f"echo {limit} > {parent}/memory.max",
            ]
        else:
            steps.append(f"mkdir {parent}")
            if "memory" in hierarchy.controllers:
                steps.append(f"echo {limit} > {parent}/memory.limit_in_bytes")
    return " && ".join(steps)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_parent_puts_the_sandbox_under_the_given_cgroup(tmp_path: Path, form: str) -> None:
    report = tmp_path / "r.json"
    with container_cgroups() as made:
        need(has_memory(made), "no memory controller for a cgroup below ours")
        hierarchy, _container = memory_of(made)
        parent = "agents" if form == "relative" else f"{hierarchy.mount}/agents"
        run_it = launcher(
            "--parent", parent, "--mem", "1G", "--report", str(report),
            "--", "cat", "/proc/self/cgroup",
        )  # fmt: skip
        setup = make_parent_script(made, "agents", 128 << 20)
        proc = run(in_container(made, f"sh -c {shlex.quote(setup + ' && exec ' + run_it)}"))
        assert proc.returncode == 0, proc.stderr
        paths = [line.split(":", 2)[2] for line in proc.stdout.splitlines() if ":" in line]
        # Every hierarchy we use puts it below agents/ (in the namespace's view).
        assert sum(p.startswith(f"/agents/{identity.PREFIX}") for p in paths) == len(made)
        data = json.loads(report.read_text())
        for path in data["sandbox"]["cgroups"].values():
            assert os.path.dirname(path).endswith("/agents")
        # The shared budget is below --mem: said once, reported.
        assert "the effective limit is 128.0 MiB" in proc.stderr
        assert data["effective_memory_bytes"] == 128 << 20


def test_parent_that_does_not_exist_is_an_error_naming_it() -> None:
    proc = run([*LAUNCHER, "--parent", f"aero-test-missing-{os.getpid()}", "--", "true"])
    assert proc.returncode == 125
    assert "no such cgroup" in proc.stderr and "mkdir" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_pid_namespace_sharing_its_cgroup_with_the_host(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """`unshare --pid` in a cgroup that also holds a process of the host: on cgroup v2 that
    process reads as pid 0 and cannot be moved into a leaf, so the cgroup backend says so (125)
    and auto falls back. With v1 controllers (the development host) no leaf is needed: it runs."""
    name = f"aero-test-shared-{os.getpid()}-{os.urandom(2).hex()}"
    with delegated() as bases:
        shared = [os.path.join(base, name) for _h, base in bases]
        outsider = subprocess.Popen(["sleep", "60"])
        pids_to_kill.append(outsider.pid)
        try:
            for path in shared:
                os.mkdir(path)
                cgroupfs.write(f"{path}/cgroup.procs", str(outsider.pid))
            join = " && ".join(f"echo $$ > {path}/cgroup.procs" for path in shared)

            def in_shared(*args: str) -> subprocess.CompletedProcess[str]:
                inner = " ".join(shlex.quote(a) for a in unshare_pid(list(args)))
                return run(["sh", "-c", f"{join} && exec {inner}"])

            v2_memory = any(
                h.version == 2 and "memory" in cgroupfs.read_words(p + "/cgroup.controllers")
                for (h, _base), p in zip(bases, shared, strict=True)
            )
            forced = in_shared("--backend", "cgroup", "--", "true")
            if not v2_memory:
                assert forced.returncode == 0, forced.stderr
                return
            assert forced.returncode == 125, forced.stderr
            assert "outside this pid namespace" in forced.stderr and "--parent" in forced.stderr
            assert forced.stderr.count("\n") == 1, forced.stderr
            report = tmp_path / "r.json"
            auto = in_shared("--report", str(report), "--", "true")
            assert auto.returncode == 0, auto.stderr
            assert json.loads(report.read_text())["backend"] == "rlimit"
            assert "outside this pid namespace" in auto.stderr
        finally:
            outsider.kill()
            outsider.wait(timeout=10)
            for path in shared:
                if os.path.isdir(path):
                    remove_cgroup_tree(path)
