"""Files in directories other users can write to (/tmp, a shared report directory, registries).

The launcher usually runs as root, so a path it opens there is hostile input: another user may
have planted a symlink (to /etc/shadow), a FIFO (an open that never returns, with our signals
blocked), a huge or endless file (/dev/zero), or a predictable temporary name. Hence:

- writing: a fresh temporary file made with O_CREAT|O_EXCL|O_NOFOLLOW in the target's own
  directory, then renamed over the target (rename replaces a symlink, it never follows it);
- writing *into* a symlink or a special file (/dev/stdout, a FIFO a reader holds open) only when
  the caller or the directory's owner made it (the rule of fs.protected_symlinks/_fifos, which
  this host leaves at 0), never with a blocking open;
- reading: O_NOFOLLOW|O_NONBLOCK, then fstat on the open fd: the expected owner, a regular
  file, a size cap.
"""

from __future__ import annotations

import os
import stat

from sandbox.core.errors import SandboxError

PRIVATE_MODE = 0o600  # a report holds the command line: nobody else's business
_WRITE_TIMEOUT_S = 5.0  # a FIFO reader that stops reading must not hold the launcher forever


class UnsafeFile(SandboxError):
    """A path that cannot or must not be written or read."""


def check_writable(path: str, what: str = "--report") -> None:
    """Raise UnsafeFile (one line) if writing `path` can never work or must not be done.

    Checked before the command starts, so a bad path costs nothing; write_atomic() checks
    again at the end, since the path may have changed meanwhile.
    """
    _plan(path, what)


def write_atomic(path: str, data: bytes, what: str = "--report") -> None:
    """Replace `path` with `data` (or write into the trusted symlink/special file it is).

    Raises UnsafeFile with one line; never leaves a temporary file behind.
    """
    into, mode = _plan(path, what)
    try:
        if into:
            _write_into(path, data)
        else:
            _replace(path, data, mode)
    except OSError as err:
        raise _error(path, what, err.strerror or str(err)) from err


def _error(path: str, what: str, why: str) -> UnsafeFile:
    return UnsafeFile(
        f"cannot write the {what} file {path!r}: {why}",
        f"give {what} a path in a directory you own and can write",
    )


def _plan(path: str, what: str) -> tuple[bool, int]:
    """(write into the existing node, mode for a replacement file)."""
    directory = os.path.dirname(path) or "."
    try:
        parent = os.stat(directory)
    except OSError as err:
        raise _error(path, what, f"its directory: {err.strerror}") from err
    if not stat.S_ISDIR(parent.st_mode):
        raise _error(path, what, f"{directory!r} is not a directory")
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    except OSError as err:
        raise _error(path, what, err.strerror or str(err)) from err
    if found is None or stat.S_ISREG(found.st_mode):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise _error(path, what, f"cannot create files in {directory!r}")
        sticky = parent.st_mode & stat.S_ISVTX and os.geteuid() != 0
        if sticky and found is not None and found.st_uid not in (os.geteuid(), parent.st_uid):
            raise _error(path, what, f"owned by uid {found.st_uid} in a sticky directory")
        # Keep the mode of a file the caller made; a file someone else made gets ours.
        mine = found is not None and found.st_uid == os.geteuid()
        return False, stat.S_IMODE(found.st_mode) if mine and found else PRIVATE_MODE
    if stat.S_ISDIR(found.st_mode):
        raise _error(path, what, "it is a directory")
    if found.st_uid not in (os.geteuid(), parent.st_uid):
        kind = "a symlink" if stat.S_ISLNK(found.st_mode) else "a special file"
        raise _error(path, what, f"{kind} owned by uid {found.st_uid}, neither you nor the "
                     "directory's owner, so it is not followed")
    if stat.S_ISLNK(found.st_mode):
        try:
            target = os.stat(path)
        except OSError as err:
            raise _error(path, what, f"a symlink to nothing usable ({err.strerror})") from err
        if stat.S_ISDIR(target.st_mode):
            raise _error(path, what, "a symlink to a directory")
    return True, PRIVATE_MODE


def _replace(path: str, data: bytes, mode: int) -> None:
    directory, name = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):  # another name on the (unlikely) collision with a planted file
        temporary = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(temporary, flags, PRIVATE_MODE)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(17, "no free temporary name")
    try:
        try:
            if mode != PRIVATE_MODE:
                os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _write_into(path: str, data: bytes) -> None:
    # O_NONBLOCK: a FIFO without a reader fails (ENXIO) at once instead of blocking. O_TRUNC
    # only for a regular file: a terminal or a pipe cannot be truncated.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    import select
    import time

    deadline = time.monotonic() + _WRITE_TIMEOUT_S
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(110, f"nothing read it for {_WRITE_TIMEOUT_S:g} s") from None
            select.select([], [fd], [], left)


def read_shared(path: str, owner: int | None, limit: int) -> bytes:
    """The contents of a regular file in a shared directory, at most `limit` bytes.

    Raises OSError for a symlink (ELOOP), a FIFO or device (no read ever blocks), a file not
    owned by `owner`, or one larger than `limit`.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file")
        if owner is not None and info.st_uid != owner:
            raise OSError(0, f"owned by uid {info.st_uid}, not {owner}")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise OSError(0, f"larger than {limit} bytes")
        return data
    finally:
        os.close(fd)
