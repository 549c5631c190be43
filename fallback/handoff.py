"""What the guardian needs to find the tree once the launcher is dead.

While the launcher lives, every orphan of the tree comes back to it (it is a child subreaper),
so "the tree" is simply its descendants. When it is SIGKILLed, its children are reparented to
init and that link is gone. So the launcher keeps, in memory shared with the guardian (a memfd,
mapped MAP_SHARED, which a spawned guardian is given as an fd; anonymous shared memory made
before the fork where memfds are refused), the pid and start time of every process the watchdog
last saw. Two halves: the launcher fills the one not in use, then
flips the index, so a launcher killed mid-write leaves the previous list intact.
"""

from __future__ import annotations

import mmap
import os

# Little-endian fields, without `struct` (~1 ms of the rlimit backend's start-up):
# the current half's index (u32); in each half a count (u32), then per entry
# the pid (i32) and its start time (u64, clock ticks since boot).
_U32 = 4
_ENTRY = 12
CAPACITY = 32768  # entries per half: the default pid_max; 384 KiB each, touched only as used
_HALF = _U32 + CAPACITY * _ENTRY


class Handoff:
    def __init__(self, fd: int | None = None) -> None:
        """New shared memory, or (`fd`) the launcher's, in the guardian it spawned.

        A memfd, so that a guardian spawned rather than forked gets it too (its fd, in the
        guardian's notes: sandbox/run/guardian.py); where memfd_create is refused (a seccomp
        filter), anonymous MAP_SHARED memory, which only a forked guardian shares (fd None)."""
        size = _U32 + 2 * _HALF
        if fd is None:
            try:
                fd = os.memfd_create("aero-sandbox-handoff", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
            except OSError:
                if fd is not None:
                    os.close(fd)
                fd = None
        self.fd = fd
        self._map: mmap.mmap | None = mmap.mmap(-1 if fd is None else fd, size)  # MAP_SHARED
        self._written: list[tuple[int, int]] = []

    def write(self, entries: list[tuple[int, int]]) -> None:
        """Publish (pid, start time) of the tree; the first CAPACITY when there are more."""
        if self._map is None or entries == self._written:
            return
        self._written = entries
        entries = entries[:CAPACITY]
        half = 1 - int.from_bytes(self._map[:_U32], "little")
        offset = _U32 + half * _HALF
        packed = len(entries).to_bytes(_U32, "little") + b"".join(
            pid.to_bytes(4, "little", signed=True) + start.to_bytes(8, "little")
            for pid, start in entries
        )
        self._map[offset : offset + len(packed)] = packed
        self._map[:_U32] = half.to_bytes(_U32, "little")

    def read(self) -> list[tuple[int, int]]:
        if self._map is None:
            return []
        offset = _U32 + int.from_bytes(self._map[:_U32], "little") * _HALF
        count = int.from_bytes(self._map[offset : offset + _U32], "little")
        found = []
        for at in range(offset + _U32, offset + _U32 + count * _ENTRY, _ENTRY):
            pid = int.from_bytes(self._map[at : at + 4], "little", signed=True)
            found.append((pid, int.from_bytes(self._map[at + 4 : at + _ENTRY], "little")))
        return found

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
