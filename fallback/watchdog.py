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
    page divided among its users) before the tree is killed, with the tree stopped (SIGSTOP)
    while PSS is read, and continued if it is under the limit. PSS costs a walk of every page
    table, ~14 ms per GiB resident, so while the sum stays over the limit and PSS under it, an
    upper bound stands in for it: the last PSS, plus the growth of the sum since (new pages,
    huge pages included), plus a page per page fault since (a write to a shared page makes a
    private copy without changing any RSS counter, but it faults). A fresh PSS is read when
    the bound crosses the limit: no kill without one.

When to sample (the interval, adaptive): a still tree is sampled every 50 ms, or less often
when a sample costs more than 1% of a core. A tree growing toward a limit is sampled so that
at its current rate it takes about four samples to get there (down to 5 ms, at most 15% of a
core), and a still one near a limit as if it could start growing by 1 GiB/s (or 1000
tasks/s) at any moment (at most 3% of a core). So the interval shrinks as the tree nears a
limit, and the overshoot stays a few percent.

Besides the limits themselves, two rules end a tree as an OOM instead of leaving it to hang:
  - backstop: a process within 1/32 of the RLIMIT_DATA or RLIMIT_AS it was given is refused
    memory by the kernel (or is about to be); programs handle that badly (V8 aborts a worker
    and hangs), so the watchdog kills the tree then.
  - pressure: a tree above 90% of --mem that keeps taking major faults (over 100/s, each a
    wait for a read from disk) for a whole window is thrashing, not progressing.
"""

from __future__ import annotations

import time

from fallback import proctree
from sandbox.core import linux, procfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`: its enums cost ~4 ms of start-up

INTERVAL_S = 0.05  # a still tree, and the first sample
MIN_INTERVAL_S = 0.005
MAX_INTERVAL_S = 1.0
DUTY = 0.01  # a still tree's sampling may use 1% of a core: interval >= 100x a sample's cost
NEAR_DUTY = 0.03  # ... a still tree near a limit 3%
GROWING_DUTY = 0.15  # ... a tree growing toward a limit 15%, for as long as that lasts
STEPS = 4  # samples a growing tree gets, at its current rate, before it reaches a limit
BURST_BYTES_PER_S = 1 << 30  # how fast a still tree might start growing
BURST_TASKS_PER_S = 1000
PAGE = 4096  # what one fault may add at most, outside huge pages (which RSS counts)
BACKSTOP_MARGIN = 32  # within 1/32 of its RLIMIT_DATA / RLIMIT_AS, a process is at its backstop
PRESSURE_SHARE = 0.9  # of --mem
PRESSURE_MAJOR_FAULTS_PER_S = 100


class Watchdog:
    def __init__(
        self,
        launcher: int,
        memory_limit: int | None,
        tasks_limit: int | None,
        backstop: dict[str, int] | None = None,
        pressure_window_s: float | None = None,
    ) -> None:
        self.launcher = launcher
        self.memory_limit = memory_limit
        self.tasks_limit = tasks_limit
        # RLIMIT_DATA / RLIMIT_AS given to the command (absent: not set)
        self.backstop = backstop or {}
        self.pressure_window_s = pressure_window_s
        self.members: dict[int, int] = {}  # pid -> start time
        self._outsiders: set[int] = set()
        self._excluded: set[int] = set()
        self._pss_supported: bool | None = None
        # (PSS, RSS sum, faults per member) at the last PSS read, while the RSS sum stays over
        # the limit; None below it.
        self._basis: tuple[int, int, dict[int, int]] | None = None
        # (when, major faults per member) since the tree went over PRESSURE_SHARE of --mem
        self._pressure_since: tuple[float, dict[int, int]] | None = None
        self._last: tuple[float, int, int] | None = None  # (when, memory, tasks) last sample
        self.interval_s = INTERVAL_S
        self.samples = 0
        self.peak_memory: int | None = None
        self.peak_tasks: int | None = None
        self.tasks_limit_hits = 0  # samples that found the tree at or over --pids
        # Why over() said "memory" when not simply over --mem: "backstop ..." or "pressure ..."
        self.verdict: str | None = None

    def adopt(self, main: int, excluded: set[int]) -> None:
        """The main child is known; `excluded` are the launcher's other children (the guardian)."""
        info = procfs.stat(main)
        if info is not None:
            self.members[main] = info.start
        self._excluded = excluded

    def sample(self) -> tuple[int, int]:
        """(memory, tasks) of the tree now; updates the peaks and the next interval."""
        if not self.samples:
            # The host's other processes are sorted out once, at the first sample (a stat read
            # each, ~1-5 ms for ~120): a command that ends sooner (most) never pays it. Not
            # counted in the sample's cost, which sets the interval.
            self._discover()
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
            if self.verdict is None:
                self._check_backstop(pid, share)
        took = time.thread_time() - began
        memory = self._confirmed(memory)
        self.samples += 1
        if self.members:  # a sample of an empty tree (after the end) measures nothing
            self.peak_memory = max(self.peak_memory or 0, memory)
            self.peak_tasks = max(self.peak_tasks or 0, tasks)
        if self.tasks_limit is not None and tasks >= self.tasks_limit:
            self.tasks_limit_hits += 1
        now = time.monotonic()
        self._check_pressure(now, memory)
        self.interval_s = self._next_interval(now, took, memory, tasks)
        self._last = (now, memory, tasks)
        return memory, tasks

    def _next_interval(self, now: float, took: float, memory: int, tasks: int) -> float:
        """Sparse while the tree is still and far from its limits, dense as it nears them."""
        wanted = min(MAX_INTERVAL_S, max(INTERVAL_S, took / DUTY))
        elapsed = now - self._last[0] if self._last is not None else 0.0
        growing = False
        for index, used, limit, burst in (
            (1, memory, self.memory_limit, BURST_BYTES_PER_S),
            (2, tasks, self.tasks_limit, BURST_TASKS_PER_S),
        ):
            if limit is None:
                continue
            left = max(0, limit - used)
            if self._last is not None and elapsed > 0 and used > self._last[index]:
                rate = (used - self._last[index]) / elapsed
                wanted = min(wanted, left / rate / STEPS)
                growing = True
            else:
                wanted = min(wanted, left / burst)
        # A tree parked near a limit costs at most NEAR_DUTY; only growth buys GROWING_DUTY.
        return max(wanted, MIN_INTERVAL_S, took / (GROWING_DUTY if growing else NEAR_DUTY))

    def _check_backstop(self, pid: int, share: proctree.Footprint) -> None:
        for name, used in (("RLIMIT_DATA", share.data), ("RLIMIT_AS", share.size)):
            limit = self.backstop.get(name)
            if limit is not None and used >= limit - limit // BACKSTOP_MARGIN:
                self.verdict = (
                    f"backstop: process {pid} reached its {name} ({used >> 20} of "
                    f"{limit >> 20} MiB): the kernel refuses it memory"
                )
                return

    def _check_pressure(self, now: float, memory: int) -> None:
        """Over PRESSURE_SHARE of --mem with a sustained major-fault rate: thrashing."""
        limit, window = self.memory_limit, self.pressure_window_s
        if limit is None or window is None or memory < limit * PRESSURE_SHARE:
            self._pressure_since = None
            return
        if self._pressure_since is not None and now - self._pressure_since[0] < window:
            return  # the faults are read at each end of a window only: a stat read per member
        faults = {}
        for pid in self.members:
            info = procfs.stat(pid)
            faults[pid] = info.major_faults if info is not None else 0
        if self._pressure_since is None:
            self._pressure_since = (now, faults)
            return
        since, before = self._pressure_since
        rate = sum(max(0, n - before.get(pid, 0)) for pid, n in faults.items()) / (now - since)
        if rate >= PRESSURE_MAJOR_FAULTS_PER_S and self.verdict is None:
            self.verdict = (
                f"memory pressure: above {PRESSURE_SHARE:.0%} of the limit for {now - since:.1f} s "
                f"with {rate:.0f} major faults/s"
            )
        else:  # a new window: the rate must hold in each one, not on average since the start
            self._pressure_since = (now, faults)

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
        faults, running = {}, set()
        for pid in self.members:
            info = procfs.stat(pid)
            faults[pid] = info.faults if info is not None else 0
            if info is not None and info.state not in "TtZX":
                running.add(pid)
        if self._basis is not None:
            pss, then_sum, then_faults = self._basis
            new = sum(max(0, count - then_faults.get(pid, 0)) for pid, count in faults.items())
            bound = pss + max(0, rss_sum - then_sum) + new * PAGE
            if bound <= self.memory_limit:
                return bound
        # PSS walks every page table, and a tree faulting pages in holds the walk up: 200-350 ms
        # for 8 processes growing together to 1 GiB, while they grew by 200 MB more. Stopped,
        # they wait for the verdict instead: killed (the backend kills what is over), or
        # continued. Only the running ones: a process stopped by someone else stays stopped.
        linux.kill_each(running, _signal.SIGSTOP)
        pss_now = self._proportional()
        if pss_now is None:
            return rss_sum
        if pss_now <= self.memory_limit:
            linux.kill_each(running, _signal.SIGCONT)
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
        """Which limit a sample broke: "memory" (see `verdict`), "pids", or None."""
        if self.memory_limit is not None and memory > self.memory_limit:
            self.verdict = None  # plainly over --mem, whatever else was seen
            return "memory"
        if self.verdict is not None:
            return "memory"
        if self.tasks_limit is not None and tasks > self.tasks_limit:
            return "pids"
        return None
