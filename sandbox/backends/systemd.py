"""The `systemd` backend: where systemd is PID 1 the cgroup tree is its own, so ask it for a scope.

One run:
    prepare   connect (the system bus as root, the user's bus otherwise), check that the manager
              answers and may set the limits asked for, subscribe to JobRemoved
    child     (after fork) blocks on a pipe: not one instruction of the command runs outside
    started   StartTransientUnit(aero-sandbox-<pid>-<id>.scope, PIDs=[child, holder], MemoryMax,
              MemorySwapMax=0, TasksMax, RuntimeMaxUSec...), wait (bounded) for its job, move the
              child into <scope>/command, read the limits back, then release the child
    supervise signal_all / kill_all through <scope>/command (cgroup.kill)
    tear down measure <scope>/command; kill the holder; StopUnit and wait for its job

Two choices follow from how systemd (252) treats a scope:
- It stops a scope as soon as its cgroup is empty, and deletes the cgroup: the command's last
  exit would take memory.peak and memory.events with it before we read them. So a holder
  (`sleep infinity`, our child, dies with us) sits in <scope>/holder and keeps the scope until
  remove(). The scope is Delegate=yes: the subtree below it is ours to arrange.
- OOMPolicy=stop or kill (scopes default to stop) end the unit at the first OOM kill, holder
  included, with the same loss. So the scope runs with OOMPolicy=continue, and the kernel kills
  <scope>/command as one group (memory.oom.group=1, Linux 4.19+), as the cgroup backend does.
systemd still enforces the limits (MemoryMax, TasksMax on the scope) and, through RuntimeMaxUSec,
the timeout even when the launcher and its guardian are both gone.

pystemd is an optional extra and is imported only here, in prepare() (~30 ms: it loads lxml).
"""

from __future__ import annotations

import os
import select
import time

from sandbox.cgroups import cgroupfs, pressure
from sandbox.core import identity, linux
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import Limits, format_size
from sandbox.core.result import Reason, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any
else:
    import _signal  # the C half of `signal`: `signal` itself costs ~4 ms of start-up

CGROUP_ROOT = "/sys/fs/cgroup"  # where systemd mounts the unified hierarchy (it requires it there)
OWN_CGROUP = "/proc/self/cgroup"
COMMAND = "command"  # <scope>/command: the command's processes
HOLDER = "holder"  # <scope>/holder: the process that keeps the scope alive until remove()
HOLDER_TASKS = 1  # TasksMax counts the holder too
JOB_TIMEOUT_S = 10.0  # bound on systemd starting or stopping our scope
# systemd's own timeout comes this long after ours (timeout + kill-after), so the launcher, when
# alive, always acts first and reports; systemd only steps in when nobody else can.
RUNTIME_MARGIN_S = 5.0
DESCRIPTION_CHARS = 256

INSTALL_REMEDY = (
    "pip install 'aero-sandbox[systemd]': pystemd builds from source and needs libsystemd-dev, "
    "pkg-config, a C compiler and the Python headers (scripts/install installs them where apt "
    "exists); or use --backend cgroup"
)

# D-Bus types of the unit properties we set: plain data, like pystemd's unit_signatures.py
# (whose table lacks PIDs: a scope started through it fails with KeyError b'PIDs').
SIGNATURES = {
    "Description": "s",
    "CollectMode": "s",
    "PIDs": "au",
    "Slice": "s",
    "Delegate": "b",
    "OOMPolicy": "s",
    "MemoryMax": "t",
    "MemorySwapMax": "t",
    "TasksMax": "t",
    "RuntimeMaxUSec": "t",
    "TimeoutStopUSec": "t",
}

_DESTINATION = b"org.freedesktop.systemd1"
_MANAGER_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"
_SCOPE = b"org.freedesktop.systemd1.Scope"
_UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"


def unit_properties(
    limits: Limits, argv: list[str], pids: list[int], slice_name: str | None
) -> list[tuple[str, object]]:
    """The transient scope's properties, in the order systemd receives them."""
    properties: list[tuple[str, object]] = [
        ("Description", describe_command(argv)),
        # Unload the unit when it ends, failed or not: nothing is left for `systemctl reset-failed`.
        ("CollectMode", "inactive-or-failed"),
        ("PIDs", pids),
        ("Delegate", True),
        ("OOMPolicy", "continue"),
    ]
    if slice_name:
        properties.append(("Slice", slice_name))
    if limits.memory_bytes is not None:
        properties += [("MemoryMax", limits.memory_bytes), ("MemorySwapMax", 0)]
    if limits.pids is not None:
        properties.append(("TasksMax", limits.pids + HOLDER_TASKS))
    if limits.timeout_s:
        budget = limits.timeout_s + limits.kill_after_s + RUNTIME_MARGIN_S
        properties.append(("RuntimeMaxUSec", _usec(budget)))
    # The grace systemd gives between SIGTERM and SIGKILL when it stops the scope itself (its
    # RuntimeMaxUSec, `systemctl stop`). 0 would mean no SIGKILL at all to systemd: 1 us at least.
    properties.append(("TimeoutStopUSec", max(1, _usec(limits.kill_after_s))))
    return properties


def describe_command(argv: list[str]) -> str:
    """One line: systemctl shows a description with a newline (`sh -c` scripts) as unprintable."""
    text = "aero-sandbox: " + " ".join(" ".join(arg.split()) for arg in argv)
    return text if len(text) <= DESCRIPTION_CHARS else text[: DESCRIPTION_CHARS - 3] + "..."


def encode_properties(
    properties: list[tuple[str, object]], apply_signature: Any
) -> list[tuple[int, Any]]:
    """The a(sv) argument in pystemd.dbuslib's form (what its signature_array builds)."""
    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for name, value in properties:
        signature = SIGNATURES[name].encode()
        args += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), signature)]
        args += apply_signature(signature, [value])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


def _usec(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


class SystemdBackend:
    name = "systemd"
    tick_s: float | None = None

    def __init__(self, slice_name: str | None = None) -> None:
        self.slice = slice_name
        self.not_enforced: list[str] = []
        self.unit: str | None = None
        self.scope: str | None = None  # the scope's cgroup directory, once systemd made it
        self.command: str | None = None  # <scope>/command
        self._limits: Limits | None = None
        self._argv: list[str] = []
        self._bus: _Bus | None = None
        self._release: tuple[int, int] | None = None  # the pipe the child waits on
        self._child: int | None = None
        self._holder: int | None = None
        self._holder_fd: int | None = None  # a pidfd: kill the holder, never a reused pid
        self._owner = os.getpid()  # the launcher; any other pid running our methods is its guardian
        self._removed = False
        self._pressure: pressure.PressureWatch | None = None

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, limits: Limits, argv: list[str]) -> None:
        # Refusals without a remedy are quiet under `auto`: the cgroup backend is the right one
        # there, nothing needs fixing. Those with one name a misconfiguration (see selection).
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
        self._owner = os.getpid()
        self._bus = _Bus.connect()
        seen = self._bus.our_pid()
        if seen != self._owner:
            self._close_bus()
            # systemd 252 takes a scope's processes by pid: ours would name another process.
            raise BackendUnavailable(
                "systemd",
                f"this process runs in its own pid namespace (pid {self._owner} here, {seen} to "
                "the bus): use the cgroup backend (auto does)",
            )
        root = self._bus.root
        if not os.access(f"{CGROUP_ROOT}{root}", os.W_OK):
            self._close_bus()
            # We arrange the scope's subtree ourselves (holder, command, memory.oom.group).
            raise BackendUnavailable(
                "systemd",
                f"cannot write below {CGROUP_ROOT}{root} (a read-only cgroupfs?), where the "
                "scope's own cgroups go: use the cgroup or rlimit backend (auto does)",
            )
        available = cgroupfs.read_words(f"{CGROUP_ROOT}{root}/cgroup.controllers")
        wanted = {"memory": limits.memory_bytes is not None, "pids": limits.pids is not None}
        missing = [c for c, needed in wanted.items() if needed and c not in available]
        if missing:
            self._close_bus()
            raise BackendUnavailable(
                "systemd",
                f"the {_manager_kind()} manager cannot set {' and '.join(missing)} limits: "
                f"{CGROUP_ROOT}{root} was not given the {' and '.join(missing)} controller",
                "delegate it: `systemctl edit user@.service`, [Service] Delegate=cpu memory pids "
                "(the default since systemd 244), or use --backend cgroup as root",
            )
        self._limits, self._argv = limits, argv
        self.unit = identity.sandbox_name() + ".scope"
        self._release = os.pipe()

    # -- run ----------------------------------------------------------------------------------
    def child_setup(self) -> None:
        """Wait until the parent has put us in the scope: 'g' on the pipe, or EOF if it failed."""
        assert self._release is not None
        read_end, write_end = self._release
        os.close(write_end)
        if os.read(read_end, 1) != b"g":
            raise SandboxError("the launcher could not place the command in a systemd scope")
        os.close(read_end)

    def started(self, pid: int) -> None:
        assert self._bus is not None and self._limits is not None and self.unit is not None
        self._child = pid
        self._holder = _fork_holder()
        self._holder_fd = os.pidfd_open(self._holder)
        properties = unit_properties(self._limits, self._argv, [pid, self._holder], self.slice)
        result = self._bus.start_scope(self.unit, properties)
        if result != "done":
            raise SandboxError(
                f"systemd could not start {self.unit}: its job ended {result!r}",
                "see `journalctl -b -u "
                + self.unit
                + "`"
                + (f"; is --slice {self.slice} a valid slice?" if self.slice else ""),
            )
        path = self._bus.scope_cgroup(self.unit)
        if path is None:
            raise SandboxError(f"systemd started {self.unit} but reports no cgroup for it")
        self.scope = CGROUP_ROOT + path
        self.command = self._arrange(pid)
        self._check_limits()
        self._pressure = pressure.watch(self.command, self._limits)
        self.tick_s = self._pressure.tick_s if self._pressure else None
        assert self._release is not None
        os.write(self._release[1], b"g")
        self._close_release()

    def _arrange(self, pid: int) -> str:
        """Move the child to <scope>/command and the holder to <scope>/holder, give both their
        controllers, and have the kernel kill the command as one group on OOM."""
        assert self.scope is not None and self._holder is not None
        scope, command = self.scope, f"{self.scope}/{COMMAND}"
        try:
            for leaf, member in ((HOLDER, self._holder), (COMMAND, pid)):
                os.mkdir(f"{scope}/{leaf}")
                cgroupfs.write(f"{scope}/{leaf}/cgroup.procs", str(member))
            # Possible only now that the scope's own cgroup holds no process (cgroup v2's
            # no-internal-process rule); nested sandboxes need them in `command` too.
            controllers = {"memory", "pids"} & set(
                cgroupfs.read_words(scope + "/cgroup.controllers")
            )
            if controllers:
                cgroupfs.write(
                    scope + "/cgroup.subtree_control",
                    " ".join(f"+{c}" for c in sorted(controllers)),
                )
            if os.path.exists(command + "/memory.oom.group"):
                cgroupfs.write(command + "/memory.oom.group", "1")
        except OSError as err:
            raise SandboxError(
                f"cannot arrange the delegated scope {scope}: {err.strerror} "
                f"({err.filename or scope})"
            ) from err
        with open(f"/proc/{pid}/cgroup") as f:
            where = f.read().strip()
        if where != f"0::{command[len(CGROUP_ROOT) :]}":
            raise SandboxError(f"the command is in {where!r}, not in {command}")
        return command

    def _check_limits(self) -> None:
        """Read every limit back: systemd skips a limit whose controller it lacks (systemd#9641)."""
        assert self.scope is not None and self._limits is not None
        limits, scope = self._limits, self.scope
        if limits.memory_bytes is not None:
            got = cgroupfs.read_int(scope + "/memory.max")
            page = os.sysconf("SC_PAGE_SIZE")  # the kernel rounds memory.max down to pages
            if got is None or not limits.memory_bytes - page < got <= limits.memory_bytes:
                raise SandboxError(
                    f"systemd did not apply MemoryMax={limits.memory_bytes} "
                    f"({format_size(limits.memory_bytes)}): {scope}/memory.max reads {got}"
                )
            swap = scope + "/memory.swap.max"
            if os.path.exists(swap) and cgroupfs.read_int(swap) != 0:
                raise SandboxError(f"systemd did not apply MemorySwapMax=0: {swap} is not 0")
        if limits.pids is not None:
            got = cgroupfs.read_int(scope + "/pids.max")
            if got != limits.pids + HOLDER_TASKS:
                raise SandboxError(
                    f"systemd did not apply TasksMax={limits.pids + HOLDER_TASKS}: "
                    f"{scope}/pids.max reads {got}"
                )

    def watch_fds(self) -> list[int]:
        # memory.oom.group kills the whole command: the main child's exit wakes us; the
        # memory-pressure trigger is all we watch.
        return [self._pressure.fd] if self._pressure and self._pressure.fd else []

    def check(self) -> str | None:
        if self.command is None:
            return None
        if self._pressure is not None and self._pressure.check():
            return Reason.OOM
        # .local (Linux 5.2+): a kill in a sandbox nested in ours, under its own smaller limit,
        # counts there, not here. Under our limit the kernel kills `command` as a group.
        events = cgroupfs.read_keyed(self.command + "/memory.events.local") or cgroupfs.read_keyed(
            self.command + "/memory.events"
        )
        return Reason.OOM if events.get("oom_kill") or events.get("oom_group_kill") else None

    def signal_all(self, signo: int) -> None:
        if self.command is not None:
            cgroupfs.signal_all(self.command, signo)
        elif self._child is not None:
            os.kill(self._child, signo)

    def kill_all(self) -> None:
        target = self.command or self.scope
        if target is None and self._child is not None:
            # The scope never started: the child still waits on the pipe, our unreaped child.
            os.kill(self._child, _signal.SIGKILL)
            return
        if target is None and self._in_guardian():
            target = self._lookup_scope()  # the launcher died: ask systemd where the scope is
        if target is not None:
            _kill_cgroup(target)

    def measure(self) -> Usage:
        if self.command is None or self.scope is None:
            return Usage()
        command = self.command
        events = cgroupfs.read_keyed(command + "/memory.events")
        # pids.events counts a refused fork in the forking task's cgroup up to Linux 6.1, in the
        # cgroup whose limit refused it (our scope) from 6.2 on: read both.
        hits = [
            cgroupfs.read_keyed(path + "/pids.events").get("max") for path in (command, self.scope)
        ]
        known = [h for h in hits if h is not None]
        usec = cgroupfs.read_keyed(command + "/cpu.stat").get("usage_usec")
        return Usage(
            peak_memory_bytes=cgroupfs.read_int(command + "/memory.peak"),  # Linux 5.19+
            oom_kills=events.get("oom_kill"),
            pids_limit_hits=max(known) if known else None,
            cpu_s=None if usec is None else usec / 1e6,
            memory_pressure=self._pressure.fired if self._pressure else None,
        )

    # -- tear down ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Kill the holder and anything left, stop the unit and wait until systemd removed it;
        kill the scopes that crashed launchers left. Safe twice, and from the guardian."""
        if self._removed or self.unit is None:
            return
        self._removed = True
        self._close_release()
        if self._pressure is not None:
            self._pressure.close()
        if self._child is None and not self._in_guardian():
            self._close_bus()  # no scope was ever asked for
            return
        try:
            scope = self.scope or self._lookup_scope()
            if scope is not None:
                _kill_cgroup(scope)
            self._end_holder()
            bus = self._connection()
            bus.stop_unit(self.unit)
            self.collect_stale()
        except SandboxError as err:
            raise SandboxError(
                f"could not remove {self.unit}: {err.message}",
                "it ends when its processes do; with a timeout, systemd stops it (RuntimeMaxSec)",
            ) from err
        finally:
            self._close_bus()

    def collect_stale(self) -> None:
        if self._in_guardian() or self._bus is None:
            return  # the guardian only cleans up its own launcher's scope
        try:
            self._bus.stop_stale_scopes()
        except SandboxError:
            pass

    def describe(self) -> dict[str, Any]:
        cgroups = (
            {} if self.scope is None else dict.fromkeys(("memory", "pids", "unified"), self.scope)
        )
        return {"cgroups": cgroups, "cgroup_mode": "v2", "unit": self.unit, "slice": self.slice}

    # -- helpers ------------------------------------------------------------------------------
    def _in_guardian(self) -> bool:
        """The guardian is a fork of the launcher, made before the child existed."""
        return os.getpid() != self._owner

    def _connection(self) -> _Bus:
        """Our bus connection; in the guardian a new one (sd-bus refuses one used across fork)."""
        if self._bus is None or self._bus.pid != os.getpid():
            self._bus = _Bus.connect()
        return self._bus

    def _close_bus(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _lookup_scope(self) -> str | None:
        assert self.unit is not None
        try:
            path = self._connection().scope_cgroup(self.unit)
        except SandboxError:
            return None
        return None if path is None else CGROUP_ROOT + path

    def _end_holder(self) -> None:
        if self._holder_fd is None or self._holder is None:
            return
        try:
            _signal.pidfd_send_signal(self._holder_fd, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        select.select([self._holder_fd], [], [], 2.0)  # readable once it has exited
        os.close(self._holder_fd)
        self._holder_fd = None
        try:
            os.waitpid(self._holder, os.WNOHANG)
        except ChildProcessError:
            pass  # the supervisor's reaping loop was first

    def _close_release(self) -> None:
        if self._release is not None:
            for fd in self._release:
                os.close(fd)
            self._release = None


def _kill_cgroup(directory: str) -> None:
    """SIGKILL everything in a cgroup subtree and wait (bounded) until it is empty."""
    try:
        emptied = cgroupfs.kill_all(directory, 2)
    except OSError as err:
        raise SandboxError(f"cannot kill the processes in {directory}: {err.strerror}") from err
    if not emptied:
        raise SandboxError(f"processes in {directory} did not die within 3 s of SIGKILL")


def _fork_holder() -> int:
    """A process that does nothing but keep the scope's cgroup alive; SIGKILL is its only end.

    It inherits the supervisor's blocked signals (exec keeps them blocked) and leaves the
    terminal's session, so neither ^C nor a forwarded signal reaches it; it dies with the
    launcher (PR_SET_PDEATHSIG). It is `sleep`, not a copy of Python, so it is the smallest
    process in the scope and never the OOM killer's choice.
    """
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the holder
        try:
            linux.set_parent_death_signal(_signal.SIGKILL)
            if os.getppid() != launcher:
                os._exit(0)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # never hold the caller's pipes open
                os.dup2(null, fd)
            try:  # root may exempt it from the OOM killer outright
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("-1000")
            except OSError:
                pass
            try:
                os.execvp("sleep", ["sleep", "infinity"])
            except OSError:
                pass
            while True:  # no sleep(1) on PATH: wait here, a bigger process but the same role
                select.select([], [], [])
        finally:
            os._exit(0)
    return pid


def import_dbuslib() -> tuple[Any, Any]:
    """pystemd.dbuslib and pystemd.dbusexc, without running pystemd/__init__.py.

    That file loads pystemd's whole object API (lxml, typing, inspect...), of which we use
    nothing: 13 of the 34 ms the import takes on the development machine, and about 250 of
    360 ms under the VM stage's emulation. So unless pystemd is imported already, the package is
    entered as a bare module with its search path, and only the two submodules load.
    """
    import sys

    if "pystemd" not in sys.modules:
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("pystemd")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'pystemd'")
        package = type(sys)("pystemd")
        package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
        package.__file__, package.__package__ = spec.origin, "pystemd"
        sys.modules["pystemd"] = package
    try:
        import pystemd.dbusexc as errors
        import pystemd.dbuslib as dbuslib
    except ImportError:
        if getattr(sys.modules.get("pystemd"), "__path__", None) is not None:
            sys.modules.pop("pystemd", None)  # a bare package that leads nowhere: forget it
        raise
    return dbuslib, errors


def _manager_kind() -> str:
    return "system" if os.geteuid() == 0 else "user"


class _Bus:
    """A connection to systemd (pystemd.dbuslib) that hears when its own jobs end."""

    def __init__(self, dbuslib: Any, errors: Any, bus: Any) -> None:
        self._dbuslib = dbuslib
        self._errors = errors
        self._bus = bus
        self.pid = os.getpid()
        # The manager's own cgroup: "" for the system manager, user@UID.service's for a user's.
        self.root = ""
        self._jobs: dict[bytes, str] = {}
        jobs = self._jobs

        def job_removed(message: Any, error: Any = None, userdata: Any = None) -> None:
            message.process_reply(False)
            _id, job, _unit, result = message.body
            jobs[job] = result.decode()

        # sd-bus keeps only a borrowed pointer to the callback: we keep it alive.
        self._job_removed = job_removed
        # Subscribed before any job starts, so its JobRemoved cannot pass unheard. systemd sends
        # JobRemoved to the client that queued the job even without Manager.Subscribe().
        bus.match_signal(_DESTINATION, _MANAGER_PATH, _MANAGER, b"JobRemoved", job_removed)

    @classmethod
    def connect(cls) -> _Bus:
        """The system bus as root, the user's bus (its systemd --user) otherwise."""
        try:
            dbuslib, errors = import_dbuslib()
        except ImportError as err:
            raise BackendUnavailable(
                "systemd", f"pystemd is not installed ({err})", INSTALL_REMEDY
            ) from err
        user = os.geteuid() != 0
        if user and not (
            os.environ.get("DBUS_SESSION_BUS_ADDRESS") or os.environ.get("XDG_RUNTIME_DIR")
        ):
            raise BackendUnavailable(
                "systemd",
                "no user bus: XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS are unset",
                _linger_remedy(),
            )
        bus = dbuslib.DBus(user_mode=user)
        try:
            bus.open()
            connection = cls(dbuslib, errors, bus)
            # Does a systemd manager answer on this bus? Its cgroup tells what it may limit.
            connection.root = _text(
                bus.get_property(_DESTINATION, _MANAGER_PATH, _MANAGER, b"ControlGroup", b"s")
            )
        except errors.DBusBaseError as err:
            where = "the system bus" if not user else "the user's bus"
            raise BackendUnavailable(
                "systemd",
                f"no systemd manager answers on {where}: {err}",
                _linger_remedy() if user else "start dbus (systemctl start dbus)",
            ) from err
        return connection

    def close(self) -> None:
        if self.pid == os.getpid():
            self._bus.close()

    def _call(
        self,
        method: bytes,
        args: list[tuple[int, Any]],
        path: bytes = _MANAGER_PATH,
        interface: bytes = _MANAGER,
    ) -> Any:
        # pystemd gives a reply of one value as that value, of several as a list.
        return self._bus.call_method(_DESTINATION, path, interface, method, args).body

    def start_scope(self, unit: str, properties: list[tuple[str, object]]) -> str:
        """Start the scope and wait (bounded) for its job; return the job's result ("done")."""
        apply = self._dbuslib.apply_signature
        args = apply(b"ss", [unit.encode(), b"fail"])
        args += encode_properties(properties, apply)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        try:
            job = self._call(b"StartTransientUnit", args)
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused to start {unit}: {err}") from err
        return self._wait_job(job, f"start {unit}")

    def our_pid(self) -> int:
        """Our pid as the bus (and so systemd) sees it: another number in a pid namespace."""
        name = self._bus.get_unique_name()
        args = self._dbuslib.apply_signature(b"s", [name])
        try:
            reply = self._bus.call_method(
                b"org.freedesktop.DBus",
                b"/org/freedesktop/DBus",
                b"org.freedesktop.DBus",
                b"GetConnectionUnixProcessID",
                args,
            )
        except self._errors.DBusBaseError as err:
            raise BackendUnavailable("systemd", f"the bus does not tell our pid: {err}") from err
        return int(reply.body)

    def scope_cgroup(self, unit: str) -> str | None:
        """The scope's cgroup (below the hierarchy's root), None when it has none (any more)."""
        path = self._dbuslib.path_encode(_UNIT_PATH_PREFIX, unit.encode())
        try:
            value = _text(self._bus.get_property(_DESTINATION, path, _SCOPE, b"ControlGroup", b"s"))
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"cannot read the cgroup of {unit}: {err}") from err
        return value or None

    def stop_unit(self, unit: str) -> None:
        """Stop the unit and wait (bounded) until systemd has removed it; gone already is fine."""
        try:
            job = self._call(
                b"StopUnit", self._dbuslib.apply_signature(b"ss", [unit.encode(), b"replace"])
            )
        except self._errors.DBusNoSuchUnitError:
            return
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused to stop {unit}: {err}") from err
        self._wait_job(job, f"stop {unit}")

    def stop_stale_scopes(self) -> None:
        """Kill the scopes of launchers that died with neither cleanup nor timeout (both the
        launcher and its guardian killed): a daemon they left would otherwise keep one forever."""
        args = self._dbuslib.apply_signature(b"asas", [[], [b"aero-sandbox-*.scope"]])
        try:
            units = self._call(b"ListUnitsByPatterns", args)
        except self._errors.DBusBaseError:
            return  # systemd < 230: no such method; `aero-sandbox gc` remains
        for row in units or []:
            name = _text(row[0])  # (name, description, load state, active state, ...)
            pid = identity.launcher_pid(name.removesuffix(".scope"))
            if pid is None or pid == os.getpid() or identity.pid_exists(pid):
                continue
            kill = self._dbuslib.apply_signature(b"ssi", [name.encode(), b"all", _signal.SIGKILL])
            try:
                self._call(b"KillUnit", kill)
            except self._errors.DBusBaseError:
                pass

    def _wait_job(self, job: bytes, what: str) -> str:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            while job not in self._jobs:
                self._bus.process()  # dispatches one queued message (our JobRemoved callback)
                if job in self._jobs:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError(
                        f"systemd did not finish the job to {what} within {JOB_TIMEOUT_S:g} s"
                    )
                # Short slices: process() handles one message per call, and a second one
                # already read from the socket would not wake a long wait.
                self._bus.wait(_usec(min(left, 0.02)))
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"lost the bus while waiting to {what}: {err}") from err
        return self._jobs.pop(job)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _linger_remedy() -> str:
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (
        f"`loginctl enable-linger {user}` starts the user's systemd without a login; then "
        f"XDG_RUNTIME_DIR=/run/user/{os.getuid()} (or use --backend cgroup)"
    )
