"""The `cgroup` backend: the launcher creates the cgroups itself.

Covers pure cgroup v2 (root without systemd, a delegated subtree, a container with a writable
cgroupfs), hybrid hosts (v1 memory/pids controllers plus a controller-less v2 hierarchy used for
cgroup.kill, cgroup.events and cpu.stat) and legacy v1. Each controller comes from v2 when v2
offers it to our cgroup, else from its v1 hierarchy. Every sandbox is created below the cgroup the
launcher runs in, in each hierarchy it uses.
"""

from __future__ import annotations

import errno
import os

from sandbox.cgroups import cgroupfs, pressure
from sandbox.cgroups.cgroupfs import Hierarchy
from sandbox.core import identity
from sandbox.core.errors import BackendUnavailable, SandboxError, UsageError
from sandbox.core.limits import Limits, format_size
from sandbox.core.result import Reason, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Where we move the processes of our own cgroup so that it may enable controllers for its
# children (cgroup v2's no-internal-process rule). It is not a sandbox: gc leaves it alone.
LEAF = "aero-leaf"
CONTROLLERS = ("memory", "pids")

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
    tick_s: float | None = None

    def __init__(
        self, hierarchies: list[Hierarchy] | None = None, parent: str | None = None
    ) -> None:
        self._hierarchies = hierarchies
        self._parent = parent  # --parent: an admin-made cgroup that caps all sandboxes together
        self.not_enforced: list[str] = []
        self.dirs: dict[str, int] = {}  # every directory we created -> its cgroup version
        self.memory: tuple[str, int] | None = None  # (directory, version) holding memory limits
        self.pids: tuple[str, int] | None = None
        self.v2: str | None = None  # our v2 directory, for cgroup.kill/cgroup.events/cpu.stat
        self._oom_fds: tuple[int, int] | None = None  # v1: (eventfd, memory.oom_control fd)
        self._parents: set[str] = set()
        self._pressure: pressure.PressureWatch | None = None

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, limits: Limits, argv: list[str]) -> None:
        hierarchies = self._hierarchies if self._hierarchies is not None else cgroupfs.discover()
        if self._parent is not None:
            hierarchies = at_parent(hierarchies, self._parent)
        v2 = next((h for h in hierarchies if h.version == 2), None)
        sources: dict[str, Hierarchy] = {}
        for controller in CONTROLLERS:
            if v2 is not None and controller in v2.controllers:
                sources[controller] = v2
            else:
                v1 = next(
                    (h for h in hierarchies if h.version == 1 and controller in h.controllers), None
                )
                if v1 is not None:
                    sources[controller] = v1
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
            if v2 is not None:
                wanted = {c for c, h in sources.items() if h is v2}
                self.v2 = self._create(_enable_controllers(v2.own, wanted), name, 2)
            placed = {
                controller: (self.v2, 2)
                if hierarchy is v2 and self.v2
                else (self._create(hierarchy.own, name, 1), 1)
                for controller, hierarchy in sources.items()
            }
            self.memory, self.pids = placed.get("memory"), placed.get("pids")
            self._set_limits(limits)
            self._pressure = pressure.watch(self.v2, limits)  # PSI: v2 and hybrid hosts
            self.tick_s = self._pressure.tick_s if self._pressure else None
        except BaseException:
            self.remove()
            raise

    def _create(self, parent: str, name: str, version: int) -> str:
        path = os.path.join(parent, name)
        if path in self.dirs:
            return path
        try:
            os.mkdir(path)
        except OSError as err:
            raise _unavailable(parent, err) from err
        self.dirs[path] = version
        self._parents.add(parent)
        return path

    def _set_limits(self, limits: Limits) -> None:
        if self.memory is not None:
            path, version = self.memory
            if version == 2:
                if limits.memory_bytes is not None:
                    _set(path, "memory.max", limits.memory_bytes)
                    if os.path.exists(path + "/memory.swap.max"):
                        _set(path, "memory.swap.max", 0)
                # On OOM the kernel kills the whole sandbox, not one process of it (Linux 4.19+).
                if os.path.exists(path + "/memory.oom.group"):
                    _set(path, "memory.oom.group", 1)
            else:
                if limits.memory_bytes is not None:
                    _set(path, "memory.limit_in_bytes", limits.memory_bytes)
                    if os.path.exists(path + "/memory.memsw.limit_in_bytes"):
                        _set(path, "memory.memsw.limit_in_bytes", limits.memory_bytes)
                self._watch_v1_oom(path)
        if self.pids is not None and limits.pids is not None:
            _set(self.pids[0], "pids.max", limits.pids)

    def _watch_v1_oom(self, path: str) -> None:
        """v1 has no memory.oom.group: an eventfd tells us of an OOM so we can kill the group."""
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ofd = os.open(path + "/memory.oom_control", os.O_RDONLY)
            cgroupfs.write(path + "/cgroup.event_control", f"{efd} {ofd}")
        except OSError:
            return  # no notification: the OOM counter still reports it at the end
        self._oom_fds = (efd, ofd)

    # -- run ----------------------------------------------------------------------------------
    def child_setup(self) -> None:
        for path in self.dirs:
            cgroupfs.write(path + "/cgroup.procs", "0")

    def started(self, pid: int) -> None:
        pass

    def watch_fds(self) -> list[int]:
        fds = [self._oom_fds[0]] if self._oom_fds else []
        return fds + ([self._pressure.fd] if self._pressure and self._pressure.fd else [])

    def check(self) -> str | None:
        if self.memory is None:
            return None
        if self._pressure is not None and self._pressure.check():
            return Reason.OOM
        path, version = self.memory
        if version == 1:
            if self._oom_fds is None:
                return Reason.OOM if _oom_kills(path, 1) else None
            try:
                os.read(self._oom_fds[0], 8)
            except BlockingIOError:
                return None
            return Reason.OOM
        local = cgroupfs.read_keyed(path + "/memory.events.local") or cgroupfs.read_keyed(
            path + "/memory.events"
        )
        return Reason.OOM if local.get("oom_kill") or local.get("oom_group_kill") else None

    def _primary(self) -> tuple[str, int]:
        if self.v2 is not None:
            return self.v2, 2
        return next(iter(self.dirs.items()))

    def signal_all(self, signo: int) -> None:
        cgroupfs.signal_all(self._primary()[0], signo)

    def kill_all(self) -> None:
        for path, version in sorted(self.dirs.items(), key=lambda item: -item[1]):
            if not cgroupfs.kill_all(path, version):
                raise SandboxError(f"processes in {path} did not die within 3 s of SIGKILL")

    def measure(self) -> Usage:
        peak = oom_kills = hits = None
        cpu = None
        if self.memory is not None:
            path, version = self.memory
            # memory.peak: Linux 5.19+; v1 has memory.max_usage_in_bytes.
            peak = cgroupfs.read_int(
                path + ("/memory.peak" if version == 2 else "/memory.max_usage_in_bytes")
            )
            oom_kills = _oom_kills(path, version)
        if self.pids is not None:
            hits = cgroupfs.read_keyed(self.pids[0] + "/pids.events").get("max")
        if self.v2 is not None:
            usec = cgroupfs.read_keyed(self.v2 + "/cpu.stat").get("usage_usec")
            cpu = None if usec is None else usec / 1e6
        stall = self._pressure.fired if self._pressure else None
        return Usage(peak, oom_kills, hits, cpu, stall)

    def remove(self) -> None:
        if self._pressure is not None:
            self._pressure.close()
        if self._oom_fds is not None:
            for fd in self._oom_fds:
                os.close(fd)
            self._oom_fds = None
        failed: OSError | None = None
        for path in list(self.dirs):
            try:
                cgroupfs.remove_tree(path)
                del self.dirs[path]
            except OSError as err:
                failed = failed or err
        self.collect_stale()
        if failed is not None:
            raise SandboxError(
                f"could not remove the cgroup {failed.filename}: {failed.strerror}",
                "a later run or `aero-sandbox gc` removes it once its processes are gone",
            )

    def collect_stale(self) -> None:
        for parent in self._parents:
            cgroupfs.remove_stale(parent)

    def describe(self) -> dict[str, Any]:
        cgroups = {}
        if self.memory is not None:
            cgroups["memory"] = self.memory[0]
        if self.pids is not None:
            cgroups["pids"] = self.pids[0]
        if self.v2 is not None:
            cgroups["unified"] = self.v2
        # From what was placed, not from self.dirs: remove() empties that before the report.
        placed = [self.memory, self.pids, (self.v2, 2) if self.v2 else None]
        versions = sorted({version for item in placed if item for version in item[1:]})
        mode = "v2" if versions == [2] else "v1" if versions == [1] else "hybrid"
        return {"cgroups": cgroups, "cgroup_mode": mode}


def _oom_kills(path: str, version: int) -> int | None:
    if version == 2:
        return cgroupfs.read_keyed(path + "/memory.events").get("oom_kill")
    return cgroupfs.read_keyed(path + "/memory.oom_control").get("oom_kill")


def _set(path: str, name: str, value: int) -> None:
    """Write a limit and read it back: a limit that did not take is an error (systemd#9641)."""
    file = f"{path}/{name}"
    try:
        cgroupfs.write(file, str(value))
    except OSError as err:
        raise SandboxError(f"cannot set {file} to {value}: {err.strerror}") from err
    got = cgroupfs.read_int(file)
    # v1 rounds memory limits down to whole pages.
    if got is None or not (value - os.sysconf("SC_PAGE_SIZE") < got <= value):
        shown = format_size(value) if "memory" in name else str(value)
        raise SandboxError(
            f"{file} reads back {got} after writing {value} ({shown}): the limit did not take"
        )


def _enable_controllers(own: str, wanted: set[str]) -> str:
    """Make `own` able to give `wanted` controllers to a child cgroup; return it as the parent.

    cgroup v2 lets a cgroup enable controllers for its children only while it holds no
    processes itself (the root excepted), so first move our cgroup's processes, ourselves
    included, into a leaf below it (BenchExec and container inits do the same).
    An earlier launcher may have done so already: then we run in that leaf, and its parent,
    which has the controllers, is where sandboxes go (not a leaf of the leaf).
    """
    if os.path.basename(own) == LEAF:
        above = os.path.dirname(own)
        if wanted <= set(cgroupfs.read_words(above + "/cgroup.subtree_control")):
            return above
    missing = wanted - set(cgroupfs.read_words(own + "/cgroup.subtree_control"))
    if not missing:
        return own
    is_root = not os.path.exists(own + "/cgroup.type")
    for _attempt in range(20):
        if not is_root:
            _move_processes_to_leaf(own)
        try:
            cgroupfs.write(
                own + "/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing))
            )
            return own
        except OSError as err:
            if err.errno == errno.EBUSY:  # a process forked into `own` meanwhile: move it too
                continue
            raise _unavailable(own, err) from err
    raise SandboxError(
        f"cannot enable {', '.join(sorted(missing))} in {own}: processes keep appearing"
    )


def _move_processes_to_leaf(own: str) -> None:
    pids = cgroupfs.read_words(own + "/cgroup.procs")
    if "0" in pids:
        # A process of another pid namespace reads as 0 (a launcher under `unshare --pid` in a
        # cgroup it shares with the host): we cannot name it, so cannot move it out.
        raise BackendUnavailable(
            "cgroup",
            f"{own} holds processes outside this pid namespace, which cannot be moved into a "
            "leaf, so it cannot give memory and pids to a sandbox",
            "start it in a cgroup that holds no process of another pid namespace (a container "
            "runtime makes one per container), or use --parent, or --backend rlimit",
        )
    leaf = os.path.join(own, LEAF)
    try:
        os.mkdir(leaf)
    except FileExistsError:
        pass
    except OSError as err:
        raise _unavailable(own, err) from err
    for pid in pids:
        try:
            cgroupfs.write(leaf + "/cgroup.procs", pid)
        except ProcessLookupError:
            pass
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise _unavailable(own, err) from err


def at_parent(hierarchies: list[Hierarchy], parent: str) -> list[Hierarchy]:
    """The hierarchies a sandbox uses, each with `own` set to the admin's parent cgroup (--parent).

    PATH is a directory below a cgroup mount (/sys/fs/cgroup/agents on pure v2,
    /sys/fs/cgroup/memory/agents on hybrid/v1) or a path relative to the mounts (agents). Either
    way the same relative path is used in every hierarchy we use: the v2 one, and each v1 one
    that holds memory or pids; on a hybrid host the admin creates it in each of them.
    """
    used = [h for h in hierarchies if h.version == 2 or h.controllers & set(CONTROLLERS)]
    relative = parent.strip()
    if relative.startswith("/"):
        mounts = sorted({h.mount for h in used}, key=len, reverse=True)
        mount = next((m for m in mounts if relative.startswith(m.rstrip("/") + "/")), None)
        if mount is None:
            raise UsageError(
                f"invalid --parent value {parent!r}: expected a cgroup directory below "
                f"{' or '.join(sorted(mounts)) or 'a mounted cgroup hierarchy'}, or a path "
                "relative to the cgroup mounts (agents)"
            )
        relative = relative[len(mount) :]
    parts = [part for part in relative.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise UsageError(
            f"invalid --parent value {parent!r}: expected a cgroup below the hierarchy's root, "
            "absolute (/sys/fs/cgroup/agents) or relative to the cgroup mounts (agents)"
        )
    paths = [os.path.join(h.mount, *parts) for h in used]
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
