"""The tree's memory and task count, sampled: the fallback's stand-in for memory.max and pids.max.

The tree is every descendant of the launcher except its guardian. The launcher is a child
subreaper, so a process that double-forks or calls setsid() stays in it: when its parent dies
it is reparented to the launcher, never to init. Membership never changes during a process's
life (a process is in the tree if its parent was when it forked), so each sample lists /proc,
reads /proc/PID/stat only for pids it has not seen yet, and then one /proc/PID/status per
member. A pid that died and was reused by an outsider between two samples would need the
whole pid space to wrap within one interval; a member's status names its parent, and a member
whose parent is neither the launcher nor a member is such an outsider and is dropped.

What counts as the tree's memory (docs/fallback.md has the numbers):
  - each process's resident anonymous + shmem pages + swap (RssAnon + RssShmem + VmSwap):
    kernel counters, cheap to read. File-backed pages are left out: shared and reclaimable.
  - a sum of those counts a page shared by several processes (copy-on-write after fork(),
    shared memory) once per process. So a sum over the limit is confirmed with PSS (each shared
    page divided among its users) before the tree is killed. PSS costs a walk of every page
    table, ~14 ms per GiB resident, so while the sum stays over the limit and PSS under it, an
    upper bound stands in for it: the last PSS, plus the growth of the sum since (new pages,
    huge pages included), plus a page per page fault since (a write to a shared page makes a
    private copy without changing any RSS counter, but it faults). A fresh PSS is read when
    the bound crosses the limit: no kill without one.
"""

from __future__ import annotations

import time

from fallback import proctree
from sandbox.core import procfs

INTERVAL_S = 0.1  # a tree growing 300 MB/s overshoots by ~30 MB before it is seen
MAX_INTERVAL_S = 1.0
DUTY = 0.01  # sampling may use 1% of a core: the interval is at least 100x a sample's cost
PAGE = 4096  # what one fault may add at most, outside huge pages (which RSS counts)


class Watchdog:
    def __init__(self, launcher: int, memory_limit: int | None, tasks_limit: int | None) -> None:
        self.launcher = launcher
        self.memory_limit = memory_limit
        self.tasks_limit = tasks_limit
        self.members: dict[int, int] = {}  # pid -> start time
        self._outsiders: set[int] = set()
        self._excluded: set[int] = set()
        self._pss_supported: bool | None = None
        # (PSS, RSS sum, faults per member) at the last PSS read, while the RSS sum stays over
        # the limit; None below it.
        self._basis: tuple[int, int, dict[int, int]] | None = None
        self.interval_s = INTERVAL_S
        self.samples = 0
        self.peak_memory: int | None = None
        self.peak_tasks: int | None = None
        self.tasks_limit_hits = 0  # samples that found the tree at or over --pids

    def adopt(self, main: int, excluded: set[int]) -> None:
        """The main child is known; `excluded` are the launcher's other children (the guardian)."""
        info = procfs.stat(main)
        if info is not None:
            self.members[main] = info.start
        self._excluded = excluded
        # Sort the host's other processes out now, while the child execs: it costs a stat read
        # each (~1-5 ms), which would otherwise inflate the first sample and its interval.
        self._discover()

    def sample(self) -> tuple[int, int]:
        """(memory, tasks) of the tree now; updates the peaks and the next interval."""
        began = time.thread_time()  # CPU, not wall time: a busy host must not stretch the interval
        self._discover()
        memory = tasks = 0
        for pid in list(self.members):
            share = proctree.footprint(pid)
            if share is None or (share.ppid != self.launcher and share.ppid not in self.members):
                del self.members[pid]  # gone, or a reused pid (see the module's docstring)
                continue
            memory += share.memory
            tasks += share.tasks
        took = time.thread_time() - began
        memory = self._confirmed(memory)
        self.samples += 1
        if self.members:  # a sample of an empty tree (after the end) measures nothing
            self.peak_memory = max(self.peak_memory or 0, memory)
            self.peak_tasks = max(self.peak_tasks or 0, tasks)
        if self.tasks_limit is not None and tasks >= self.tasks_limit:
            self.tasks_limit_hits += 1
        self.interval_s = min(MAX_INTERVAL_S, max(INTERVAL_S, took / DUTY))
        return memory, tasks

    def _discover(self) -> None:
        present = procfs.pids()
        current = set(present)
        for pid in [pid for pid in self.members if pid not in current]:
            del self.members[pid]
        self._outsiders &= current
        new = {}
        for pid in present:
            if pid not in self.members and pid not in self._outsiders:
                info = procfs.stat(pid)
                if info is not None:
                    new[pid] = info
        # A parent may be new too: repeat until no process joins (a child never precedes its
        # parent in the tree, whatever the order of pids after a wrap-around).
        joined = True
        while joined:
            joined = False
            for pid, info in list(new.items()):
                if info.ppid in self.members or (
                    info.ppid == self.launcher and pid not in self._excluded
                ):
                    self.members[pid] = info.start
                    del new[pid]
                    joined = True
        self._outsiders.update(new)

    def _confirmed(self, rss_sum: int) -> int:
        """The tree's memory: the RSS sum below the limit, PSS (or its upper bound) above it."""
        if self.memory_limit is None or rss_sum <= self.memory_limit:
            self._basis = None
            return rss_sum
        faults = {}
        for pid in self.members:
            info = procfs.stat(pid)
            faults[pid] = info.faults if info is not None else 0
        if self._basis is not None:
            pss, then_sum, then_faults = self._basis
            new = sum(max(0, count - then_faults.get(pid, 0)) for pid, count in faults.items())
            bound = pss + max(0, rss_sum - then_sum) + new * PAGE
            if bound <= self.memory_limit:
                return bound
        pss_now = self._proportional()
        if pss_now is None:
            return rss_sum
        self._basis = (pss_now, rss_sum, faults)
        return pss_now

    def _proportional(self) -> int | None:
        """PSS of the tree, or None where the kernel lacks Pss_Anon (before 5.3)."""
        if self._pss_supported is None:
            self._pss_supported = proctree.proportional(self.launcher) is not None
        if not self._pss_supported:
            return None
        return sum(proctree.proportional(pid) or 0 for pid in self.members)

    def over(self, memory: int, tasks: int) -> str | None:
        """Which limit a sample broke: "memory", "pids", or None."""
        if self.memory_limit is not None and memory > self.memory_limit:
            return "memory"
        if self.tasks_limit is not None and tasks > self.tasks_limit:
            return "pids"
        return None
