"""The one protocol every backend implements (cgroup, systemd, rlimit).

Only type checkers import this module: `typing` costs ~9 ms of start-up, and the launcher's
start-up time is a feature. A backend object lives for one run:

    prepare -> (fork) child_setup in the child -> started in the parent -> collect_stale
    -> supervise (watch_fds / check / signal_all) -> kill_all -> measure -> remove

`remove` must be safe to call twice and from the guardian process (launcher killed).
"""

from __future__ import annotations

from typing import Any, Protocol

from sandbox.core.limits import Limits
from sandbox.core.result import Usage


class Backend(Protocol):
    name: str
    # Limits this backend could not enforce on this host ("pids", ...), for the report.
    not_enforced: list[str]
    # Seconds between periodic check() calls, or None when only watch_fds wake us.
    tick_s: float | None

    def prepare(self, limits: Limits, argv: list[str]) -> None:
        """Create the sandbox; raise BackendUnavailable (auto tries the next) or SandboxError."""

    def child_setup(self) -> None:
        """In the forked child, before exec: join the sandbox. No exec may happen outside it."""

    def started(self, pid: int) -> None:
        """In the parent, after fork: the main child's pid is known."""

    def watch_fds(self) -> list[int]:
        """File descriptors whose readiness means check() has news (an OOM event)."""

    def check(self) -> str | None:
        """Reason.OOM when the sandbox ran out of memory under our limit, else None."""

    def signal_all(self, signo: int) -> None:
        """Send a signal to every process in the sandbox."""

    def kill_all(self) -> None:
        """SIGKILL everything in the sandbox and wait, bounded, until it is empty."""

    def measure(self) -> Usage:
        """What the sandbox used (after kill_all)."""

    def collect_stale(self) -> None:
        """Cheaply remove what crashed launchers left beside this sandbox (empty cgroups, scopes);
        never raises. Runs once the command has started, off its way to exec, and in remove()."""

    def remove(self) -> None:
        """Delete the sandbox (cgroups, unit), then collect_stale()."""

    def describe(self) -> dict[str, Any]:
        """Paths and names a harness or a person needs to find the sandbox."""
