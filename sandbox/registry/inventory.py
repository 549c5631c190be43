"""What runs and what is left over: the data behind `aero-sandbox list` and `aero-sandbox gc`.

Every launcher registers its sandbox (sandbox/registry/store.py): command, backend, limits, cgroup
paths. `list` reads the live entries and each sandbox's memory from its cgroups, whatever the
backend made them (cgroupfs, a systemd scope); a sandbox without cgroups (rlimit) is measured
from the launcher's process tree. `gc` removes what crashed launchers left: registry entries no
launcher holds, and empty sandbox cgroups whose launcher is gone. It never touches a live
sandbox: a live launcher holds its entry's lock, and rmdir refuses a cgroup with a process in it.

This runs in subcommands only, never on the launcher's run path: heavier imports are fine here.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from typing import Any

from sandbox.cgroups import cgroupfs, tree, v1
from sandbox.cgroups.enclosing import enclosing_memory_limit
from sandbox.core import identity, procfs
from sandbox.core.errors import UsageError
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
            cgroups = _cgroups(entry, uid)
            if not live and not any(cgroupfs.procs(p) for p in cgroups.values()):
                continue  # a dead launcher's entry: gc's business
            rows.append(_row(entry, cgroups, live, now, limits_above, processes))
    rows.sort(key=lambda row: row["started"])
    return rows


def _cgroups(entry: dict[str, Any], uid: int) -> dict[str, str]:
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


# -- gc ---------------------------------------------------------------------------------------
class Collection:
    """What gc removed (or, with dry_run, would remove) and what it left, with why."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.cgroups: list[str] = []
        self.kept: list[str] = []  # one line each: what and why
        self.busy: set[str] = set()  # cgroups kept because processes still run in them


def collect(dry_run: bool = False, parents: list[str] | None = None) -> Collection:
    """Remove crashed launchers' leftovers, never a live sandbox's.

    1. Registry entries no launcher holds: their cgroups go (when empty), then the entry.
    2. Sandbox cgroups (aero-sandbox-<pid>-<id>) below our own cgroups, below `parents` and
       below the parents of registered sandboxes, whose launcher pid is gone and which no live
       entry claims. A cgroup that still holds processes is kept and reported.
    """
    done = Collection()
    claimed: set[str] = set()
    scan: set[str] = set(parents or [])
    stale: list[tuple[str, list[str]]] = []
    for directory, uid in registry.directories():
        for path in _all_entries(directory):
            try:
                entry: dict[str, Any] | None = registry.load(path, uid)
            except registry.BadEntry as err:
                entry = None
                if path.rpartition("/")[2][:1] != ".":  # a dot file: a write that never ended
                    done.kept.append(f"{path}: not read ({err}), so not removed either")
                    continue
            cgroups = list(_cgroups(entry, uid).values()) if entry else []
            scan.update(os.path.dirname(p) for p in cgroups)
            if registry.is_live(path):
                claimed.update(cgroups)
            else:
                stale.append((path, cgroups))
    for path, cgroups in stale:
        busy = False
        for cgroup in cgroups:
            busy = not _remove_cgroup(cgroup, done, dry_run) or busy
        if busy:
            done.kept.append(f"{path}: its launcher is gone but its sandbox still runs")
            continue
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                done.kept.append(f"{path}: {err.strerror}")
                continue
        done.entries.append(path)
    scan.update(h.own for h in cgroupfs.discover(read_controllers=False))
    for parent in sorted(scan):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            pid = identity.launcher_pid(name)
            path = os.path.join(parent, name)
            seen = path in claimed or path in done.cgroups or path in done.busy
            if pid is None or seen or identity.pid_exists(pid) or not sandbox_cgroup(path):
                continue
            _remove_cgroup(path, done, dry_run)
    return done


def parent_dirs(parent: str, hierarchies: list[cgroupfs.Hierarchy] | None = None) -> list[str]:
    """Where `gc --parent PATH` looks: PATH itself when it is a cgroup directory, and the same
    path relative to each cgroup mount wherever it exists (where a run's --parent puts them)."""
    if hierarchies is None:
        hierarchies = cgroupfs.discover(read_controllers=False)
    found = []
    if parent.startswith("/"):
        found = [os.path.normpath(parent)] if os.path.isdir(parent) else []
    relative = cgroupfs.below_mounts(parent, [h.mount for h in hierarchies])
    if relative:
        for hierarchy in hierarchies:
            candidate = os.path.normpath(f"{hierarchy.mount}/{relative}")
            if os.path.isdir(candidate) and candidate not in found:
                found.append(candidate)
    if not found:
        raise UsageError(
            f"invalid gc --parent value {parent!r}: no such cgroup; expected a cgroup directory "
            "or a path relative to the cgroup mounts, as given to a run's --parent"
        )
    return found


def _all_entries(directory: str) -> list[str]:
    """Complete entries and the temporary files of writes that never finished."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if n.lstrip(".")[:1].isdigit()]


def _remove_cgroup(path: str, done: Collection, dry_run: bool) -> bool:
    """Remove an empty leftover cgroup tree; False (and a note) when processes still run in it.

    Only ever called with a path sandbox_cgroup() accepted: rmdir on a cgroup filesystem
    removes a cgroup, never anyone's files.
    """
    if not os.path.isdir(path):
        return True
    pid = identity.launcher_pid(os.path.basename(path))
    if pid is not None and pid != os.getpid() and identity.pid_exists(pid):
        done.kept.append(f"{path}: its launcher (pid {pid}) still runs")
        return False
    left = cgroupfs.procs(path)
    if left:
        if path not in done.busy:
            done.busy.add(path)
            count = f"{len(left)} process" + ("es" if len(left) != 1 else "")
            verb = "runs" if len(left) == 1 else "run"
            done.kept.append(f"{path}: {count} still {verb} in it (pids {left[:5]})")
        return False
    if not dry_run:
        try:
            tree.remove(path, timeout_s=0.5)
        except OSError as err:
            done.kept.append(f"{path}: {err.strerror}")
            return False
    done.cgroups.append(path)
    return True
