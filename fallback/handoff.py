"""What the guardian needs to find the tree once the launcher is dead.

While the launcher lives, every orphan of the tree comes back to it (it is a child subreaper),
so "the tree" is simply its descendants. When it is SIGKILLed, its children are reparented to
init and that link is gone. So the launcher keeps, in memory shared with the guardian (an
anonymous MAP_SHARED mapping made before the guardian is forked), the pid and start time of
every process the watchdog last saw. Two halves: the launcher fills the one not in use, then
flips the index, so a launcher killed mid-write leaves the previous list intact.
"""

from __future__ import annotations

import mmap
import struct

_INDEX = struct.Struct("<I")  # which half is current
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<iQ")  # pid, start time (clock ticks since boot)
CAPACITY = 32768  # entries per half: the default pid_max; 384 KiB each, touched only as used
_HALF = _COUNT.size + CAPACITY * _ENTRY.size


class Handoff:
    def __init__(self) -> None:
        self._map: mmap.mmap | None = mmap.mmap(-1, _INDEX.size + 2 * _HALF)  # MAP_SHARED
        self._written: list[tuple[int, int]] = []

    def write(self, entries: list[tuple[int, int]]) -> None:
        """Publish (pid, start time) of the tree; the first CAPACITY when there are more."""
        if self._map is None or entries == self._written:
            return
        self._written = entries
        entries = entries[:CAPACITY]
        half = 1 - _INDEX.unpack_from(self._map, 0)[0]
        offset = _INDEX.size + half * _HALF
        _COUNT.pack_into(self._map, offset, len(entries))
        packed = b"".join(_ENTRY.pack(pid, start) for pid, start in entries)
        self._map[offset + _COUNT.size : offset + _COUNT.size + len(packed)] = packed
        _INDEX.pack_into(self._map, 0, half)

    def read(self) -> list[tuple[int, int]]:
        if self._map is None:
            return []
        offset = _INDEX.size + _INDEX.unpack_from(self._map, 0)[0] * _HALF
        count = _COUNT.unpack_from(self._map, offset)[0]
        start = offset + _COUNT.size
        return [_ENTRY.unpack_from(self._map, start + i * _ENTRY.size) for i in range(count)]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
