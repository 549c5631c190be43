"""Small files in a shared state directory, read and written as hostile input.

aero-sandbox runs as root on shared hosts, so a file it opens in a directory another user could
write must not be a symlink (O_NOFOLLOW), a FIFO (O_NONBLOCK, then a regular-file check) or a
huge file (a size cap), and must belong to the user we are. A directory we use must be a real
directory owned by us, not a symlink planted in its place.
"""

from __future__ import annotations

import os

from sandbox.core.errors import SandboxError

MAX_BYTES = 64 * 1024
_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def directory(path: str, mode: int) -> str:
    """`path`, created if missing; SandboxError if it is not a directory of ours."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as err:
        raise SandboxError(f"cannot create {path}: {err.strerror}") from err
    info = os.lstat(path)
    if (info.st_mode & 0o170000) != 0o040000 or info.st_uid != os.geteuid():
        raise SandboxError(
            f"{path} is not a directory owned by uid {os.geteuid()}: refusing to use it",
            f"remove it (rm -r {path}); someone or something else made it",
        )
    return path


def open_own(path: str, create: bool = False) -> int:
    """An fd of a regular file of ours at `path` (read-write); OSError when it is anything else."""
    flags = os.O_RDWR | _FLAGS | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        info = os.fstat(fd)
        if (info.st_mode & 0o170000) != 0o100000 or info.st_uid != os.geteuid():
            raise PermissionError(1, "not a regular file of ours", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own(path: str) -> tuple[int, str] | None:
    """(fd, text) of a regular file of ours, at most MAX_BYTES; None for anything else. The
    caller closes the fd (it may test or take a lock on it first)."""
    try:
        fd = os.open(path, os.O_RDONLY | _FLAGS | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if (info.st_mode & 0o170000) != 0o100000 or info.st_uid != os.geteuid():
            raise OSError("not a regular file of ours")
        if info.st_size > MAX_BYTES:
            raise OSError("too large")
        data = os.read(fd, MAX_BYTES + 1)
    except OSError:
        os.close(fd)
        return None
    return fd, data.decode("utf-8", "surrogateescape")


def write_all(fd: int, text: str) -> None:
    data = text.encode("utf-8", "surrogateescape")
    while data:
        data = data[os.write(fd, data) :]


def ascii_int(text: str) -> int | None:
    """A whole number in ASCII digits ('²' is a digit to str.isdigit, not to us)."""
    raw = text.strip()
    return int(raw) if raw and raw.isascii() and raw.isdigit() and len(raw) < 25 else None


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
