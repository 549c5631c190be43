"""`aero-sandbox budget set|list|rm`, the waiting runs `list` shows, and `gc` of empty budgets.

Subcommands only, never on a run's path.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sandbox.budgets import admission, files, slices, tickets
from sandbox.budgets import cgroup as levels_fs
from sandbox.budgets.membership import state_dir, state_root
from sandbox.budgets.model import Caps, parse_name, slice_names
from sandbox.cgroups.cgroupfs import Hierarchy
from sandbox.core.errors import SandboxError

BACKEND_ENV = "AERO_BACKEND"  # as for a run: systemd keeps budgets in slices, cgroup in cgroups


class Where:
    """Where the subcommands find budgets, the same place a run with AERO_BACKEND (default
    auto) puts them: systemd's slices (`bus` set), or cgroups below `--root`/ours."""

    def __init__(self, root: str | None, backend: str | None = None) -> None:
        root = root or os.environ.get(levels_fs.ROOT_ENV, "").strip() or None
        backend = backend or os.environ.get(BACKEND_ENV, "").strip() or "auto"
        self.bus = None if root else slices.open_bus(backend)
        try:
            self.places = slices.tree(self.bus) if self.bus else levels_fs.bases(root)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Where:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
            self.bus = None

    def names(self) -> list[tuple[str, ...]]:
        if self.bus is not None:
            return slices.names(self.bus, self.places)
        return levels_fs.names(self.places)

    def remove(self, parts: tuple[str, ...]) -> list[str]:
        if self.bus is not None:
            return slices.remove(self.bus, self.places, parts)
        return levels_fs.remove(self.places, parts)


def set_budget(name: str, memory: int | None, pids: int | None, root: str | None) -> str:
    parts = parse_name(name, "budget NAME")
    with Where(root) as where:
        found = where.places
        if where.bus is not None:
            slices.ensure(where.bus, found, parts)
            slices.set_caps(where.bus, found, parts, Caps(memory, pids))
            return f"{slice_names(parts)[-1]}, {levels_fs.level_dir(found[0], parts)}"
        levels_fs.ensure(found, parts)
        levels_fs.set_caps(found, parts, Caps(memory, pids))
        return levels_fs.level_dir(levels_fs.memory_base(found), parts)


def _tickets(found: list[Hierarchy], parts: tuple[str, ...]) -> list[tickets.Ticket]:
    path = state_dir(found, parts, create=False)
    return tickets.read_tickets(path) if os.path.isdir(path) else []


def rows(root: str | None) -> list[dict[str, Any]]:
    with Where(root) as where:
        return _rows(where)


def _rows(where: Where) -> list[dict[str, Any]]:
    found = where.places
    result = []
    for parts in where.names():
        name = "/".join(parts)
        level = levels_fs.read_level(found, parts)
        queued = [t for t in _tickets(found, parts) if admission.within(t.budget, name)]
        result.append(
            {
                "name": name,
                "memory_cap_bytes": level.caps.memory_bytes,
                "pids_cap": level.caps.pids,
                "memory_bytes": level.usage_bytes,
                "peak_memory_bytes": level.peak_bytes,
                "running": levels_fs.members(found, parts),
                "waiting": sum(1 for t in queued if not t.running),
                "reserved_bytes": sum(t.reserve for t in queued if t.running),
                "cgroup": level.memory_dir,
                **({"slice": slice_names(parts)[-1]} if where.bus else {}),
            }
        )
    return result


def table(found: list[dict[str, Any]]) -> str:
    from sandbox.registry.inventory import size

    header = ("BUDGET", "CAP", "MEM", "PEAK", "RESERVED", "PIDS", "RUNNING", "WAITING")
    lines = [header]
    for row in found:
        cap = row["memory_cap_bytes"]
        lines.append(
            (
                row["name"],
                size(cap) if cap is not None else "none",
                size(row["memory_bytes"]),
                size(row["peak_memory_bytes"]),
                size(row["reserved_bytes"]),
                str(row["pids_cap"] or "none"),
                str(row["running"]),
                str(row["waiting"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def remove(name: str, root: str | None) -> list[str]:
    """Remove a budget (and those nested in it); SandboxError (125) while members run or wait."""
    parts = parse_name(name, "budget NAME")
    with Where(root) as where:
        return _remove(where, name, parts)


def _remove(where: Where, name: str, parts: tuple[str, ...]) -> list[str]:
    found = where.places
    if not levels_fs.exists(found, parts) and not any(
        os.path.isdir(levels_fs.level_dir(h, parts)) for h in found
    ):
        raise SandboxError(f"no budget {name} here (below {levels_fs.memory_base(found).own})")
    state = state_dir(found, parts)
    lock = admission.take_exclusive(state, "/".join(parts))
    try:
        busy = _busy(found, parts)
        if lock is None:  # a launcher holds it: running, waiting, or about to make its sandbox
            busy = busy or "a launcher is starting a run in it"
        if busy:
            raise SandboxError(
                f"budget {name} is in use: {busy}",
                "wait for its runs to end (aero-sandbox budget list), or stop them",
            )
        return where.remove(parts)
    finally:
        if lock is not None:
            os.close(lock)
        prune_state()


def _busy(found: list[Hierarchy], parts: tuple[str, ...]) -> str | None:
    name = "/".join(parts)
    pids = levels_fs.processes(found, parts)
    queued = [t for t in _tickets(found, parts) if admission.within(t.budget, name)]
    waiting = sum(1 for t in queued if not t.running)
    if not pids and not waiting:
        return None
    return (
        f"{levels_fs.members(found, parts)} running members ({len(pids)} processes), "
        f"{waiting} waiting runs"
    )


def waiting_runs() -> list[dict[str, Any]]:
    """Rows for `aero-sandbox list`: runs waiting for admission, in every budget tree."""
    try:
        root = state_root()
        keys = os.listdir(root)
    except (OSError, SandboxError):
        return []
    now = time.time()
    found: list[dict[str, Any]] = []
    for key in keys:
        for ticket in tickets.read_tickets(os.path.join(root, key), remove_stale=False):
            if ticket.running:
                continue
            found.append(
                {
                    "launcher_pid": ticket.pid,
                    "launcher_alive": True,
                    "guardian_pid": None,
                    "backend": f"waiting:{ticket.budget}",
                    "state": "waiting",
                    "budget": ticket.budget,
                    "reserve_bytes": ticket.reserve,
                    "command": ticket.argv,
                    "started": ticket.started,
                    "age_s": round(max(0.0, now - ticket.started), 3),
                    "memory_bytes": None,
                    "peak_memory_bytes": None,
                    "memory_limit_bytes": None,
                    "effective_memory_limit_bytes": None,
                    "tasks": None,
                    "limits": {},
                    "cgroups": {},
                    "registry": ticket.path,
                }
            )
    return found


def collect(dry_run: bool, root: str | None = None) -> tuple[list[str], list[str]]:
    """gc: remove empty budgets aero-sandbox made, innermost first: those in systemd's slices
    (where the systemd backend runs) and those in cgroups (aero-budget-*); never the root they
    live below (an admin's cgroup), never a slice that is not ours. Returns (removed, kept)."""
    removed: list[str] = []
    kept: list[str] = []
    for backend in ("systemd", "cgroup"):
        try:
            where = Where(root if backend == "cgroup" else None, backend)
        except SandboxError:  # BackendUnavailable too: nothing of that kind here
            continue
        with where:
            if root and backend == "systemd":
                continue
            _collect(where, dry_run, removed, kept)
    if not dry_run:
        prune_state()
    return removed, kept


def _collect(where: Where, dry_run: bool, removed: list[str], kept: list[str]) -> None:
    found = where.places
    for parts in reversed(where.names()):
        name = "/".join(parts)
        state = state_dir(found, parts)
        lock = admission.take_exclusive(state, name)
        if lock is None:
            kept.append(f"budget {name}: a launcher uses it")
            continue
        try:
            if _busy(found, parts):
                continue
            if any(levels_fs.names_below(found, parts)):
                continue  # a nested budget that was kept keeps its parent
            if dry_run:
                removed += [levels_fs.level_dir(h, parts) for h in found]
            else:
                removed += where.remove(parts)
        except SandboxError as err:
            kept.append(f"budget {name}: {err.line()}")
        finally:
            os.close(lock)


def prune_state() -> list[str]:
    """Remove the queue state of budget trees whose top cgroup is gone and that nobody uses."""
    try:
        root = state_root()
        keys = os.listdir(root)
    except (OSError, SandboxError):
        return []
    pruned = []
    for key in keys:
        state = os.path.join(root, key)
        opened = files.read_own(os.path.join(state, "cgroup"))
        if opened is None:
            continue
        os.close(opened[0])
        if os.path.isdir(opened[1].strip()) or tickets.read_tickets(state):
            continue
        locks = [admission.take_exclusive(state, n[2:]) for n in _names(state) if n[:2] == "m-"]
        try:
            if all(fd is not None for fd in locks):
                for name in _names(state):
                    files.unlink(os.path.join(state, name))
                os.rmdir(state)
                pruned.append(state)
        except OSError:
            pass
        finally:
            for fd in locks:
                if fd is not None:
                    os.close(fd)
    return pruned


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []



def doctor_summary() -> tuple[str, str, dict[str, Any]]:
    """(status, one line, details) for `aero-sandbox doctor`: the budgets and where they live."""
    try:
        with Where(None) as place:
            found = _rows(place)
            where = levels_fs.memory_base(place.places).own
            if place.bus is not None:
                where = f"systemd's {slices.TOP} ({where})"
    except SandboxError as err:
        return "info", f"no budgets possible here: {err.line()}", {}
    names = ", ".join(
        f"{row['name']} ({table_size(row['memory_cap_bytes'])})" for row in found[:8]
    ) + (", ..." if len(found) > 8 else "")
    summary = f"{len(found)} below {where}" + (f": {names}" if found else "")
    root = os.environ.get(levels_fs.ROOT_ENV, "").strip() or None
    return "info", summary, {"where": where, "root_env": root, "budgets": found}


def table_size(value: int | None) -> str:
    from sandbox.registry.inventory import size

    return size(value) if value is not None else "no cap"
