"""A run's ticket in a budget tree's queue: its file's contents, read as hostile input.

A ticket is `w-<number>-<pid>-<hex>` while its run waits and `r-...` once admitted (admission.py
renames it); its launcher holds flock(LOCK_EX) on it from creation to its end, so a ticket no
one holds is stale (its launcher died) and readers remove it.
"""

from __future__ import annotations

import os

from sandbox.budgets import files
from sandbox.core.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    import fcntl
else:
    import fcntl  # a C module: cheap

MAGIC = "aero-sandbox-ticket 1"


class Ticket(Frozen):
    """One run's place in a budget tree's queue, as read from its file."""

    number: int
    pid: int
    budget: str  # agents/agent-17
    reserve: int
    started: float
    running: bool
    argv: list[str]
    path: str = ""


def parse(text: str, path: str) -> Ticket | None:
    lines = text.split("\n")
    if not lines or lines[0] != MAGIC:
        return None
    name = os.path.basename(path)
    state, _, rest = name.partition("-")
    number = files.ascii_int(rest.partition("-")[0])
    values: dict[str, str] = {}
    argv: list[str] = []
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key == "arg":
            argv.append(value.replace("\\n", "\n"))
        elif key:
            values[key] = value
    pid = files.ascii_int(values.get("pid", ""))
    reserve = files.ascii_int(values.get("reserve", ""))
    try:
        started = float(values.get("started", ""))
    except ValueError:
        return None
    if number is None or pid is None or reserve is None or state not in ("w", "r"):
        return None
    return Ticket(number, pid, values.get("budget", ""), reserve, started, state == "r", argv, path)


def format_ticket(ticket: Ticket) -> str:
    lines = [
        MAGIC,
        f"pid {ticket.pid}",
        f"budget {ticket.budget}",
        f"reserve {ticket.reserve}",
        f"started {ticket.started:.6f}",
    ]
    lines += ["arg " + arg.replace("\n", "\\n") for arg in ticket.argv]
    return "\n".join(lines) + "\n"


def read_tickets(state: str, remove_stale: bool = True) -> list[Ticket]:
    """Every live ticket of the tree, oldest first; stale ones (no lock held) are removed."""
    found = []
    try:
        names = os.listdir(state)
    except OSError:
        return []
    for name in names:
        if name.startswith(("w-", "r-")):
            ticket = read_live(os.path.join(state, name), remove_stale)
            if ticket is not None:
                found.append(ticket)
    found.sort(key=lambda t: t.number)
    return found


def read_live(path: str, remove_stale: bool) -> Ticket | None:
    """The ticket at `path` if its launcher still holds it; a stale one is removed if asked."""
    opened = files.read_own(path)
    if opened is None:
        return None
    fd, text = opened
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return parse(text, path)  # its launcher holds it: live
    except OSError:
        return None
    finally:
        os.close(fd)
    if remove_stale:
        files.unlink(path)  # no launcher holds it: it died
    return None
