"""The calls of sandbox/core/syscalls.c through `_ctypes`, where that module was not built (no C
compiler at install, a wheel), and clone3 with fork semantics, which only this module makes.

They go through `_ctypes`, the C core of ctypes, not through the `ctypes` package: the package
builds its type classes at import (~3 ms), the core loads in ~0.5 ms (with libffi). We declare
the one return type (int) ourselves, as ctypes.CDLL would.
"""

from __future__ import annotations

import _ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    _IntData = _ctypes._SimpleCData[int]
else:
    _IntData = _ctypes._SimpleCData  # generic for typeshed only


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


def prctl(option: int, value: int) -> int:
    return _check(_prctl(option, value, 0, 0, 0))


def signalfd(mask: bytes, flags: int) -> int:
    return _check(_signalfd(-1, mask, flags))


def inotify_init1(flags: int) -> int:
    return _check(_inotify_init1(flags))


def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
    return _check(_inotify_add_watch(fd, path, mask))


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
