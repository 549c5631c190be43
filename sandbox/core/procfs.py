"""Reading /proc: small files, the process list, /proc/PID/stat, a user's task count.

One parser for every reader (the rlimit backend's process tree and watchdog, `list`, `doctor`).
Raw os.open/os.read, not Python's buffered files: the watchdog samples through here every ~0.1 s
(fallback/proctree.py says what it costs). A pid alone is not an identity (pids are reused):
whoever keeps one also keeps its start time (ProcInfo.start) and compares it before trusting it.
"""

from __future__ import annotations

import os

PROC = "/proc"


class ProcInfo:
    """The fields of /proc/PID/stat we use. A plain slotted class: read for every process of the
    host on some paths, where Frozen's checks would cost."""

    __slots__ = ("ppid", "start", "state", "faults", "threads", "rss_pages", "major_faults")

    def __init__(
        self,
        ppid: int,
        start: int,
        state: str,
        faults: int = 0,
        threads: int = 1,
        rss_pages: int = 0,
        major_faults: int = 0,
    ) -> None:
        self.ppid = ppid
        self.start = start  # clock ticks after boot: with the pid, the process's identity
        self.state = state  # "Z" zombie, "X" dead: gone for every purpose here
        self.faults = faults  # page faults, minor + major, of all its threads so far
        self.threads = threads
        self.rss_pages = rss_pages  # resident pages, file-backed ones included
        self.major_faults = major_faults  # of `faults`, those that waited for a read from disk


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
    """/proc/PID/stat (proc(5)), or None when the process is gone."""
    data = read(f"{PROC}/{pid}/stat")
    if not data:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    # Counted from 3 (state): 4 ppid, 10 minflt, 12 majflt, 20 num_threads, 22 starttime, 24 rss.
    major = int(fields[9])
    ppid, threads, start, rss = int(fields[1]), int(fields[17]), int(fields[19]), int(fields[21])
    return ProcInfo(ppid, start, fields[0].decode(), int(fields[7]) + major, threads, rss, major)


def field(data: bytes, key: bytes) -> int:
    """The first number after `key` in a `Key:   value [kB]` file; 0 when the key is absent."""
    start = data.find(key)
    if start < 0:
        return 0
    start += len(key)
    end = data.find(b"\n", start)
    return int(data[start : end if end >= 0 else None].split()[0])


def user_tasks(uid: int) -> int:
    """Tasks (threads) of the processes whose real uid is `uid`: what RLIMIT_NPROC counts
    (the kernel charges a task to its real uid, not the effective one /proc/PID's owner shows)."""
    total = 0
    for pid in pids():
        data = read(f"{PROC}/{pid}/status")
        if data and field(data, b"\nUid:") == uid:  # the first Uid is the real one
            total += field(data, b"\nThreads:")
    return total


def nproc_applies() -> bool:
    """RLIMIT_NPROC binds everyone but root of the initial user namespace (and holders of
    CAP_SYS_RESOURCE/CAP_SYS_ADMIN there); root inside a user namespace is bound too."""
    if os.getuid() != 0:
        return True
    data = read(f"{PROC}/self/uid_map") or b""
    return data.split() != [b"0", b"0", b"4294967295"]
