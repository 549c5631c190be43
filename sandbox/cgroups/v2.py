"""cgroup v2 (the unified hierarchy): limits, OOM, usage, and giving controllers to children.

Used by the cgroup backend for the directories it creates, and by the systemd backend for the
delegated scope systemd hands it (systemd only provides the directory, as in BenchExec).
Files by kernel version: memory.oom.group 4.19+, memory.events.local 5.2+, cgroup.kill 5.14+,
memory.peak 5.19+; each is used only where it exists.
"""

from __future__ import annotations

import errno
import os

from sandbox.cgroups import cgroupfs, tree
from sandbox.core.errors import BackendUnavailable, SandboxError

# Where we move the processes of a cgroup so that it may enable controllers for its children
# (cgroup v2's no-internal-process rule). It is not a sandbox: gc leaves it alone.
LEAF = "aero-leaf"


class Cgroup(tree.Cgroup):
    version = 2

    def set_memory(self, limit_bytes: int | None) -> None:
        if limit_bytes is not None:
            self.write_checked("memory.max", limit_bytes)
            if os.path.exists(self.path + "/memory.swap.max"):
                self.write_checked("memory.swap.max", 0)
        self.kill_as_group()

    def kill_as_group(self) -> None:
        """On OOM the kernel kills the whole cgroup, not one process of it (Linux 4.19+)."""
        if os.path.exists(self.path + "/memory.oom.group"):
            self.write_checked("memory.oom.group", 1)

    def kernel_oom_kill(self) -> bool:
        # .local (Linux 5.2+): a kill in a sandbox nested in this one, under its own smaller
        # limit, counts there, not here.
        events = cgroupfs.read_keyed(self.path + "/memory.events.local") or cgroupfs.read_keyed(
            self.path + "/memory.events"
        )
        return bool(events.get("oom_kill") or events.get("oom_group_kill"))

    def peak_memory(self) -> int | None:
        return cgroupfs.read_int(self.path + "/memory.peak")  # Linux 5.19+

    def oom_kills(self) -> int | None:
        return cgroupfs.read_keyed(self.path + "/memory.events").get("oom_kill")

    def cpu_s(self) -> float | None:
        usec = cgroupfs.read_keyed(self.path + "/cpu.stat").get("usage_usec")
        return None if usec is None else usec / 1e6


def sandbox_parent(own: str, wanted: set[str]) -> str:
    """Where sandboxes with the `wanted` controllers go: `own`, made able to give them.

    An earlier launcher may have moved our processes into a leaf already: then we run in that
    leaf, and its parent, which has the controllers, is where sandboxes go (not a leaf of the
    leaf). OSError (EACCES, EROFS) for the caller to turn into a remedy.
    """
    if os.path.basename(own) == LEAF:
        above = os.path.dirname(own)
        if wanted <= set(cgroupfs.read_words(above + "/cgroup.subtree_control")):
            return above
    give_controllers(own, wanted)
    return own


def give_controllers(directory: str, wanted: set[str]) -> None:
    """Enable `wanted` controllers for the children of `directory`.

    cgroup v2 lets a cgroup enable controllers for its children only while it holds no
    processes itself (the root excepted), so first move its processes, ourselves included,
    into a leaf below it (BenchExec and container inits do the same). A delegated systemd scope
    whose processes were placed in their own leaves already has none to move.
    """
    missing = wanted - set(cgroupfs.read_words(directory + "/cgroup.subtree_control"))
    if not missing:
        return
    is_root = not os.path.exists(directory + "/cgroup.type")
    for _attempt in range(20):
        if not is_root:
            _move_processes_to_leaf(directory)
        try:
            cgroupfs.write(
                directory + "/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing))
            )
            return
        except OSError as err:
            if err.errno != errno.EBUSY:  # EBUSY: a process forked in meanwhile: move it too
                raise
    raise SandboxError(
        f"cannot enable {', '.join(sorted(missing))} in {directory}: processes keep appearing"
    )


def _move_processes_to_leaf(directory: str) -> None:
    pids = cgroupfs.read_words(directory + "/cgroup.procs")
    if not pids:
        return
    if "0" in pids:
        # A process of another pid namespace reads as 0 (a launcher under `unshare --pid` in a
        # cgroup it shares with the host): we cannot name it, so cannot move it out. Only the
        # cgroup backend's own cgroup can hold one (a systemd scope holds what we put there).
        raise BackendUnavailable(
            "cgroup",
            f"{directory} holds processes outside this pid namespace, which cannot be moved "
            "into a leaf, so it cannot give memory and pids to a sandbox",
            "start it in a cgroup that holds no process of another pid namespace (a container "
            "runtime makes one per container), or use --parent, or --backend rlimit",
        )
    leaf = os.path.join(directory, LEAF)
    try:
        os.mkdir(leaf)
    except FileExistsError:
        pass
    for pid in pids:
        move(leaf, int(pid))


def move(directory: str, pid: int) -> None:
    """Put a process into a cgroup; one that exited meanwhile is no error."""
    try:
        cgroupfs.write(directory + "/cgroup.procs", str(pid))
    except ProcessLookupError:
        pass
    except OSError as err:
        if err.errno != errno.ESRCH:
            raise
