"""From a parsed request to an exit status: choose the backend, run, report."""

from __future__ import annotations

import os
import sys
import time

from sandbox.backends import selection
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import Limits, format_duration, format_size, smaller
from sandbox.core.result import (
    EXIT_ERROR,
    EXIT_MISSING_OUTPUT,
    Placement,
    Reason,
    RunResult,
    Usage,
    message,
    report,
    signal_name,
    write_report,
)
from sandbox.options import RunRequest
from sandbox.run import supervisor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from sandbox.backends.protocol import Backend
    from sandbox.run.relay import Relay


def say(request: RunRequest, text: str, level: int = 0) -> None:
    if request.verbosity >= level and sys.stderr is not None:  # None: started with `2>&-`
        sys.stderr.write(f"aero-sandbox: {text}\n")
        sys.stderr.flush()


def execute(request: RunRequest) -> int:
    start = time.monotonic()
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
    line = message(result)
    if line:
        say(request, line)
    if result.cleanup_error:
        say(request, f"after the command ended: {result.cleanup_error}")
    if request.verbosity > 0 and result.reason != Reason.ERROR:
        say(request, _summary(result), 1)
    if request.report:
        data = report(result, request.argv, attempt.backend_name, attempt.choice)
        data["not_enforced"] = attempt.not_enforced
        # Only the rlimit backend applies --as, and says which cap it chose (None elsewhere).
        data["limits"]["address_space_bytes"] = result.sandbox.address_space_bytes
        data["launcher_pid"] = os.getpid()
        data["effective_memory_bytes"] = smaller(request.limits.memory_bytes, attempt.enclosing[0])
        data["enclosing_memory"] = {"bytes": attempt.enclosing[0], "cgroup": attempt.enclosing[1]}
        data["retried_for"] = retried_for
        if request.expect:
            data["expect"] = {"paths": request.expect, "problems": problems}
        write_report(request.report, data)
    return result.exit_code


class _Attempt:
    """One run in a fresh sandbox, and how its backend was chosen."""

    def __init__(
        self, result: RunResult, backend_name: str, choice: dict[str, Any], not_enforced: list[str]
    ) -> None:
        self.result = result
        self.backend_name = backend_name
        self.choice = choice
        self.not_enforced = not_enforced
        self.enclosing: tuple[int | None, str | None] = (None, None)  # a cgroup's limit above


def _attempt(request: RunRequest, limits: Limits, relay: Relay | None, start: float) -> _Attempt:
    backend_name = request.backend
    choice: dict[str, Any] = {"requested": request.backend}
    not_enforced: list[str] = []
    enclosing: tuple[int | None, str | None] = (None, None)
    owner = Cleanup()  # owns the prepared sandbox until it is removed, on every path
    try:
        backend, choice = selection.prepare(
            request.backend, limits, request.argv, request.parent, request.slice
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
        result = _supervised(request.argv, limits, backend, relay)
    except (BackendUnavailable, SandboxError) as err:
        result = RunResult(
            reason=Reason.ERROR,
            exit_code=EXIT_ERROR,
            wall_s=time.monotonic() - start,
            usage=Usage(),
            limits=limits,
            sandbox=Placement(),
            detail=err.line(),
        )
    finally:
        failures = owner.close()
    if failures and not result.cleanup_error:
        result = _replace(result, cleanup_error=_line(failures[0]))
    attempt = _Attempt(result, backend_name, choice, not_enforced)
    attempt.enclosing = enclosing
    return attempt


def _supervised(
    argv: list[str], limits: Limits, backend: Backend, relay: Relay | None
) -> RunResult:
    if relay is None:
        return supervisor.run(argv, limits, backend)
    relay.start()
    try:
        return supervisor.run(argv, limits, backend, relay)
    finally:
        relay.finish()


def _with_retries(request: RunRequest, start: float) -> tuple[_Attempt, list[str]]:
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
        result = attempt.result
        matched = retry.should_retry(result.reason, result.exit_code, result.signal, relay.tails())
        if matched is None or number >= request.attempts:
            break
        delay = retry.backoff(number, base)
        if deadline is not None and time.monotonic() + delay >= deadline:
            say(request, f"attempt {number} failed ({matched}); no time left to retry")
            break
        say(
            request,
            f"attempt {number} of {request.attempts} failed with a transient resource error "
            f"({matched}); retrying in {delay:.1f}s",
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
    attempt.result = _replace(
        result, attempts=number, limits=request.limits, wall_s=time.monotonic() - start
    )
    return attempt, retried_for


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
    if found is not None and wanted is not None and found < wanted:
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
