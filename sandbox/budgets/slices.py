"""Budgets on the systemd backend: one slice per level in the manager that starts our scopes.

Where systemd is PID 1 the cgroup tree is its own: a budget is a slice, never a directory we
mkdir. The budget `agents/agent-17` is

    aero-agents.slice                      (inside aero.slice: a '-' in a slice name nests)
    aero-agents-agent\\x2d17.slice          (a '-' inside a segment is escaped so it does not)

in the system manager (root) or the user's manager (anyone else), each a transient slice
(StartTransientUnit) with MemoryMax/MemorySwapMax=0/TasksMax, Description `aero-sandbox budget
NAME` (which tells gc it is ours). A started slice stays active when its last member ends, so the
budget survives between runs until `budget rm`/`gc` stops it (a stopped transient unit is gone
from systemd); new caps go through SetUnitProperties(runtime=True). Members are the backend's
scopes with Slice= the innermost level.

Everything else is the cgroup code's (budgets/cgroup.py, admission.py, oom.py), handed the
slices' cgroup directories: a Hierarchy marked SLICES names its levels as above.
Needs pure cgroup v2 (systemd 244+ for the user manager's memory/pids delegation).
"""

from __future__ import annotations

import os
import time

from sandbox.budgets import cgroup as levels_fs
from sandbox.budgets.model import SLICES, Caps, slice_names, slice_segments
from sandbox.budgets.oom import BudgetWatch
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import format_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandbox.backends.systemd import SystemdBackend
    from sandbox.backends.systemd.bus import Bus
    from sandbox.cgroups.cgroupfs import Hierarchy
    from sandbox.core.result import Placement

SYSTEMD_RUNS = "/run/systemd/system"
TOP = "aero.slice"  # systemd's parent of every aero-<segment>.slice
DESCRIPTION = "aero-sandbox budget "
INFINITY = 2**64 - 1  # systemd's "infinity" for MemoryMax/TasksMax
APPLY_WAIT_S = 2.0


def open_bus(requested: str) -> Bus | None:
    """A bus to the manager when budgets live in systemd slices for a run (or subcommand) with
    this --backend, else None.

    `systemd`: always (BackendUnavailable if it cannot run). `cgroup`/`rlimit`: never. `auto`:
    where a plain run would get a systemd scope (systemd is PID 1 on pure v2, not nested, a
    manager answers with memory and pids), unless AERO_BUDGET_ROOT names an admin's cgroup,
    which is the cgroup backend's place.
    """
    if requested not in ("auto", "systemd"):
        return None
    if requested == "auto":
        # sd_booted(), as selection.systemd_running (which imports the budgets: no cycle here)
        if os.environ.get(levels_fs.ROOT_ENV, "").strip() or not os.path.isdir(SYSTEMD_RUNS):
            return None
        try:
            return connect()
        except BackendUnavailable:
            return None
    return connect()


def connect() -> Bus:
    """A bus to the manager our scopes go to; BackendUnavailable where the backend cannot run."""
    from sandbox.backends.systemd import scope
    from sandbox.core.limits import Limits

    scope.check_host()
    return scope.connect(Limits(memory_bytes=1, pids=1))  # it must give memory and pids


def tree(bus: Bus) -> list[Hierarchy]:
    """The hierarchy budgets live in: the manager's cgroup, where aero.slice is."""
    from sandbox.backends.systemd.scope import CGROUP_ROOT
    from sandbox.cgroups import cgroupfs
    from sandbox.cgroups.cgroupfs import Hierarchy

    root = CGROUP_ROOT + bus.root
    controllers = frozenset([*cgroupfs.read_words(root + "/cgroup.controllers"), SLICES])
    return [Hierarchy(2, CGROUP_ROOT, controllers, os.path.join(root, TOP))]


def ensure(bus: Bus, places: list[Hierarchy], parts: tuple[str, ...]) -> list[str]:
    """Start every missing level (uncapped; set_caps caps it); return the cgroups made.

    A level is there when its cgroup is: asking systemd about a unit by its object path
    loads it, and a loaded slice can no longer be started as a transient one."""
    made = []
    for depth, unit in enumerate(slice_names(parts), 1):
        path = levels_fs.level_dir(places[0], parts[:depth])
        if os.path.isdir(path):  # started (by us, another launcher, or an admin)
            continue
        name = "/".join(parts[:depth])
        properties: list[tuple[str, object]] = [
            ("Description", DESCRIPTION + name),
            ("MemoryMax", INFINITY),
            ("MemorySwapMax", 0),
            ("TasksMax", INFINITY),
        ]
        try:
            job = bus.start_scope(unit, properties)  # StartTransientUnit: any unit type
            result = "done" if job == "done" else f"its job ended {job!r}"
        except SandboxError as err:
            result = err.message  # another launcher may have started it a moment ago
        if result != "done" and not os.path.isdir(path):
            raise SandboxError(
                f"systemd could not start {unit} for budget {name}: {result}",
                f"see `journalctl -b -u {unit}`",
            )
        made.append(path)
    return made


def set_caps(bus: Bus, places: list[Hierarchy], parts: tuple[str, ...], caps: Caps) -> None:
    """Give the innermost level its caps (runtime: until the next boot) and read them back."""
    level = levels_fs.read_level(places, parts)
    if caps.memory_bytes is not None and (level.usage_bytes or 0) > caps.memory_bytes:
        raise SandboxError(  # the kernel would OOM-kill members to get there
            f"cannot cap budget {'/'.join(parts)} at {format_size(caps.memory_bytes)}: its "
            f"members use {format_size(level.usage_bytes)} now",
            "wait for them to end, or choose a larger cap",
        )
    unit = slice_names(parts)[-1]
    memory = INFINITY if caps.memory_bytes is None else caps.memory_bytes
    tasks = INFINITY if caps.pids is None else caps.pids
    wanted: list[tuple[str, object]] = [("MemoryMax", memory), ("TasksMax", tasks)]
    bus.manager("SetUnitProperties", b"sb", [unit.encode(), True], wanted)  # runtime
    # systemd writes the cgroup files when it next realizes the unit's cgroup, which may come
    # after its reply: read them back for a bounded moment.
    deadline = time.monotonic() + APPLY_WAIT_S
    found = levels_fs.read_level(places, parts).caps
    while not _applied(found, caps) and time.monotonic() < deadline:
        time.sleep(0.02)
        found = levels_fs.read_level(places, parts).caps
    if not _applied(found, caps):
        raise SandboxError(
            f"systemd did not apply the caps of {unit}: memory {found.memory_bytes}, "
            f"tasks {found.pids} (asked {caps.memory_bytes}, {caps.pids})",
            "does the manager have the memory and pids controllers? (docs/systemd.md)",
        )


def _applied(found: Caps, wanted: Caps) -> bool:
    """The caps read back are those asked (the kernel rounds memory.max down to whole pages)."""
    if found.pids != wanted.pids or (found.memory_bytes is None) != (wanted.memory_bytes is None):
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    return wanted.memory_bytes is None or (
        found.memory_bytes is not None and wanted.memory_bytes - page < found.memory_bytes
        and found.memory_bytes <= wanted.memory_bytes
    )


def names(bus: Bus, places: list[Hierarchy]) -> list[tuple[str, ...]]:
    """Every budget slice of ours the manager has active, outer before inner."""
    found = []
    rows = bus.manager("ListUnitsByPatterns", b"asas", [[], [b"aero-*.slice"]]) or []
    for row in rows:  # (name, description, load state, active state, ...)
        unit, description = (_text(value) for value in row[:2])
        parts = slice_segments(unit)
        ours = parts is not None and description == DESCRIPTION + "/".join(parts)
        if parts is not None and ours and os.path.isdir(levels_fs.level_dir(places[0], parts)):
            found.append(parts)
    return sorted(found, key=lambda p: (len(p), p))


def remove(bus: Bus, places: list[Hierarchy], parts: tuple[str, ...]) -> list[str]:
    """Stop the budget's slices, innermost first (nested budgets too); a stopped transient
    slice is gone. Only slices that say they are a budget of ours: never an admin's."""
    name = "/".join(parts)
    doomed = [p for p in names(bus, places) if f"{'/'.join(p)}/".startswith(name + "/")]
    removed = []
    for found in sorted(doomed, key=len, reverse=True):
        path = levels_fs.level_dir(places[0], found)
        if levels_fs.processes(places, found):
            raise SandboxError(f"cannot remove budget {'/'.join(found)}: processes run in {path}")
        bus.stop_unit(slice_names(found)[-1])
        removed.append(path)
    # aero.slice, systemd's implicit parent of them all, stays: stopping it would stop every
    # slice and scope in it, a budget another launcher is starting a run in included.
    return removed


def backend(slice_name: str, budget: BudgetWatch | None) -> SystemdBackend:
    """The systemd backend for a member: its scope in the innermost slice, an OOM kill told
    budget_oom from oom by the levels' counters (the scope holds the member's own --mem)."""
    from sandbox.backends.systemd import SystemdBackend

    class MemberBackend(SystemdBackend):
        def check(self) -> str | None:
            found = super().check()
            if found is None or budget is None or self.command is None or self.scope is None:
                return found
            return budget.classify(self.command.path, 2, own_limit=self.scope.path) or found

        def describe(self) -> Placement:
            from sandbox.core.result import Placement

            placed = super().describe().as_dict()
            return Placement(**{**placed, "budget": budget.describe() if budget else None})

    return MemberBackend(slice_name)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
