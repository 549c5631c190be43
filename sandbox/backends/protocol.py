"""The one protocol every backend implements (cgroup, systemd, rlimit).

Only type checkers import this module: `typing` costs ~9 ms of start-up, and the launcher's
start-up time is a feature. A backend object lives for one run:

    prepare -> (fork) child_setup in the child, or child_plan's data to a native spawn
    -> started in the parent -> collect_stale
    -> supervise (watch_fds / check / signal_all) -> kill_all -> measure -> remove

From prepare on, the launcher's clean-up context owns the backend: remove() runs on every path
(it must be safe to call twice). guardian_cleanup() is the other owner's path: the guardian,
calls it when the launcher died without cleaning up: on this object in a fork of the launcher,
or on one the backend rebuilt from its guardian_notes().
"""

from __future__ import annotations

from typing import Protocol

from sandbox.core.limits import Limits
from sandbox.core.linux import ChildSetup
from sandbox.core.result import Placement, Usage


class Backend(Protocol):
    name: str
    # Limits this backend could not enforce on this host ("pids", ...), for the report.
    not_enforced: list[str]

    @property
    def tick_s(self) -> float | None:
        """Seconds until check() must run without a wake-up (the rlimit watchdog's sampling, v1
        waiting for the kernel's OOM counter), or None when only watch_fds wake us."""

    def prepare(self, limits: Limits, argv: list[str]) -> None:
        """Create the sandbox; raise BackendUnavailable (auto tries the next) or SandboxError."""

    def child_setup(self) -> None:
        """In the forked child, before exec: join the sandbox. No exec may happen outside it."""

    def child_plan(self) -> ChildSetup | None:
        """What child_setup does, as data, for a spawn whose child runs no Python
        (sandbox/run/spawn.py); None when only child_setup can do it."""

    def started(self, pid: int) -> None:
        """In the parent, after fork: the main child's pid is known."""

    def watch_fds(self) -> list[int]:
        """File descriptors whose readiness means check() has news (an OOM event)."""

    def check(self) -> str | None:
        """Reason.OOM when the kernel's OOM killer struck this sandbox, else None."""

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
        """Delete the sandbox (cgroups, unit), then collect_stale(). Safe to call twice."""

    def guardian_notes(self) -> list[str] | None:
        """What a spawned guardian (sandbox/run/guardian.py) needs to clean up, as lines the
        backend's from_notes() reads back; None when only a fork holding this very object can
        (the guardian is then forked)."""

    def guardian_cleanup(self) -> None:
        """In the guardian, after the launcher died: kill everything in the sandbox and delete it,
        from what prepare() recorded (the guardian was forked before the command started)."""

    def describe(self) -> Placement:
        """Where the sandbox is, for the registry, the enclosing-limit walk and the report."""
