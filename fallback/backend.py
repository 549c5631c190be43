"""The `rlimit` backend: for hosts where no cgroup can be had (read-only cgroupfs, no delegation).

    memory  a watchdog sums the tree's resident memory (every 5-50 ms while it nears --mem,
            less often while it is still) and kills the whole tree over --mem (reason "oom",
            exit 137); per-process rlimits well above --mem (RLIMIT_AS, RLIMIT_DATA,
            fallback/address_space.py) are a backstop, and a process that reaches them ends
            the run as an OOM too; so does a tree thrashing near --mem (--oom-pressure's window)
    pids    the watchdog counts the tree's tasks and kills it over --pids (reason "pids", exit
            137); for users the kernel does not exempt (root is), RLIMIT_NPROC too (it counts
            all of the user's tasks, so it is set to what the user already runs plus --pids)
    tree    the launcher is a child subreaper: descendants that double-fork or setsid() come back
            to it, so it can signal, kill and reap all of them
    guardian if the launcher is SIGKILLed, the guardian finds the tree through the list the
            launcher shares with it (fallback/handoff.py) and through an environment marker
            every descendant inherits, stops it (so it cannot fork away) and kills it

docs/fallback.md says what this cannot do that a cgroup does.
"""

from __future__ import annotations

import os
import resource
import time

from fallback import proctree
from fallback.address_space import backstop
from fallback.handoff import Handoff
from fallback.watchdog import INTERVAL_S, Watchdog
from sandbox.core import identity, linux, procfs
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import Limits
from sandbox.core.result import Placement, Reason, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

# Every process of the tree inherits this variable (unless it clears its environment): the
# guardian finds by it what was forked after the watchdog's last sample.
MARKER = "AERO_SANDBOX_TREE"
KILL_TIMEOUT_S = 3.0  # as a cgroup's kill: a task in uninterruptible sleep may need a moment
GUARDIAN_STOP_S = 1.0  # of the 2 s promise: stopping what the guardian finds, then the kill
QUIET_ROUNDS = 5  # the guardian's marker scans that must find nothing new in a row ...
QUIET_PAUSE_S = 0.01  # ... this far apart
WATCHDOG_NICE_BOOST = 5


class RlimitBackend:
    name = "rlimit"

    def __init__(self) -> None:
        self.not_enforced: list[str] = []
        self.tick_s: float | None = INTERVAL_S
        self._launcher = os.getpid()
        self._id = ""
        self._rlimits: dict[str, int] = {}  # RLIMIT_* name -> value set in the child
        self._why = ""
        self._watchdog: Watchdog | None = None
        self._handoff: Handoff | None = None
        self._main: int | None = None
        self._excluded: set[int] = set()
        self._ended_by: str | None = None
        self._killed = False  # kill_all emptied the tree: nothing left to sample
        self._nice = 0  # the caller's priority, which the command keeps

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, limits: Limits, argv: list[str]) -> None:
        if not os.path.isdir(f"{procfs.PROC}/self/task"):
            raise BackendUnavailable(
                "rlimit", "/proc is not mounted", "mount it: mount -t proc proc /proc"
            )
        self._launcher = os.getpid()
        self._id = identity.sandbox_name()
        chosen = backstop(argv, limits.memory_bytes, limits.address_space_bytes)
        self._why = chosen.why
        wanted = {"RLIMIT_AS": chosen.address_space, "RLIMIT_DATA": chosen.data}
        nproc = limits.pids is not None and procfs.nproc_applies()
        if nproc and limits.pids is not None:
            # +1: the guardian, forked after this count, is the user's too.
            wanted["RLIMIT_NPROC"] = procfs.user_tasks(os.getuid()) + 1 + limits.pids
        for name, value in wanted.items():
            if value is not None:
                # Never above the inherited hard limit: only CAP_SYS_RESOURCE may raise it.
                hard = resource.getrlimit(getattr(resource, name))[1]
                self._rlimits[name] = value if hard == resource.RLIM_INFINITY else min(value, hard)
        if limits.memory_bytes is not None:
            self.not_enforced.append("kernel memory limit for the tree (sampled instead)")
        if limits.pids is not None:
            per_user = "(RLIMIT_NPROC counts all of the user's tasks)"
            self.not_enforced.append(
                f"kernel pids limit for the tree {per_user if nproc else '(sampled instead)'}"
            )
        backstops = {k: v for k, v in self._rlimits.items() if k in ("RLIMIT_DATA", "RLIMIT_AS")}
        # The watchdog's latency is the overshoot: on a loaded host (load 30-45 on this 2-core
        # VM) a launcher at the command's priority waited 100-200 ms for a CPU between its
        # sample and its kill. So it runs at a higher priority where it may (root or
        # CAP_SYS_NICE), and the command gets back the caller's (child_setup).
        self._nice = _caller_nice()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, max(-20, self._nice - WATCHDOG_NICE_BOOST))
        except OSError:
            pass  # EACCES: not permitted; the watchdog then samples at the caller's priority
        self._watchdog = Watchdog(
            self._launcher,
            limits.memory_bytes,
            limits.pids,
            backstops,
            # --oom-pressure's window (None: off); the watchdog has its own thrash rule
            None if limits.oom_pressure_pct is None else limits.oom_pressure_window_s,
        )
        self._handoff = Handoff()

    # -- run ----------------------------------------------------------------------------------
    def child_setup(self) -> None:
        os.setpriority(os.PRIO_PROCESS, 0, self._nice)  # lowering is always permitted
        for name, value in self._rlimits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.environ[MARKER] = self._id

    def child_plan(self) -> linux.ChildSetup:
        rlimits = tuple((getattr(resource, name), value) for name, value in self._rlimits.items())
        return linux.ChildSetup(rlimits=rlimits, nice=self._nice, env=((MARKER, self._id),))

    def started(self, pid: int) -> None:
        self._main = pid
        # Our other children, now: the guardian. Every later one is an orphan of the tree.
        self._excluded = set(proctree.own_children(self._launcher)) - {pid}
        assert self._watchdog is not None
        self._watchdog.adopt(pid, self._excluded)
        self._publish()

    def watch_fds(self) -> list[int]:
        return []

    def check(self) -> str | None:
        # After kill_all (the tear-down's last check comes then) the tree is gone: a sample
        # would measure nothing, and the first one reads a stat file per process of the host.
        if self._ended_by is not None or self._watchdog is None or self._main is None:
            return self._ended_by
        if self._killed:
            return None
        memory, tasks = self._watchdog.sample()
        self.tick_s = self._watchdog.interval_s
        self._publish()
        over = self._watchdog.over(memory, tasks)
        if over is not None:
            self._ended_by = Reason.OOM if over == "memory" else Reason.PIDS
            # Kill what the sample saw at once, before kill_all's walk of the whole /proc:
            # each ms lets a tree growing 1 GiB/s gain 1 MB. These pids are safe to signal:
            # nothing was reaped since the sample, so each is ours, alive or a zombie.
            linux.kill_each(set(self._watchdog.members), _signal.SIGKILL)
        return self._ended_by

    def _publish(self) -> None:
        if self._handoff is not None and self._watchdog is not None:
            self._handoff.write(list(self._watchdog.members.items()))

    def signal_all(self, signo: int) -> None:
        linux.kill_each(self._tree_now(), signo)

    def kill_all(self) -> None:
        # Until every process is dead and waitable: a multi-threaded process whose main thread
        # has exited shows "Z" while its other threads still exit, and cannot be reaped (nor
        # its CPU time counted in os.times()) before they have.
        def kill_round() -> set[int]:
            left = self._tree_now() | self._not_yet_waitable()
            linux.kill_each(left, _signal.SIGKILL)
            return left

        left = linux.until_empty(kill_round, KILL_TIMEOUT_S)
        self._killed = not left and self._main is not None
        if left:
            raise SandboxError(
                f"processes {sorted(left)} did not die within {KILL_TIMEOUT_S:g} s of SIGKILL"
            )

    def _not_yet_waitable(self) -> set[int]:
        """The launcher's children in the tree that waitpid() could not reap yet."""
        if self._main is None:
            return set()
        waiting = set()
        for pid in set(proctree.own_children(self._launcher)) - self._excluded:
            try:
                flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
                if os.waitid(os.P_PID, pid, flags) is None:
                    waiting.add(pid)
            except ChildProcessError:
                pass  # reaped since the list was read
        return waiting

    def _tree_now(self) -> set[int]:
        """Live (not zombie) descendants of the launcher, the guardian's subtree excluded."""
        if self._main is None:  # nothing was started: the launcher's only child is the guardian
            return set()
        if _CHILDREN_LISTED:
            roots = set(proctree.own_children(self._launcher)) - self._excluded
            return {pid for pid, info in proctree.walk(roots).items() if info.state not in "ZX"}
        procs = proctree.table()
        roots = {
            pid
            for pid, info in procs.items()
            if info.ppid == self._launcher and pid not in self._excluded
        }
        return {pid for pid in proctree.descendants(procs, roots) if procs[pid].state not in "ZX"}

    def guardian_notes(self) -> list[str] | None:
        """The sandbox's marker and the handoff's memfd, which the guardian is given; None
        where the handoff has no fd (then the guardian is a fork sharing its memory)."""
        if self._handoff is None or self._handoff.fd is None:
            return None
        return ["backend rlimit", f"id {self._id}", f"fd {self._handoff.fd}"]

    @classmethod
    def from_notes(cls, lines: list[str]) -> RlimitBackend:
        """The backend guardian_notes() described, as far as guardian_cleanup() needs it: the
        marker to scan for, the handoff (its fd as the guardian got it)."""
        backend = cls()
        for line in lines:
            kind, _, value = line.partition(" ")
            if kind == "id":
                backend._id = value
            elif kind == "fd":
                backend._handoff = Handoff(int(value))
        return backend

    def guardian_cleanup(self) -> None:
        try:
            self._kill_from_guardian()
        finally:
            self.remove()

    def _kill_from_guardian(self) -> None:
        """The launcher died: its orphans went to init. Find, stop, then kill what was ours.

        Roots: the processes of the launcher's last sample that still exist with the same start
        time, and every process carrying our environment marker. Each round stops the roots and
        their descendants (a stopped process cannot fork) and scans for the marker again: a
        process caught between fork and exec, or forked by one not yet stopped, shows it only
        in a later round. Rounds end after QUIET_ROUNDS in a row found nothing new, QUIET_PAUSE_S
        apart: one empty round is not enough, since a process in the middle of execve() shows
        no environment for a moment, and a shell killed by PDEATHSIG leaves children it was
        still forking (2 in 40 launchers killed early left a daemon with one empty round).
        """
        roots: set[int] = set()
        for pid, start in self._handoff.read() if self._handoff is not None else []:
            info = procfs.stat(pid)
            if info is not None and info.start == start:
                roots.add(pid)
        stopped: set[int] = set()
        deadline = time.monotonic() + GUARDIAN_STOP_S
        quiet = 0
        try:
            while time.monotonic() < deadline and quiet < QUIET_ROUNDS:
                roots |= proctree.marked(MARKER, self._id)
                roots.discard(os.getpid())
                procs = proctree.table()
                found = {
                    pid
                    for pid in proctree.descendants(procs, roots | stopped)
                    if procs[pid].state not in "ZX"
                } - stopped
                if not found:
                    quiet += 1
                    time.sleep(QUIET_PAUSE_S)
                    continue
                quiet = 0
                linux.kill_each(found, _signal.SIGSTOP)
                stopped |= found
        finally:
            linux.kill_each(stopped, _signal.SIGKILL)
        deadline = time.monotonic() + GUARDIAN_STOP_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in stopped):
            time.sleep(0.01)

    def measure(self) -> Usage:
        watchdog = self._watchdog
        if watchdog is None:
            return Usage()
        return Usage(
            peak_memory_bytes=watchdog.peak_memory,
            oom_kills=1 if self._ended_by == Reason.OOM else 0,
            pids_limit_hits=None if watchdog.tasks_limit is None else watchdog.tasks_limit_hits,
        )

    def collect_stale(self) -> None:
        pass  # no cgroups: a crashed run leaves only its registry entry, which the launcher sweeps

    def remove(self) -> None:
        if self._handoff is not None:
            self._handoff.close()
            self._handoff = None

    def describe(self) -> Placement:
        watchdog = self._watchdog
        memory = ["watchdog"] if watchdog and watchdog.memory_limit is not None else []
        pids = ["watchdog"] if watchdog and watchdog.tasks_limit is not None else []
        memory += [name for name in ("RLIMIT_AS", "RLIMIT_DATA") if name in self._rlimits]
        pids += ["RLIMIT_NPROC"] if "RLIMIT_NPROC" in self._rlimits else []
        enforcement = {
            "memory_enforcement": memory,
            "pids_enforcement": pids,
            "rlimits": dict(self._rlimits),
            "address_space_from": self._why,
            "watchdog": {
                "counts": "RssAnon+RssShmem+VmSwap per process; PSS when that sum is over --mem",
                "interval_s": watchdog.interval_s if watchdog else None,
                "samples": watchdog.samples if watchdog else 0,
                "peak_tasks": watchdog.peak_tasks if watchdog else None,
                "verdict": watchdog.verdict if watchdog else None,
                "pressure_window_s": watchdog.pressure_window_s if watchdog else None,
            },
            "marker": f"{MARKER}={self._id}",
        }
        # address_space_bytes: the report's limits.address_space_bytes, the cap as applied.
        return Placement(
            address_space_bytes=self._rlimits.get("RLIMIT_AS"), enforcement=enforcement
        )


# Without the children lists (a kernel without CONFIG_PROC_CHILDREN) the tree is found in a
# table of every process: a stat read per process of the host, per kill round.
_CHILDREN_LISTED = proctree.children_listed()


def _alive(pid: int) -> bool:
    info = procfs.stat(pid)
    return info is not None and info.state not in "ZX"


_caller_priority: list[int] = []  # read once: a retry prepares again, already boosted


def _caller_nice() -> int:
    if not _caller_priority:
        _caller_priority.append(os.getpriority(os.PRIO_PROCESS, 0))
    return _caller_priority[0]
