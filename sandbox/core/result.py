"""How a run ended: the reason, the exit status we return, the stderr line.

The JSON report made of it: sandbox/report.py (write_report, below, writes the file)."""

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


class Reason:
    """Why the command ended. Plain strings (the report's values); `enum` costs ~3 ms to import."""

    EXITED = "exited"  # the main process exited on its own
    SIGNALED = "signaled"  # a signal killed it (not ours)
    TIMEOUT = "timeout"  # --timeout fired
    OOM = "oom"  # the kernel (or the fallback's watchdog) killed for memory
    BUDGET_OOM = "budget_oom"  # the kernel killed it because its budget (not its --mem) ran out
    QUEUE_TIMEOUT = "queue_timeout"  # --queue-timeout: never admitted into its budget, not run
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
# EX_TEMPFAIL (sysexits.h): try again later. The command never ran.
EXIT_QUEUE_TIMEOUT = 75
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
    budget       --budget: its name, and what ran out after a budget_oom
    """

    cgroups: dict[str, str] = {}  # noqa: RUF012 - shared default, never mutated
    cgroup_mode: str | None = None
    unit: str | None = None
    slice: str | None = None
    address_space_bytes: int | None = None
    enforcement: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None  # --budget: its name, and what ran out (budget_oom)

    def as_report(self) -> dict[str, Any]:
        """The report's "sandbox" object (and the registry's sandbox.* lines)."""
        found: dict[str, Any] = {}
        if self.cgroup_mode is not None:
            found = {"cgroups": dict(self.cgroups), "cgroup_mode": self.cgroup_mode}
        if self.unit is not None:
            found.update(unit=self.unit, slice=self.slice)
        if self.enforcement is not None:
            found = {"address_space_bytes": self.address_space_bytes, **self.enforcement}
        if self.budget is not None:
            found["budget"] = self.budget
        return found


class Pressure(Frozen):
    """Why a sandbox was ended for memory pressure (sandbox/cgroups/pressure.py): every task of
    it was stalled on memory `stall_pct` of the last `over_s` seconds (at least `window_s`),
    at or above `threshold_pct`."""

    stall_pct: float
    over_s: float
    threshold_pct: float
    window_s: float


class Usage(Frozen):
    """What the sandbox measured. None where this backend or kernel cannot tell.

    `peak_memory_bytes` counts what the memory limit counts: on a cgroup, the page cache the
    sandbox's reads and writes brought in too (a cargo build peaks at 531 MiB on v1 where its
    processes' resident memory peaks at 324 MiB); under the rlimit backend's watchdog, the
    tree's resident memory. `memory_pressure` is set when the pressure watch ended the run.
    """

    peak_memory_bytes: int | None = None
    oom_kills: int | None = None
    pids_limit_hits: int | None = None
    cpu_s: float | None = None
    memory_pressure: Pressure | None = None


class RunResult(Frozen, kw_only=True):
    reason: str
    exit_code: int
    child_exit_code: int | None = None
    signal: int | None = None
    wall_s: float
    usage: Usage
    limits: Limits
    attempts: int = 1
    sandbox: Placement
    killed_after_grace: bool = False
    detail: str | None = None
    cleanup_error: str | None = None  # removing the sandbox failed after the command ended


class Attempt(Frozen, kw_only=True):
    """One run of the command in a fresh sandbox, and how its backend was chosen (the report's
    backend, backend_choice, not_enforced and enclosing-limit keys come from here)."""

    result: RunResult
    backend_name: str
    # selection.prepare's record: requested, chosen, refused, notices (only {"requested"} when
    # no backend could be prepared)
    choice: dict[str, Any]
    not_enforced: list[str]
    enclosing: tuple[int | None, str | None] = (None, None)  # (bytes, cgroup) of a limit above
    budget: dict[str, Any] | None = None  # --budget: the membership's description
    waited_s: float = 0.0  # in the budget's queue, before the sandbox was made


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
    if ended_by in (Reason.OOM, Reason.BUDGET_OOM):
        return ended_by, EXIT_OOM, child_code, signo
    if ended_by == Reason.PIDS:  # the fallback's watchdog killed the tree over --pids
        return Reason.PIDS, EXIT_OOM, child_code, signo
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


def message(
    result: RunResult, enclosing: tuple[int | None, str | None] = (None, None)
) -> str | None:
    """The one stderr line for an abnormal ending, or None when there is nothing to say.

    `enclosing` is the smallest memory limit of a cgroup around the sandbox and where it is set
    (sandbox/cgroups/enclosing.py): when it is below --mem, it is the limit the command hit.
    """
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
        above, where = enclosing
        if above is not None and (limits.memory_bytes is None or above < limits.memory_bytes):
            return (
                f"killed for memory: the command reached the {format_size(above)} limit of "
                f"{where}, below its --mem of {format_size(limits.memory_bytes)} (peak {peak}); "
                "raise that cgroup's limit or make it use less"
            )
        return (
            f"killed for memory: the command reached its {format_size(limits.memory_bytes)} limit "
            f"(peak {peak}); raise --mem or make it use less"
        )
    if result.reason == Reason.BUDGET_OOM:
        return _budget_oom_line(result.sandbox.budget)
    if result.reason == Reason.PIDS:
        ended = (
            f"exited {result.child_exit_code}"
            if result.child_exit_code is not None
            else f"was killed by {signal_name(result.signal or 0)}"
        )
        return f"the command hit the --pids limit of {limits.pids} tasks and {ended}; raise --pids"
    if result.reason == Reason.SIGNALED and result.detail:
        return result.detail  # the command never ran: a signal while waiting for admission
    if result.reason == Reason.SIGNALED and result.signal not in (_signal.SIGINT, _signal.SIGPIPE):
        return f"command killed by {signal_name(result.signal or 0)}"
    if result.reason in (
        Reason.NOT_FOUND,
        Reason.NOT_EXECUTABLE,
        Reason.ERROR,
        Reason.MISSING_OUTPUT,
        Reason.QUEUE_TIMEOUT,
    ):
        return result.detail
    return None


def _budget_oom_line(budget: object) -> str:
    """Names the budget that ran out, its cap and how full it got (sandbox/budgets/oom.py)."""
    info: dict[str, Any] = budget if isinstance(budget, dict) else {}
    ran_out = info.get("ran_out")
    hit: dict[str, Any] = ran_out if isinstance(ran_out, dict) else {}
    name = hit.get("budget") or info.get("name") or "?"
    cap, usage = hit.get("cap_bytes"), hit.get("usage_bytes")
    return (
        f"killed for memory: budget {name} ran out (cap {format_size(cap)}, usage "
        f"{format_size(usage) if usage else 'unknown'}) and the kernel chose this command; a "
        "victim, not over its own --mem"
    )


def write_report(path: str, data: dict[str, Any]) -> None:
    """Write the report safely (sandbox/core/safefile.py); raises SandboxError with one line."""
    import json  # only when a report is asked for: ~7 ms

    from sandbox.core import safefile

    text = json.dumps(data, indent=2) + "\n"
    safefile.write_atomic(path, text.encode("utf-8", "surrogateescape"))
