"""The JSON report of a run (`--report FILE`): every key is made here, nowhere else.

`build` takes what the launcher knows at the end: the request, the record of the last attempt
(core/result.py's Attempt), the run's final result, the patterns retries were made for, and what
--expect found. Its schema is the table in README.md, which tests/unit/test_report.py checks
against the keys written. Unknown values are null, never guessed. Imported only when a report
is asked for.
"""

from __future__ import annotations

import os

from sandbox.core.limits import smaller
from sandbox.core.result import signal_name, write_report

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandbox.core.result import Attempt, RunResult
    from sandbox.options import RunRequest

REPORT_VERSION = 1


def build(
    request: RunRequest,
    attempt: Attempt,
    result: RunResult,
    retried_for: list[str] | None = None,
    expect_problems: list[str] | None = None,
) -> dict[str, Any]:
    """The whole report, keys in the order of README.md's table. `result` is the run's final
    one: the last attempt's, with the attempt count and --expect's verdict applied."""
    usage = result.usage
    sandbox, address_space = _from_description(result)
    enclosing_bytes, enclosing_cgroup = attempt.enclosing
    data: dict[str, Any] = {
        "version": REPORT_VERSION,
        "command": request.argv,
        "backend": attempt.backend_name,
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
        # As requested, except the --as cap: the one the rlimit backend applied (null elsewhere).
        "limits": {**result.limits.as_dict(), "address_space_bytes": address_space},
        "sandbox": sandbox,
        # `notices` stays out: each is also in `refused`; it only decides what stderr shows.
        "backend_choice": {k: v for k, v in attempt.choice.items() if k != "notices"},
        "detail": result.detail,
        "cleanup_error": result.cleanup_error,
        "not_enforced": attempt.not_enforced,
        "launcher_pid": os.getpid(),
        "effective_memory_bytes": smaller(request.limits.memory_bytes, enclosing_bytes),
        "enclosing_memory": {"bytes": enclosing_bytes, "cgroup": enclosing_cgroup},
        "retried_for": retried_for or [],
        "budget": attempt.budget,
    }
    if request.expect:
        data["expect"] = {"paths": request.expect, "problems": expect_problems or []}
    return data


def _from_description(result: RunResult) -> tuple[dict[str, Any], int | None]:
    """The report's `sandbox` object and the address-space cap applied, from the backend's
    Placement as the result carries it: the one place the report reads a description."""
    return result.sandbox.as_report(), result.sandbox.address_space_bytes


def write(path: str, data: dict[str, Any]) -> None:
    write_report(path, data)
