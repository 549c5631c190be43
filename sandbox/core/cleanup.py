"""One owner for what a run creates: clean-up callbacks run in reverse order on every path.

contextlib.ExitStack's core, without its import: contextlib and functools cost ~5 ms of
start-up on the run path, where this is the only thing needed from them.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class Cleanup:
    def __init__(self) -> None:
        self._callbacks: list[Callable[[], object]] = []

    def push(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def close(self) -> list[Exception]:
        """Run every callback, last pushed first, even when one fails; return the failures (the
        caller reports them: a clean-up failure never replaces what the run itself ended with)."""
        failures: list[Exception] = []
        while self._callbacks:
            try:
                self._callbacks.pop()()
            except Exception as err:  # noqa: BLE001 - collected for the caller to report
                failures.append(err)
        return failures
