"""A run's membership in a budget, from before its sandbox exists until after it is gone.

    join      find (or, with --budget-mem, create) the budget's cgroups; hold each level's
              members lock; with --reserve, queue and wait for admission
    placement the hierarchies the cgroup backend creates the sandbox below (innermost level)
    watch     what the backend asks whether an OOM kill was the budget's (budget_oom)
    leave     give the reservation back and drop the locks

The launcher (sandbox/launch.py) owns one Membership per attempt; nothing else here touches a
backend.
"""

from __future__ import annotations

import os

from sandbox.budgets import admission, files, slices
from sandbox.budgets import cgroup as levels_fs
from sandbox.budgets.model import Caps, Level, levels, slice_names
from sandbox.budgets.oom import BudgetWatch
from sandbox.core.errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from sandbox.backends.systemd.bus import Bus
    from sandbox.cgroups.cgroupfs import Hierarchy


def state_root() -> str:
    """Where the budgets' queue files live: beside the registry (/run/aero-sandbox for root)."""
    from sandbox.registry.store import ROOT_DIRECTORY, own_directory

    top = own_directory()
    try:
        files.directory(top, 0o755 if top == ROOT_DIRECTORY else 0o700)
    except (SandboxError, OSError):
        top = files.directory(f"/tmp/aero-sandbox-{os.geteuid()}", 0o700)
    return files.directory(os.path.join(top, "budgets"), 0o755 if os.geteuid() == 0 else 0o700)


def state_dir(places: list[Hierarchy], parts: tuple[str, ...], create: bool = True) -> str:
    """The state directory of the tree the budget belongs to, keyed by its top level's cgroup."""
    top = levels_fs.level_dir(levels_fs.memory_base(places), parts[:1])
    key = top.strip("/").replace("%", "%25").replace("/", "%")
    if len(key) > 200:  # NAME_MAX is 255; keep the end, which names the budget
        import zlib

        key = f"{zlib.crc32(top.encode()):08x}-{key[-180:]}"
    path = os.path.join(state_root(), key)
    if not create:
        return path
    files.directory(path, 0o755 if os.geteuid() == 0 else 0o700)
    fd = files.open_own(os.path.join(path, "cgroup"), create=True)
    try:
        if os.fstat(fd).st_size == 0:  # which budget this is, for gc once the cgroup is gone
            files.write_all(fd, top + "\n")
    finally:
        os.close(fd)
    return path


class Membership:
    def __init__(self, name: str, parts: tuple[str, ...], places: list[Hierarchy]) -> None:
        self.name = name
        self.parts = parts
        self.places = places
        self.queue = admission.Queue(state_dir(places, parts))
        self.placement: list[Hierarchy] = []  # the cgroup backend's: the innermost level
        self.slice: str | None = None  # the systemd backend's: the innermost level's slice
        self.watch: BudgetWatch | None = None
        self.reserve: int | None = None
        self.waited_s = 0.0
        self.created = False

    def leave(self) -> None:
        self.queue.leave()
        if self.watch is not None:
            self.watch.close()

    def read_chain(self) -> list[Level]:
        return levels_fs.chain(self.places, self.parts)

    def describe(self) -> dict[str, object]:
        level = levels_fs.read_level(self.places, self.parts)
        found: dict[str, object] = {
            "name": self.name,
            "cap_bytes": level.caps.memory_bytes,
            "pids": level.caps.pids,
            "reserve_bytes": self.reserve,
            "queue_wait_s": round(self.waited_s, 3),
            "created": self.created,
        }
        if self.watch is not None and self.watch.hit:
            found["ran_out"] = self.watch.hit
        return found


def join(
    name: str,
    parts: tuple[str, ...],
    budget_mem: int | None,
    reserve: int | None,
    queue_timeout: float | None,
    argv: list[str],
    wait: Callable[[float, int | None], int | None],
    say: Callable[[str], None],
    backend: str = "auto",
) -> Membership:
    """Enter the budget (waiting for admission with a reservation). Raises SandboxError (125)
    or admission.NotAdmitted (queue timeout, a signal while waiting). The budget is a tree of
    systemd slices where the run's backend is systemd (slices.open_bus), else of cgroups."""
    bus = slices.open_bus(backend)
    member: Membership | None = None
    try:
        try:
            if bus is not None:
                places = slices.tree(bus)
            else:
                places = levels_fs.bases(os.environ.get(levels_fs.ROOT_ENV, "").strip() or None)
            member = Membership(name, parts, places)
            member.queue.join(levels(parts))
            _enter(member, bus, budget_mem)
        finally:
            if bus is not None:  # not held while waiting: the manager would queue signals for it
                bus.close()
        if reserve is not None:
            member.reserve = reserve
            _admit(member, reserve, queue_timeout, argv, wait, say)
    except BaseException:
        if member is not None:
            member.leave()
        raise
    return member

def _enter(member: Membership, bus: Bus | None, budget_mem: int | None) -> None:
    """Find the budget's levels (or create them with --budget-mem's cap); where the backend
    puts the sandbox; what tells a budget_oom."""
    places, parts = member.places, member.parts
    if not levels_fs.exists(places, parts):
        if budget_mem is None:
            raise SandboxError(
                f"no budget {member.name} here (below {levels_fs.memory_base(places).own})",
                f"create it: aero-sandbox budget set {member.name} --mem SIZE; or give "
                "--budget-mem SIZE (AERO_BUDGET_MEM) to create it on first use",
            )
        memory_dir = levels_fs.level_dir(levels_fs.memory_base(places), parts)
        made = slices.ensure(bus, places, parts) if bus else levels_fs.ensure(places, parts)
        if memory_dir in made:  # we made it: the cap is ours to set; else the maker's
            if bus is not None:
                slices.set_caps(bus, places, parts, Caps(budget_mem, None))
            else:
                levels_fs.set_caps(places, parts, Caps(budget_mem, None))
            member.created = True
    if bus is not None:
        member.slice = slice_names(parts)[-1]
    else:
        member.placement = levels_fs.placement(places, parts)
    memory = levels_fs.memory_base(places)
    member.watch = BudgetWatch(
        member.name,
        [(lv, levels_fs.level_dir(memory, tuple(lv.split("/")))) for lv in levels(parts)],
        memory.version,
    )


def _admit(
    member: Membership,
    reserve: int,
    queue_timeout: float | None,
    argv: list[str],
    wait: Callable[[float, int | None], int | None],
    say: Callable[[str], None],
) -> None:
    chain = member.read_chain()
    impossible = admission.too_big(reserve, chain)
    if impossible:
        raise SandboxError(impossible, "reserve less, or raise the cap: aero-sandbox budget set")
    ticket = member.queue.enqueue(member.name, reserve, argv)
    member.waited_s = admission.wait_for_admission(
        member.queue, ticket, member.read_chain, queue_timeout, wait, say
    )
