"""The guardian: a process that cleans up after a launcher that died without doing so.

It is started before the command, holds none of the caller's stdio, and sleeps until the
launcher exits (the kernel closes the pipe's write end however it exits, SIGKILL included).
If the launcher had not written `d` (cleaned up itself) by then, the guardian cleans up: it
kills what runs in the sandbox, removes it and the registry entry. It is one of two processes:

  spawned  the native entry (bin/aero-sandbox.c) started as "aero-sandbox-guardian", with
           posix_spawn: no copy of the launcher's page tables, and no copy-on-write faults in
           the launcher afterwards (~400 a run; 0.96x against the fork, in interleaved pairs,
           1.01x against no guardian at all). We write it the backend's guardian_notes(); it
           reads them only once the launcher is gone, and only then, when it must clean up,
           execs the Python entry, which rebuilds the backend from them (clean_up_after()).
  forked   a fork of the launcher, holding the prepared backend itself: where there is no
           native entry (installed without a C compiler, `python -m sandbox`), and for backends
           whose clean-up needs their live state (the systemd bus): guardian_notes() is None.

Notes are lines; the first names the backend ("backend cgroup"), and a line "fd N" names a file
descriptor the guardian must hold (the rlimit backend's shared memory): the guardian gets it as
fd 3, and the line says so when the notes reach it.
"""

from __future__ import annotations

import os
import select

from sandbox.core import linux
from sandbox.registry import store as registry

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal

    from sandbox.backends.protocol import Backend
else:
    import _signal  # the C half of `signal`: its enums cost ~4 ms of start-up

NATIVE_ENV = "AERO_SANDBOX_NATIVE_ENTRY"  # set by the native entry: its own path
SPAWNED_NAME = "aero-sandbox-guardian"
_HELD_FD = 3  # where a spawned guardian holds the fd its notes name
_END_OF_NOTES = b"\0"
_DONE = b"d"


class Guardian:
    """The launcher's side of its guardian: its pid, and the pipe that says we cleaned up."""

    def __init__(self, pid: int, write_end: int) -> None:
        self.pid = pid
        self._write_end = write_end

    def release(self) -> str | None:
        """The launcher cleaned up itself: the guardian may go when the launcher exits.
        Returns what went wrong, if the guardian died before (killed from inside the sandbox:
        the pipe has no reader, EPIPE).

        Only a byte in the pipe, which wakes nobody: waking the guardian now, to exit, would
        let it (and on a busy host, others) take the CPU before we report. The write end stays
        open (close-on-exec, so no command holds it) until we exit; then it reads the byte and
        exits, and init (or the nearest subreaper) reaps it.
        """
        problem = None
        try:
            os.write(self._write_end, _DONE)
        except BrokenPipeError:
            problem = (
                f"the guardian (pid {self.pid}) died during the run, so nothing would have "
                "cleaned up had the launcher died too (was it killed from inside the sandbox?)"
            )
        return problem


_native: list[str | None] = []  # NATIVE_ENV's value, taken out of the environment once


def start(backend: Backend, entry: registry.Entry | None, close: list[int] | None) -> Guardian:
    """The guardian of a prepared sandbox: spawned where it can be, else forked."""
    if not _native:  # taken out: the command, and a nested launcher, must not find ours
        _native.append(os.environ.pop(NATIVE_ENV, None))
    native = _native[0]
    notes = backend.guardian_notes() if native else None
    if native and notes is not None:
        held = [int(line[3:]) for line in notes if line.startswith("fd ")][:1]
        notes = [line for line in notes if not line.startswith("fd ")]
        notes += [f"fd {_HELD_FD}"] if held else []
        if entry is not None:
            notes = [*notes, f"entry {entry.path}"]
        data = "\n".join(notes).encode("utf-8", "surrogateescape") + _END_OF_NOTES
        read_end, write_end = os.pipe()  # close-on-exec: only our guardian gets read_end
        # A held fd goes to 3 by way of 1 (replaced after): dup2 of an fd onto itself would
        # keep its close-on-exec flag where the C library is older than POSIX 2018 wants.
        via_stdout = [(os.POSIX_SPAWN_DUP2, fd, 1) for fd in held]
        to_held = [(os.POSIX_SPAWN_DUP2, 1, _HELD_FD) for _ in held]
        try:
            pid = os.posix_spawn(
                native,
                [SPAWNED_NAME],
                {},
                file_actions=[
                    *via_stdout,
                    (os.POSIX_SPAWN_DUP2, read_end, 0),
                    *to_held,
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,  # ^C and ^Z from the terminal are not for it
                # The launcher's own mask (the supervisor's signals), as a fork would inherit
                # it: only SIGKILL ends the guardian while its launcher lives.
                setsigmask=_signal.pthread_sigmask(_signal.SIG_BLOCK, ()),
            )
        except OSError:  # a native entry moved away since we started: fork one
            os.close(write_end)
        else:
            # Far below a pipe's capacity (64 KiB): never waits for the guardian, which reads
            # only once we are gone.
            while data:
                data = data[os.write(write_end, data) :]
            return Guardian(pid, write_end)
        finally:
            os.close(read_end)
    return _fork(backend, entry, close)


def _fork(backend: Backend, entry: registry.Entry | None, close: list[int] | None) -> Guardian:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the guardian
        try:
            for fd in [write_end, *(close or ())]:
                os.close(fd)
            linux.detach_from_caller()
            # Polling for no event still returns on POLLHUP (all write ends closed), but a
            # write does not wake us: release() costs the launcher no context switch.
            poller = select.poll()
            poller.register(read_end, 0)
            poller.poll()
            path = entry.path if entry is not None else None
            if os.read(read_end, 1) != _DONE:
                _clean_up(backend, path)
            # What dead launchers left in the registry: after our launcher is gone, so it costs
            # no run any time (that gc's cgroups is part of backend.remove()).
            registry.sweep_beside(path)
        finally:
            os._exit(0)
    os.close(read_end)
    return Guardian(pid, write_end)


def clean_up_after(notes: str) -> None:
    """In the Python entry the spawned guardian execs (sandbox.cli.GUARDIAN_NOTES): its launcher
    died without cleaning up."""
    lines = notes.split("\n")
    entry = next((line[len("entry ") :] for line in lines if line.startswith("entry ")), None)
    backend: Backend
    if lines[0] == "backend rlimit":
        from fallback.backend import RlimitBackend

        backend = RlimitBackend.from_notes(lines)
    else:
        from sandbox.backends.cgroup import CgroupBackend

        backend = CgroupBackend.from_notes(lines)
    try:
        _clean_up(backend, entry)
    finally:
        registry.sweep_beside(entry)


def _clean_up(backend: Backend, entry: str | None) -> None:
    try:
        backend.guardian_cleanup()
    finally:
        if entry is not None:
            registry.discard(entry)

