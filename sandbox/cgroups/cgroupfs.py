"""Finding our cgroups, and reading and writing cgroupfs files (sandbox/cgroups/tree.py creates,
kills and removes them).

Paths come from /proc/self/mountinfo (where each hierarchy is mounted, and which part of it)
and /proc/self/cgroup (where we are in it), so a sandbox is always created below the cgroup the
launcher already runs in (container namespaces and bind mounts included), never at a root we
were not placed in.
"""

from __future__ import annotations

import os

from sandbox.core import linux
from sandbox.core.frozen import Frozen
from sandbox.core.identity import PREFIX


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
    """A whole file, as os.read gives it: open() builds a buffered text reader for each file,
    ~4x the cost of these calls (~1.4 ms of a run's ~20 cgroupfs and /proc reads). Bytes are
    decoded as file names are (undecodable ones kept, no newline translation)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


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
    linux.kill_each(procs(directory), signo)


def below_mounts(path: str, mounts: list[str]) -> str | None:
    """A --parent path relative to the cgroup mounts, as every hierarchy uses it.

    An absolute path loses the longest mount it lies below (None when it lies below none); a
    relative one is taken as it is. "" when it names no cgroup below a hierarchy's root.
    """
    relative = path.strip()
    if relative.startswith("/"):
        longest_first = sorted(mounts, key=len, reverse=True)
        mount = next((m for m in longest_first if relative.startswith(m.rstrip("/") + "/")), None)
        if mount is None:
            return None
        relative = relative[len(mount) :]
    parts = [part for part in relative.split("/") if part]
    if any(part in (".", "..") for part in parts):
        return ""
    return "/".join(parts)


def inside_sandbox(proc_cgroup: str | None = None) -> bool:
    """Whether this process already runs inside an aero-sandbox (cgroup or systemd scope)."""
    text = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    return f"/{PREFIX}" in text


def cgroup_mode(versions: set[int]) -> str:
    """The name of a mix of cgroup versions (hierarchies mounted, or a sandbox's cgroups)."""
    if versions == {2}:
        return "v2"
    if versions == {1, 2}:
        return "hybrid"
    return "v1" if versions == {1} else "none"
