"""From a parsed request to an exit status: choose the backend, run, report."""

from __future__ import annotations

import os
import sys
import time

from sandbox import selection, supervisor
from sandbox.errors import BackendUnavailable, SandboxError
from sandbox.limits import format_duration, format_size
from sandbox.options import RunRequest
from sandbox.result import EXIT_ERROR, Reason, RunResult, Usage, message, report, write_report

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def say(request: RunRequest, text: str, level: int = 0) -> None:
    if request.verbosity >= level:
        sys.stderr.write(f"aero-sandbox: {text}\n")
        sys.stderr.flush()


def execute(request: RunRequest) -> int:
    start = time.monotonic()
    backend_name = request.backend
    choice: dict[str, Any] = {"requested": request.backend}
    not_enforced: list[str] = []
    try:
        backend, choice = selection.prepare(request.backend, request.limits, request.argv)
        backend_name, not_enforced = backend.name, backend.not_enforced
        for why in choice["refused"].values():
            say(request, f"skipped {why}", 1)
        limits = request.limits
        say(
            request,
            f"backend {backend.name}: memory {format_size(limits.memory_bytes)}, pids "
            f"{limits.pids or 'unlimited'}, timeout {format_duration(limits.timeout_s)}",
            1,
        )
        if backend.not_enforced:
            say(request, f"not enforced on this host: {', '.join(backend.not_enforced)}")
        result = supervisor.run(request.argv, request.limits, backend)
    except (BackendUnavailable, SandboxError) as err:
        result = RunResult(
            reason=Reason.ERROR,
            exit_code=EXIT_ERROR,
            wall_s=time.monotonic() - start,
            usage=Usage(),
            limits=request.limits,
            sandbox={},
            detail=err.line(),
        )
    line = message(result)
    if line:
        say(request, line)
    if request.verbosity > 0 and result.reason != Reason.ERROR:
        say(request, _summary(result), 1)
    if request.report:
        data = report(result, request.argv, backend_name, choice)
        data["not_enforced"] = not_enforced
        data["launcher_pid"] = os.getpid()
        write_report(request.report, data)
    return result.exit_code


def _summary(result: RunResult) -> str:
    usage = result.usage
    cpu = "unknown" if usage.cpu_s is None else f"{usage.cpu_s:.2f}s"
    return (
        f"{result.reason} (exit {result.exit_code}) after {result.wall_s:.2f}s; cpu {cpu}, "
        f"peak memory {format_size(usage.peak_memory_bytes) if usage.peak_memory_bytes else 'unknown'}"
    )
