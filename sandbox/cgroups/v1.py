"""cgroup v1 (legacy and hybrid hosts): the memory and pids controllers, each its own hierarchy.

v1 has no memory.oom.group, no memory.events and no cgroup.kill. What it has:
- memory.oom_control's eventfd (cgroup.event_control), which wakes us for an OOM at this
  cgroup *or any ancestor* (a --parent budget, a container's limit, an outer sandbox): the
  kernel notifies the OOMing memcg and every cgroup below it, before it picks a victim.
- memory.oom_control's `oom_kill` (Linux 4.13+): the processes the OOM killer took from this
  very cgroup (v1 does not add a child's kills to its parent's count, unlike v2).
- memory.failcnt: how often a charge failed at this cgroup's own limit.
So after a wake-up this sandbox was hit when, within a short window, the kernel's kill counter
rises here or in a cgroup below (a nested sandbox), or when our own limit failed charges and
nothing of the sandbox is left. Only then is the rest of the sandbox killed, as v2's
memory.oom.group would: a sibling's OOM under a shared parent leaves it running, and the
decision waits for the kernel's victim, so `reason: oom` comes with oom_kills >= 1.
"""

from __future__ import annotations

import os
import time

from sandbox.cgroups import cgroupfs, tree

# v1 writes "no limit" as PAGE_COUNTER_MAX pages (0x7ffffffffffff000 with 4K pages): anything
# this large is no limit.
UNLIMITED = 1 << 60
# After a wake-up, how long the kernel may take to pick its victim (it serialises OOM kills
# host-wide under oom_lock: 40 concurrent OOMs queue). Each new wake-up restarts the window.
OOM_WINDOW_S = 2.0
OOM_POLL_S = 0.01


class Cgroup(tree.Cgroup):
    version = 1

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._oom_fds: tuple[int, int] | None = None  # (eventfd, memory.oom_control fd)
        self._window_ends: float | None = None  # while waiting for the kernel's OOM counter
        self._kills_seen = 0  # oom_kill counts that were not ours to act on
        self._failures_seen = 0  # memory.failcnt likewise
        self._kills_by_cgroup: dict[str, int] = {}  # the highest count each cgroup showed

    @property
    def tick_s(self) -> float | None:
        return OOM_POLL_S if self._window_ends is not None else None

    def set_memory(self, limit_bytes: int | None) -> None:
        if limit_bytes is not None:
            self.write_checked("memory.limit_in_bytes", limit_bytes)
            if os.path.exists(self.path + "/memory.memsw.limit_in_bytes"):
                self.write_checked("memory.memsw.limit_in_bytes", limit_bytes)
        self._watch_oom()

    def _watch_oom(self) -> None:
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            return  # no notification: the OOM counter still reports it at the end
        try:
            ofd = os.open(self.path + "/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(efd)
            return
        try:
            cgroupfs.write(self.path + "/cgroup.event_control", f"{efd} {ofd}")
        except OSError:
            os.close(efd)
            os.close(ofd)
            return
        self._oom_fds = (efd, ofd)

    def watch_fds(self) -> list[int]:
        return [self._oom_fds[0]] if self._oom_fds else []

    def kernel_oom_kill(self) -> bool:
        kills = self.oom_kills() or 0
        if self._oom_fds is None:
            return kills > 0  # no notification to wait on: the counter alone
        now = time.monotonic()
        try:
            os.read(self._oom_fds[0], 8)
            self._window_ends = now + OOM_WINDOW_S
        except BlockingIOError:
            pass
        failures = cgroupfs.read_int(self.path + "/memory.failcnt") or 0
        if self._window_ends is None:
            # No OOM at or above us since the last look: what changed meanwhile was a nested
            # sandbox's own OOM (its own limit, its own launcher's business).
            self._kills_seen, self._failures_seen = kills, failures
            return False
        if kills > self._kills_seen:
            return True  # the kernel took a process of this sandbox
        if failures > self._failures_seen and not cgroupfs.procs(self.path):
            return True  # our own limit ran out and the sandbox is gone: its victim went first
        if now >= self._window_ends:
            # An OOM elsewhere (a sibling under a shared parent): not ours.
            self._window_ends = None
            self._kills_seen, self._failures_seen = kills, failures
        return False

    def peak_memory(self) -> int | None:
        return cgroupfs.read_int(self.path + "/memory.max_usage_in_bytes")

    def oom_kills(self) -> int | None:
        """OOM kills in this cgroup and the cgroups below it. A nested sandbox removes its
        cgroup when it ends, so the highest count each one showed is remembered."""
        found = False
        for top, _dirs, _files in os.walk(self.path):
            count = cgroupfs.read_keyed(top + "/memory.oom_control").get("oom_kill")
            if count is not None:
                found = True
                self._kills_by_cgroup[top] = max(count, self._kills_by_cgroup.get(top, 0))
        if not found and not self._kills_by_cgroup:
            return None  # before Linux 4.13: no oom_kill line
        return sum(self._kills_by_cgroup.values())

    def close(self) -> None:
        if self._oom_fds is not None:
            for fd in self._oom_fds:
                os.close(fd)
            self._oom_fds = None
