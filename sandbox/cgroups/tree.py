"""The life of a cgroup directory, the same on v1 and v2: create, kill until empty, remove.

Creating goes below a parent we were given (our own cgroup, --parent, a delegated scope);
removal is bottom-up, because nested sandboxes leave cgroups below ours. The start-up sweep
(`remove_stale`) removes what crashed launchers left beside a new sandbox.
"""

from __future__ import annotations

import errno
import os
import time

from sandbox.cgroups import cgroupfs
from sandbox.core import identity, linux
from sandbox.core.errors import SandboxError
from sandbox.core.limits import format_size
from sandbox.core.result import Usage

KILL_TIMEOUT_S = 3.0  # a task in uninterruptible sleep (D state) may need a moment to die


def create(parent: str, name: str) -> str:
    """mkdir parent/name; OSError for the caller to turn into a remedy (EACCES, EROFS...)."""
    path = os.path.join(parent, name)
    os.mkdir(path)
    return path


def kill_until_empty(directory: str, timeout_s: float = KILL_TIMEOUT_S) -> bool:
    """SIGKILL everything in the cgroup subtree and wait (bounded) until it is empty.

    cgroup.kill (Linux 5.14+, v2 only) kills the whole subtree atomically, fork races included;
    without it we kill what cgroup.procs lists until nothing is left. False on the deadline.
    On v2 the subtree's `populated` in cgroup.events (Linux 4.5+) says whether anything is left:
    one read, where listing every cgroup.procs below walks the tree (a command that ended by
    itself leaves nothing, the usual case at tear-down: no kill is written then).
    """
    kill_file = directory + "/cgroup.kill"
    use_kill_file = os.path.exists(kill_file)

    def kill_round() -> list[int]:
        if use_kill_file:
            try:
                if not _populated(directory):
                    return []
                cgroupfs.write(kill_file, "1")
            except FileNotFoundError:
                return []  # the cgroup is gone, and with it everything in it
            return cgroupfs.procs(directory)
        left = cgroupfs.procs(directory)
        linux.kill_each(left, 9)
        return left

    return not linux.until_empty(kill_round, timeout_s)


def _populated(directory: str) -> bool:
    return cgroupfs.read_keyed(directory + "/cgroup.events").get("populated") != 0


def remove(directory: str, timeout_s: float = 2.0) -> None:
    """rmdir a cgroup and the cgroups below it, deepest first (nested sandboxes leave some)."""
    try:  # the usual case, no cgroup below and no task still exiting: no listing needed
        os.rmdir(directory)
        return
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno != errno.EBUSY:
            raise
    deadline = time.monotonic() + timeout_s
    for top, _dirs, _files in os.walk(directory, topdown=False):
        while True:
            try:
                os.rmdir(top)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: the last task is still exiting; give it a moment, bounded.
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)


def remove_stale(parent: str) -> list[str]:
    """Remove empty sandbox cgroups whose launcher is gone (a crash, a SIGKILL of both processes).

    A live launcher's cgroup is never touched: its pid still exists. rmdir refuses a cgroup that
    still holds a process, so a live sandbox cannot be removed by mistake either.
    """
    removed: list[str] = []
    try:
        # cgroupfs (kernfs, Linux 3.15+) counts a directory's subdirectories in its link count:
        # 2 is none at all, the usual case once our own is gone, with no listing to read.
        if os.stat(parent).st_nlink == 2:
            return removed
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        pid = identity.launcher_pid(name)
        if pid is None or pid == os.getpid() or identity.pid_exists(pid):
            continue
        path = os.path.join(parent, name)
        try:
            remove(path, timeout_s=0)
            removed.append(path)
        except OSError:
            pass
    return removed


class Cgroup:
    """One cgroup directory of one hierarchy, as a sandbox (or a level above sandboxes) uses it.

    v1.Cgroup and v2.Cgroup fill in what differs (the limit files, how an OOM is noticed,
    where usage is read); everything else is here. A later level with caps (a shared budget) is
    the same object: create it at a parent, set its limits, create sandboxes below its path.
    """

    version = 0

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def tick_s(self) -> float | None:
        """Seconds until oom_hit() must look again without a wake-up (v1, while it waits for the
        kernel's OOM counter), or None."""
        return None

    @classmethod
    def create(cls, parent: str, name: str) -> Cgroup:
        return cls(create(parent, name))

    # -- limits -------------------------------------------------------------------------------
    def set_memory(self, limit_bytes: int | None) -> None:
        raise NotImplementedError

    def set_pids(self, limit: int) -> None:
        self.write_checked("pids.max", limit)

    def write_checked(self, name: str, value: int) -> None:
        """Write a limit and read it back: one that did not take is an error (systemd#9641)."""
        file = f"{self.path}/{name}"
        try:
            cgroupfs.write(file, str(value))
        except OSError as err:
            raise SandboxError(f"cannot set {file} to {value}: {err.strerror}") from err
        self.check_reads(name, value)

    def check_reads(self, name: str, value: int, who: str = "") -> None:
        """The limit file reads `value` (memory limits: rounded down to whole pages)."""
        file = f"{self.path}/{name}"
        got = cgroupfs.read_int(file)
        page = os.sysconf("SC_PAGE_SIZE") if "memory" in name else 1
        if got is None or not (value - page < got <= value):
            shown = f" ({format_size(value)})" if "memory" in name else ""
            cause = who or "the limit did not take"
            raise SandboxError(f"{file} reads back {got} after setting {value}{shown}: {cause}")

    # -- run ----------------------------------------------------------------------------------
    def watch_fds(self) -> list[int]:
        """File descriptors whose readiness means oom_hit() may have news."""
        return []

    def oom_hit(self) -> bool:
        """Whether the kernel's OOM killer struck THIS cgroup: the one place an OOM is decided
        (a pressure-based decision, PSI over a window as systemd-oomd does, hooks in here)."""
        return self.kernel_oom_kill()

    def kernel_oom_kill(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        try:
            emptied = kill_until_empty(self.path)
        except OSError as err:
            raise SandboxError(f"cannot kill the processes in {self.path}: {err.strerror}") from err
        if not emptied:
            raise SandboxError(
                f"processes in {self.path} did not die within {KILL_TIMEOUT_S:g} s of SIGKILL"
            )

    # -- usage (None where this kernel cannot tell) -------------------------------------------
    def peak_memory(self) -> int | None:
        raise NotImplementedError

    def oom_kills(self) -> int | None:
        raise NotImplementedError

    def pids_hits(self) -> int | None:
        return cgroupfs.read_keyed(self.path + "/pids.events").get("max")

    def cpu_s(self) -> float | None:
        return None

    def close(self) -> None:
        """Release what watches this cgroup (v1's eventfd); the directory stays."""

    def remove(self) -> None:
        self.close()
        remove(self.path)


def usage(memory: Cgroup | None, pids: list[Cgroup], cpu: Cgroup | None) -> Usage:
    """What a sandbox used, from the cgroups that hold its memory, pids and cpu accounting.

    `pids` may name two cgroups: pids.events counts a refused fork in the forking task's cgroup
    up to Linux 6.1, in the cgroup whose limit refused it from 6.2 on.
    """
    hits = [h for h in (cgroup.pids_hits() for cgroup in pids) if h is not None]
    return Usage(
        peak_memory_bytes=None if memory is None else memory.peak_memory(),
        oom_kills=None if memory is None else memory.oom_kills(),
        pids_limit_hits=max(hits) if hits else None,
        cpu_s=None if cpu is None else cpu.cpu_s(),
    )
