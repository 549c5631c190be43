"""A doctor finding: a status, one line in plain words, and the exact remedy when something is
missing."""

from __future__ import annotations

from sandbox.core.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Check(Frozen):
    name: str
    status: str  # ok | info | warn | error
    summary: str
    remedy: str | None = None
    details: dict[str, Any] = {}  # noqa: RUF012 - shared default, never mutated


class Diagnosis(Frozen):
    checks: list[Check]
    memory_enforced: bool
    exit_code: int

    def as_json(self) -> dict[str, Any]:
        return {
            "checks": [check.as_dict() for check in self.checks],
            "memory_enforced": self.memory_enforced,
            "exit_code": self.exit_code,
        }


def read(path: str) -> str:
    """A small text file (/proc, .nvmrc), or "" when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
