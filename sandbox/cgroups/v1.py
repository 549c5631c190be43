"""cgroup v1 (legacy and hybrid hosts): the memory and pids controllers, each its own hierarchy.

v1 has no memory.oom.group, no memory.events and no cgroup.kill. What it has:
- memory.oom_control's eventfd (cgroup.event_control), which wakes us for an OOM at this
  cgroup *or any ancestor* (a --parent budget, a container's limit, an outer sandbox): the
  kernel notifies the OOMing memcg and every cgroup below it, before it picks a victim.
- memory.oom_control's `oom_kill` (Linux 4.13+): the processes the OOM killer took from this
  very cgroup (v1 does not add a child's kills to its parent's count, unlike v2).
- memory.failcnt: how often a charge failed at this cgroup's own limit.
So after a wake-up this sandbox was hit when, within a short window, the kernel's kill counter
rises here or in a cgroup below (a nested sandbox, when the limit that ran out is ours or above),
or when our own limit failed charges and nothing of the sandbox is left. Only then is the rest
of the sandbox killed, as v2's memory.oom.group would: a sibling's OOM under a shared parent
leaves it running, and the decision waits for the kernel's victim, so `reason: oom` comes with
oom_kills >= 1.
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
        self._woken = False  # an OOM at or above this cgroup happened during the run
        self._failures_seen = 0  # memory.failcnt up to the last OOM that was not ours
        self._kills_below: dict[str, int] = {}  # nested cgroups' highest oom_kill counts

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
        if self._oom_fds is None:
            return bool(self._own_kills())  # no notification to wait on: the counter alone
        now = time.monotonic()
        try:
            os.read(self._oom_fds[0], 8)
            self._window_ends = now + OOM_WINDOW_S
            self._woken = True
        except BlockingIOError:
            if self._window_ends is None:
                return False  # no OOM at or above this cgroup since the window closed
        if self._own_kills() or self._nested_kills():
            return True  # the kernel took a process of this sandbox
        failures = cgroupfs.read_int(self.path + "/memory.failcnt") or 0
        if failures > self._failures_seen and not cgroupfs.procs(self.path):
            return True  # our own limit ran out and the sandbox is gone: its victim went first
        if now >= self._window_ends:
            # An OOM elsewhere (a sibling under a shared parent): not ours.
            self._window_ends = None
            self._failures_seen = failures
        return False

    def _own_kills(self) -> int:
        # v1 counts a kill only in the victim's own cgroup: a nested sandbox's are its own.
        return cgroupfs.read_keyed(self.path + "/memory.oom_control").get("oom_kill") or 0

    def _nested_kills(self) -> int:
        """Kills below us, when the OOM was ours but its victim ran in a nested sandbox. That
        sandbox removes its cgroup when it ends: the highest count each one showed is kept."""
        for top, _dirs, _files in os.walk(self.path):
            if top != self.path:
                count = cgroupfs.read_keyed(top + "/memory.oom_control").get("oom_kill") or 0
                self._kills_below[top] = max(count, self._kills_below.get(top, 0))
        return sum(self._kills_below.values())

    def peak_memory(self) -> int | None:
        return cgroupfs.read_int(self.path + "/memory.max_usage_in_bytes")

    def oom_kills(self) -> int | None:
        own = cgroupfs.read_keyed(self.path + "/memory.oom_control").get("oom_kill")
        if own is None:
            return None  # before Linux 4.13: no oom_kill line
        return own + (self._nested_kills() if self._woken else 0)

    def close(self) -> None:
        if self._oom_fds is not None:
            for fd in self._oom_fds:
                os.close(fd)
            self._oom_fds = None
