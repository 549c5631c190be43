"""The watchdog's decisions against a fake /proc: who is in the tree, what its memory is.

The counting rule pinned here (docs/fallback.md): each process's RssAnon+RssShmem+VmSwap is
summed; a sum over the limit is confirmed with PSS, so a page shared by N processes counts
once, not N times, before the tree is killed. Between PSS reads an upper bound stands in.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest

from fallback import handoff, proctree, watchdog
from fallback.watchdog import Watchdog
from sandbox.core import linux, procfs

LAUNCHER, GUARDIAN = 100, 101
M = 1 << 20


class FakeProc:
    """pid -> (ppid, start, RSS-counted memory, PSS, tasks, faults); stands in for /proc."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int, int, int, int, int]] = {}
        self.pss_reads = 0
        self.signals: list[tuple[int, set[int]]] = []
        self.data: dict[int, int] = {}  # pid -> VmData, where a test sets it
        self.major: dict[int, int] = {}  # pid -> major faults, where a test sets it
        self.pss_supported = True

    def add(
        self,
        pid: int,
        ppid: int,
        rss: int = 0,
        pss: int | None = None,
        tasks: int = 1,
        faults: int = 0,
    ) -> None:
        self.procs[pid] = (ppid, pid * 10, rss, rss if pss is None else pss, tasks, faults)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(procfs, "pids", lambda: list(self.procs))
        monkeypatch.setattr(procfs, "stat", self.stat)
        monkeypatch.setattr(proctree, "footprint", self.footprint)
        monkeypatch.setattr(proctree, "proportional", self.proportional)
        monkeypatch.setattr(linux, "kill_each", self.signal)

    def signal(self, pids: Collection[int], signo: int) -> None:
        self.signals.append((signo, set(pids)))

    def stat(self, pid: int) -> procfs.ProcInfo | None:
        if pid not in self.procs:
            return None
        ppid, start, *_, faults = self.procs[pid]
        return procfs.ProcInfo(ppid, start, "S", faults, major_faults=self.major.get(pid, 0))

    def footprint(self, pid: int) -> proctree.Footprint | None:
        if pid not in self.procs:
            return None
        ppid, _start, rss, _pss, tasks, _faults = self.procs[pid]
        return proctree.Footprint(rss, tasks, ppid, self.data.get(pid, 0))

    def proportional(self, pid: int) -> int | None:
        if not self.pss_supported:
            return None
        self.pss_reads += pid != LAUNCHER  # the launcher's is read once, to probe the kernel
        return self.procs[pid][3] if pid in self.procs else 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    proc = FakeProc()
    proc.add(1, 0)
    proc.add(LAUNCHER, 1, 50 * M)
    proc.add(GUARDIAN, LAUNCHER, 5 * M)
    proc.add(7, 1, 900 * M)  # someone else's process
    proc.install(monkeypatch)
    return proc


def test_the_tree_is_the_launchers_descendants_without_the_guardian(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 10 * M)  # the main child
    dog = Watchdog(LAUNCHER, None, None)
    dog.adopt(200, {GUARDIAN})
    fake.add(201, 200, 20 * M)
    fake.add(203, 202, 40 * M)  # a grandchild listed before its (new) parent
    fake.add(202, 201, 30 * M)
    fake.add(300, LAUNCHER, 1 * M)  # an orphan of the tree, reparented to the launcher
    memory, tasks = dog.sample()
    assert set(dog.members) == {200, 201, 202, 203, 300}
    assert (memory, tasks) == (101 * M, 5)


def test_adopting_reads_only_the_main_child(
    fake: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's other processes are sorted out at the first sample, not at the start: a
    command that ends before it (most) costs no stat read per process of the host."""
    read: list[int] = []
    monkeypatch.setattr(procfs, "stat", lambda pid: read.append(pid) or fake.stat(pid))
    fake.add(200, LAUNCHER, 10 * M)
    dog = Watchdog(LAUNCHER, None, None)
    dog.adopt(200, {GUARDIAN})
    assert read == [200]
    fake.add(201, 200, 20 * M)
    assert dog.sample() == (30 * M, 2)
    assert set(read) >= {1, 7, GUARDIAN, 201}


def test_a_reused_pid_is_not_counted(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 10 * M)
    dog = Watchdog(LAUNCHER, None, None)
    dog.adopt(200, {GUARDIAN})
    fake.add(201, 200, 20 * M)
    dog.sample()
    fake.add(201, 7, 500 * M)  # 201 died and an outsider's child got its pid
    assert dog.sample() == (10 * M, 1)
    assert 201 not in dog.members


def test_under_the_limit_the_rss_sum_is_used_without_reading_pss(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 300 * M, pss=100 * M)
    dog = Watchdog(LAUNCHER, 400 * M, None)
    dog.adopt(200, {GUARDIAN})
    assert dog.sample()[0] == 300 * M and fake.pss_reads == 0


def test_shared_pages_count_once_over_the_limit(fake: FakeProc) -> None:
    """Parent and three forked children share 200 MB copy-on-write: RSS sum 800, PSS 200."""
    fake.add(200, LAUNCHER, 200 * M, pss=50 * M)
    for child in (201, 202, 203):
        fake.add(child, 200, 200 * M, pss=50 * M)
    dog = Watchdog(LAUNCHER, 500 * M, None)
    dog.adopt(200, {GUARDIAN})
    memory, tasks = dog.sample()
    assert memory == 200 * M and dog.over(memory, tasks) is None
    assert dog.peak_memory == 200 * M


def test_private_copies_over_the_limit_are_killed(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 200 * M)
    for child in (201, 202, 203):
        fake.add(child, 200, 200 * M)  # each wrote its copy: PSS == RSS
    dog = Watchdog(LAUNCHER, 500 * M, None)
    dog.adopt(200, {GUARDIAN})
    memory, tasks = dog.sample()
    assert memory == 800 * M and dog.over(memory, tasks) == "memory"


def test_between_pss_reads_an_upper_bound_stands_in(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 300 * M, pss=150 * M)
    fake.add(201, 200, 300 * M, pss=150 * M)
    dog = Watchdog(LAUNCHER, 500 * M, None)
    dog.adopt(200, {GUARDIAN})
    assert dog.sample()[0] == 300 * M and fake.pss_reads == 2
    fake.add(201, 200, 400 * M, pss=250 * M)  # +100 MB of new pages: the RSS sum shows them
    assert dog.sample()[0] == 400 * M and fake.pss_reads == 2  # bounded, not read
    fake.add(201, 200, 550 * M, pss=400 * M)  # the bound (550) crosses: read PSS to be sure
    memory, tasks = dog.sample()
    assert memory == 550 * M and fake.pss_reads == 4 and dog.over(memory, tasks) == "memory"


def test_writes_to_shared_pages_are_bounded_by_their_faults(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, 300 * M, pss=150 * M)
    fake.add(201, 200, 300 * M, pss=150 * M)
    dog = Watchdog(LAUNCHER, 500 * M, None)
    dog.adopt(200, {GUARDIAN})
    dog.sample()
    # The child writes 100 MB of the pages it shares: private copies, one fault per page, and
    # no RSS counter moves.
    fake.add(201, 200, 300 * M, pss=250 * M, faults=(100 * M) // watchdog.PAGE)
    assert dog.sample()[0] == 400 * M and fake.pss_reads == 2
    fake.add(201, 200, 300 * M, pss=400 * M, faults=(250 * M) // watchdog.PAGE)
    memory, tasks = dog.sample()
    assert memory == 550 * M and fake.pss_reads == 4 and dog.over(memory, tasks) == "memory"


def test_without_pss_fields_the_rss_sum_decides(fake: FakeProc) -> None:
    fake.pss_supported = False  # Linux before 5.3: no Pss_Anon in smaps_rollup
    fake.add(200, LAUNCHER, 300 * M, pss=100 * M)
    fake.add(201, 200, 300 * M, pss=100 * M)
    dog = Watchdog(LAUNCHER, 500 * M, None)
    dog.adopt(200, {GUARDIAN})
    memory, tasks = dog.sample()
    assert memory == 600 * M and dog.over(memory, tasks) == "memory"


def test_tasks_over_the_limit(fake: FakeProc) -> None:
    fake.add(200, LAUNCHER, tasks=8)
    dog = Watchdog(LAUNCHER, None, 10)
    dog.adopt(200, {GUARDIAN})
    assert dog.over(*dog.sample()) is None and dog.tasks_limit_hits == 0
    fake.add(201, 200, tasks=2)
    assert dog.over(*dog.sample()) is None and dog.tasks_limit_hits == 1  # at the limit
    fake.add(202, 200)
    assert dog.over(*dog.sample()) == "pids"


def test_an_empty_tree_leaves_the_peak_unknown(fake: FakeProc) -> None:
    dog = Watchdog(LAUNCHER, None, None)
    dog.adopt(200, {GUARDIAN})  # exited before we looked
    dog.sample()
    assert dog.peak_memory is None and dog.samples == 1


def test_the_handoff_keeps_the_last_complete_list() -> None:
    shared = handoff.Handoff()
    try:
        assert shared.read() == []
        shared.write([(200, 2000), (201, 2010)])
        shared.write([(200, 2000), (201, 2010), (202, 2020)])
        assert shared.read() == [(200, 2000), (201, 2010), (202, 2020)]
        shared.write([(200, 2000)])
        assert shared.read() == [(200, 2000)]
    finally:
        shared.close()
    assert shared.read() == []


class Clock:
    """Stands in for the `time` module the watchdog reads: wall and CPU time move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def thread_time(self) -> float:
        return 0.0  # samples cost nothing: the interval follows the tree alone


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake_clock = Clock()
    monkeypatch.setattr(watchdog, "time", fake_clock)
    return fake_clock


def test_a_still_tree_far_from_its_limits_is_sampled_sparsely(fake: FakeProc, clock: Clock) -> None:
    fake.add(200, LAUNCHER, 100 * M, tasks=2)
    dog = Watchdog(LAUNCHER, 8 << 30, 1000)
    dog.adopt(200, {GUARDIAN})
    for _ in range(3):
        dog.sample()
        clock.now += dog.interval_s
    assert dog.interval_s == watchdog.INTERVAL_S


def test_a_tree_growing_toward_mem_is_sampled_densely(fake: FakeProc, clock: Clock) -> None:
    """~1 GiB/s toward --mem 1G: each interval is at most a quarter of the time left at that
    rate, so the sample that sees the tree over --mem comes soon after it crossed."""
    dog = Watchdog(LAUNCHER, 1 << 30, None)
    fake.add(200, LAUNCHER, 0)
    dog.adopt(200, {GUARDIAN})
    memory, intervals = 0, []
    while memory <= 1 << 30:
        dog.sample()
        intervals.append(dog.interval_s)
        clock.now += dog.interval_s
        memory += int(dog.interval_s * (1 << 30))  # 1 GiB/s
        fake.add(200, LAUNCHER, memory)
    overshoot = dog.sample()[0] - (1 << 30)
    assert overshoot <= 0.05 * (1 << 30), overshoot  # target 1.15x: the sampling's share
    assert intervals[-1] <= 4 * watchdog.MIN_INTERVAL_S < intervals[0]


def test_a_tree_near_its_pids_limit_is_sampled_often(fake: FakeProc, clock: Clock) -> None:
    fake.add(200, LAUNCHER, tasks=54)
    dog = Watchdog(LAUNCHER, None, 64)
    dog.adopt(200, {GUARDIAN})
    dog.sample()
    assert dog.interval_s <= 10 / watchdog.BURST_TASKS_PER_S  # 10 tasks left: 10 ms


def test_a_process_at_its_backstop_ends_the_run_as_an_oom(fake: FakeProc) -> None:
    limit = 1324 * M  # RLIMIT_DATA at --mem 300M
    fake.add(200, LAUNCHER, 50 * M)
    dog = Watchdog(LAUNCHER, 300 * M, None, {"RLIMIT_DATA": limit})
    dog.adopt(200, {GUARDIAN})
    assert dog.over(*dog.sample()) is None
    fake.data[200] = limit - 8 * M  # the kernel refuses its next allocation
    assert dog.over(*dog.sample()) == "memory"
    assert dog.verdict is not None and dog.verdict.startswith("backstop: process 200")


def test_thrashing_near_mem_for_a_window_is_an_oom(fake: FakeProc, clock: Clock) -> None:
    fake.add(200, LAUNCHER, 290 * M)  # 97% of --mem
    dog = Watchdog(LAUNCHER, 300 * M, None, pressure_window_s=10.0)
    dog.adopt(200, {GUARDIAN})
    for second in range(12):
        fake.major[200] = 300 * second  # 300 major faults/s, as Chromium at its limit
        assert dog.over(*dog.sample()) is None or second >= 10
        clock.now += 1.0
    assert dog.over(*dog.sample()) == "memory"
    assert dog.verdict is not None and dog.verdict.startswith("memory pressure")


def test_a_busy_tree_near_mem_without_major_faults_lives(fake: FakeProc, clock: Clock) -> None:
    fake.add(200, LAUNCHER, 290 * M)
    dog = Watchdog(LAUNCHER, 300 * M, None, pressure_window_s=10.0)
    dog.adopt(200, {GUARDIAN})
    for second in range(30):
        fake.major[200] = 5 * second  # a healthy build reads a file now and then
        assert dog.over(*dog.sample()) is None
        clock.now += 1.0
