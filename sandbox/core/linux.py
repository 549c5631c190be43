"""The few Linux calls Python's standard library lacks: prctl, signalfd, clone3 and inotify.

They go through `_ctypes`, the C core of ctypes, not through the `ctypes` package: the package
builds its type classes at import (~3 ms, as long as the rest of our imports together), the
core loads in ~0.5 ms. We declare the one return type (int) ourselves, as ctypes.CDLL would.

signalfd gives each signal's sender (si_code), so a Ctrl-C that the terminal already delivered
to the child's process group is not sent to it a second time, while a `kill -INT` aimed at the
launcher is forwarded.
"""

from __future__ import annotations

import _ctypes
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC
if TYPE_CHECKING:
    _IntData = _ctypes._SimpleCData[int]
else:
    _IntData = _ctypes._SimpleCData  # generic for typeshed only

SI_KERNEL = 0x80  # a signal the kernel sent: the terminal's ^C, ^\, a hangup
_SIGINFO_SIZE = 128


class _Int(_IntData):
    _type_ = "i"  # ctypes.c_int


class _Function(_ctypes.CFuncPtr):
    """A libc function returning int, its errno kept for us (ctypes.CDLL(None, use_errno=True))."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    """What _ctypes needs of a ctypes.CDLL: its dlopen(3) handle (NULL: the program itself)."""

    _handle = _ctypes.dlopen(None)  # type: ignore[arg-type]  # typeshed lacks dlopen(NULL)


class _HeldFunction(_Function):
    """As _Function, but the GIL stays held across the call (ctypes.PyDLL): a clone's child
    returns into Python holding it, as after os.fork()."""

    _flags_ = _Function._flags_ | _ctypes.FUNCFLAG_PYTHONAPI


# typeshed types the library as a ctypes.CDLL; _ctypes only reads its _handle.
_prctl = _Function(("prctl", _Libc))  # type: ignore[arg-type]
_signalfd = _Function(("signalfd", _Libc))  # type: ignore[arg-type]
_syscall = _HeldFunction(("syscall", _Libc))  # type: ignore[arg-type]
_inotify_init1 = _Function(("inotify_init1", _Libc))  # type: ignore[arg-type]
_inotify_add_watch = _Function(("inotify_add_watch", _Libc))  # type: ignore[arg-type]
SYS_CLONE3 = 435  # the same number on every architecture's table (x86-64, arm64...)
CLONE_INTO_CGROUP = 0x200000000


def _check(result: int) -> int:
    if result < 0:
        err = _ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def set_child_subreaper() -> None:
    """Orphaned descendants (double forks, setsid daemons) are reparented to us, not to init."""
    _check(_prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))


def set_parent_death_signal(signo: int) -> None:
    _check(_prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0))


def clone_into_cgroup(cgroup_fd: int, exit_signal: int) -> int:
    """fork(), the child born in the cgroup v2 directory open as `cgroup_fd` (clone3 with
    CLONE_INTO_CGROUP, Linux 5.7+): 0 in the child, its pid in the parent. OSError where it is
    refused (ENOSYS: older kernel or a seccomp filter; EINVAL...); nothing was started then.

    Unlike os.fork(), no at-fork handlers run and no interpreter lock is re-made: the child may
    only do what a forked child of a single-threaded launcher does before exec (no imports, no
    threads), which is all our spawn does."""
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    # tls, set_tid, set_tid_size, cgroup; a u64 each
    fields = (CLONE_INTO_CGROUP, 0, 0, 0, exit_signal, 0, 0, 0, 0, 0, cgroup_fd)
    args = b"".join(value.to_bytes(8, "little") for value in fields)
    return _check(_syscall(SYS_CLONE3, args, len(args)))


def signalfd(signals: set[int] | frozenset[int]) -> int:
    """A non-blocking close-on-exec fd that reads the given (already blocked) signals."""
    mask = sum(1 << (s - 1) for s in signals).to_bytes(_SIGINFO_SIZE, "little")
    return _check(_signalfd(-1, mask, SFD_NONBLOCK | SFD_CLOEXEC))


IN_MOVED_TO = 0x80
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400


def inotify(path: str, mask: int) -> int:
    """A non-blocking close-on-exec fd that becomes readable when `mask`'s events happen in the
    directory `path` (Linux 2.6.27+). OSError where refused (EMFILE: the user's
    fs.inotify.max_user_instances, 128 by default, are taken)."""
    fd = _check(_inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        _check(_inotify_add_watch(fd, os.fsencode(path), mask))
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
