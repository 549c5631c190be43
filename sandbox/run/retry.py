"""Retries of transient resource failures: which commands get them, which failures qualify, how long
to wait. Plain data and small pure functions; the launcher imports this on every run, so nothing
heavy (no `re`: the patterns are byte substrings).

On a crowded host rustc, the linker and Node die with errors that are not bugs: a thread or a
process could not be created (EAGAIN, "Resource temporarily unavailable") because the user's
process limit or the machine was momentarily full. Waiting and running again helps; a compile
error or a failing test never matches these patterns and is never retried.
"""

from __future__ import annotations

import os

from sandbox.core.commandline import ATTEMPTS_ENV, RETRIED_PROGRAMS, program
from sandbox.core.errors import UsageError
from sandbox.core.limits import is_ascii_digits
from sandbox.core.result import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

DEFAULT_ATTEMPTS = 3  # for RETRIED_PROGRAMS; every other command runs once unless --attempts
BACKOFF_ENV = "AERO_RETRY_BACKOFF_S"
DEFAULT_BACKOFF_S = 4.0  # first wait ~4 s, then ~8, ~16, ~32, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 60.0
# How much of the end of each output stream is kept and searched (per stream, per attempt).
TAIL_BYTES = 64 * 1024

# (name, substrings that must all appear in the same stream's tail). Each is a failure to
# create a thread or a process, never a verdict on the code being built or tested.
TRANSIENT_PATTERNS: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    # rustc: "failed to spawn helper thread: Os { code: 11, kind: WouldBlock, ... }"
    ("rustc could not spawn a helper thread", (b"failed to spawn helper thread",)),
    ("rustc could not spawn a work thread", (b"failed to spawn work thread",)),
    # rustc (ctrlc crate): "Unable to install ctrlc handler: System(WouldBlock)"
    ("rustc could not install its ctrl-c handler", (b"Unable to install ctrlc handler",)),
    # rustc ICE: "thread 'rustc' panicked at ... Os { code: 11, kind: WouldBlock, ... }"
    ("rustc panicked on EAGAIN", (b"thread 'rustc' panicked", b"kind: WouldBlock")),
    # Any Rust tool: std's Display of EAGAIN.
    ("EAGAIN (os error 11)", (b"Resource temporarily unavailable (os error 11)",)),
    # bash retries fork itself and says so; it gives up with the second form.
    ("fork failed with EAGAIN", (b"fork: retry: Resource temporarily unavailable",)),
    ("fork failed with EAGAIN", (b"fork: Resource temporarily unavailable",)),
    # "could not exec the linker `cc`" is transient only with EAGAIN: ENOENT (no linker
    # installed) would fail the same way every time.
    (
        "could not exec the linker (EAGAIN)",
        (b"could not exec the linker", b"Resource temporarily unavailable"),
    ),
    # Node/libuv: "Assertion `(0) == (uv_thread_create(...))' failed" when no thread can start.
    ("node could not create a thread", (b"uv_thread_create",)),
)

BUDGET_OOM_RETRY = "budget_oom: the kernel's victim when its budget ran out"

# Endings that a person or a supervisor caused: never retried, whatever the output says.
# (SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGPIPE, SIGTERM; as a shell reports them: 128+N.)
_STOP_SIGNALS = frozenset({1, 2, 3, 9, 13, 15})


def parse_attempts(text: str, what: str) -> int:
    """A whole number of attempts; 0 is taken as 1 (old safe-run.sh users disabled with 0 or 1)."""
    raw = text.strip()
    if not is_ascii_digits(raw) or int(raw) > 100:
        raise UsageError(
            f"invalid {what} value {text!r}: expected a whole number of attempts, 1 to 100 "
            "(1 runs the command once, without retries)"
        )
    return max(1, int(raw))


def attempts(argv: Sequence[str], option: str | None, environ: Mapping[str, str]) -> int:
    """--attempts for any command; else, for the build/test tools only, the old environment
    variable or the default of 3; every other command runs once."""
    if option is not None:
        return parse_attempts(option, "--attempts")
    if program(argv) not in RETRIED_PROGRAMS:
        return 1
    env = environ.get(ATTEMPTS_ENV, "").strip()
    return parse_attempts(env, ATTEMPTS_ENV) if env else DEFAULT_ATTEMPTS


def backoff_base(environ: Mapping[str, str]) -> float:
    text = environ.get(BACKOFF_ENV, "").strip()
    if not text:
        return DEFAULT_BACKOFF_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_BACKOFF_S:
        raise UsageError(
            f"invalid {BACKOFF_ENV} value {text!r}: expected seconds from 0 to {MAX_BACKOFF_S:g}"
        )
    return value


def backoff(attempt: int, base: float, jitter: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base * 2^(attempt-1),
    times a random factor in [0.5, 1.5) so that agents that failed together do not retry together.
    """
    if jitter is None:
        jitter = int.from_bytes(os.urandom(2), "little") / 65536
    return min(MAX_BACKOFF_S, base * 2.0 ** (attempt - 1)) * (0.5 + jitter)


def transient(tails: Iterable[bytes]) -> str | None:
    """The name of the first transient pattern found in one of the output tails, else None."""
    for name, needles in TRANSIENT_PATTERNS:
        for tail in tails:
            if all(needle in tail for needle in needles):
                return name
    return None


def should_retry(
    reason: str, exit_code: int, signal: int | None, tails: Iterable[bytes]
) -> str | None:
    """Why this failed attempt deserves another (the pattern's name), or None.

    A budget's OOM victim (budget_oom) qualifies: it did nothing wrong. Otherwise only a
    failure of the command itself qualifies: never a timeout, an OOM kill, our own --pids
    limit (it would hit it again), a launcher error, or a signal a person or supervisor sent.
    """
    if reason == Reason.BUDGET_OOM:
        # Killed because the budget it shares ran out, not for its own use: run it again.
        return BUDGET_OOM_RETRY
    if exit_code == 0 or reason not in (Reason.EXITED, Reason.SIGNALED):
        return None
    if signal in _STOP_SIGNALS or (signal is None and exit_code - 128 in _STOP_SIGNALS):
        return None
    return transient(tails)
