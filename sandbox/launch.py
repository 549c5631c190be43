"""From a parsed request to an exit status: choose the backend, run, report."""

from __future__ import annotations

import os
import sys
import time

from sandbox.backends import selection
from sandbox.core.errors import BackendUnavailable, NotAdmitted, SandboxError
from sandbox.core.limits import Limits, format_duration, format_size
from sandbox.core.result import (
    EXIT_ERROR,
    EXIT_MISSING_OUTPUT,
    EXIT_QUEUE_TIMEOUT,
    Attempt,
    Placement,
    Reason,
    RunResult,
    Usage,
    message,
    signal_name,
)
from sandbox.options import RunRequest
from sandbox.run import supervisor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from sandbox.backends.protocol import Backend
    from sandbox.budgets.membership import Membership
    from sandbox.run.relay import Relay


def say(request: RunRequest, text: str, level: int = 0) -> None:
    if request.verbosity >= level and sys.stderr is not None:  # None: started with `2>&-`
        sys.stderr.write(f"aero-sandbox: {text}\n")
        sys.stderr.flush()


def execute(request: RunRequest) -> int:
    start = time.monotonic()
    if request.report:  # a report that can never be written fails now, not after the command
        from sandbox.core.safefile import check_writable

        check_writable(request.report)
    # Before anything can start a thread (pystemd's bus, a backend): a thread created with these
    # signals unblocked would take them, and the signalfd would never see them.
    supervisor.block_signals()
    if request.preset is not None:
        from sandbox.run import presets

        preset = presets.agent_environment(os.environ)
        presets.apply(preset, os.environ)  # the child inherits os.environ through exec
        for note in preset.notes:
            say(request, f"preset {request.preset}: {note}", 1)
    retried_for: list[str] = []
    if request.attempts > 1:
        attempt, retried_for = _with_retries(request, start)
    else:
        attempt = _attempt(request, request.limits, None, start)
    result = attempt.result
    problems: list[str] = []
    if request.expect and result.exit_code == 0:
        problems = _missing_outputs(request.expect)
        if problems:
            result = _replace(
                result,
                reason=Reason.MISSING_OUTPUT,
                exit_code=EXIT_MISSING_OUTPUT,
                detail="the command exited 0 but its expected output is not there: "
                + "; ".join(problems),
            )
    line = message(result, attempt.enclosing)
    if line:
        say(request, line)
    if result.cleanup_error:
        say(request, f"after the command ended: {result.cleanup_error}")
    if request.verbosity > 0 and result.reason != Reason.ERROR:
        say(request, _summary(result), 1)
    if request.report:
        from sandbox import report  # only when asked for: not on every run's path

        data = report.build(request, attempt, result, retried_for, problems)
        try:
            report.write(request.report, data)
        except SandboxError as err:  # the command's own status stays the exit status
            say(request, err.line())
    return result.exit_code


def _attempt(
    request: RunRequest, limits: Limits, relay: Relay | None, start: float
) -> Attempt:
    backend_name = request.backend
    choice: dict[str, Any] = {"requested": request.backend}
    not_enforced: list[str] = []
    enclosing: tuple[int | None, str | None] = (None, None)
    member: Membership | None = None
    owner = Cleanup()  # owns the prepared sandbox until it is removed, on every path
    try:
        if request.budget is not None:
            member = _join_budget(request)
            owner.push(member.leave)  # after the sandbox is gone: the reservation, the locks
        backend, choice = selection.prepare(
            request.backend, limits, request.argv, request.parent, request.slice, member
        )
        owner.push(backend.remove)  # a no-op once the supervisor's tear-down removed it
        backend_name, not_enforced = backend.name, backend.not_enforced
        for why in choice["refused"].values():
            # systemd runs here but its backend could not: say why and the fix, once a run.
            loud = why in choice["notices"] and why not in _SAID
            if loud:
                _SAID.add(why)
            say(request, f"skipped {why}", 0 if loud else 1)
        if backend.name == "rlimit" and choice["refused"]:
            refused = "; ".join(choice["refused"].values())
            line = f"no cgroup here, limits come from rlimits and a watchdog: {refused}"
            if line not in _SAID:  # once a run, not once an attempt
                _SAID.add(line)
                say(request, line)
        say(
            request,
            f"backend {backend.name}: memory {format_size(limits.memory_bytes)}, pids "
            f"{limits.pids or 'unlimited'}, timeout {format_duration(limits.timeout_s)}",
            1,
        )
        if backend.not_enforced:
            say(request, f"not enforced on this host: {', '.join(backend.not_enforced)}")
        enclosing = _enclosing_limit(request, backend.describe())
        result = _supervised(request.argv, limits, backend, relay, member)
    except (BackendUnavailable, SandboxError) as err:
        result = _not_run(Reason.ERROR, EXIT_ERROR, start, limits, err.line())
    except NotAdmitted as err:
        if err.signo is None:
            result = _not_run(Reason.QUEUE_TIMEOUT, EXIT_QUEUE_TIMEOUT, start, limits, err.line)
        else:
            line = f"{signal_name(err.signo)} while waiting for admission: the command did not run"
            result = _not_run(Reason.SIGNALED, 128 + err.signo, start, limits, line, err.signo)
    finally:
        failures = owner.close()
    if failures and not result.cleanup_error:
        result = _replace(result, cleanup_error=_line(failures[0]))
    return Attempt(
        result=result,
        backend_name=backend_name,
        choice=choice,
        not_enforced=not_enforced,
        enclosing=enclosing,
        budget=member.describe() if member is not None and request.report else None,
        waited_s=member.waited_s if member is not None else 0.0,
    )


def _join_budget(request: RunRequest) -> Membership:
    from sandbox.budgets.membership import join

    assert request.budget is not None
    return join(
        request.budget,
        tuple(request.budget.split("/")),
        request.budget_mem,
        request.reserve,
        request.queue_timeout,
        request.argv,
        supervisor.wait_for_signal,
        lambda line: say(request, line),
        request.backend,
    )


def _not_run(
    reason: str,
    code: int,
    start: float,
    limits: Limits,
    detail: str,
    signo: int | None = None,
) -> RunResult:
    """The result of an attempt whose command never started."""
    return RunResult(
        reason=reason,
        exit_code=code,
        signal=signo,
        wall_s=time.monotonic() - start,
        usage=Usage(),
        limits=limits,
        sandbox=Placement(),
        detail=detail,
    )


def _supervised(
    argv: list[str],
    limits: Limits,
    backend: Backend,
    relay: Relay | None,
    member: Membership | None,
) -> RunResult:
    # A reservation is given back once the command's processes are gone, not after the clean-up.
    ended = member.queue.release if member is not None else None
    if relay is None:
        return supervisor.run(argv, limits, backend, None, ended)
    relay.start()
    try:
        return supervisor.run(argv, limits, backend, relay, ended)
    finally:
        relay.finish()


def _with_retries(request: RunRequest, start: float) -> tuple[Attempt, list[str]]:
    """Run up to request.attempts times: again only after a transient resource failure.

    Each attempt is a fresh sandbox. --timeout bounds the whole run: an attempt gets what is
    left of it, and no retry starts that its back-off would push past the deadline.
    """
    from sandbox.run import retry
    from sandbox.run.relay import Relay

    base = retry.backoff_base(os.environ)
    deadline = start + request.limits.timeout_s if request.limits.timeout_s else None
    limits = request.limits
    retried_for: list[str] = []
    number = 1
    while True:
        relay = Relay()
        attempt = _attempt(request, limits, relay, start)
        if deadline is not None:
            deadline += attempt.waited_s  # --timeout counts the runs, not waits for admission
        result = attempt.result
        matched = retry.should_retry(result.reason, result.exit_code, result.signal, relay.tails())
        if matched is None or number >= request.attempts:
            break
        # A budget's victim waits for admission again (with --reserve): no back-off on top.
        victim = result.reason == Reason.BUDGET_OOM
        delay = 0.0 if victim and request.reserve else retry.backoff(number, base)
        if deadline is not None and time.monotonic() + delay >= deadline:
            say(request, f"attempt {number} failed ({matched}); no time left to retry")
            break
        kind = "as its budget's OOM victim" if victim else "with a transient resource error"
        say(
            request,
            f"attempt {number} of {request.attempts} failed {kind} ({matched}); retrying in "
            f"{delay:.1f}s",
        )
        retried_for.append(matched)
        signo = supervisor.wait_for_signal(delay)
        if signo is not None:
            say(request, f"{signal_name(signo)} during the back-off: not retrying")
            break
        number += 1
        if deadline is not None:
            left = deadline - time.monotonic()
            limits = Limits(**{**request.limits.as_dict(), "timeout_s": left})
    final = _replace(
        result, attempts=number, limits=request.limits, wall_s=time.monotonic() - start
    )
    return Attempt(**{**attempt.as_dict(), "result": final}), retried_for


def _replace(result: RunResult, **changes: Any) -> RunResult:
    return RunResult(**{**result.as_dict(), **changes})


def _missing_outputs(paths: list[str]) -> list[str]:
    """What is wrong with each --expect path: missing, an empty file, an empty directory."""
    import stat

    problems = []
    for path in paths:
        try:
            found = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        except OSError as err:
            problems.append(f"{path} cannot be examined: {err.strerror}")
            continue
        if stat.S_ISDIR(found.st_mode):
            try:
                with os.scandir(path) as entries:
                    empty = next(entries, None) is None
            except OSError as err:
                problems.append(f"{path} cannot be listed: {err.strerror}")
                continue
            if empty:
                problems.append(f"{path} is an empty directory")
        elif stat.S_ISREG(found.st_mode) and found.st_size == 0:
            problems.append(f"{path} is an empty file")
    return problems


def _enclosing_limit(request: RunRequest, sandbox: Placement) -> tuple[int | None, str | None]:
    """The memory limit of a cgroup around the sandbox; say (once a run) if it is below --mem."""
    from sandbox.cgroups.enclosing import for_sandbox

    found, where = for_sandbox(sandbox)
    wanted = request.limits.memory_bytes
    # In a budget its cap is the point, not news: the report still says the effective limit.
    if found is not None and wanted is not None and found < wanted and request.budget is None:
        line = (
            f"--mem {format_size(wanted)} is more than the {format_size(found)} that {where} "
            f"allows: the effective limit is {format_size(found)}"
        )
        if line not in _SAID:  # a retry is a new sandbox, not news
            _SAID.add(line)
            say(request, line)
    return found, where


class Cleanup:
    """One owner for what an attempt creates: contextlib.ExitStack's core, without its import
    (contextlib and functools cost ~5 ms of start-up, for this alone)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], object]] = []

    def push(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def close(self) -> list[Exception]:
        """Run every callback, last pushed first, even when one fails; return the failures (the
        caller reports them: a clean-up failure never replaces what the run itself ended with)."""
        failures: list[Exception] = []
        while self._callbacks:
            try:
                self._callbacks.pop()()
            except Exception as err:  # noqa: BLE001 - collected for the caller to report
                failures.append(err)
        return failures


_SAID: set[str] = set()


def _line(err: Exception) -> str:
    return err.line() if isinstance(err, SandboxError) else f"{type(err).__name__}: {err}"


def _summary(result: RunResult) -> str:
    usage = result.usage
    cpu = "unknown" if usage.cpu_s is None else f"{usage.cpu_s:.2f}s"
    peak = format_size(usage.peak_memory_bytes) if usage.peak_memory_bytes else "unknown"
    return (
        f"{result.reason} (exit {result.exit_code}) after {result.wall_s:.2f}s; cpu {cpu}, "
        f"peak memory {peak}"
    )
