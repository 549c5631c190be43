"""The process tree as /proc shows it, without a cgroup: who descends from whom, what each uses.

Read directly rather than through psutil: on this project's 2-core VM, psutil's
`children(recursive=True)` plus `memory_info()` for 50 processes costs 4.3-4.8 ms a sample,
these reads 1.2 ms (bench/watchdog.py). Small raw reads (os.open/os.read) avoid Python's
buffered file objects on the hot path.

A pid alone is not an identity (pids are reused): whoever keeps one also keeps its start time
(field 22 of /proc/PID/stat, in clock ticks since boot) and compares it before trusting it.
"""

from __future__ import annotations

import os

PROC = "/proc"
KIB = 1024


class ProcInfo:
    """The fields of /proc/PID/stat we use."""

    __slots__ = ("ppid", "start", "state", "faults")

    def __init__(self, ppid: int, start: int, state: str, faults: int = 0) -> None:
        self.ppid = ppid
        self.start = start
        self.state = state  # "Z" zombie, "X" dead: gone for every purpose here
        self.faults = faults  # page faults, minor + major, of all its threads so far


def read(path: str, size: int = 8192) -> bytes | None:
    """A small /proc file, or None when it (or its process) is gone or not ours to read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, size)
        if len(data) < size:  # the usual case: one read, no second one to see the end
            return data
        chunks = [data]
        while chunk := os.read(fd, size):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:  # ESRCH: the process exited between open and read
        return None
    finally:
        os.close(fd)


def pids() -> list[int]:
    """Every process (thread-group leader) this /proc shows."""
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def stat(pid: int) -> ProcInfo | None:
    data = read(f"{PROC}/{pid}/stat")
    if not data:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    # Fields 4 (ppid), 10 (minflt), 12 (majflt), 22 (starttime), counted from 3 (state).
    faults = int(fields[7]) + int(fields[9])
    return ProcInfo(int(fields[1]), int(fields[19]), fields[0].decode(), faults)


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


def field(data: bytes, key: bytes) -> int:
    """The first number after `key` in a `Key:   value [kB]` file; 0 when the key is absent."""
    start = data.find(key)
    if start < 0:
        return 0
    start += len(key)
    end = data.find(b"\n", start)
    return int(data[start : end if end >= 0 else None].split()[0])


class Footprint:
    """One process's share of the tree, from /proc/PID/status (cheap: kernel counters)."""

    __slots__ = ("memory", "tasks", "ppid")

    def __init__(self, memory: int, tasks: int, ppid: int) -> None:
        self.memory = memory
        self.tasks = tasks
        self.ppid = ppid


def footprint(pid: int) -> Footprint | None:
    """Resident anonymous + shmem memory + swap, threads and parent of a process.

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
    return Footprint(memory, field(data, b"\nThreads:") or 1, field(data, b"\nPPid:"))


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
