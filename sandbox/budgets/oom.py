"""Whose memory ran out when the kernel killed a budget member: its own limit (`oom`, the culprit)
or the budget's (`budget_oom`, a victim that may run again).

Decided from the kernel's counters, never from an OOM notification alone: on cgroup v1 the
`memory.oom_control` eventfd of every cgroup below an OOMing ancestor wakes, so a wake-up says
only that some level above or at this sandbox ran out.

    v2  this sandbox's memory.events.local: oom_kill/oom_group_kill > 0 means a process of this
        sandbox was killed; its `oom` > 0 means the OOM was at this sandbox's own memory.max. A
        budget level's memory.events.local `oom` counts the OOMs at that level.
    v1  memory.oom_control's oom_kill (Linux 4.13+) counts kills of this cgroup's processes (v1
        does not propagate it up); memory.failcnt (+memsw) counts charges that hit this
        cgroup's own limit. A budget level's failcnt does not grow when it runs out below a
        child that has its own limit (seen on 6.18), so each level gets its own OOM eventfd:
        the kernel notifies the OOMing cgroup and every cgroup below it, never those above, so
        the outermost level whose eventfd fired is the one that ran out.

`verdict` is the pure decision, for unit tests and to combine with the plain-sandbox check.
"""

from __future__ import annotations

import os
import sys

from sandbox.cgroups import cgroupfs, v1

BUDGET_OOM = "budget_oom"
OOM = "oom"


def verdict(
    killed: bool, own_limit_hit: bool, levels_hit: list[str], levels: list[str]
) -> tuple[str, str | None] | None:
    """(reason, budget level that ran out) for a sandbox, or None when it was not hit.

    `levels_hit`: the budget levels whose own counter grew during the run, innermost last;
    `levels`: every level of the budget, outermost first.
    """
    if not killed:
        return None
    if levels_hit and not own_limit_hit:
        return BUDGET_OOM, levels_hit[-1]
    if levels_hit:
        # Both ran out (a --mem near the budget's cap): the budget's is the one that hurt others.
        return BUDGET_OOM, levels_hit[-1]
    # Our own limit, or a limit above the budget (a container's): the command's own doing.
    return OOM, None


def own_counters(path: str, version: int) -> tuple[bool, bool]:
    """(a process of this sandbox was OOM-killed, the OOM was at its own limit)."""
    if version == 2:
        local = cgroupfs.read_keyed(path + "/memory.events.local")
        killed = bool(local.get("oom_kill") or local.get("oom_group_kill"))
        return killed, bool(local.get("oom"))
    killed = bool(cgroupfs.read_keyed(path + "/memory.oom_control").get("oom_kill"))
    return killed, bool(_v1_failures(path))


def _v1_failures(path: str) -> int:
    # With memsw set equal to the memory limit, v1 charges memory+swap first: that counter fails.
    return (cgroupfs.read_int(path + "/memory.failcnt") or 0) + (
        cgroupfs.read_int(path + "/memory.memsw.failcnt") or 0
    )


def level_counter(path: str) -> int:
    """v2: how often this level itself ran out (memory.events.local `oom`)."""
    return cgroupfs.read_keyed(path + "/memory.events.local").get("oom", 0)


def _v1_watch(path: str) -> int | None:
    """An eventfd the kernel signals on an OOM at this v1 cgroup or above it."""
    try:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        return None
    try:
        ofd = os.open(path + "/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            cgroupfs.write(path + "/cgroup.event_control", f"{efd} {ofd}")
        finally:
            os.close(ofd)  # the kernel keeps its own reference
    except OSError:
        os.close(efd)
        return None
    return efd


class BudgetWatch:
    """Given to the cgroup backend of a budget member: classifies an OOM kill of the sandbox."""

    def __init__(self, name: str, levels: list[tuple[str, str]], version: int) -> None:
        self.name = name
        self._levels = levels  # (budget name, memory directory), outermost first
        self._version = version
        self._baseline: dict[str, int] = {}
        self._fired: dict[str, int] = {}  # v1: OOM notifications seen per level
        self._fds: dict[str, int] = {}
        for _name, path in levels:
            if version == 2:
                self._baseline[path] = level_counter(path)
            else:
                fd = _v1_watch(path)
                if fd is not None:
                    self._fds[path], self._fired[path] = fd, 0
        self.hit: dict[str, object] | None = None  # the level that ran out, for the report

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def levels_hit(self) -> list[str]:
        """The budget levels that ran out during the run (v1: the outermost notified)."""
        if self._version == 2:
            return [n for n, p in self._levels if level_counter(p) > self._baseline[p]]
        for path, fd in self._fds.items():
            try:
                self._fired[path] += int.from_bytes(os.read(fd, 8), sys.byteorder)
            except BlockingIOError:
                pass
        fired = [name for name, path in self._levels if self._fired.get(path)]
        return fired[:1]

    def classify(self, path: str, version: int, own_limit: str | None = None) -> str | None:
        """`own_limit`: the v2 cgroup that holds the member's own --mem when it is not `path`
        (the systemd backend's scope, above <scope>/command)."""
        killed, own = own_counters(path, version)
        own = own or bool(own_limit and level_counter(own_limit))
        if not killed:
            return None
        hit = self.levels_hit()
        found = verdict(killed, own, hit, [name for name, _path in self._levels])
        if found is None:
            return None
        reason, level_name = found
        if reason == BUDGET_OOM and self.hit is None:
            directory = dict(self._levels).get(level_name or "", "")
            self.hit = {
                "budget": level_name,
                "cap_bytes": _cap(directory, self._version),
                "usage_bytes": _usage(directory, self._version),
            }
        return reason

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **({"ran_out": self.hit} if self.hit else {})}


def _cap(path: str, version: int) -> int | None:
    value = cgroupfs.read_int(path + ("/memory.max" if version == 2 else "/memory.limit_in_bytes"))
    return None if value is None or value >= v1.UNLIMITED else value


def _usage(path: str, version: int) -> int | None:
    # The peak says how full it got; usage now is lower once the kernel freed the victim.
    if version == 2:
        return cgroupfs.read_int(path + "/memory.peak") or cgroupfs.read_int(
            path + "/memory.current"
        )
    return cgroupfs.read_int(path + "/memory.max_usage_in_bytes")

