"""How a run ended: the reason, the exit status we return, the stderr line, the JSON report."""

from __future__ import annotations

import os

from sandbox.core.frozen import Frozen
from sandbox.core.limits import Limits, format_duration, format_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any
else:
    # The C half of `signal`: the module `signal` wraps it in enums, ~4 ms of start-up.
    import _signal

REPORT_VERSION = 1


class Reason:
    """Why the command ended. Plain strings (the report's values); `enum` costs ~3 ms to import."""

    EXITED = "exited"  # the main process exited on its own
    SIGNALED = "signaled"  # a signal killed it (not ours)
    TIMEOUT = "timeout"  # --timeout fired
    OOM = "oom"  # the kernel (or the fallback's watchdog) killed for memory
    PIDS = "pids"  # it failed after hitting --pids
    NOT_FOUND = "not_found"  # exit 127
    NOT_EXECUTABLE = "not_executable"  # exit 126
    ERROR = "error"  # the launcher's own failure, exit 125
    MISSING_OUTPUT = "missing_output"  # exited 0, but an --expect path is missing or empty


EXIT_TIMEOUT = 124
EXIT_ERROR = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_OOM = 137
# Below the 124-127 band of timeout(1)/env(1) and 128+N, and used by none of cargo, rustc, npm,
# node, pytest or jest (xargs alone uses 123, for "a command failed").
EXIT_MISSING_OUTPUT = 123


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


class Usage(Frozen):
    """What the sandbox measured. None where this backend or kernel cannot tell."""

    __slots__ = ("peak_memory_bytes", "oom_kills", "pids_limit_hits", "cpu_s")
    peak_memory_bytes: int | None
    oom_kills: int | None
    pids_limit_hits: int | None
    cpu_s: float | None

    def __init__(
        self,
        peak_memory_bytes: int | None = None,
        oom_kills: int | None = None,
        pids_limit_hits: int | None = None,
        cpu_s: float | None = None,
    ) -> None:
        self._init(
            peak_memory_bytes=peak_memory_bytes,
            oom_kills=oom_kills,
            pids_limit_hits=pids_limit_hits,
            cpu_s=cpu_s,
        )


class RunResult(Frozen):
    __slots__ = (
        "reason",
        "exit_code",
        "child_exit_code",
        "signal",
        "wall_s",
        "usage",
        "limits",
        "attempts",
        "sandbox",
        "killed_after_grace",
        "detail",
        "cleanup_error",
    )
    reason: str
    exit_code: int
    child_exit_code: int | None
    signal: int | None
    wall_s: float
    usage: Usage
    limits: Limits
    attempts: int
    sandbox: Placement
    killed_after_grace: bool
    detail: str | None
    cleanup_error: str | None  # removing the sandbox failed after the command ended, or similar

    def __init__(
        self,
        *,
        reason: str,
        exit_code: int,
        wall_s: float,
        usage: Usage,
        limits: Limits,
        sandbox: Placement,
        child_exit_code: int | None = None,
        signal: int | None = None,
        attempts: int = 1,
        killed_after_grace: bool = False,
        detail: str | None = None,
        cleanup_error: str | None = None,
    ) -> None:
        self._init(
            reason=reason,
            exit_code=exit_code,
            child_exit_code=child_exit_code,
            signal=signal,
            wall_s=wall_s,
            usage=usage,
            limits=limits,
            attempts=attempts,
            sandbox=sandbox,
            killed_after_grace=killed_after_grace,
            detail=detail,
            cleanup_error=cleanup_error,
        )


def classify(
    status: int, ended_by: str | None, usage: Usage, limits: Limits
) -> tuple[str, int, int | None, int | None]:
    """(reason, exit code, child's own exit code, signal) from a wait status.

    `ended_by` is what the launcher or the backend decided: our timeout fired (we sent the
    signals), or the sandbox ran out of memory under our own limit (read from the kernel's
    counters or the fallback's watchdog). Those win over how the child itself ended.
    """
    code = os.waitstatus_to_exitcode(status)
    child_code, signo = (code, None) if code >= 0 else (None, -code)
    if ended_by == Reason.TIMEOUT:
        return Reason.TIMEOUT, EXIT_TIMEOUT, child_code, signo
    if ended_by == Reason.OOM:
        return Reason.OOM, EXIT_OOM, child_code, signo
    exit_code = code if signo is None else 128 + signo
    if exit_code != 0 and usage.pids_limit_hits and limits.pids is not None:
        return Reason.PIDS, exit_code, child_code, signo
    if signo is not None:
        return Reason.SIGNALED, exit_code, None, signo
    return Reason.EXITED, code, code, None


_ALIASES = ("SIGIOT", "SIGPOLL", "SIGCLD")  # second names of SIGABRT, SIGIO, SIGCHLD


def signal_name(signo: int) -> str:
    # SIG_DFL, SIG_IGN, SIG_BLOCK...: not signals, and equal to 0, 1, 2.
    names = (n for n in dir(_signal) if n[:3] == "SIG" and n[:4] != "SIG_" and n not in _ALIASES)
    for name in names:
        if getattr(_signal, name) == signo:
            return name
    return f"signal {signo}"


def message(result: RunResult) -> str | None:
    """The one stderr line for an abnormal ending, or None when there is nothing to say."""
    usage, limits = result.usage, result.limits
    if result.reason == Reason.TIMEOUT:
        how = (
            f"sent SIGTERM, then SIGKILL after {format_duration(limits.kill_after_s)}"
            if result.killed_after_grace
            else "sent SIGTERM"
        )
        return f"timed out after {format_duration(limits.timeout_s)}; {how}"
    if result.reason == Reason.OOM:
        peak = format_size(usage.peak_memory_bytes) if usage.peak_memory_bytes else "unknown"
        return (
            f"killed for memory: the command reached its {format_size(limits.memory_bytes)} limit "
            f"(peak {peak}); raise --mem or make it use less"
        )
    if result.reason == Reason.PIDS:
        ended = (
            f"exited {result.child_exit_code}"
            if result.child_exit_code is not None
            else f"was killed by {signal_name(result.signal or 0)}"
        )
        return f"the command hit the --pids limit of {limits.pids} tasks and {ended}; raise --pids"
    if result.reason == Reason.SIGNALED and result.signal not in (_signal.SIGINT, _signal.SIGPIPE):
        return f"command killed by {signal_name(result.signal or 0)}"
    if result.reason in (
        Reason.NOT_FOUND,
        Reason.NOT_EXECUTABLE,
        Reason.ERROR,
        Reason.MISSING_OUTPUT,
    ):
        return result.detail
    return None


def report(
    result: RunResult, argv: list[str], backend: str, choice: dict[str, Any]
) -> dict[str, Any]:
    """The JSON report (schema in README.md). Unknown values are null, never guessed."""
    usage = result.usage
    return {
        "version": REPORT_VERSION,
        "command": argv,
        "backend": backend,
        "reason": result.reason,
        "exit_code": result.exit_code,
        "child_exit_code": result.child_exit_code,
        "signal": result.signal,
        "signal_name": signal_name(result.signal) if result.signal else None,
        "wall_s": round(result.wall_s, 6),
        "cpu_s": None if usage.cpu_s is None else round(usage.cpu_s, 6),
        "peak_memory_bytes": usage.peak_memory_bytes,
        "oom_kills": usage.oom_kills,
        "pids_limit_hits": usage.pids_limit_hits,
        "attempts": result.attempts,
        "killed_after_grace": result.killed_after_grace,
        "limits": result.limits.as_dict(),
        "sandbox": result.sandbox.as_report(),
        "backend_choice": choice,
        "detail": result.detail,
        "cleanup_error": result.cleanup_error,
    }


def write_report(path: str, data: dict[str, Any]) -> None:
    import json  # only when a report is asked for: ~7 ms

    # A symlink (/dev/stdout) or not a regular file (a FIFO): write into it. Renaming over it
    # would replace the link or node itself (as root, /dev/stdout became a regular file).
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
