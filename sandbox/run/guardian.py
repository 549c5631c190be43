"""The guardian: a forked process that cleans up after a launcher that died without doing so.

It is forked before the command, holds none of the caller's pipes, and sleeps until the
launcher exits (the kernel closes the pipe's write end however it exits, SIGKILL included).
If the launcher had not written `d` (cleaned up itself) by then, the guardian calls
backend.guardian_cleanup() and removes the registry entry.
"""

from __future__ import annotations

import os
import select

from sandbox.core import linux
from sandbox.registry import store as registry

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandbox.backends.protocol import Backend


class Guardian:
    """A forked process that cleans up after a launcher that died without doing so.

    It waits for the launcher to close the write end of a pipe, which the kernel does when the
    launcher exits, however it exits; a `d` in the pipe then says it cleaned up itself.
    """

    def __init__(
        self, backend: Backend, entry: registry.Entry | None = None, close: list[int] | None = None
    ) -> None:
        read_end, self._write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the guardian
            try:
                for fd in [self._write_end, *(close or ())]:
                    os.close(fd)
                linux.detach_from_caller()
                # Polling for no event still returns on POLLHUP (all write ends closed), but a
                # write does not wake us: release() costs the launcher no context switch.
                poller = select.poll()
                poller.register(read_end, 0)
                poller.poll()
                if os.read(read_end, 1) != b"d":
                    try:
                        backend.guardian_cleanup()
                    finally:
                        if entry is not None:
                            registry.discard(entry.path)
                # What dead launchers left in the registry: after our launcher is gone, so it
                # costs no run any time (that gc's cgroups is part of backend.remove()).
                registry.sweep_beside(entry)
            finally:
                os._exit(0)
        os.close(read_end)

    def release(self) -> str | None:
        """The launcher cleaned up itself: the guardian may go when the launcher exits.
        Returns what went wrong, if the guardian died before (killed from inside the sandbox:
        the pipe has no reader, EPIPE).

        Only a byte in the pipe, which wakes nobody: waking the guardian now, to exit, would
        let it (and on a busy host, others) take the CPU before we report. The write end stays
        open (close-on-exec, so no command holds it) until we exit; then it reads the byte and
        exits, and init (or the nearest subreaper) reaps it.
        """
        problem = None
        try:
            os.write(self._write_end, b"d")
        except BrokenPipeError:
            problem = (
                f"the guardian (pid {self.pid}) died during the run, so nothing would have "
                "cleaned up had the launcher died too (was it killed from inside the sandbox?)"
            )
        return problem
