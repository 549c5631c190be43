"""What a run may use, and the parsers for the forms users type (`12G`, `50%`, `1h30m`)."""

from __future__ import annotations

import os

from sandbox.core.errors import UsageError
from sandbox.core.frozen import Frozen

# Limits.address_space_bytes for `--as unlimited`: no cap at all. None means --as was not given,
# and the rlimit backend chooses one per command (fallback/address_space.py).
AS_UNLIMITED = -1

DEFAULT_MEMORY = "12G"
# Tasks (threads included). Chromium under Playwright uses a few hundred; `cargo build -j64`
# about 64 rustc x up to 16 threads, ~1,100. 4096 leaves room for both and still stops a fork
# bomb at an eighth of the default pid_max (32768) and a fraction of threads-max.
DEFAULT_PIDS = 4096
DEFAULT_KILL_AFTER_S = 10.0
# End a sandbox whose tasks were all stalled on memory (PSI "full") this share of this window:
# see sandbox/cgroups/pressure.py and docs/pressure.md for the measurements behind it.
DEFAULT_OOM_PRESSURE = "50%/10s"

_UNLIMITED = ("unlimited", "infinity", "max")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

SIZE_FORMS = (
    "bytes, K/M/G/T with optional i/iB/B (binary units: 1G = 2^30), N% of RAM, or unlimited"
)
DURATION_FORMS = "seconds (90, 2.5) or s/m/h units combined (1.5m, 10m, 1h30m); 0 means none"
PIDS_FORMS = "a positive whole number of tasks, or unlimited"
PRESSURE_FORMS = "PERCENT/DURATION (50%/10s, 80%/1m; 1-99%, at least 1s), or off"


class Limits(Frozen):
    """None means no limit. `kill_after_s` is the grace between SIGTERM and SIGKILL.
    `oom_pressure_pct` over `oom_pressure_window_s`: the memory-pressure kill (None: off)."""

    __slots__ = (
        "memory_bytes",
        "pids",
        "timeout_s",
        "kill_after_s",
        "address_space_bytes",
        "oom_pressure_pct",
        "oom_pressure_window_s",
    )
    memory_bytes: int | None
    pids: int | None
    timeout_s: float | None
    kill_after_s: float
    address_space_bytes: int | None
    oom_pressure_pct: float | None
    oom_pressure_window_s: float

    def __init__(
        self,
        memory_bytes: int | None,
        pids: int | None,
        timeout_s: float | None = None,
        kill_after_s: float = DEFAULT_KILL_AFTER_S,
        address_space_bytes: int | None = None,
        oom_pressure_pct: float | None = None,
        oom_pressure_window_s: float = 10.0,
    ) -> None:
        self._init(
            memory_bytes=memory_bytes,
            pids=pids,
            timeout_s=timeout_s,
            kill_after_s=kill_after_s,
            address_space_bytes=address_space_bytes,
            oom_pressure_pct=oom_pressure_pct,
            oom_pressure_window_s=oom_pressure_window_s,
        )


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_size(text: str, what: str = "--mem") -> int | None:
    """Bytes, or None for unlimited. Raises UsageError naming the value and the accepted forms."""
    raw = text.strip().lower()
    if raw in _UNLIMITED:
        return None
    value: float | None
    if raw.endswith("%"):
        value = _number(raw[:-1])
        if value is None or not 0 < value <= 100:
            raise UsageError(f"invalid {what} value {text!r}: expected {SIZE_FORMS}")
        return int(physical_memory() * value / 100)
    body = raw.removesuffix("b")
    binary_marker = body.endswith("i")  # "Gi", "GiB": only valid after a unit letter
    body = body.removesuffix("i")
    unit = body[-1:] if body[-1:] in ("k", "m", "g", "t") else ""
    value = _number(body[: len(body) - len(unit)])
    if binary_marker and not unit:
        value = None
    if value is None or value <= 0 or (unit == "" and value != int(value)):
        raise UsageError(f"invalid {what} value {text!r}: expected {SIZE_FORMS}")
    return int(value * _SIZE_UNITS[unit])


def parse_duration(text: str, what: str = "--timeout") -> float | None:
    """Seconds, or None for 0 (no timeout)."""
    raw = text.strip().lower()
    error = UsageError(f"invalid {what} value {text!r}: expected {DURATION_FORMS}")
    plain = _number(raw)
    if plain is not None:
        if plain < 0:
            raise error
        return plain or None
    total, number, seen = 0.0, "", ""
    for char in raw:
        if char.isdigit() or char == ".":
            number += char
        elif char in _DURATION_UNITS and number and char not in seen:
            value = _number(number)
            if value is None:
                raise error
            total += value * _DURATION_UNITS[char]
            number, seen = "", seen + char
        else:
            raise error
    if number or not seen:
        raise error
    return total or None


def parse_grace(text: str, what: str = "--kill-after") -> float:
    """Like a duration, but 0 is a real value: SIGKILL at once, no grace."""
    return parse_duration(text, what) or 0.0


def parse_pids(text: str, what: str = "--pids") -> int | None:
    raw = text.strip().lower()
    if raw in _UNLIMITED:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise UsageError(f"invalid {what} value {text!r}: expected {PIDS_FORMS}")
    return int(raw)


def parse_pressure(text: str, what: str = "--oom-pressure") -> tuple[float | None, float]:
    """(percent, window seconds); percent None for off."""
    raw = text.strip().lower()
    if raw in ("off", "none", "0"):
        return None, 10.0
    share, slash, window = raw.partition("/")
    error = UsageError(f"invalid {what} value {text!r}: expected {PRESSURE_FORMS}")
    pct = _number(share.removesuffix("%"))
    if not slash or pct is None or not 1 <= pct <= 99:
        raise error
    seconds = parse_duration(window, what) if window.strip() else None
    if seconds is None or seconds < 1:
        raise error
    return pct, seconds


def format_size(value: int | None) -> str:
    if value is None:
        return "unlimited"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
