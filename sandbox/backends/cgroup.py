"""The `cgroup` backend: the launcher creates the cgroups itself.

Covers pure cgroup v2 (root without systemd, a delegated subtree, a container with a writable
cgroupfs), hybrid hosts (v1 memory/pids controllers plus a controller-less v2 hierarchy used for
cgroup.kill, cgroup.events and cpu.stat) and legacy v1. Each controller comes from v2 when v2
offers it to our cgroup, else from its v1 hierarchy. Every sandbox is created below the cgroup the
launcher runs in (or --parent), in each hierarchy it uses. What differs between v1 and v2 is in
sandbox/cgroups/v1.py and v2.py; this module only decides which cgroup holds what.
"""

from __future__ import annotations

import errno
import os

from sandbox.cgroups import cgroupfs, pressure, tree, v1, v2
from sandbox.cgroups.cgroupfs import Hierarchy
from sandbox.core import identity, linux
from sandbox.core.errors import BackendUnavailable, SandboxError, UsageError
from sandbox.core.limits import Limits
from sandbox.core.result import Placement, Reason, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal

    from sandbox.budgets.oom import BudgetWatch
else:
    import _signal  # the C half of `signal`: its enums cost ~4 ms of start-up

CONTROLLERS = ("memory", "pids")
# The PSI trigger of --oom-pressure is made this long after the start (sandbox/cgroups/pressure.py:
# closing one costs ~4-20 ms), so a short command never pays for it.
PRESSURE_ARM_AFTER_S = 1.0

READ_ONLY_REMEDY = (
    "the cgroup filesystem is read-only (an unprivileged container?): run the container with "
    "--privileged, or on cgroup v2 with --cgroupns=private and a writable /sys/fs/cgroup "
    "(Podman: --security-opt unmask=/sys/fs/cgroup); or use --backend rlimit"
)
PERMISSION_REMEDY = (
    "run as root, or in a cgroup delegated to you "
    "(systemd-run --user --scope -p Delegate=yes aero-sandbox ...), or use --backend rlimit"
)


class CgroupBackend:
    name = "cgroup"

    def __init__(
        self,
        hierarchies: list[Hierarchy] | None = None,
        parent: str | None = None,
        budget: BudgetWatch | None = None,
    ) -> None:
        self._hierarchies = hierarchies
        self._parent = parent  # --parent: an admin-made cgroup that caps all sandboxes together
        # --budget: `hierarchies` are the budget's innermost level; `budget` tells an OOM kill
        # at a budget level (budget_oom) from one at our own limit (oom), from kernel counters.
        self.budget = budget
        self.not_enforced: list[str] = []
        self.created: list[tree.Cgroup] = []  # every cgroup we made and have not removed yet
        self.memory: tree.Cgroup | None = None  # the cgroup holding the memory limit
        self.pids: tree.Cgroup | None = None
        self.v2: v2.Cgroup | None = None  # for cgroup.kill, cgroup.events and cpu.stat
        self._parents: set[str] = set()
        self._pressure: pressure.PressureWatch | None = None  # --oom-pressure (PSI, v2 dir)
        self._removed = False
        self._born_in_v2 = False  # set in the child by fork(): it needs no cgroup.procs write

    @property
    def tick_s(self) -> float | None:
        """The soonest any watch wants a look without a wake-up, or None."""
        if self.memory is None:
            return None
        ticks = [self.memory.tick_s, self._pressure.tick_s if self._pressure else None]
        if self.budget is not None:
            # v1: the victim may be counted after the OOM wake-up (or a grandchild killed with
            # no wake-up of ours at all): look at the counters again every half second.
            ticks.append(0.5)
        return min((t for t in ticks if t), default=None)

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, limits: Limits, argv: list[str]) -> None:
        hierarchies = self._hierarchies if self._hierarchies is not None else cgroupfs.discover()
        if self._parent is not None:
            hierarchies = at_parent(hierarchies, self._parent)
        unified = next((h for h in hierarchies if h.version == 2), None)
        sources = controller_sources(hierarchies)
        if "memory" not in sources and limits.memory_bytes is not None:
            raise BackendUnavailable(
                "cgroup",
                "no memory controller is available to this process's cgroup",
                "enable the memory controller (cgroup_enable=memory) or delegate it to us",
            )
        if "pids" not in sources:
            self.not_enforced.append("pids")
        name = identity.sandbox_name()
        try:
            if unified is not None:
                wanted = {c for c, h in sources.items() if h is unified}
                parent = _arranged(unified.own, wanted)
                self.v2 = v2.Cgroup(self._create(parent, name))
                self.created.append(self.v2)
            placed: dict[str, tree.Cgroup] = {}
            for controller, hierarchy in sources.items():
                if hierarchy is unified and self.v2 is not None:
                    placed[controller] = self.v2
                else:
                    placed[controller] = v1.Cgroup(self._create(hierarchy.own, name))
                    self.created.append(placed[controller])
            self.memory, self.pids = placed.get("memory"), placed.get("pids")
            if self.memory is not None:
                self.memory.set_memory(limits.memory_bytes)
            if self.pids is not None and limits.pids is not None:
                self.pids.set_pids(limits.pids)
            # PSI is accounted in the v2 directory, with or without controllers (hybrid too).
            self._pressure = pressure.watch(
                self.v2.path if self.v2 else None,
                limits,
                PRESSURE_ARM_AFTER_S,
                memory_dir=self.memory.path if self.memory else None,
            )
        except BaseException:
            self.remove()
            raise

    def _create(self, parent: str, name: str) -> str:
        try:
            path = tree.create(parent, name)
        except OSError as err:
            raise _unavailable(parent, err) from err
        self._parents.add(parent)
        return path

    # -- run ----------------------------------------------------------------------------------
    def fork(self) -> int:
        """os.fork(), the child born in the sandbox's v2 cgroup where the kernel can (Linux 5.7+).

        Moving a process in through cgroup.procs takes the global cgroup_threadgroup_rwsem for
        writing, whose first writer after a quiet spell waits for an RCU grace period, holding
        cgroup_mutex (5-15 ms on the development VM; every cgroup mkdir on the host waits too).
        A child born in the cgroup (CLONE_INTO_CGROUP) takes it for reading only: bench/floor.py
        measured 4.8 ms against 17 ms for fork and three cgroup.procs writes."""
        # Only single-threaded: the child of a raw clone3 gets no interpreter re-init, and a
        # thread waiting for the GIL at that moment would leave the child waiting on it.
        if self.v2 is None or not _clone_into_works or not _single_threaded():
            return os.fork()
        fd = os.open(self.v2.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        pid = -1
        try:
            pid = linux.clone_into_cgroup(fd, _signal.SIGCHLD)
        except OSError:  # ENOSYS (a seccomp filter, an old kernel), EINVAL...: the old way
            _clone_into_works.clear()
        finally:
            if pid != 0:
                os.close(fd)  # in the child it is close-on-exec
        if pid == 0:
            self._born_in_v2 = True
            return 0
        return pid if pid > 0 else os.fork()

    def child_setup(self) -> None:
        # The forked child has one thread, so v1's `tasks` moves all of it; a write of 0 there
        # skips cgroup_threadgroup_rwsem (see fork()). Measured on Linux 6.18
        # (cgroup_procs_write_start); older kernels may take it here too, at no loss. v2 has no
        # such file for a domain cgroup: there, unless the child was born in it, cgroup.procs.
        for cgroup in self.created:
            if cgroup is self.v2 and self._born_in_v2:
                continue
            join = "/cgroup.procs" if cgroup.version == 2 else "/tasks"
            cgroupfs.write(cgroup.path + join, "0")

    def child_plan(self) -> linux.ChildSetup | None:
        """Born in the v2 cgroup (see fork()); v1's through `tasks`, as child_setup does."""
        if self.v2 is not None and not _clone_into_works:  # refused once: the fork's way
            return None
        joins = tuple(c.path + "/tasks" for c in self.created if c.version == 1)
        return linux.ChildSetup(born_in=self.v2.path if self.v2 else None, joins=joins)

    def started(self, pid: int) -> None:
        pass

    def watch_fds(self) -> list[int]:
        fds = [] if self.memory is None else self.memory.watch_fds()
        return fds + ([self._pressure.fd] if self._pressure and self._pressure.fd else [])

    def check(self) -> str | None:
        if self.memory is None:
            return None
        if self._pressure is not None and self._pressure.check():
            return Reason.OOM  # thrashing at the limit, which the OOM killer does not end
        hit = self.memory.oom_hit()  # also drains v1's wake-up
        if self.budget is not None:
            # Which limit ran out, ours (oom) or a budget level's (budget_oom): its counters say.
            return self.budget.classify(self.memory.path, self.memory.version)
        return Reason.OOM if hit else None

    def signal_all(self, signo: int) -> None:
        primary = self.v2 or (self.created[0] if self.created else None)
        if primary is not None:
            cgroupfs.signal_all(primary.path, signo)

    def kill_all(self) -> None:
        for cgroup in self.created:  # v2 first: its cgroup.kill takes everything at once
            cgroup.kill()

    def measure(self) -> Usage:
        usage = tree.usage(self.memory, [self.pids] if self.pids else [], self.v2)
        if self._pressure is None or self._pressure.fired is None:
            return usage
        return Usage(**{**usage.as_dict(), "memory_pressure": self._pressure.fired})

    def remove(self) -> None:
        if self._pressure is not None:
            self._pressure.close()
            self._pressure = None
        if self._removed:
            return
        failed: OSError | None = None
        for cgroup in list(self.created):
            try:
                cgroup.remove()
                self.created.remove(cgroup)
            except OSError as err:
                failed = failed or err
        self.collect_stale()
        self._removed = failed is None
        if failed is not None:
            raise SandboxError(
                f"could not remove the cgroup {failed.filename}: {failed.strerror}",
                "a later run or `aero-sandbox gc` removes it once its processes are gone",
            )

    def guardian_notes(self) -> list[str] | None:
        """Our cgroups (in kill_all's order) and their parents (for collect_stale), one a line."""
        lines = ["backend cgroup"] + [f"cgroup {c.version} {c.path}" for c in self.created]
        lines += [f"parent {parent}" for parent in sorted(self._parents)]
        # A path with a newline (a parent so named) does not fit a line: then a forked guardian.
        return None if any("\n" in line for line in lines) else lines

    @classmethod
    def from_notes(cls, lines: list[str]) -> CgroupBackend:
        """The backend guardian_notes() described, as far as guardian_cleanup() needs it."""
        backend = cls()
        for line in lines:
            kind, _, value = line.partition(" ")
            if kind == "cgroup":
                version, _, path = value.partition(" ")
                backend.created.append(v2.Cgroup(path) if version == "2" else v1.Cgroup(path))
            elif kind == "parent":
                backend._parents.add(value)
        return backend

    def guardian_cleanup(self) -> None:
        """In the guardian, the launcher dead: kill through the cgroups, then remove them."""
        try:
            self.kill_all()
        finally:
            self.remove()

    def collect_stale(self) -> None:
        for parent in self._parents:
            tree.remove_stale(parent)

    def describe(self) -> Placement:
        cgroups = {}
        if self.memory is not None:
            cgroups["memory"] = self.memory.path
        if self.pids is not None:
            cgroups["pids"] = self.pids.path
        if self.v2 is not None:
            cgroups["unified"] = self.v2.path
        # From what was placed, not from self.created: remove() empties that before the report.
        versions = {c.version for c in (self.memory, self.pids, self.v2) if c is not None}
        return Placement(
            cgroups=cgroups,
            cgroup_mode=cgroupfs.cgroup_mode(versions),
            budget=None if self.budget is None else self.budget.describe(),
        )


# Cleared once clone3 is refused here: every later fork goes the old way at once.
_clone_into_works = [True]


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no /proc: cannot tell
        return False


def controller_sources(hierarchies: list[Hierarchy]) -> dict[str, Hierarchy]:
    """controller -> the hierarchy a sandbox takes it from: v2 when v2 offers it to our cgroup,
    else its v1 hierarchy (doctor shows the same choice)."""
    unified = next((h for h in hierarchies if h.version == 2), None)
    sources: dict[str, Hierarchy] = {}
    for controller in CONTROLLERS:
        if unified is not None and controller in unified.controllers:
            sources[controller] = unified
            continue
        legacy = next(
            (h for h in hierarchies if h.version == 1 and controller in h.controllers), None
        )
        if legacy is not None:
            sources[controller] = legacy
    return sources


def _arranged(own: str, wanted: set[str]) -> str:
    try:
        return v2.sandbox_parent(own, wanted)
    except OSError as err:
        raise _unavailable(own, err) from err


def at_parent(hierarchies: list[Hierarchy], parent: str) -> list[Hierarchy]:
    """The hierarchies a sandbox uses, each with `own` set to the admin's parent cgroup (--parent).

    PATH is a directory below a cgroup mount (/sys/fs/cgroup/agents on pure v2,
    /sys/fs/cgroup/memory/agents on hybrid/v1) or a path relative to the mounts (agents). Either
    way the same relative path is used in every hierarchy we use: the v2 one, and each v1 one
    that holds memory or pids; on a hybrid host the admin creates it in each of them.
    """
    used = [h for h in hierarchies if h.version == 2 or h.controllers & set(CONTROLLERS)]
    mounts = sorted({h.mount for h in used})
    relative = cgroupfs.below_mounts(parent, mounts)
    if relative is None:
        raise UsageError(
            f"invalid --parent value {parent!r}: expected a cgroup directory below "
            f"{' or '.join(mounts) or 'a mounted cgroup hierarchy'}, or a path "
            "relative to the cgroup mounts (agents)"
        )
    if not relative:
        raise UsageError(
            f"invalid --parent value {parent!r}: expected a cgroup below the hierarchy's root, "
            "absolute (/sys/fs/cgroup/agents) or relative to the cgroup mounts (agents)"
        )
    paths = [os.path.join(h.mount, relative) for h in used]
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        raise SandboxError(
            f"--parent {parent}: no such cgroup {', '.join(missing)}",
            f"an admin creates it and sets the shared limit: mkdir {' '.join(missing)}; "
            "see docs/containers.md",
        )
    for path in paths:
        if not os.access(path, os.W_OK):
            raise SandboxError(
                f"--parent {parent}: cannot create cgroups in {path}: permission denied",
                "run as root, or have the admin give this user the parent (chown -R)",
            )
    return [
        Hierarchy(
            h.version,
            h.mount,
            frozenset(cgroupfs.read_words(path + "/cgroup.controllers"))
            if h.version == 2
            else h.controllers,
            path,
        )
        for h, path in zip(used, paths, strict=True)
    ]


def _unavailable(parent: str, err: OSError) -> BackendUnavailable:
    remedy = READ_ONLY_REMEDY if err.errno == errno.EROFS else PERMISSION_REMEDY
    return BackendUnavailable(
        "cgroup", f"cannot create a cgroup in {parent}: {err.strerror}", remedy
    )
