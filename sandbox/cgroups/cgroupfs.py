"""Finding our cgroups, and reading and writing cgroupfs files: shared by the cgroup backends.

Paths come from /proc/self/mountinfo (where each hierarchy is mounted, and which part of it)
and /proc/self/cgroup (where we are in it), so a sandbox is always created below the cgroup the
launcher already runs in (container namespaces and bind mounts included), never at a root we
were not placed in.
"""

from __future__ import annotations

import errno
import os
import time

from sandbox.core.frozen import Frozen
from sandbox.core.identity import PREFIX, launcher_pid, pid_exists


class Hierarchy(Frozen):
    """One mounted cgroup hierarchy and the directory of our own cgroup in it."""

    version: int  # 1 or 2
    mount: str
    controllers: frozenset[str]  # v1: bound controllers; v2: those available to our cgroup
    own: str  # absolute path of our own cgroup's directory


def _mounts(mountinfo: str) -> list[tuple[str, str, str, str]]:
    """(fstype, mount point, mount root, super options) of each cgroup mount, in mount order."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], _unescape(fields[4]), _unescape(fields[3]), tail[2]))
    return found


def _unescape(path: str) -> str:
    return (
        path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def _join(mount: str, root: str, path: str) -> str | None:
    """Our cgroup's directory, or None when it lies outside what this mount shows."""
    if root != "/":
        if path != root and not path.startswith(root + "/"):
            return None
        path = path[len(root) :]
    if path.startswith("/.."):  # outside our cgroup namespace
        return None
    return os.path.normpath(mount + "/" + path.lstrip("/"))


def discover(
    proc_cgroup: str | None = None, mountinfo: str | None = None, read_controllers: bool = True
) -> list[Hierarchy]:
    """The hierarchies we can see. Arguments allow unit tests to pass fake /proc contents."""
    if proc_cgroup is None:
        proc_cgroup = _read("/proc/self/cgroup")
    if mountinfo is None:
        mountinfo = _read("/proc/self/mountinfo")
    ours: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            ours[parts[1]] = parts[2]
    result, seen = [], set()
    for fstype, mount, root, options in _mounts(mountinfo):
        if fstype == "cgroup2":
            key, path = "", ours.get("")
            controllers: frozenset[str] = frozenset()
        else:
            names = [o for o in options.split(",") if o not in ("rw", "ro") and "=" not in o]
            names += [o for o in options.split(",") if o.startswith("name=")]
            key = ",".join(sorted(names))
            path = next(
                (p for k, p in ours.items() if k and ",".join(sorted(k.split(","))) == key), None
            )
            controllers = frozenset(n for n in names if not n.startswith("name="))
        if path is None or key in seen:
            continue
        own = _join(mount, root, path)
        if own is None or not os.path.isdir(own):
            continue
        seen.add(key)
        if fstype == "cgroup2" and read_controllers:
            controllers = frozenset(read_words(own + "/cgroup.controllers"))
        result.append(Hierarchy(2 if fstype == "cgroup2" else 1, mount, controllers, own))
    return result


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_words(path: str) -> list[str]:
    try:
        return _read(path).split()
    except OSError:
        return []


def read_int(path: str) -> int | None:
    """An integer file; None for 'max' or a missing file (an older kernel)."""
    try:
        text = _read(path).strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def read_keyed(path: str) -> dict[str, int]:
    """Files of 'key value' lines: memory.events, cpu.stat, pids.events, memory.oom_control."""
    values = {}
    try:
        text = _read(path)
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def procs(directory: str) -> list[int]:
    """Every process in a cgroup and in the cgroups below it (nested sandboxes)."""
    pids = []
    for top, _dirs, _files in os.walk(directory):
        try:
            pids += [int(p) for p in _read(top + "/cgroup.procs").split()]
        except OSError:
            continue
    return pids


def signal_all(directory: str, signo: int) -> None:
    for pid in procs(directory):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


def kill_all(directory: str, version: int, timeout_s: float = 3.0) -> bool:
    """SIGKILL everything in the cgroup subtree and wait (bounded) until it is empty.

    cgroup.kill (Linux 5.14+, v2 only) kills atomically, fork races included; without it we
    kill what cgroup.procs lists until nothing is left.
    """
    use_kill_file = version == 2 and os.path.exists(directory + "/cgroup.kill")
    deadline = time.monotonic() + timeout_s
    pause = 0.0005
    while True:
        if use_kill_file:
            try:
                write(directory + "/cgroup.kill", "1")
            except FileNotFoundError:
                return True
        left = procs(directory)
        if not left:
            return True
        if not use_kill_file:
            for pid in left:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def remove_tree(directory: str, timeout_s: float = 2.0) -> None:
    """rmdir a cgroup and the cgroups below it, deepest first (nested sandboxes leave some)."""
    deadline = time.monotonic() + timeout_s
    for top, _dirs, _files in os.walk(directory, topdown=False):
        while True:
            try:
                os.rmdir(top)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: the last task is still exiting; give it a moment, bounded.
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)


def inside_sandbox(proc_cgroup: str | None = None) -> bool:
    """Whether this process already runs inside an aero-sandbox (cgroup or systemd scope)."""
    text = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    return f"/{PREFIX}" in text


def remove_stale(parent: str) -> list[str]:
    """Remove empty sandbox cgroups whose launcher is gone (a crash, a SIGKILL of both processes).

    A live launcher's cgroup is never touched: its pid still exists. rmdir refuses a cgroup that
    still holds a process, so a live sandbox cannot be removed by mistake either.
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        pid = launcher_pid(name)
        if pid is None or pid == os.getpid() or pid_exists(pid):
            continue
        path = os.path.join(parent, name)
        try:
            remove_tree(path, timeout_s=0)
            removed.append(path)
        except OSError:
            pass
    return removed


def cgroup_mode(versions: set[int]) -> str:
    """The name of a mix of cgroup versions (hierarchies mounted, or a sandbox's cgroups)."""
    if versions == {2}:
        return "v2"
    if versions == {1, 2}:
        return "hybrid"
    return "v1" if versions == {1} else "none"
