"""The process tree as /proc shows it, without a cgroup: who descends from whom, what each uses.

Read directly rather than through psutil: on this project's 2-core VM, psutil's
`children(recursive=True)` plus `memory_info()` for 50 processes costs 4.3-4.8 ms a sample,
these reads 1.2 ms (bench/watchdog.py). The /proc reading itself (small raw reads, the stat
parser, pid identity by start time) is sandbox/core/procfs.py, shared with `list` and `doctor`.
"""

from __future__ import annotations

import os

from sandbox.core.procfs import PROC, ProcInfo, field, pids, read, stat

KIB = 1024


def table() -> dict[int, ProcInfo]:
    """ProcInfo of every process now (one read per process: for the rare paths, not sampling)."""
    found = {}
    for pid in pids():
        info = stat(pid)
        if info is not None:
            found[pid] = info
    return found


def own_children(pid: int) -> list[int]:
    """Children of `pid`, from each of its threads' list (Linux 3.5+, CONFIG_PROC_CHILDREN)."""
    children: list[int] = []
    try:
        tids = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return children
    for tid in tids:
        data = read(f"{PROC}/{pid}/task/{tid}/children")
        children += [int(word) for word in (data or b"").split()]
    return children


def children_listed() -> bool:
    """Whether this kernel lists children in /proc (CONFIG_PROC_CHILDREN: Debian, Ubuntu, Fedora
    and RHEL kernels have it); else only a table() of every process finds a tree."""
    pid = os.getpid()
    return os.path.exists(f"{PROC}/{pid}/task/{pid}/children")


def walk(roots: set[int]) -> dict[int, ProcInfo]:
    """The roots and every process below them, each with its /proc/PID/stat, found through the
    children lists: reads scale with the tree, not with the host (table() read ~120 stat files
    here for a tree of one). A child forked while the walk passes its parent is missed; the
    callers repeat until a round finds nothing (a kill's), or sample again."""
    found: dict[int, ProcInfo] = {}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        info = stat(pid)
        if info is None:
            continue
        found[pid] = info
        stack += own_children(pid)
    return found


def descendants(procs: dict[int, ProcInfo], roots: set[int]) -> set[int]:
    """The roots and every process below them in `procs` (a table())."""
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        children.setdefault(info.ppid, []).append(pid)
    found, stack = set(), [pid for pid in roots if pid in procs]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack += children.get(pid, [])
    return found


class Footprint:
    """One process's share of the tree, from /proc/PID/status (cheap: kernel counters)."""

    __slots__ = ("memory", "tasks", "ppid", "data", "size")

    def __init__(self, memory: int, tasks: int, ppid: int, data: int = 0, size: int = 0) -> None:
        self.memory = memory
        self.tasks = tasks
        self.ppid = ppid
        self.data = data  # VmData: what RLIMIT_DATA counts
        self.size = size  # VmSize: what RLIMIT_AS counts


def footprint(pid: int) -> Footprint | None:
    """Resident anonymous + shmem memory + swap, threads, parent and rlimit-counted sizes.

    File-backed pages are left out: they are shared (libnode's 40 MB of text in every Node
    process) and reclaimable, and a memory cgroup reclaims them before it ever kills.
    RssAnon/RssShmem: Linux 4.5+.
    """
    data = read(f"{PROC}/{pid}/status")
    if not data:
        return None
    memory = (
        field(data, b"\nRssAnon:") + field(data, b"\nRssShmem:") + field(data, b"\nVmSwap:")
    ) * KIB
    return Footprint(
        memory,
        field(data, b"\nThreads:") or 1,
        field(data, b"\nPPid:"),
        field(data, b"\nVmData:") * KIB,
        field(data, b"\nVmSize:") * KIB,
    )


def proportional(pid: int) -> int | None:
    """The same memory as footprint(), each shared page divided among the processes that map it.

    Exact for copy-on-write pages after fork() and for shared memory, but the kernel walks every
    page table to produce it: ~0.6 ms for a 40 MB Node process, so it is only read to confirm a
    sum over the limit. Pss_Anon/Pss_Shmem: Linux 5.3+; None before (then the RSS sum decides).
    """
    data = read(f"{PROC}/{pid}/smaps_rollup")
    if not data or b"\nPss_Anon:" not in data:
        return None
    return (
        field(data, b"\nPss_Anon:") + field(data, b"\nPss_Shmem:") + field(data, b"\nSwapPss:")
    ) * KIB


def marked(variable: str, value: str) -> set[int]:
    """Processes whose environment (as they were exec'd) holds `variable=value`."""
    needle = f"{variable}={value}".encode()
    found = set()
    for pid in pids():
        data = read(f"{PROC}/{pid}/environ", 65536)
        if data and needle in data.split(b"\0"):
            found.add(pid)
    return found
