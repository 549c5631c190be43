"""One run, start to end: spawn the child inside the sandbox, supervise it, tear everything down.

    spawn       fork; the child joins the sandbox (backend.child_setup), then execs
                (sandbox/run/spawn.py)
    supervise   poll a signalfd (SIGCHLD + forwarded signals) and the backend's fds, with
                deadlines on time.monotonic(): timeout -> SIGTERM to all -> grace -> SIGKILL
    tear down   one `finally`, fixed order: kill what is left -> reap -> measure -> remove the
                sandbox -> release the guardian -> close the signalfd. A failure to remove or
                a guardian that died is the result's cleanup_error, never the command's status.

A guardian process, started before the child, cleans up (backend.guardian_cleanup) if the
launcher itself dies (even by SIGKILL): it waits on a pipe whose write end only the launcher
holds (sandbox/run/guardian.py).
"""

from __future__ import annotations

import os
import select
import time

from sandbox.core import linux
from sandbox.core.errors import SandboxError
from sandbox.core.limits import Limits
from sandbox.core.result import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    Reason,
    RunResult,
    Usage,
    classify,
)
from sandbox.registry import store as registry
from sandbox.run import guardian as guardians
from sandbox.run.spawn import ExecFailed, spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable

    from sandbox.backends.protocol import Backend
    from sandbox.run.relay import Relay
else:
    # The C half of `signal`: the module `signal` wraps it in enums, ~4 ms of start-up.
    import _signal

FORWARDED = frozenset(
    {
        _signal.SIGINT,
        _signal.SIGTERM,
        _signal.SIGHUP,
        _signal.SIGQUIT,
        _signal.SIGUSR1,
        _signal.SIGUSR2,
    }
)
HANDLED = FORWARDED | {_signal.SIGCHLD}
_MAX_POLL_MS = 86_400_000.0  # one day
GC_AFTER_S = 1.0  # see _supervise


_original_mask: set[int] | None = None


def block_signals() -> set[int]:
    """Block the signals we handle, for the rest of the launcher's life; return the mask the
    command must get (the one we started with).

    They are read from a signalfd during a run. Never unblocking them means a signal that
    arrives between runs (a retry's back-off) or during tear-down waits for the next run or is
    dropped at exit, instead of killing the launcher before it has cleaned up and reported.
    """
    global _original_mask
    if _original_mask is None:
        _original_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED)
    return _original_mask


def wait_for_signal(seconds: float, wake: int | None = None) -> int | None:
    """Sleep (signals blocked) until `seconds` pass, a forwarded signal comes (returned), or the
    fd `wake` (an inotify fd of admission's queue) becomes readable."""
    block_signals()
    if wake is None:
        info = _signal.sigtimedwait(FORWARDED, seconds)
        return None if info is None else info.si_signo
    sfd = linux.signalfd(FORWARDED)
    try:
        poller = select.poll()
        poller.register(sfd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        poller.poll(min(max(0.0, seconds) * 1000, _MAX_POLL_MS))
        signals = linux.read_signals(sfd)
    finally:
        os.close(sfd)
    return signals[0][0] if signals else None


def run(
    argv: list[str],
    limits: Limits,
    backend: Backend,
    relay: Relay | None = None,
    ended: Callable[[], None] | None = None,
) -> RunResult:
    """Run argv in an already prepared backend; always removes the sandbox before returning.

    `relay` (only for runs that may be retried) copies the command's output; its fds are served
    by the poll loop below, so timeouts and signals stay on time however the output is read.
    `ended` is called once nothing of the command runs any more, before the sandbox is measured
    and removed (a budget's reservation: the next run may start while we clean up).
    """
    child_mask = block_signals()
    sfd = linux.signalfd(HANDLED)
    try:
        return _run(argv, limits, backend, relay, sfd, child_mask, ended)
    finally:
        os.close(sfd)


def _run(
    argv: list[str],
    limits: Limits,
    backend: Backend,
    relay: Relay | None,
    sfd: int,
    child_mask: set[int],
    ended: Callable[[], None] | None,
) -> RunResult:
    start = time.monotonic()
    times_before = os.times()
    guardian: guardians.Guardian | None = None
    status: int | None = None
    ended_by: str | None = None
    killed_after_grace = False
    failure: RunResult | None = None
    entry: registry.Entry | None = None
    try:
        entry = registry.register(backend, argv, limits)  # for `aero-sandbox list` and `gc`
        linux.set_child_subreaper()
        guardian = guardians.start(backend, entry, relay.launcher_fds() if relay else None)
        registry.note_guardian(entry, guardian.pid)
        try:
            pid = spawn(argv, backend, child_mask, limits.protected)
        except ExecFailed as err:
            failure = _not_started(argv, err, backend, limits, start)
        else:
            status, ended_by, killed_after_grace = _supervise(
                pid, sfd, backend, limits, start, relay, entry
            )
    finally:
        ran = status is not None or failure is not None
        torn = _tear_down(backend, guardian, ran, entry, ended)
    if failure is not None:
        return _with_cleanup_error(failure, torn.problems)
    assert status is not None
    measured = _with_cpu(torn.usage, times_before)
    reason, code, child_code, signo = classify(status, ended_by or torn.reason, measured, limits)
    return RunResult(
        reason=reason,
        exit_code=code,
        child_exit_code=child_code,
        signal=signo,
        wall_s=time.monotonic() - start,
        usage=measured,
        limits=limits,
        sandbox=backend.describe(),
        killed_after_grace=killed_after_grace,
        cleanup_error="; ".join(torn.problems) or None,
    )


def _not_started(
    argv: list[str], err: ExecFailed, backend: Backend, limits: Limits, start: float
) -> RunResult:
    code = EXIT_NOT_FOUND if err.errno in (2, 20) else EXIT_NOT_EXECUTABLE
    return RunResult(
        reason=Reason.NOT_FOUND if code == EXIT_NOT_FOUND else Reason.NOT_EXECUTABLE,
        exit_code=code,
        wall_s=time.monotonic() - start,
        usage=Usage(),
        limits=limits,
        sandbox=backend.describe(),
        detail=f"cannot run {argv[0]!r}: {err}",
    )


def _with_cpu(measured: Usage, times_before: os.times_result) -> Usage:
    """Without a cgroup's cpu.stat: the rusage of every descendant we reaped (a subreaper)."""
    if measured.cpu_s is not None:
        return measured
    after = os.times()
    cpu = (after.children_user - times_before.children_user) + (
        after.children_system - times_before.children_system
    )
    return Usage(**{**measured.as_dict(), "cpu_s": cpu})


def _with_cleanup_error(result: RunResult, problems: list[str]) -> RunResult:
    if not problems:
        return result
    return RunResult(**{**result.as_dict(), "cleanup_error": "; ".join(problems)})


def _supervise(
    pid: int,
    sfd: int,
    backend: Backend,
    limits: Limits,
    start: float,
    relay: Relay | None,
    entry: registry.Entry | None,
) -> tuple[int, str | None, bool]:
    """Wait for the main child; returns (wait status, what ended it, SIGKILL needed after grace).

    gc's cheap part (what crashed launchers left beside our sandbox and registry entry) runs
    once the command has run GC_AFTER_S, so a short command never waits for it (teardown does
    it anyway) and a long one does not let leftovers wait for its end.
    """
    poller = select.poll()
    poller.register(sfd, select.POLLIN)
    watched = backend.watch_fds()
    for fd in watched:
        poller.register(fd, select.POLLIN)
    deadline = start + limits.timeout_s if limits.timeout_s else None
    kill_at: float | None = None
    next_tick = start + backend.tick_s if backend.tick_s else None
    gc_at: float | None = start + GC_AFTER_S
    ended_by: str | None = None
    killed_after_grace = False
    status: int | None = None
    relayed: set[int] = set()
    while status is None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            deadline, ended_by = None, ended_by or Reason.TIMEOUT
            if limits.kill_after_s:  # 0 means no grace: SIGKILL at once, no SIGTERM first
                backend.signal_all(_signal.SIGTERM)
            kill_at = now + limits.kill_after_s
        if kill_at is not None and now >= kill_at:
            kill_at, killed_after_grace = None, True
            backend.kill_all()
        # A check due now runs after a poll that does not wait (a due tick is in `waits`).
        check = next_tick is not None and now >= next_tick
        if gc_at is not None and now >= gc_at:
            gc_at = None
            backend.collect_stale()
            registry.sweep_beside(entry.path if entry is not None else None)
        waits = [t for t in (deadline, kill_at, next_tick, gc_at) if t is not None]
        # poll() takes a C int of milliseconds: a deadline weeks away waits in steps.
        timeout_ms = -1 if not waits else min(max(0.0, min(waits) - now) * 1000, _MAX_POLL_MS)
        if relay is not None:
            relayed = _watch_relay(poller, relay, relayed)
        for fd, _events in poller.poll(timeout_ms):
            if fd in relayed and relay is not None:
                relay.ready(fd)
                continue
            if fd != sfd:
                check = True
                continue
            for signo, code, _sender in linux.read_signals(sfd):
                if signo == _signal.SIGCHLD:
                    status = _reap(pid) if status is None else status
                elif status is None and not _terminal_already_sent(code, pid):
                    os.kill(pid, signo)
        if check and (reason := backend.check()) and ended_by is None:
            ended_by = reason
            backend.kill_all()
        if check:  # the backend may want the next look sooner, later, or only on a wake-up
            tick = backend.tick_s
            next_tick = time.monotonic() + tick if tick else None
    return status, ended_by, killed_after_grace


def _watch_relay(poller: select.poll, relay: Relay, registered: set[int]) -> set[int]:
    """Poll the relay's fds for what it waits on now (reading, or writing when output is held)."""
    wanted = relay.wanted()
    for fd in registered - wanted.keys():
        poller.unregister(fd)
    for fd, events in wanted.items():
        poller.register(fd, events)  # registering again only changes the events
    return set(wanted)


def _terminal_already_sent(code: int, pid: int) -> bool:
    """A ^C or ^\\ from the terminal reached the child's process group along with us."""
    if code != linux.SI_KERNEL:
        return False
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return True


def _reap(main: int) -> int | None:
    """Reap every exited child (we are a subreaper); return the main child's status if it ended."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == main:
            found = status


class _TornDown:
    def __init__(self, usage: Usage, reason: str | None, problems: list[str]) -> None:
        self.usage = usage
        self.reason = reason  # the backend's last word on why it ended (an OOM), if it ran
        self.problems = problems  # clean-up failures: reported, never the command's status


def _tear_down(
    backend: Backend,
    guardian: guardians.Guardian | None,
    ran: bool,
    entry: registry.Entry | None,
    ended: Callable[[], None] | None,
) -> _TornDown:
    """Kill what is left, reap, call `ended`, measure, remove the sandbox and its registry entry,
    release the guardian. In that order. A kill that fails raises (nothing could be measured); a
    removal that fails, or a guardian found dead, is one of the returned problems."""
    problems: list[str] = []
    try:
        backend.kill_all()
        _reap(-1)
        if ended is not None:
            ended()
        reason = backend.check() if ran else None
        usage = backend.measure()
    finally:
        try:
            backend.remove()
        except SandboxError as err:
            problems.append(err.line())
        finally:
            if entry is not None:  # the guardian sweeps the others, after we exit
                registry.discard(entry.path)
                os.close(entry.fd)
            if guardian is not None and (problem := guardian.release()):
                problems.append(problem)
    return _TornDown(usage, reason, problems)
