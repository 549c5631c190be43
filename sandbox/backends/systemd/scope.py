"""Obtaining a delegated cgroup v2 directory from systemd: a transient scope with Delegate=yes.

systemd only provides the directory, as in BenchExec; sandbox/cgroups/v2.py arranges, limits,
measures and kills in it like in any other v2 cgroup. Two things follow from how systemd (252)
treats a scope:
- It stops a scope as soon as its cgroup is empty, and deletes the cgroup: the command's last
  exit would take memory.peak and memory.events with it before we read them. So a holder
  (`sleep infinity`, our child, dies with us) sits in <scope>/holder and keeps the scope until
  the backend's remove(); the command runs in <scope>/command.
- It takes a scope's processes by pid, and its cgroups are below /sys/fs/cgroup as it sees
  them: both must be ours (no pid or cgroup namespace between us).
"""

from __future__ import annotations

import os
import select

from sandbox.backends.systemd.bus import Bus, manager_kind
from sandbox.cgroups import cgroupfs, tree, v2
from sandbox.core import linux
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

CGROUP_ROOT = "/sys/fs/cgroup"  # where systemd mounts the unified hierarchy (it requires it there)
OWN_CGROUP = "/proc/self/cgroup"
COMMAND = "command"  # <scope>/command: the command's processes
HOLDER = "holder"  # <scope>/holder: the process that keeps the scope alive until remove()


def check_host() -> None:
    """Refuse where a scope would not be a sandbox of ours. These refusals carry no remedy, so
    `auto` moves on quietly: the cgroup backend is the right one there, nothing needs fixing."""
    with open(OWN_CGROUP) as f:
        own = f.read()
    if cgroupfs.inside_sandbox(own):
        raise BackendUnavailable(
            "systemd",
            "this process runs inside a sandbox already, and a new scope would be outside "
            "its limits: use --backend cgroup (auto does) to nest in it",
        )
    if not os.path.exists(CGROUP_ROOT + "/cgroup.controllers"):
        raise BackendUnavailable(
            "systemd",
            "systemd runs the legacy or hybrid cgroup hierarchy here, whose scopes have no "
            "memory.peak or cgroup.kill (boot with systemd.unified_cgroup_hierarchy=1 to use "
            "this backend; the cgroup backend works meanwhile)",
        )
    top = own.partition("0::/")[2].split("/", 1)[0].strip()
    if not top.endswith((".slice", ".scope")):
        # systemd puts every process in a unit's cgroup (/init.scope, /system.slice/...):
        # a path outside them is a cgroup namespace, where systemd's paths are not ours.
        raise BackendUnavailable(
            "systemd",
            f"this process sees its own cgroup namespace (cgroup {own.strip()!r}), not "
            "systemd's tree: use the cgroup backend (auto does)",
        )


def connect(limits: Limits) -> Bus:
    """A bus to a manager that can give us a scope with these limits; BackendUnavailable if not."""
    bus = Bus.connect()
    try:
        _check_manager(bus, limits)
    except BaseException:
        bus.close()
        raise
    return bus


def _check_manager(bus: Bus, limits: Limits) -> None:
    foreign = bus.foreign_pid_namespace()
    if foreign is not None:
        # systemd 252 takes a scope's processes by pid: ours would name another process.
        raise BackendUnavailable(
            "systemd",
            f"this process runs in its own pid namespace ({foreign}): use the cgroup backend "
            "(auto does)",
        )
    root = f"{CGROUP_ROOT}{bus.root}"
    if not os.access(root, os.W_OK):
        # We arrange the scope's subtree ourselves (holder, command, memory.oom.group).
        raise BackendUnavailable(
            "systemd",
            f"cannot write below {root} (a read-only cgroupfs?), where the scope's own cgroups "
            "go: use the cgroup or rlimit backend (auto does)",
        )
    available = cgroupfs.read_words(f"{root}/cgroup.controllers")
    wanted = {"memory": limits.memory_bytes is not None, "pids": limits.pids is not None}
    missing = [c for c, needed in wanted.items() if needed and c not in available]
    if missing:
        raise BackendUnavailable(
            "systemd",
            f"the {manager_kind()} manager cannot set {' and '.join(missing)} limits: "
            f"{root} was not given the {' and '.join(missing)} controller",
            "delegate it: `systemctl edit user@.service`, [Service] Delegate=cpu memory pids "
            "(the default since systemd 244), or use --backend cgroup as root",
        )


def start(
    bus: Bus, unit: str, properties: list[tuple[str, object]], slice_name: str | None, pid: int
) -> str:
    """Start the scope with `pid` in it, wait for its job; return the scope's cgroup directory,
    read from where `pid` now is (no round trip to ask systemd)."""
    result = bus.start_scope(unit, properties)
    if result != "done":
        hint = f"; is --slice {slice_name} a valid slice?" if slice_name else ""
        raise SandboxError(
            f"systemd could not start {unit}: its job ended {result!r}",
            f"see `journalctl -b -u {unit}`{hint}",
        )
    with open(f"/proc/{pid}/cgroup") as f:
        path = f.read().partition("0::")[2].split("\n", 1)[0]
    if not path.endswith("/" + unit):
        raise SandboxError(f"systemd started {unit} but the command is in {path!r}, not in it")
    return CGROUP_ROOT + path


def arrange(scope: str, command_pid: int, holder_pid: int) -> v2.Cgroup:
    """Move the command to <scope>/command and the holder to <scope>/holder, give both the
    scope's controllers (possible only now that the scope itself holds no process; nested
    sandboxes need them in `command`), and have the kernel kill the command as one group."""
    try:
        for leaf, member in ((HOLDER, holder_pid), (COMMAND, command_pid)):
            v2.move(tree.create(scope, leaf), member)
        available = set(cgroupfs.read_words(scope + "/cgroup.controllers"))
        v2.give_controllers(scope, {"memory", "pids"} & available)
    except OSError as err:
        raise SandboxError(
            f"cannot arrange the delegated scope {scope}: {err.strerror} ({err.filename or scope})"
        ) from err
    command = v2.Cgroup(f"{scope}/{COMMAND}")
    command.kill_as_group()
    with open(f"/proc/{command_pid}/cgroup") as f:
        where = f.read().strip()
    if where != f"0::{command.path[len(CGROUP_ROOT) :]}":
        raise SandboxError(f"the command is in {where!r}, not in {command.path}")
    return command


class Holder:
    """A process that does nothing but keep the scope's cgroup alive; SIGKILL is its only end.

    It inherits the supervisor's blocked signals (exec keeps them blocked) and leaves the
    terminal's session, so neither ^C nor a forwarded signal reaches it; it dies with the
    launcher (PR_SET_PDEATHSIG). It is `sleep`, not a copy of Python, so it is the smallest
    process in the scope and never the OOM killer's choice. Killed through a pidfd, never
    through a pid that may have been reused.
    """

    def __init__(self) -> None:
        launcher = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the holder
            try:
                linux.set_parent_death_signal(_signal.SIGKILL)
                if os.getppid() != launcher:
                    os._exit(0)
                linux.detach_from_caller()
                _exempt_from_oom_killer()
                try:
                    os.execvp("sleep", ["sleep", "infinity"])
                except OSError:
                    pass
                while True:  # no sleep(1) on PATH: wait here, a bigger process, the same role
                    select.select([], [], [])
            finally:
                os._exit(0)
        self._fd: int | None = os.pidfd_open(self.pid)

    def end(self) -> None:
        if self._fd is None:
            return
        try:
            _signal.pidfd_send_signal(self._fd, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        select.select([self._fd], [], [], 2.0)  # readable once it has exited
        os.close(self._fd)
        self._fd = None
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # the supervisor's reaping loop was first


def _exempt_from_oom_killer() -> None:
    try:  # root may; others keep the default and are still the smallest process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
