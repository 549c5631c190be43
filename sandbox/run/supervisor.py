"""One run, start to end: spawn the child inside the sandbox, supervise it, tear everything down.

    spawn       fork; the child joins the sandbox (backend.child_setup), then execs
    supervise   poll a signalfd (SIGCHLD + forwarded signals) and the backend's fds, with
                deadlines on time.monotonic(): timeout -> SIGTERM to all -> grace -> SIGKILL
    tear down   one `finally`, fixed order: kill what is left -> reap -> measure -> remove the
                sandbox -> release the guardian

A guardian process, forked before the child, kills and removes the sandbox if the launcher
itself dies (even by SIGKILL): it waits on a pipe whose write end only the launcher holds.
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal

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


def wait_for_signal(seconds: float) -> int | None:
    """Sleep (signals blocked) until `seconds` pass or a forwarded signal comes; return it."""
    block_signals()
    info = _signal.sigtimedwait(FORWARDED, seconds)
    return None if info is None else info.si_signo


class ExecFailed(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Guardian:
    """A forked process that cleans up after a launcher that died without doing so."""

    def __init__(
        self, backend: Backend, entry: registry.Entry | None = None, close: list[int] | None = None
    ) -> None:
        read_end, self._write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the guardian
            try:
                for fd in [self._write_end, *(close or ())]:
                    os.close(fd)
                os.setsid()  # out of the terminal's process group: ^C and ^Z are not for us
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # never hold the caller's pipes open
                    os.dup2(null, fd)
                if os.read(read_end, 1) != b"d":
                    backend.kill_all()
                    backend.remove()
                    if entry is not None:
                        registry.discard(entry.path)
            finally:
                os._exit(0)
        os.close(read_end)

    def release(self) -> None:
        """The launcher cleaned up itself: let the guardian go.

        It exits as soon as it reads the byte. Waiting for that costs a few ms on a busy host
        and buys nothing: it holds none of the caller's pipes, and once we exit, init (or the
        nearest subreaper) reaps it. Reap it now only if it is already gone.
        """
        os.write(self._write_end, b"d")
        os.close(self._write_end)
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # already reaped by the SIGCHLD loop


def spawn(argv: list[str], backend: Backend, child_mask: set[int]) -> int:
    """Fork, join the sandbox in the child, exec. Raises ExecFailed (126/127) or SandboxError."""
    launcher = os.getpid()
    read_end, write_end = os.pipe()  # close-on-exec: EOF means the exec happened
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            linux.set_parent_death_signal(_signal.SIGKILL)
            if os.getppid() != launcher:
                os._exit(125)
            try:
                backend.child_setup()
            except Exception as err:  # noqa: BLE001 - reported to the parent
                os.write(write_end, f"setup:0:{err}".encode())
                os._exit(125)
            # Python ignores these; an exec keeps ignored signals ignored.
            _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
            _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, child_mask)
            _execvp(argv)
        except OSError as err:
            os.write(write_end, f"exec:{err.errno}:{err.strerror}".encode())
        finally:
            os._exit(127)
    os.close(write_end)
    try:
        backend.started(pid)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if chunks:
        kind, errno, message = b"".join(chunks).decode(errors="replace").split(":", 2)
        if kind == "setup":
            raise SandboxError(f"could not place the command in the sandbox: {message}")
        raise ExecFailed(int(errno), message)
    return pid


def _execvp(argv: list[str]) -> None:
    """os.execvp, less its import of `warnings` (~1 ms, paid while the launcher waits)."""
    if "/" in argv[0]:
        os.execv(argv[0], argv)
    first_error: OSError | None = None  # like execvp(3): EACCES somewhere beats ENOENT
    last_error: OSError = FileNotFoundError(2, "No such file or directory")
    for directory in (os.environ.get("PATH") or os.defpath).split(os.pathsep):
        try:
            os.execv(os.path.join(directory or ".", argv[0]), argv)
        except (FileNotFoundError, NotADirectoryError) as err:
            last_error = err
        except OSError as err:
            last_error = err
            first_error = first_error or err
    raise first_error or last_error


def run(
    argv: list[str], limits: Limits, backend: Backend, relay: Relay | None = None
) -> RunResult:
    """Run argv in an already prepared backend; always removes the sandbox before returning.

    `relay` (only for runs that may be retried) copies the command's output; its fds are served
    by the poll loop below, so timeouts and signals stay on time however the output is read.
    """
    start = time.monotonic()
    times_before = os.times()
    child_mask = block_signals()
    sfd = linux.signalfd(HANDLED)
    guardian: Guardian | None = None
    status: int | None = None
    ended_by: str | None = None
    killed_after_grace = False
    failure: RunResult | None = None
    entry: registry.Entry | None = None
    try:
        entry = registry.register(backend, argv, limits)  # for `aero-sandbox list` and `gc`
        linux.set_child_subreaper()
        guardian = Guardian(backend, entry, relay.launcher_fds() if relay else None)
        registry.note_guardian(entry, guardian.pid)
        try:
            pid = spawn(argv, backend, child_mask)
        except ExecFailed as err:
            code = EXIT_NOT_FOUND if err.errno in (2, 20) else EXIT_NOT_EXECUTABLE
            failure = RunResult(
                reason=Reason.NOT_FOUND if code == EXIT_NOT_FOUND else Reason.NOT_EXECUTABLE,
                exit_code=code,
                wall_s=time.monotonic() - start,
                usage=Usage(),
                limits=limits,
                sandbox=backend.describe(),
                detail=f"cannot run {argv[0]!r}: {err}",
            )
            return failure
        # gc's cheap part, now that the command runs (off its way to exec); again at teardown.
        backend.collect_stale()
        registry.sweep_beside(entry)
        status, ended_by, killed_after_grace = _supervise(pid, sfd, backend, limits, start, relay)
    finally:
        usage = _tear_down(backend, guardian, status is not None or failure is not None, entry)
        if status is not None and ended_by is None:
            ended_by = usage[1]
        os.close(sfd)
    measured = usage[0]
    if measured.cpu_s is None:  # no cgroup cpu.stat: we reap every descendant (subreaper)
        after = os.times()
        cpu = (after.children_user - times_before.children_user) + (
            after.children_system - times_before.children_system
        )
        measured = Usage(**{**measured.as_dict(), "cpu_s": cpu})
    assert status is not None
    reason, code, child_code, signo = classify(status, ended_by, measured, limits)
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
    )


def _supervise(
    pid: int, sfd: int, backend: Backend, limits: Limits, start: float, relay: Relay | None
) -> tuple[int, str | None, bool]:
    """Wait for the main child; returns (wait status, what ended it, SIGKILL needed after grace)."""
    poller = select.poll()
    poller.register(sfd, select.POLLIN)
    watched = backend.watch_fds()
    for fd in watched:
        poller.register(fd, select.POLLIN)
    deadline = start + limits.timeout_s if limits.timeout_s else None
    kill_at: float | None = None
    next_tick = start + backend.tick_s if backend.tick_s else None
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
        check = next_tick is not None and now >= next_tick
        if check and backend.tick_s:
            next_tick = now + backend.tick_s
        waits = [t for t in (deadline, kill_at, next_tick) if t is not None]
        timeout_ms = -1 if not waits else max(0.0, min(waits) - now) * 1000
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
        if check and ended_by is None and (reason := backend.check()):
            ended_by = reason
            backend.kill_all()
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


def _tear_down(
    backend: Backend, guardian: Guardian | None, ran: bool, entry: registry.Entry | None
) -> tuple[Usage, str | None]:
    """Kill what is left, reap, measure, remove the sandbox and its registry entry, release the
    guardian. In that order."""
    try:
        backend.kill_all()
        _reap(-1)
        reason = backend.check() if ran else None
        usage = backend.measure()
    finally:
        try:
            backend.remove()
        finally:
            registry.unregister(entry)  # never raises
            if guardian is not None:
                guardian.release()
    return usage, reason
