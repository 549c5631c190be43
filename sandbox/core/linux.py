"""The few Linux calls Python's standard library lacks: prctl, signalfd, clone3 and inotify.

They come from sandbox/core/syscalls.c (the module `_syscalls`, built by scripts/install where
a C compiler exists), else from `_ctypes` (sandbox/core/ctypes_calls.py): the same calls, ~0.5
ms more of start-up. Only _syscalls has `spawn` (a clone that shares the launcher's memory and
execs, sandbox/run/spawn.py); only ctypes_calls has clone3 with fork semantics, imported when a
fork into a cgroup is needed (no _syscalls, or its spawn refused).

signalfd gives each signal's sender (si_code), so a Ctrl-C that the terminal already delivered
to the child's process group is not sent to it a second time, while a `kill -INT` aimed at the
launcher is forwarded.
"""

from __future__ import annotations

import os
import time

from sandbox.core.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

try:
    from sandbox.core import _syscalls as _calls
except ImportError:  # not built: no C compiler when installed, or a wheel
    from sandbox.core import ctypes_calls as _calls  # type: ignore[no-redef]

# spawn(...) of sandbox/core/syscalls.c, or None (not built, or not on this architecture)
native_spawn = getattr(_calls, "spawn", None)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC
SI_KERNEL = 0x80  # a signal the kernel sent: the terminal's ^C, ^\, a hangup
_SIGINFO_SIZE = 128
_SIGSET_SIZE = 128  # glibc's sigset_t (the kernel reads the first 8 bytes)


class ChildSetup(Frozen, kw_only=True):
    """What a backend's child does between the clone and the exec, as data, so that a spawn
    whose child runs no Python can do it (Backend.child_plan, native_spawn)."""

    born_in: str | None = None  # the cgroup v2 directory the child is cloned into
    joins: tuple[str, ...] = ()  # files the child writes "0" into: a v1 cgroup's `tasks`
    rlimits: tuple[tuple[int, int], ...] = ()  # (resource, soft and hard limit)
    nice: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # variables set in the command's environment


def set_child_subreaper() -> None:
    """Orphaned descendants (double forks, setsid daemons) are reparented to us, not to init."""
    _calls.prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(signo: int) -> None:
    _calls.prctl(PR_SET_PDEATHSIG, signo)


def clone_into_cgroup(cgroup_fd: int, exit_signal: int) -> int:
    """fork() into a cgroup v2 directory: sandbox/core/ctypes_calls.py."""
    from sandbox.core.ctypes_calls import clone_into_cgroup as clone

    return clone(cgroup_fd, exit_signal)


def signal_mask(signals: set[int] | frozenset[int]) -> bytes:
    """A sigset_t's bytes, as signalfd(2) and rt_sigprocmask(2) take it."""
    return sum(1 << (s - 1) for s in signals).to_bytes(_SIGSET_SIZE, "little")


def signalfd(signals: set[int] | frozenset[int]) -> int:
    """A non-blocking close-on-exec fd that reads the given (already blocked) signals."""
    return _calls.signalfd(signal_mask(signals), SFD_NONBLOCK | SFD_CLOEXEC)


IN_MOVED_TO = 0x80
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400


def inotify(path: str, mask: int) -> int:
    """A non-blocking close-on-exec fd that becomes readable when `mask`'s events happen in the
    directory `path` (Linux 2.6.27+). OSError where refused (EMFILE: the user's
    fs.inotify.max_user_instances, 128 by default, are taken)."""
    fd = _calls.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _calls.inotify_add_watch(fd, os.fsencode(path), mask)
    except OSError:
        os.close(fd)
        raise
    return fd


def drain(fd: int) -> bool:
    """Read whatever a non-blocking fd holds (inotify's events); whether there was any."""
    found = False
    while True:
        try:
            if not os.read(fd, 65536):
                return found
        except BlockingIOError:
            return found
        found = True


def read_signals(fd: int) -> list[tuple[int, int, int]]:
    """(signal, si_code, sender pid) of each pending signal."""
    try:
        data = os.read(fd, _SIGINFO_SIZE * 16)
    except BlockingIOError:
        return []
    found = []
    for offset in range(0, len(data), _SIGINFO_SIZE):
        # struct signalfd_siginfo: u32 ssi_signo, s32 ssi_errno, s32 ssi_code, u32 ssi_pid
        field = [data[offset + at : offset + at + 4] for at in (0, 8, 12)]
        signo = int.from_bytes(field[0], "little")
        code = int.from_bytes(field[1], "little", signed=True)
        pid = int.from_bytes(field[2], "little")
        found.append((signo, code, pid))
    return found


def kill_each(pids: Collection[int], signo: int) -> None:
    """Signal each pid; one that has exited meanwhile is no error."""
    for pid in pids:
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


def until_empty(kill_round: Callable[[], Collection[int]], timeout_s: float) -> Collection[int]:
    """Repeat kill_round (kill what is there, return what was there) until it finds nothing or
    `timeout_s` passes; return what the last round found (empty: all gone). The one
    kill-until-empty loop: a cgroup's (tree.kill_until_empty) and a process tree's (rlimit)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.0005
    while True:
        left = kill_round()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def detach_from_caller() -> None:
    """In a freshly forked helper (the guardian, systemd's holder): leave the terminal's session,
    so ^C and ^Z are not for it, and hold none of the caller's pipes open (stdio -> /dev/null)."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
