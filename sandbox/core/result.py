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


class Pressure(Frozen):
    """Why a sandbox was ended for memory pressure (sandbox/cgroups/pressure.py): every task of
    it was stalled on memory `stall_pct` of the last `over_s` seconds (at least `window_s`),
    at or above `threshold_pct`."""

    __slots__ = ("stall_pct", "over_s", "threshold_pct", "window_s")
    stall_pct: float
    over_s: float
    threshold_pct: float
    window_s: float

    def __init__(
        self, stall_pct: float, over_s: float, threshold_pct: float, window_s: float
    ) -> None:
        self._init(
            stall_pct=stall_pct, over_s=over_s, threshold_pct=threshold_pct, window_s=window_s
        )


class Usage(Frozen):
    """What the sandbox measured. None where this backend or kernel cannot tell.

    `peak_memory_bytes` counts what the memory limit counts: on a cgroup, the page cache the
    sandbox's reads and writes brought in too (a cargo build peaks at 531 MiB on v1 where its
    processes' resident memory peaks at 324 MiB); under the rlimit backend's watchdog, the
    tree's resident memory. `memory_pressure` is set when the pressure watch ended the run.
    """

    __slots__ = ("peak_memory_bytes", "oom_kills", "pids_limit_hits", "cpu_s", "memory_pressure")
    peak_memory_bytes: int | None
    oom_kills: int | None
    pids_limit_hits: int | None
    cpu_s: float | None
    memory_pressure: Pressure | None

    def __init__(
        self,
        peak_memory_bytes: int | None = None,
        oom_kills: int | None = None,
        pids_limit_hits: int | None = None,
        cpu_s: float | None = None,
        memory_pressure: Pressure | None = None,
    ) -> None:
        self._init(
            peak_memory_bytes=peak_memory_bytes,
            oom_kills=oom_kills,
            pids_limit_hits=pids_limit_hits,
            cpu_s=cpu_s,
            memory_pressure=memory_pressure,
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
    )
    reason: str
    exit_code: int
    child_exit_code: int | None
    signal: int | None
    wall_s: float
    usage: Usage
    limits: Limits
    attempts: int
    sandbox: dict[str, Any]
    killed_after_grace: bool
    detail: str | None

    def __init__(
        self,
        *,
        reason: str,
        exit_code: int,
        wall_s: float,
        usage: Usage,
        limits: Limits,
        sandbox: dict[str, Any],
        child_exit_code: int | None = None,
        signal: int | None = None,
        attempts: int = 1,
        killed_after_grace: bool = False,
        detail: str | None = None,
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
        if not limits.kill_after_s:  # --kill-after 0: no grace, SIGKILL at once
            how = "sent SIGKILL at once (--kill-after 0)"
        elif result.killed_after_grace:
            how = f"sent SIGTERM, then SIGKILL after {format_duration(limits.kill_after_s)}"
        else:
            how = "sent SIGTERM"
        return f"timed out after {format_duration(limits.timeout_s)}; {how}"
    if result.reason == Reason.OOM:
        peak = format_size(usage.peak_memory_bytes) if usage.peak_memory_bytes else "unknown"
        if (stall := usage.memory_pressure) is not None:
            return (
                f"killed for memory pressure: thrashing at its {format_size(limits.memory_bytes)} "
                f"limit, every task stalled on memory {stall.stall_pct:g}% of the last "
                f"{stall.over_s:g}s (threshold {stall.threshold_pct:g}% over "
                f"{format_duration(stall.window_s)}; peak {peak}); raise --mem, or tune "
                "--oom-pressure"
            )
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
        Reason.NOT_FOUND, Reason.NOT_EXECUTABLE, Reason.ERROR, Reason.MISSING_OUTPUT
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
        "memory_pressure": usage.memory_pressure.as_dict() if usage.memory_pressure else None,
        "attempts": result.attempts,
        "killed_after_grace": result.killed_after_grace,
        "limits": result.limits.as_dict(),
        "sandbox": result.sandbox,
        "backend_choice": choice,
        "detail": result.detail,
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
