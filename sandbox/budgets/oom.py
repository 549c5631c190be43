"""Whose memory ran out when the kernel killed a budget member: its own limit (`oom`, the culprit)
or the budget's (`budget_oom`, a victim that may run again).

Decided from the kernel's counters, never from an OOM notification alone: on cgroup v1 the
`memory.oom_control` eventfd of every cgroup below an OOMing ancestor wakes, so a wake-up says
only that some level above or at this sandbox ran out.

    v2  this sandbox's memory.events.local: oom_kill/oom_group_kill > 0 means a process of this
        sandbox was killed; its `oom` > 0 means the OOM was at this sandbox's own memory.max. A
        budget level's memory.events.local `oom` counts the OOMs at that level.
    v1  memory.oom_control's oom_kill (Linux 4.13+) counts kills of this cgroup's processes (v1
        does not propagate it up); memory.failcnt counts charges that hit this cgroup's own
        limit, so it tells an OOM at our limit from one at a level above.

`verdict` is the pure decision, for unit tests and to combine with the plain-sandbox check.
"""

from __future__ import annotations

from sandbox.cgroups import cgroupfs

BUDGET_OOM = "budget_oom"
OOM = "oom"


def verdict(
    killed: bool, own_limit_hit: bool, levels_hit: list[str], levels: list[str]
) -> tuple[str, str | None] | None:
    """(reason, budget level that ran out) for a sandbox, or None when it was not hit.

    `levels_hit`: the budget levels whose own OOM counter grew during the run, innermost last;
    `levels`: every level of the budget, outermost first (the innermost is named when the
    counters cannot tell which one ran out).
    """
    if not killed:
        return None
    if own_limit_hit and not levels_hit:
        return OOM, None
    if levels_hit:
        return BUDGET_OOM, levels_hit[-1]
    return BUDGET_OOM, levels[-1] if levels else None


def own_counters(path: str, version: int) -> tuple[bool, bool]:
    """(a process of this sandbox was OOM-killed, the OOM was at its own limit)."""
    if version == 2:
        local = cgroupfs.read_keyed(path + "/memory.events.local")
        killed = bool(local.get("oom_kill") or local.get("oom_group_kill"))
        return killed, bool(local.get("oom"))
    killed = bool(cgroupfs.read_keyed(path + "/memory.oom_control").get("oom_kill"))
    return killed, bool(cgroupfs.read_int(path + "/memory.failcnt"))


def level_counter(path: str, version: int) -> int:
    """What grows when a level itself runs out: v2 events.local `oom`, v1 failcnt."""
    if version == 2:
        return cgroupfs.read_keyed(path + "/memory.events.local").get("oom", 0)
    return cgroupfs.read_int(path + "/memory.failcnt") or 0


class BudgetWatch:
    """Given to the cgroup backend of a budget member: classifies an OOM kill of the sandbox."""

    def __init__(self, name: str, levels: list[tuple[str, str]], version: int) -> None:
        self.name = name
        self._levels = levels  # (budget name, memory directory), outermost first
        self._version = version
        self._baseline = {path: level_counter(path, version) for _name, path in levels}
        self.hit: dict[str, object] | None = None  # the level that ran out, for the report

    def classify(self, path: str, version: int) -> str | None:
        killed, own = own_counters(path, version)
        if not killed:
            return None
        hit = [
            name
            for name, level in self._levels
            if level_counter(level, self._version) > self._baseline[level]
        ]
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
    return None if value is None or value >= 1 << 60 else value


def _usage(path: str, version: int) -> int | None:
    # The peak says how full it got; usage now is lower once the kernel freed the victim.
    if version == 2:
        return cgroupfs.read_int(path + "/memory.peak") or cgroupfs.read_int(
            path + "/memory.current"
        )
    return cgroupfs.read_int(path + "/memory.max_usage_in_bytes")

