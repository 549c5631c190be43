"""The launcher's own failures. Each carries the remedy; only the CLI turns them into exit 125."""

from __future__ import annotations


class SandboxError(Exception):
    """A failure of the launcher itself (exit 125), with what would fix it."""

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def line(self) -> str:
        return f"{self.message} ({self.remedy})" if self.remedy else self.message


class UsageError(SandboxError):
    """A bad command line or environment value: names the value and the accepted forms."""


class BackendUnavailable(SandboxError):
    """A backend cannot run on this host; `auto` moves on to the next one."""

    def __init__(self, backend: str, message: str, remedy: str | None = None) -> None:
        super().__init__(message, remedy)
        self.backend = backend

    def line(self) -> str:
        return f"{self.backend} backend unavailable: {super().line()}"


class NotAdmitted(Exception):
    """The run never started: its budget's queue timed out, or a signal came while it waited
    (sandbox/budgets/admission.py). Here, not there, so the launcher can catch it without
    importing the budgets on every run."""

    def __init__(self, line: str, signo: int | None = None) -> None:
        super().__init__(line)
        self.line = line
        self.signo = signo
