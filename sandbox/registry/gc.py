"""`aero-sandbox gc`: remove what crashed launchers left, never a live sandbox's.

Registry entries no launcher holds, and empty sandbox cgroups whose launcher is gone. A live
launcher holds its entry's lock, and rmdir refuses a cgroup with a process in it. What may be
ours at all (a name aero-sandbox gives, below a cgroup mount, owned by the entry's uid) is
decided in inventory.py, which `list` shares.
"""

from __future__ import annotations

import os
from typing import Any

from sandbox.cgroups import cgroupfs, tree
from sandbox.core import identity
from sandbox.core.errors import UsageError
from sandbox.registry import inventory
from sandbox.registry import store as registry


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
            cgroups = list(inventory.cgroups_of(entry, uid).values()) if entry else []
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
            ours = inventory.sandbox_cgroup(path)
            if pid is None or seen or identity.pid_exists(pid) or not ours:
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

    Only ever called with a path inventory.sandbox_cgroup() accepted: rmdir on a cgroup filesystem
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
