"""The memory limit that encloses a sandbox: a container's, a slice's, an admin's parent cgroup.

A sandbox asking for 12G inside a container capped at 4G gets 4G at most: the kernel charges
every cgroup up the tree, and the smallest limit on the way wins. We walk up from where the
sandbox sits (or from our own memory cgroup) to the top of what this mount shows, a handful of
file reads, and report the smallest limit and where it is set.
"""

from __future__ import annotations

import os

from sandbox.cgroups import cgroupfs
from sandbox.core.result import Placement

# At or above this a v1 limit means none (v1.UNLIMITED; not imported from there: the rlimit
# backend asks too, and would import v1 and tree for this number alone).
V1_UNLIMITED = 1 << 60


def enclosing_memory_limit(start: str | None = None) -> tuple[int | None, str | None]:
    """(bytes, cgroup directory) of the smallest memory limit on `start` or above it.

    `start` is a cgroup directory (v1 memory or v2); without it, our own memory cgroup.
    (None, None) when no cgroup we can see sets a limit (or the memory controller is absent).
    """
    if start is None:
        start = own_memory_cgroup()
        if start is None:
            return None, None
    name = "memory.max" if os.path.exists(start + "/memory.max") else "memory.limit_in_bytes"
    smallest: int | None = None
    where: str | None = None
    directory = os.path.normpath(start)
    # The top of the mount has no limit file (v2 root) or its parent is not cgroupfs at all
    # (a container's own cgroup mounted at /sys/fs/cgroup): both end the walk.
    while True:
        value = cgroupfs.read_int(f"{directory}/{name}")
        if value is None and not os.path.exists(f"{directory}/{name}"):
            break
        if value is not None and value < V1_UNLIMITED and (smallest is None or value < smallest):
            smallest, where = value, directory
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return smallest, where


def own_memory_cgroup() -> str | None:
    """Our memory cgroup's directory: v2 when it offers the memory controller, else v1."""
    hierarchies = cgroupfs.discover()
    for version in (2, 1):
        for hierarchy in hierarchies:
            if hierarchy.version == version and "memory" in hierarchy.controllers:
                return hierarchy.own
    return None


def for_sandbox(sandbox: Placement) -> tuple[int | None, str | None]:
    """The limit enclosing a prepared sandbox, from its describe(): above its memory cgroup.

    A backend without cgroups (rlimit) is enclosed by the launcher's own memory cgroup.
    """
    cgroups = sandbox.cgroups
    paths = [cgroups["memory"]] if "memory" in cgroups else []
    paths += [p for p in cgroups.values() if p not in paths]
    for path in paths:
        if os.path.exists(path + "/memory.max") or os.path.exists(path + "/memory.limit_in_bytes"):
            return enclosing_memory_limit(os.path.dirname(path))
    return enclosing_memory_limit()
