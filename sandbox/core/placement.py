"""Where a sandbox is: what its backend tells the registry (`list`, `gc`), the enclosing-limit
walk, doctor and the report (its "sandbox" object) about it."""

from __future__ import annotations

from sandbox.core.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Placement(Frozen):
    """None (or empty) where a backend has no such thing.

    cgroups      controller ("memory", "pids", "unified") -> cgroup directory
    cgroup_mode  "v2", "v1" or "hybrid": which hierarchies those directories are in
    unit, slice  the systemd scope and the slice it was asked into
    address_space_bytes  the RLIMIT_AS the rlimit backend applied (the report's limits)
    enforcement  the rlimit backend's account of how each limit is enforced (report keys)
    """

    __slots__ = ("cgroups", "cgroup_mode", "unit", "slice", "address_space_bytes", "enforcement")
    cgroups: dict[str, str]
    cgroup_mode: str | None
    unit: str | None
    slice: str | None
    address_space_bytes: int | None
    enforcement: dict[str, Any] | None

    def __init__(
        self,
        cgroups: dict[str, str] | None = None,
        cgroup_mode: str | None = None,
        unit: str | None = None,
        slice: str | None = None,  # noqa: A002 - systemd's word
        address_space_bytes: int | None = None,
        enforcement: dict[str, Any] | None = None,
    ) -> None:
        self._init(
            cgroups=dict(cgroups or {}),
            cgroup_mode=cgroup_mode,
            unit=unit,
            slice=slice,
            address_space_bytes=address_space_bytes,
            enforcement=enforcement,
        )

    def as_report(self) -> dict[str, Any]:
        """The report's "sandbox" object (and the registry's sandbox.* lines)."""
        found: dict[str, Any] = {}
        if self.cgroup_mode is not None:
            found = {"cgroups": dict(self.cgroups), "cgroup_mode": self.cgroup_mode}
        if self.unit is not None:
            found.update(unit=self.unit, slice=self.slice)
        if self.enforcement is not None:
            found = {"address_space_bytes": self.address_space_bytes, **self.enforcement}
        return found
