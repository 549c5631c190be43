"""One small file per live sandbox, so `aero-sandbox list` sees every backend's sandboxes (a
cgroup has no command line; the rlimit backend has no cgroup) and `gc` can tell what a crashed
launcher left from a live run.

Where: /run/aero-sandbox for root; $XDG_RUNTIME_DIR/aero-sandbox, else /tmp/aero-sandbox-<uid>,
for other users. One file per run, named `<launcher pid>-<random hex>`.

Liveness: the launcher holds a POSIX record lock (lockf) on its file for the whole run. The
kernel drops it when the launcher exits or is killed, so readers never trust a pid (pids are
reused, and a launcher in a pid namespace has a pid the reader cannot see). Such locks are not
inherited across fork: neither the guardian nor the child holds it.

Format: the run path must stay cheap (no json import), so one `key value` per line, values with
backslash and newline escaped; `arg` repeats, once per argv element:

    aero-sandbox-registry 1
    pid 4242
    started 1712345678.250131
    backend cgroup
    memory_bytes 1073741824
    pids 4096
    timeout_s
    sandbox.cgroups.memory /sys/fs/cgroup/memory/aero-sandbox-4242-1a2b3c
    sandbox.cgroup_mode hybrid
    arg npm
    arg test
    guardian 4243
"""

from __future__ import annotations

import os
import stat
import time

from sandbox.core import identity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandbox.backends.protocol import Backend
    from sandbox.core.limits import Limits

MAGIC = "aero-sandbox-registry 1"
ROOT_DIRECTORY = "/run/aero-sandbox"


class Entry:
    """The launcher's own registry file, open and locked for the run."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd


def own_directory() -> str:
    """Where this user's launchers register."""
    uid = os.geteuid()
    if uid == 0 and os.path.isdir("/run"):
        return ROOT_DIRECTORY
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if uid != 0 and runtime.startswith("/") and os.path.isdir(runtime):
        return os.path.join(runtime, "aero-sandbox")
    return f"/tmp/aero-sandbox-{uid}"


def _usable_directory() -> str | None:
    """Our directory, created if needed; /tmp when /run is not writable (a read-only container
    root). In a shared /tmp, only one that is ours and not a symlink is trusted."""
    for directory in dict.fromkeys((own_directory(), f"/tmp/aero-sandbox-{os.geteuid()}")):
        try:
            try:
                os.mkdir(directory, 0o755 if directory == ROOT_DIRECTORY else 0o700)
            except FileExistsError:
                pass
            if not directory.startswith("/tmp/"):
                return directory
            info = os.lstat(directory)
        except OSError:
            continue
        if (info.st_mode & 0o170000) == 0o040000 and info.st_uid == os.geteuid():
            return directory
    return None


# -- the launcher's side: cheap, no imports ---------------------------------------------------
def register(backend: Backend, argv: list[str], limits: Limits) -> Entry | None:
    """Write and lock this run's entry. Never fails a run: None when the registry is unusable."""
    directory = _usable_directory()
    if directory is None:
        return None
    try:
        name = f"{os.getpid()}-{os.urandom(3).hex()}"
        path = os.path.join(directory, name)
        temporary = os.path.join(directory, "." + name)  # readers skip dot files
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        os.lockf(fd, os.F_TLOCK, 0)
        data = _format(backend, argv, limits).encode("utf-8", "surrogateescape")
        while data:
            data = data[os.write(fd, data) :]
        os.rename(temporary, path)  # the lock stays with the file
    except Exception:  # noqa: BLE001 - observers' data: a run never fails for it
        os.close(fd)
        _unlink(temporary)
        return None
    return Entry(path, fd)


def _format(backend: Backend, argv: list[str], limits: Limits) -> str:
    lines = [
        MAGIC,
        _line("pid", os.getpid()),
        _line("started", f"{time.time():.6f}"),
        _line("backend", backend.name),
        _line("memory_bytes", limits.memory_bytes),
        _line("pids", limits.pids),
        _line("timeout_s", limits.timeout_s),
    ]
    for key, value in backend.describe().as_report().items():
        if isinstance(value, dict):
            lines += [_line(f"sandbox.{key}.{k}", v) for k, v in value.items() if v is not None]
        elif isinstance(value, (str, int, float)):
            lines.append(_line(f"sandbox.{key}", value))
    lines += [_line("arg", arg) for arg in argv]
    return "\n".join(lines) + "\n"


def _line(key: str, value: object) -> str:
    text = "" if value is None else str(value)
    if "\\" in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"{key} {text}"


def note_guardian(entry: Entry | None, pid: int) -> None:
    """Record the guardian's pid, so `list` can leave it out of a process tree's memory."""
    if entry is not None:
        try:
            os.write(entry.fd, _line("guardian", pid).encode() + b"\n")
        except OSError:
            pass


def sweep_beside(entry_path: str | None) -> None:
    """sweep() the directory of this run's entry (at `entry_path`)."""
    if entry_path is not None:
        sweep(os.path.dirname(entry_path))


def discard(path: str) -> None:
    """The guardian's cleanup after the launcher died: the entry goes with the sandbox."""
    _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the readers' side (list, gc) ---------------------------------------------------------------
# A registry directory is other users' input to root's `list` and `gc`: an entry is read only
# from a directory owned by the uid it claims (the uid in its name; root's in /run), only when
# that uid owns the entry too, never through a symlink, never from a FIFO, and never more than:
MAX_ENTRY_BYTES = 1 << 20  # a command line near ARG_MAX (2 MiB) is cut short here, not read


class BadEntry(Exception):
    """An entry that is unsafe to read or malformed: skipped, with this as the note."""


def is_live(path: str) -> bool:
    """A launcher still holds the entry's lock."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as live, never remove it
    try:
        os.lockf(fd, os.F_TEST, 0)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(directory: str) -> list[str]:
    """Remove entries whose launcher died and whose sandbox is gone too; return their paths.

    Runs 1 s into a run and after one (a forked guardian's, once its launcher exited; a spawned
    guardian's only when it cleans up), so it stays cheap: one kill(0) per entry, and only the
    entries whose launcher pid is gone in our pid namespace are opened (lock checked, cgroups
    looked for). An entry whose cgroups are still there is left for `aero-sandbox gc`, which removes
    both. A pid alive here may still be a dead launcher's (pid reuse, another pid namespace):
    gc checks every entry's lock.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name.lstrip(".").partition("-")[0]
        if not (pid.isascii() and pid.isdigit()) or identity.pid_exists(int(pid)):
            continue
        path = os.path.join(directory, name)
        if is_live(path):
            continue
        try:
            entry: dict[str, Any] | None = load(path, os.geteuid())
        except BadEntry:
            entry = None  # a write that never finished, or not ours to judge: only unlinked
        cgroups = entry["sandbox"].get("cgroups") if entry else None
        if isinstance(cgroups, dict) and any(_maybe_there(str(p)) for p in cgroups.values()):
            continue
        _unlink(path)
        removed.append(path)
    return removed


def _maybe_there(cgroup: str) -> bool:
    """The cgroup exists, or we cannot see where it would be: a launcher in a container with
    its own cgroup mounts shares /run with the host but not the host's cgroup paths."""
    return os.path.isdir(cgroup) or not os.path.isdir(os.path.dirname(cgroup))


def directories() -> list[tuple[str, int]]:
    """Every registry directory this user may read, with the uid whose entries it holds.

    Root sees all users' directories. A directory counts only when it is a real directory (not
    a symlink) owned by that uid and writable by nobody else: /tmp/aero-sandbox-evil, or a
    /tmp/aero-sandbox-0 that uid 4242 made, is nobody's registry.
    """
    me = os.geteuid()
    candidates = [(own_directory(), me), (ROOT_DIRECTORY, 0)]
    try:
        candidates += [
            (f"/run/user/{name}/aero-sandbox", int(name))
            for name in os.listdir("/run/user")
            if name.isascii() and name.isdigit()
        ]
    except OSError:
        pass
    try:
        for name in os.listdir("/tmp"):
            number = name[len("aero-sandbox-") :]
            if name.startswith("aero-sandbox-") and number.isascii() and number.isdigit():
                candidates.append((f"/tmp/{name}", int(number)))
    except OSError:
        pass
    found: list[tuple[str, int]] = []
    for directory, uid in candidates:
        if (directory, uid) not in found and _trusted_directory(directory, uid):
            found.append((directory, uid))
    return found


def _trusted_directory(directory: str, uid: int) -> bool:
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == uid
        and not info.st_mode & 0o022
        and os.access(directory, os.R_OK | os.X_OK)
    )


def paths(directory: str) -> list[str]:
    """The complete entries of a directory (not the ones still being written)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if n[:1].isascii() and n[:1].isdigit()]


def read(path: str, owner: int | None = None) -> dict[str, Any] | None:
    """An entry as a dict (argv, limits, sandbox description...), or None if unusable."""
    try:
        return load(path, owner)
    except BadEntry:
        return None


def load(path: str, owner: int | None) -> dict[str, Any]:
    """An entry as a dict; raises BadEntry (why, in one line) for an unsafe or malformed one.

    `owner`: the uid that must own the file (None: anyone's, for the caller's own directory).
    """
    from sandbox.core.safefile import read_shared

    try:
        data = read_shared(path, owner, MAX_ENTRY_BYTES)
    except OSError as err:
        raise BadEntry(err.strerror or str(err)) from err
    return _parse(data.decode("utf-8", "surrogateescape"), path)


def parse(text: str, path: str = "") -> dict[str, Any] | None:
    try:
        return _parse(text, path)
    except BadEntry:
        return None


def _parse(text: str, path: str) -> dict[str, Any]:
    lines = text.split("\n")  # not splitlines(): it also splits on \r, \f, \x1c...
    if not lines or lines[0] != MAGIC:
        raise BadEntry("not an aero-sandbox registry entry")
    entry: dict[str, Any] = {"path": path, "argv": [], "limits": {}, "sandbox": {}}
    for line in lines[1:]:
        if not line:
            continue
        key, _, raw = line.partition(" ")
        value = _unescape(raw) if "\\" in raw else raw
        if key == "arg":
            entry["argv"].append(value)
        elif key in ("pid", "guardian"):
            entry[key] = _whole(key, value)
        elif key == "started":
            entry[key] = _seconds(key, value)
        elif key in ("memory_bytes", "pids"):
            entry["limits"][key] = _whole(key, value) if value else None
        elif key == "timeout_s":
            entry["limits"][key] = _seconds(key, value) if value else None
        elif key.startswith("sandbox."):
            where, name = entry["sandbox"], key[len("sandbox.") :]
            if "." in name:
                group, _, name = name.partition(".")
                where = where.setdefault(group, {})
                if not isinstance(where, dict):
                    raise BadEntry(f"{key} under a plain value")
            where[name] = int(value) if value.isascii() and value.isdigit() else value
        else:
            entry[key] = value
    if "pid" not in entry or "started" not in entry:
        raise BadEntry("not a complete entry (no pid or start time)")
    return entry


def _whole(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise BadEntry(f"malformed {key} {value!r}")
    return int(value)


def _seconds(key: str, value: str) -> float:
    number = None
    if value.isascii() and "_" not in value:
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not 0 <= number < 1e12:  # also refuses nan and inf
        raise BadEntry(f"malformed {key} {value!r}")
    return number


def _unescape(text: str) -> str:
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            index += 1
            char = "\n" if text[index] == "n" else text[index]
        out.append(char)
        index += 1
    return "".join(out)
