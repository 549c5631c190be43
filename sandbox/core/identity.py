"""How aero-sandbox names what it makes, and whether the launcher that made it still lives.

Every backend names its sandbox `aero-sandbox-<launcher pid>-<random>` (a cgroup, a scope), so
that `list`, `gc` and the start-up sweep can tell a live launcher's sandbox from a dead one's.
"""

from __future__ import annotations

import os

PREFIX = "aero-sandbox-"


def sandbox_name() -> str:
    return f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}"


def launcher_pid(name: str) -> int | None:
    """The launcher pid in `aero-sandbox-<pid>-<id>`, or None for other names."""
    if not name.startswith(PREFIX):
        return None
    pid, _, ident = name[len(PREFIX) :].partition("-")
    return int(pid) if pid.isascii() and pid.isdigit() and ident else None


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (it may be another user's: EPERM means yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
