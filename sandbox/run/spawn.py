"""Starting the command: the child joins the sandbox, then execs.

Two ways. Where sandbox/core/syscalls.c was built and the backend can say as data what its
child does (Backend.child_plan), a clone that shares the launcher's memory runs no Python and
execs at once, as posix_spawn(3) does (clone3 CLONE_VM | CLONE_VFORK, born in the v2 cgroup):
the kernel copies none of the launcher's page tables. Otherwise a fork (or clone3 into the
cgroup), backend.child_setup in the child, exec.

The child reports a failure to join or to exec on a close-on-exec pipe (EOF: the exec happened),
so the launcher tells 125 (setup), 126 and 127 apart as coreutils' `timeout` does.
"""

from __future__ import annotations

import os

from sandbox.core import linux
from sandbox.core.errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable

    from sandbox.backends.protocol import Backend
else:
    import _signal  # the C half of `signal`, without its enums (~4 ms)


class ExecFailed(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def spawn(
    argv: list[str], backend: Backend, child_mask: set[int], protected: bool = False
) -> int:
    """Start the command in the sandbox (the native clone or a fork), exec it; its pid. Raises
    ExecFailed (126/127) or SandboxError (125), and then nothing is left running."""
    protect: Callable[[], None] | None = None
    if protected:  # imported here: ctypes stays off the run path of every other run
        from sandbox.core.protect import protect_limits

        protect = protect_limits
    launcher = os.getpid()
    kept = _caller_ignores()
    resolved = _on_path(argv[0])
    plan = None if protect is not None or not _NATIVE else backend.child_plan()
    read_end, write_end = os.pipe()  # close-on-exec: EOF means the exec happened
    pid = -1
    try:
        if plan is not None and all("\0" not in arg for arg in argv):
            try:
                pid = _spawn_natively(argv, plan, kept, resolved, child_mask, write_end)
            except OSError:  # the clone refused (a seccomp filter, Linux before 5.7): as below
                _NATIVE.clear()
        # The cgroup backend's child is born in its v2 cgroup (CgroupBackend.fork says why).
        if pid < 0:
            pid = getattr(backend, "fork", os.fork)()
    except BaseException:  # nothing started: a cgroup file that would not open, no fork
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            linux.set_parent_death_signal(_signal.SIGKILL)
            if os.getppid() != launcher:
                os._exit(125)
            try:
                backend.child_setup()
                if protect is not None:
                    protect()
            except Exception as err:  # noqa: BLE001 - reported to the parent
                os.write(write_end, f"setup:0:{err}".encode())
                os._exit(125)
            # Python ignores these at start-up, and an exec keeps ignored signals ignored: reset
            # them, unless the caller had them ignored (_caller_ignores). As HUP, INT and QUIT do.
            for name, signo in (("PIPE", _signal.SIGPIPE), ("XFSZ", _signal.SIGXFSZ)):
                _signal.signal(signo, _signal.SIG_IGN if name in kept else _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, child_mask)
            if resolved is not None:
                try:
                    os.execv(resolved, argv)
                except OSError:
                    pass  # execvp's own search says why, with its errno
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
        kind, number, message = b"".join(chunks).decode(errors="replace").split(":", 2)
        errno = int(number)
        if kind == "setup":
            # The native child names what failed and sends the errno; a forked one the error.
            why = f"{message}: {os.strerror(errno)}" if errno else message
            raise SandboxError(f"could not place the command in the sandbox: {why}")
        raise ExecFailed(errno, message or os.strerror(errno))
    return pid


# Cleared once the kernel refuses the native clone: every later spawn forks.
_NATIVE = [True] if linux.native_spawn is not None else []


def _spawn_natively(
    argv: list[str],
    plan: linux.ChildSetup,
    kept: list[str],
    resolved: str | None,
    child_mask: set[int],
    report_fd: int,
) -> int:
    """The clone that runs no Python (sandbox/core/syscalls.c); returns once the child has
    exec'd or failed (its failure is on report_fd). OSError: nothing was started."""
    opened: list[int] = []
    try:
        try:
            if plan.born_in is not None:
                opened.append(os.open(plan.born_in, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            joins = []
            for path in plan.joins:
                opened.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                joins.append((opened[-1], os.fsencode(path)))
        except OSError as err:
            raise SandboxError(f"could not place the command in the sandbox: {err}") from err
        envp = None
        if plan.env:
            env = {**os.environb, **{os.fsencode(k): os.fsencode(v) for k, v in plan.env}}
            envp = [name + b"=" + value for name, value in env.items()]
        assert linux.native_spawn is not None
        pid: int = linux.native_spawn(
            None if resolved is None else os.fsencode(resolved),
            os.fsencode(os.environ.get("PATH") or os.defpath),
            [os.fsencode(arg) for arg in argv],
            envp,
            opened[0] if plan.born_in is not None else -1,
            joins,
            list(plan.rlimits),
            plan.nice,
            "PIPE" in kept,
            "XFSZ" in kept,
            linux.signal_mask(child_mask),
            report_fd,
        )
        return pid
    finally:
        for fd in opened:
            os.close(fd)


# The child between fork and exec is the costliest place for any work: each page it touches is
# a copy-on-write fault (~200 of them, ~1 ms, for the code below). So what can be known before
# the fork is found in the parent: the environment it would edit, the program execvp would find.
_CALLER_IGNORES: list[list[str]] = []


def _caller_ignores() -> list[str]:
    """The signals the caller had ignored (SIGPIPE, SIGXFSZ), as the native entry
    (bin/aero-sandbox.c) says; taken out of our environment at the first spawn, so that no
    command inherits the variable and no child edits its environment."""
    if not _CALLER_IGNORES:
        _CALLER_IGNORES.append(os.environ.pop("AERO_SANDBOX_CALLER_IGNORES", "").split(","))
    return _CALLER_IGNORES[0]


def _on_path(name: str) -> str | None:
    """The executable execvp would run for a bare name, found before the fork; None when the
    name has a slash or nothing qualifies (the child then searches itself, for the errno)."""
    if not name or "/" in name:
        return None
    for directory in (os.environ.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _execvp(argv: list[str]) -> None:
    """os.execvp, less its import of `warnings` (~1 ms, paid while the launcher waits)."""
    if not argv[0]:  # execv refuses it with ValueError, which no errno reaches the parent for
        raise FileNotFoundError(2, "No such file or directory")
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
