"""The `systemd` backend: where systemd is PID 1 the cgroup tree is its own, so ask it for a scope.

One run:
    prepare   scope.check_host, connect (the system bus as root, the user's bus otherwise),
              check that the manager answers and may set the limits asked for
    child     (after fork) blocks on a pipe: not one instruction of the command runs outside
    started   StartTransientUnit(aero-sandbox-<pid>-<id>.scope, PIDs=[child, holder],
              properties.py), wait (bounded) for its job; close the connection; scope.arrange
              moves the child into <scope>/command; read the limits back (v2); release the child
    supervise check / signal_all / kill_all through <scope>/command (sandbox/cgroups/v2.py)
    tear down measure <scope>/command; kill the scope's processes and the holder: systemd
              stops and unloads the emptied scope itself
systemd still enforces the limits (MemoryMax, TasksMax on the scope) and, through RuntimeMaxUSec,
the timeout even when the launcher and its guardian are both gone.

pystemd is an optional extra, imported only when prepare() opens the bus (bus.py).
"""

from __future__ import annotations

import os

from sandbox.backends.systemd import scope
from sandbox.backends.systemd.bus import Bus
from sandbox.backends.systemd.properties import HOLDER_TASKS, unit_properties
from sandbox.cgroups import cgroupfs, pressure, tree, v2
from sandbox.core import identity
from sandbox.core.errors import SandboxError
from sandbox.core.limits import Limits, format_size
from sandbox.core.result import Placement, Reason, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal


class SystemdBackend:
    name = "systemd"
    tick_s: float | None = None  # memory.oom.group kills the command: its exit wakes us

    def __init__(self, slice_name: str | None = None) -> None:
        self.slice = slice_name
        self.not_enforced: list[str] = []
        self.unit: str | None = None
        self.scope: v2.Cgroup | None = None  # the scope's cgroup, once systemd made it
        self.command: v2.Cgroup | None = None  # <scope>/command
        self._limits: Limits | None = None
        self._argv: list[str] = []
        self._bus: Bus | None = None
        self._release: tuple[int, int] | None = None  # the pipe the child waits on
        self._child: int | None = None
        self._holder: scope.Holder | None = None
        self._pressure: pressure.PressureWatch | None = None  # --oom-pressure
        self._removed = False

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, limits: Limits, argv: list[str]) -> None:
        scope.check_host()
        self._bus = scope.connect(limits)
        self._limits, self._argv = limits, argv
        self.unit = identity.sandbox_name() + ".scope"
        self._release = os.pipe()

    # -- run ----------------------------------------------------------------------------------
    def child_plan(self) -> None:
        return None  # the child waits on a pipe until systemd made its scope (child_setup)

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
        self._holder = scope.Holder()
        properties = unit_properties(self._limits, self._argv, [pid, self._holder.pid], self.slice)
        self.scope = v2.Cgroup(scope.start(self._bus, self.unit, properties, self.slice, pid))
        # Not held while the command runs (as systemd-run, which execs it): the manager would
        # queue every unit's signals for it. Reconnected only when needed (collect_stale).
        self._close_bus()
        self.command = scope.arrange(self.scope.path, pid, self._holder.pid)
        self._check_limits(self.scope, self._limits)
        self._pressure = pressure.watch(
            self.command.path, self._limits, memory_dir=self.scope.path
        )
        self.tick_s = self._pressure.tick_s if self._pressure else None
        assert self._release is not None
        os.write(self._release[1], b"g")
        self._close_release()

    @staticmethod
    def _check_limits(cgroup: v2.Cgroup, limits: Limits) -> None:
        """Read every limit back: systemd skips a limit whose controller it lacks (systemd#9641)."""
        if limits.memory_bytes is not None:
            size = f"{limits.memory_bytes} ({format_size(limits.memory_bytes)})"
            cgroup.check_reads(
                "memory.max", limits.memory_bytes, f"systemd did not apply MemoryMax={size}"
            )
            if os.path.exists(cgroup.path + "/memory.swap.max"):
                cgroup.check_reads("memory.swap.max", 0, "systemd did not apply MemorySwapMax=0")
        if limits.pids is not None:
            tasks = limits.pids + HOLDER_TASKS
            cgroup.check_reads("pids.max", tasks, f"systemd did not apply TasksMax={tasks}")

    def watch_fds(self) -> list[int]:
        # memory.oom.group kills the whole command: the main child's exit wakes us; the
        # memory-pressure trigger is all we watch.
        return [self._pressure.fd] if self._pressure and self._pressure.fd else []

    def check(self) -> str | None:
        if self._pressure is not None and self._pressure.check():
            return Reason.OOM  # thrashing at the limit, which the OOM killer does not end
        return Reason.OOM if self.command is not None and self.command.oom_hit() else None

    def signal_all(self, signo: int) -> None:
        if self.command is not None:
            cgroupfs.signal_all(self.command.path, signo)
        elif self._child is not None:
            os.kill(self._child, signo)

    def kill_all(self) -> None:
        target = self.command or self.scope
        if target is not None:
            target.kill()
        elif self._child is not None:
            # The scope never started: the child still waits on the pipe, our unreaped child.
            os.kill(self._child, _signal.SIGKILL)

    def measure(self) -> Usage:
        if self.command is None or self.scope is None:
            return Usage()
        usage = tree.usage(self.command, [self.command, self.scope], self.command)
        if self._pressure is None or self._pressure.fired is None:
            return usage
        return Usage(**{**usage.as_dict(), "memory_pressure": self._pressure.fired})

    # -- tear down ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Kill anything left and the holder; kill the scopes that crashed launchers left beside
        ours. Safe twice.

        An empty scope is systemd's to stop and unload (CollectMode=inactive-or-failed): it sees
        the scope's cgroup.events say unpopulated and removes the cgroup, our subtree with it.
        So no StopUnit and no wait for its job on the way out (two round trips and a context
        switch to systemd per run). Only a scope we never learnt the cgroup of is stopped here.
        """
        if self._removed or self.unit is None:
            return
        self._removed = True
        self._close_release()
        if self._pressure is not None:
            self._pressure.close()
        if self._child is None:
            self._close_bus()  # no scope was ever asked for
            return
        try:
            directory = self.scope.path if self.scope else self._lookup_scope(self._bus)
            if directory is not None:
                v2.Cgroup(directory).kill()
            if self._holder is not None:
                self._holder.end()
            if self._bus is not None and self.scope is None:
                self._bus.stop_unit(self.unit)
            self._collect_beside()
        except SandboxError as err:
            raise _removal_failed(self.unit, err) from err
        finally:
            self._close_bus()

    def guardian_notes(self) -> None:
        """None: the guardian is a fork holding this object (its clean-up needs this object's
        unit and a new bus connection)."""
        return None

    def guardian_cleanup(self) -> None:
        """In the guardian, the launcher dead: its holder died with it (PR_SET_PDEATHSIG); ask
        systemd where the scope is, kill what runs there, stop it. A new bus connection: sd-bus
        refuses one used across fork, so the launcher's is never touched here."""
        if self.unit is None:
            return
        bus = Bus.connect()
        try:
            directory = self._lookup_scope(bus)
            if directory is not None:
                v2.Cgroup(directory).kill()
            bus.stop_unit(self.unit)
        except SandboxError as err:
            raise _removal_failed(self.unit, err) from err
        finally:
            bus.close()

    def collect_stale(self) -> None:
        """Every scope of a dead launcher that the manager knows (one ListUnitsByPatterns)."""
        if self.scope is None:
            return
        try:
            self._connected().stop_stale_scopes()
        except SandboxError:
            pass
        finally:
            self._close_bus()

    def _collect_beside(self) -> None:
        """The teardown's part of collect_stale: dead launchers' scopes in our scope's slice,
        found in the cgroupfs, not asked for (`gc` and runs longer than GC_AFTER_S ask for all)."""
        if self.scope is None:
            return
        parent = os.path.dirname(self.scope.path)
        try:
            with os.scandir(parent) as entries:
                stale = [
                    entry.name
                    for entry in entries
                    if entry.name.endswith(".scope") and _dead_launchers(entry.name)
                ]
        except OSError:
            return
        for unit in stale:
            try:
                self._connected().kill_unit(unit)
            except SandboxError:
                pass

    def describe(self) -> Placement:
        cgroups = (
            {}
            if self.scope is None
            else dict.fromkeys(("memory", "pids", "unified"), self.scope.path)
        )
        return Placement(cgroups=cgroups, cgroup_mode="v2", unit=self.unit, slice=self.slice)

    # -- helpers ------------------------------------------------------------------------------
    def _lookup_scope(self, bus: Bus | None) -> str | None:
        if bus is None or self.unit is None:
            return None
        try:
            path = bus.scope_cgroup(self.unit)
        except SandboxError:
            return None
        return None if path is None else scope.CGROUP_ROOT + path

    def _connected(self) -> Bus:
        if self._bus is None:
            self._bus = Bus.connect()
        return self._bus

    def _close_bus(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _close_release(self) -> None:
        if self._release is not None:
            for fd in self._release:
                os.close(fd)
            self._release = None


def _dead_launchers(unit: str) -> bool:
    """Whether this is a sandbox's scope whose launcher is gone (not ours: ours is alive)."""
    pid = identity.launcher_pid(unit.removesuffix(".scope"))
    return pid is not None and pid != os.getpid() and not identity.pid_exists(pid)


def _removal_failed(unit: str, err: SandboxError) -> SandboxError:
    return SandboxError(
        f"could not remove {unit}: {err.message}",
        "it ends when its processes do; with a timeout, systemd stops it (RuntimeMaxSec)",
    )
