"""Budget names and the value a budget has: what a user types and what the kernel holds.

A budget NAME is segments of `[A-Za-z0-9][A-Za-z0-9_.-]*` joined by `/`: `agents/agent-17` is the
budget `agent-17` inside the budget `agents`, and the caps of both apply (the kernel charges every
level, so the smaller wins). Each level is one cgroup named `aero-budget-<segment>`, so that
`list`, `gc` and a person reading /sys/fs/cgroup recognise what aero-sandbox made.
"""

from __future__ import annotations

from sandbox.core.errors import UsageError
from sandbox.core.frozen import Frozen

PREFIX = "aero-budget-"
NAME_FORMS = (
    "segments of letters, digits and _ . - (not starting with _ . -) joined by /, "
    "such as agents or agents/agent-17"
)
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_REST = _FIRST | frozenset("_.-")
MAX_SEGMENT = 100  # a cgroup directory name must stay well below NAME_MAX (255)
MAX_DEPTH = 8


def parse_name(text: str, what: str = "--budget") -> tuple[str, ...]:
    """The segments of a budget name; UsageError naming the value and the accepted forms."""
    parts = tuple(text.strip().split("/"))
    if len(parts) > MAX_DEPTH or not all(_segment_ok(part) for part in parts):
        raise UsageError(f"invalid {what} value {text!r}: expected {NAME_FORMS}")
    return parts


def _segment_ok(part: str) -> bool:
    return (
        0 < len(part) <= MAX_SEGMENT
        and part[0] in _FIRST
        and all(char in _REST for char in part)
    )


def directory_names(parts: tuple[str, ...]) -> list[str]:
    """The cgroup directory of each level, outermost first."""
    return [PREFIX + part for part in parts]


# Budgets on the systemd backend (budgets/slices.py): a Hierarchy whose `controllers` hold this
# marker has its levels named as systemd slices, not as aero-budget-* directories.
SLICES = "systemd-slices"
SLICE_PREFIX = "aero-"


def slice_names(parts: tuple[str, ...]) -> list[str]:
    """The slice of each level, outermost first: aero-agents.slice,
    aero-agents-agent\\x2d17.slice. A '-' in a slice name is a level to systemd, so a '-' in a
    segment is escaped as systemd-escape does; '_' and '.' are fine as they are."""
    escaped = [part.replace("-", "\\x2d") for part in parts]
    return [SLICE_PREFIX + "-".join(escaped[: i + 1]) + ".slice" for i in range(len(parts))]


def slice_segments(unit: str) -> tuple[str, ...] | None:
    """The budget a slice name of ours stands for, or None for other names."""
    if not (unit.startswith(SLICE_PREFIX) and unit.endswith(".slice")):
        return None
    middle = unit[len(SLICE_PREFIX) : -len(".slice")]
    parts = tuple(part.replace("\\x2d", "-") for part in middle.split("-"))
    if len(parts) > MAX_DEPTH or not all(_segment_ok(part) for part in parts):
        return None
    return parts if slice_names(parts)[-1] == unit else None


def segment_of(directory_name: str) -> str | None:
    """The budget segment a cgroup directory name stands for, or None for other names."""
    if not directory_name.startswith(PREFIX):
        return None
    part = directory_name[len(PREFIX) :]
    return part if _segment_ok(part) else None


def levels(parts: tuple[str, ...]) -> list[str]:
    """Every budget a run in `parts` belongs to, outermost first: agents, agents/agent-17."""
    return ["/".join(parts[: index + 1]) for index in range(len(parts))]


class Caps(Frozen):
    """What a budget level may use in total (None: no cap at this level)."""

    memory_bytes: int | None
    pids: int | None = None


class Level(Frozen):
    """One level of a budget as the kernel has it now."""

    name: str  # agents/agent-17
    memory_dir: str | None  # the level's cgroup in the hierarchy that holds memory
    caps: Caps
    usage_bytes: int | None  # all it is charged, page cache and kernel memory included
    peak_bytes: int | None
    # What its processes hold and cannot give back: anonymous memory and tmpfs (memory.stat).
    # Admission counts this, not usage_bytes: page cache is reclaimed when a run needs the room,
    # and what removed members leave charged (cache, kernel memory) is nobody's and may stay for
    # good: counted, it would hold a reservation of the whole cap back forever.
    held_bytes: int | None = None
