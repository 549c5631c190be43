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
# A limit below one page cannot hold a process at all (and `--as` 0 would read as "no cap").
MIN_SIZE = 4096
MAX_SIZE = (1 << 63) - 1  # the kernel's counters are signed 64-bit
# poll() takes a C int of milliseconds (24.8 days) and monotonic deadlines lose precision far
# out: a year is longer than any build, and a typo (1e300) is an error, not "forever".
MAX_DURATION_S = 366 * 86400.0
# The kernel's PID_MAX_LIMIT on 64-bit: pids.max accepts nothing larger.
MAX_PIDS = 1 << 22
PRESSURE_FORMS = "PERCENT/DURATION (50%/10s, 80%/1m; 1-99%, at least 1s), or off"


class Limits(Frozen):
    """None means no limit. `kill_after_s` is the grace between SIGTERM and SIGKILL.
    `oom_pressure_pct` over `oom_pressure_window_s`: the memory-pressure kill (None: off)."""

    memory_bytes: int | None
    pids: int | None
    timeout_s: float | None = None
    kill_after_s: float = DEFAULT_KILL_AFTER_S
    address_space_bytes: int | None = None
    protected: bool = False  # --protect-limits: a root command cannot undo them (core/protect.py)
    oom_pressure_pct: float | None = None  # --oom-pressure: off (None) or the threshold
    oom_pressure_window_s: float = 10.0


def is_ascii_digits(text: str) -> bool:
    """str.isdigit() also takes "²" and "١", which int() then refuses: ASCII digits only."""
    return text.isascii() and text.isdigit()


def smaller(first: int | None, second: int | None) -> int | None:
    """The smaller of two limits, None meaning no limit."""
    return second if first is None else first if second is None else min(first, second)


def _number(text: str) -> float | None:
    # float() also takes "1_000", "١٢" and surrounding spaces: plain ASCII forms only.
    if not text.isascii() or "_" in text or text != text.strip():
        return None
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
        return _size_in_range(int(physical_memory() * value / 100), text, what)
    body = raw.removesuffix("b")
    binary_marker = body.endswith("i")  # "Gi", "GiB": only valid after a unit letter
    body = body.removesuffix("i")
    unit = body[-1:] if body[-1:] in ("k", "m", "g", "t") else ""
    value = _number(body[: len(body) - len(unit)])
    if binary_marker and not unit:
        value = None
    if value is None or value <= 0 or (unit == "" and value != int(value)):
        raise UsageError(f"invalid {what} value {text!r}: expected {SIZE_FORMS}")
    return _size_in_range(value * _SIZE_UNITS[unit], text, what)


def _size_in_range(value: float, text: str, what: str) -> int:
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise UsageError(
            f"invalid {what} value {text!r}: expected at least one page ({MIN_SIZE} bytes) and "
            f"at most 8 EiB, as {SIZE_FORMS}"
        )
    return int(value)


def parse_duration(text: str, what: str = "--timeout") -> float | None:
    """Seconds, or None for 0 (no timeout)."""
    raw = text.strip().lower()
    error = UsageError(f"invalid {what} value {text!r}: expected {DURATION_FORMS}")
    total = _number(raw)
    if total is None:
        total = _duration_with_units(raw, error)
    if total < 0:
        raise error
    if total > MAX_DURATION_S:
        raise UsageError(
            f"invalid {what} value {text!r}: more than a year; expected {DURATION_FORMS}"
        )
    return total or None


def _duration_with_units(raw: str, error: UsageError) -> float:
    total, number, seen = 0.0, "", ""
    for char in raw:
        if is_ascii_digits(char) or char == ".":
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
    return total


def parse_grace(text: str, what: str = "--kill-after") -> float:
    """Like a duration, but 0 is a real value: SIGKILL at once, no grace."""
    return parse_duration(text, what) or 0.0


def parse_pids(text: str, what: str = "--pids") -> int | None:
    raw = text.strip().lower()
    if raw in _UNLIMITED:
        return None
    if not is_ascii_digits(raw) or not 0 < int(raw) <= MAX_PIDS:
        raise UsageError(
            f"invalid {what} value {text!r}: expected {PIDS_FORMS} (at most {MAX_PIDS})"
        )
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


def format_size(value: int | None, compact: bool = False) -> str:
    """`1.5 GiB`, or `1.5G` when compact (table columns); `unlimited` for None."""
    if value is None:
        return "unlimited"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}" if compact else f"{value / size:.1f} {unit}iB"
    return f"{value}B" if compact else f"{value} B"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
