"""What runs and what is left over: the data behind `aero-sandbox list` and `aero-sandbox gc`.

Every launcher registers its sandbox (sandbox/registry/store.py): command, backend, limits, cgroup
paths. `list` reads the live entries and each sandbox's memory from its cgroups, whatever the
backend made them (cgroupfs, a systemd scope); a sandbox without cgroups (rlimit) is measured
from the launcher's process tree. `gc` removes what crashed launchers left: registry entries no
launcher holds, and empty sandbox cgroups whose launcher is gone (sandbox/registry/gc.py, with
the checks here of what may be ours).

This runs in subcommands only, never on the launcher's run path: heavier imports are fine here.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from typing import Any

from sandbox.cgroups import cgroupfs, v1
from sandbox.cgroups.enclosing import enclosing_memory_limit
from sandbox.core import identity, procfs
from sandbox.core.limits import format_size, smaller
from sandbox.registry import store as registry


# -- list -------------------------------------------------------------------------------------
def live_sandboxes(notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every sandbox the caller may see, oldest first.

    A sandbox whose launcher died while processes still run in its cgroups (the guardian was
    killed too) is listed with `launcher_alive: false`: gc leaves it, a person must decide.
    An entry that is unsafe to read or malformed is skipped, with a line in `notes`.
    """
    rows = []
    now = time.time()
    limits_above: dict[str, int | None] = {}
    processes = ProcessTable()
    for directory, uid in registry.directories():
        for path in registry.paths(directory):
            live = registry.is_live(path)
            try:
                entry = registry.load(path, uid)
            except registry.BadEntry as err:
                if notes is not None:
                    notes.append(f"skipped registry entry {path}: {err}")
                continue
            cgroups = cgroups_of(entry, uid)
            if not live and not any(cgroupfs.procs(p) for p in cgroups.values()):
                continue  # a dead launcher's entry: gc's business
            rows.append(_row(entry, cgroups, live, now, limits_above, processes))
    rows.sort(key=lambda row: row["started"])
    return rows


def cgroups_of(entry: dict[str, Any], uid: int) -> dict[str, str]:
    """The entry's sandbox cgroups that are what it says: see sandbox_cgroup()."""
    found = entry["sandbox"].get("cgroups")
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str) and sandbox_cgroup(v, uid)}


def made_by_us(name: str) -> bool:
    """A cgroup name aero-sandbox gives what it creates: `aero-sandbox-<launcher pid>-<id>`.

    The one place gc asks "may this be ours?"; add the names of other things we create here.
    """
    return identity.launcher_pid(name) is not None


_MOUNTS: list[tuple[str, int]] | None = None


def _cgroup_mounts() -> list[tuple[str, int]]:
    """(mount point, device) of every cgroup filesystem we can see, read once."""
    global _MOUNTS
    if _MOUNTS is None:
        _MOUNTS = []
        for mount in sorted({h.mount for h in cgroupfs.discover(read_controllers=False)}):
            try:
                _MOUNTS.append((mount, os.stat(mount).st_dev))
            except OSError:
                pass
    return _MOUNTS


def sandbox_cgroup(path: str, uid: int | None = None) -> bool:
    """Whether `path` is a sandbox cgroup gc may consider: a real directory (no symlink on the
    way) on a cgroup filesystem below one of its mounts, with our name, owned by `uid` or root
    when given (the uid of the registry entry naming it; systemd makes scopes as root). A path
    that only an entry names is never trusted for more: gc also checks that it is empty and
    that the launcher pid in its name is gone."""
    if not path.startswith("/") or os.path.realpath(path) != path or not made_by_us(
        os.path.basename(path)
    ):
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid not in (uid, 0)):
        return False
    return any(
        path.startswith(mount.rstrip("/") + "/") and info.st_dev == device
        for mount, device in _cgroup_mounts()
    )


def _row(
    entry: dict[str, Any],
    cgroups: dict[str, str],
    live: bool,
    now: float,
    limits_above: dict[str, int | None],
    processes: ProcessTable,
) -> dict[str, Any]:
    memory = peak = limit = tasks = None
    effective = entry["limits"].get("memory_bytes")
    memory_dir = _memory_dir(cgroups)
    if memory_dir is not None:
        memory, peak, limit = _memory(memory_dir)
        parent = os.path.dirname(memory_dir)
        if parent not in limits_above:  # sandboxes share parents: read each parent chain once
            limits_above[parent] = enclosing_memory_limit(parent)[0]
        effective = smaller(limit, limits_above[parent])
    if cgroups:
        tasks = _tasks(cgroups)
    elif live:
        memory, tasks = processes.tree(entry["pid"], entry.get("guardian"))
        limit = entry["limits"].get("memory_bytes")
    sandbox = {k: v for k, v in entry["sandbox"].items() if k != "cgroups"}
    return {
        "launcher_pid": entry["pid"],
        "launcher_alive": live,
        "guardian_pid": entry.get("guardian"),
        "backend": entry.get("backend"),
        "command": entry["argv"],
        "started": entry["started"],
        "age_s": round(max(0.0, now - entry["started"]), 3),
        "memory_bytes": memory,
        "peak_memory_bytes": peak,
        "memory_limit_bytes": limit,
        "effective_memory_limit_bytes": effective,
        "tasks": tasks,
        "limits": entry["limits"],
        "cgroups": cgroups,
        **sandbox,
        "registry": entry["path"],
    }


def _memory_dir(cgroups: dict[str, str]) -> str | None:
    candidates = ([cgroups["memory"]] if "memory" in cgroups else []) + list(cgroups.values())
    for path in candidates:
        if os.path.exists(path + "/memory.current") or os.path.exists(
            path + "/memory.usage_in_bytes"
        ):
            return path
    return None


def _memory(path: str) -> tuple[int | None, int | None, int | None]:
    """(now, peak, limit) of a memory cgroup, v2 or v1."""
    if os.path.exists(path + "/memory.current"):
        # memory.peak: Linux 5.19+.
        names = ("memory.current", "memory.peak", "memory.max")
    else:
        names = ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes")
    now, peak, limit = (cgroupfs.read_int(f"{path}/{name}") for name in names)
    if limit is not None and limit >= v1.UNLIMITED:
        limit = None
    return now, peak, limit


def _tasks(cgroups: dict[str, str]) -> int:
    """Tasks (threads included) as pids.current counts them, else the processes."""
    ordered = ([cgroups["pids"]] if "pids" in cgroups else []) + list(cgroups.values())
    for path in ordered:
        count = cgroupfs.read_int(path + "/pids.current")
        if count is not None:
            return count
    return len(cgroupfs.procs(next(iter(cgroups.values()))))


class ProcessTable:
    """Every process's parent, resident memory and threads, from one pass over /proc.

    Read once per `list`, on first use (only sandboxes without cgroups need it): a process
    tree walk per sandbox (psutil's children(recursive=True) scans /proc each time) took a
    second for 100 rlimit sandboxes.
    """

    def __init__(self) -> None:
        self._children: dict[int, list[int]] | None = None
        self._usage: dict[int, tuple[int, int]] = {}  # pid -> (resident bytes, threads)

    def _load(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in procfs.pids():
            info = procfs.stat(pid)
            if info is None:
                continue  # it exited meanwhile
            children.setdefault(info.ppid, []).append(pid)
            self._usage[pid] = (info.rss_pages * page, info.threads)
        return children

    def tree(self, launcher: int, guardian: int | None) -> tuple[int | None, int | None]:
        """(resident bytes, threads) of a launcher's descendants, its guardian's left out."""
        if self._children is None:
            self._children = self._load()
        if launcher not in self._usage:
            return None, None
        rss = threads = 0
        todo = [p for p in self._children.get(launcher, []) if p != guardian]
        while todo:
            pid = todo.pop()
            resident, count = self._usage.get(pid, (0, 0))
            rss, threads = rss + resident, threads + count
            todo += self._children.get(pid, [])
        return rss, threads


def table(rows: list[dict[str, Any]]) -> str:
    """The human view: one line per sandbox, the command last and whole."""
    header = ("PID", "BACKEND", "AGE", "MEM", "PEAK", "LIMIT", "TASKS", "COMMAND")
    lines = [header]
    for row in rows:
        pid = str(row["launcher_pid"]) + ("" if row["launcher_alive"] else " (gone)")
        limit = row["effective_memory_limit_bytes"]
        lines.append(
            (
                pid,
                str(row["backend"]),
                age(row["age_s"]),
                size(row["memory_bytes"]),
                size(row["peak_memory_bytes"]),
                size(limit) if limit is not None else "none",
                "-" if row["tasks"] is None else str(row["tasks"]),
                printable(shlex.join(row["command"])),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    )


def printable(text: str) -> str:
    """Control characters (an escape sequence in a command line is not for root's terminal) and
    undecodable bytes as backslash escapes."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(repr(char)[1:-1])  # \x1b, \n, \u2028
    return "".join(out)


def size(value: int | None) -> str:
    return "-" if value is None else format_size(value, compact=True)


def age(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
