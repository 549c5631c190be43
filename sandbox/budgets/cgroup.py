"""A budget's cgroups: one directory per level (`aero-budget-<segment>`) in each hierarchy a
sandbox uses, caps written on the level and read back, usage read from the kernel.

Where: by default below the cgroup the launcher runs in, exactly where its sandboxes go today
(on pure v2 the parent our leaf `aero-leaf` sits in), so a budget never escapes an enclosing
limit (a CI job's cgroup, a container, an outer sandbox). AERO_BUDGET_ROOT (or `budget set
--root`) names an admin-made cgroup instead, resolved like a run's --parent. Never the root of a
hierarchy the launcher was not placed in.

A level holds no process itself (cgroup v2's no-internal-process rule, and so that `budget rm`
and `gc` can tell an idle budget): sandboxes are created below the innermost level.
"""

from __future__ import annotations

import errno
import os

from sandbox.backends.cgroup import CONTROLLERS, at_parent
from sandbox.budgets.model import (
    SLICES,
    Caps,
    Level,
    directory_names,
    levels,
    segment_of,
    slice_names,
    slice_segments,
)
from sandbox.cgroups import cgroupfs, tree, v1, v2
from sandbox.cgroups.cgroupfs import Hierarchy
from sandbox.core.errors import SandboxError
from sandbox.core.limits import format_size

ROOT_ENV = "AERO_BUDGET_ROOT"


def bases(root: str | None = None, hierarchies: list[Hierarchy] | None = None) -> list[Hierarchy]:
    """The hierarchies a budget lives in, each with `own` set to the directory its top levels
    go in: our own cgroup (v2: the one that can give memory and pids to children), or `root`."""
    found = hierarchies if hierarchies is not None else cgroupfs.discover()
    if root:
        found = at_parent(found, root)
    used = [h for h in found if h.version == 2 or h.controllers & set(CONTROLLERS)]
    result = []
    for h in used:
        own = h.own
        if h.version == 2:
            wanted = set(CONTROLLERS) & h.controllers
            own = _sandbox_parent(h.own, wanted) if wanted else h.own
        result.append(Hierarchy(h.version, h.mount, h.controllers, own))
    if not any(_holds_memory(h) for h in result):
        raise SandboxError(
            "no memory controller is available to this process's cgroup, so no budget can cap "
            "memory here",
            "run as root on a host with the memory controller, or in a delegated cgroup",
        )
    return result


def _sandbox_parent(own: str, wanted: set[str]) -> str:
    """Our own v2 cgroup, made able to give `wanted` controllers to the levels below it."""
    try:
        return v2.sandbox_parent(own, wanted)
    except OSError as err:
        raise SandboxError(
            f"cannot give {', '.join(sorted(wanted))} to budgets below {own}: {err.strerror}",
            "run as root, or in a cgroup delegated to you",
        ) from err


def _holds_memory(h: Hierarchy) -> bool:
    return "memory" in h.controllers


def memory_base(places: list[Hierarchy]) -> Hierarchy:
    v2 = [h for h in places if h.version == 2 and "memory" in h.controllers]
    return (v2 or [h for h in places if h.version == 1 and "memory" in h.controllers])[0]


def pids_base(places: list[Hierarchy]) -> Hierarchy | None:
    v2 = [h for h in places if h.version == 2 and "pids" in h.controllers]
    v1 = [h for h in places if h.version == 1 and "pids" in h.controllers]
    found = v2 or v1
    return found[0] if found else None


def level_dir(base: Hierarchy, parts: tuple[str, ...]) -> str:
    if SLICES in base.controllers:  # systemd's: aero-a.slice/aero-a-b.slice (budgets/slices.py)
        return os.path.join(base.own, *slice_names(parts))
    return os.path.join(base.own, *directory_names(parts))


def exists(places: list[Hierarchy], parts: tuple[str, ...]) -> bool:
    return all(os.path.isdir(level_dir(h, parts)) for h in places)


def ensure(places: list[Hierarchy], parts: tuple[str, ...]) -> list[str]:
    """Create whatever levels are missing in each hierarchy; return the directories made."""
    made = []
    for h in places:
        path = h.own
        for name in directory_names(parts):
            path = os.path.join(path, name)
            try:
                os.mkdir(path, 0o755)
                made.append(path)
            except FileExistsError:
                pass
            except OSError as err:
                raise SandboxError(
                    f"cannot create the budget cgroup {path}: {err.strerror}",
                    "run as root, or in a cgroup delegated to you; or set AERO_BUDGET_ROOT to a "
                    "cgroup you may write",
                ) from err
            if h.version == 2:
                wanted = set(CONTROLLERS) & set(cgroupfs.read_words(path + "/cgroup.controllers"))
                have = set(cgroupfs.read_words(path + "/cgroup.subtree_control"))
                if wanted - have:
                    cgroupfs.write(
                        path + "/cgroup.subtree_control",
                        " ".join(f"+{c}" for c in sorted(wanted - have)),
                    )
    return made


def placement(places: list[Hierarchy], parts: tuple[str, ...]) -> list[Hierarchy]:
    """The hierarchies for a sandbox in this budget: `own` is the innermost level."""
    result = []
    for h in places:
        path = level_dir(h, parts)
        controllers = (
            frozenset(cgroupfs.read_words(path + "/cgroup.controllers"))
            if h.version == 2
            else h.controllers
        )
        result.append(Hierarchy(h.version, h.mount, controllers, path))
    return result


def set_caps(places: list[Hierarchy], parts: tuple[str, ...], caps: Caps) -> None:
    """Write the level's caps (None: no cap) and read them back."""
    memory = memory_base(places)
    path = level_dir(memory, parts)
    usage = cgroupfs.read_int(
        path + ("/memory.current" if memory.version == 2 else "/memory.usage_in_bytes")
    )
    if caps.memory_bytes is not None and usage is not None and usage > caps.memory_bytes:
        # v2 would OOM-kill members to get there: never as a side effect of `budget set`.
        raise SandboxError(
            f"cannot cap budget {'/'.join(parts)} at {format_size(caps.memory_bytes)}: its "
            f"members use {format_size(usage)} now",
            "wait for them to end, or choose a larger cap",
        )
    if memory.version == 2:
        _write_limit(path, "memory.max", caps.memory_bytes)
    else:
        _set_v1_memory(path, caps.memory_bytes)
    pids = pids_base(places)
    if pids is not None:
        _write_limit(level_dir(pids, parts), "pids.max", caps.pids)


def _write_limit(path: str, name: str, value: int | None) -> None:
    if value is not None:
        tree.Cgroup(path).write_checked(name, value)
        return
    try:
        cgroupfs.write(f"{path}/{name}", "max")
    except OSError as err:
        raise SandboxError(f"cannot set {path}/{name} to max: {err.strerror}") from err


def _set_v1_memory(path: str, value: int | None) -> None:
    """v1 wants memsw >= the memory limit at every moment: lower memory first, raise memsw first."""
    files = ["memory.limit_in_bytes"]
    if os.path.exists(path + "/memory.memsw.limit_in_bytes"):
        files.append("memory.memsw.limit_in_bytes")
    current = cgroupfs.read_int(path + "/memory.limit_in_bytes") or 0
    raising = value is None or value > current
    for name in reversed(files) if raising else files:
        if value is None:
            cgroupfs.write(f"{path}/{name}", "-1")  # v1's "no limit"
            continue
        try:
            tree.Cgroup(path).write_checked(name, value)
        except SandboxError as err:
            usage = cgroupfs.read_int(path + "/memory.usage_in_bytes")
            raise SandboxError(
                f"cannot cap {path} at {format_size(value)}: {err.message}",
                f"its members use {format_size(usage)} now; wait for them, or choose a larger cap",
            ) from err


def read_level(places: list[Hierarchy], parts: tuple[str, ...]) -> Level:
    memory = memory_base(places)
    path = level_dir(memory, parts)
    if memory.version == 2:
        names = ("memory.max", "memory.current", "memory.peak")  # memory.peak: Linux 5.19+
    else:
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes")
    cap, usage, peak = (cgroupfs.read_int(f"{path}/{name}") for name in names)
    if cap is not None and cap >= v1.UNLIMITED:
        cap = None
    pids = pids_base(places)
    pids_cap = cgroupfs.read_int(level_dir(pids, parts) + "/pids.max") if pids else None
    held = held_bytes(path, memory.version)
    return Level("/".join(parts), path, Caps(cap, pids_cap), usage, peak, held)


def held_bytes(memory_dir: str, version: int) -> int | None:
    """Anonymous memory and tmpfs charged to a memory cgroup and those below it (Level.held_bytes
    says why admission counts only these); None where memory.stat lacks them."""
    stat = cgroupfs.read_keyed(f"{memory_dir}/memory.stat")
    keys = ("anon", "shmem") if version == 2 else ("total_rss", "total_shmem")
    return sum(stat[k] for k in keys) if all(k in stat for k in keys) else None


def chain(places: list[Hierarchy], parts: tuple[str, ...]) -> list[Level]:
    """Every level of a budget as the kernel has it now, outermost first."""
    return [read_level(places, tuple(name.split("/"))) for name in levels(parts)]


def processes(places: list[Hierarchy], parts: tuple[str, ...]) -> list[int]:
    """Every process in the budget (in any of its members, nested budgets included)."""
    found: set[int] = set()
    for h in places:
        found.update(cgroupfs.procs(level_dir(h, parts)))
    return sorted(found)


def members(places: list[Hierarchy], parts: tuple[str, ...]) -> int:
    """Sandboxes that run in the budget now (directly or in a nested budget)."""
    count = 0
    for top, dirs, _files in os.walk(level_dir(memory_base(places), parts)):
        count += sum(1 for d in dirs if d.startswith("aero-sandbox-") and cgroupfs.procs(
            os.path.join(top, d)
        ))
    return count


def names(places: list[Hierarchy]) -> list[tuple[str, ...]]:
    """Every budget below the bases, outer before inner."""
    found: list[tuple[str, ...]] = []
    base = memory_base(places).own

    def walk(path: str, prefix: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            return
        for entry in entries:
            part = segment_of(entry)
            if part is not None and os.path.isdir(os.path.join(path, entry)):
                found.append(prefix + (part,))
                walk(os.path.join(path, entry), prefix + (part,))

    walk(base, ())
    return found


def remove(places: list[Hierarchy], parts: tuple[str, ...]) -> list[str]:
    """rmdir the budget (and budgets nested in it) in every hierarchy; processes make it fail."""
    removed = []
    for h in places:
        path = level_dir(h, parts)
        if not os.path.isdir(path):
            continue
        try:
            tree.remove(path, timeout_s=0.5)
        except OSError as err:
            if err.errno == errno.ENOENT:
                continue
            raise SandboxError(f"cannot remove the budget cgroup {path}: {err.strerror}") from err
        removed.append(path)
    return removed


def names_below(places: list[Hierarchy], parts: tuple[str, ...]) -> list[str]:
    """The budgets nested directly in this one that still exist."""
    base = memory_base(places)
    path = level_dir(base, parts)
    ours = slice_segments if SLICES in base.controllers else segment_of
    try:
        return [n for n in os.listdir(path) if ours(n) and os.path.isdir(f"{path}/{n}")]
    except OSError:
        return []
