"""Relaying a command's stderr through the launcher, for runs that may be retried.

A retry needs to know what the failed attempt printed, and every transient failure it looks for
(retry.TRANSIENT_PATTERNS: rustc, bash, libuv, std's EAGAIN message) is printed on stderr. So
(only when --attempts allows more than one attempt) the command's stderr is a pipe or a
pseudo-terminal that the launcher reads and copies, byte for byte and as it arrives, to the
launcher's own stderr. stdout stays the caller's own file, untouched, with one exception: when
stdout and stderr are one file, pipe or terminal (`2>&1`, or both on the same terminal), they
share the relay's channel, since copying only stderr would let stdout overtake it; the
interleaving is then the one the command wrote. The normal path (one attempt) never comes here:
the child inherits the launcher's stdio untouched.

    start()   fd 2 of the launcher (and fd 1 with it when both are one file) is pointed at a new
              pipe (a pty when the original is a terminal, so the command still sees a TTY);
              the child inherits it through fork and exec, stdin stays as it is
    wanted()  / ready()   called from the supervisor's poll loop: read what the command wrote,
              write it on to the original output without ever blocking the loop (timeouts and
              signals keep working while the reader of our output is slow)
    finish()  after the sandbox is torn down: put the fds back, read to EOF, write the rest

Memory stays bounded: at most PENDING_MAX bytes wait to be written (beyond that we stop reading
and the command blocks on a full pipe, as it would on the original output), and only the last
retry.TAIL_BYTES are kept for the transient-failure patterns. When the reader of our output goes
away (`2>&1 | head`), our end is closed, so the command gets SIGPIPE as it would writing there
itself.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import time

from sandbox.run.retry import TAIL_BYTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any
else:
    import _signal

CHUNK = 64 * 1024
PENDING_MAX = 256 * 1024
DRAIN_S = 5.0  # after tear-down every writer is dead: EOF comes at once; this is a safety bound


class _Channel:
    """One output of the command (stdout, stderr, or both) and the original it is copied to."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets  # our fds it replaces: [1], [2] or [1, 2]
        original = targets[0]
        self.pty = os.isatty(original)
        if self.pty:
            self.read_fd, child_end = os.openpty()
            _raw_output(child_end)
        else:
            self.read_fd, child_end = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.writer, self.nonblocking = _writer(original)
        self.saved = {fd: os.dup(fd) for fd in targets}  # the originals, close-on-exec
        for fd in targets:
            os.dup2(child_end, fd)  # inheritable: the command gets it as its stdout/stderr
        os.close(child_end)
        self.pending = bytearray()
        self.tail = bytearray()
        self.eof = False
        self.discard = False  # the original output is gone: read, keep the tail, write nothing
        if self.pty:
            self.copy_window_size()

    def copy_window_size(self) -> None:
        import fcntl
        import termios

        try:
            size = fcntl.ioctl(self.saved[self.targets[0]], termios.TIOCGWINSZ, bytes(8))
            fcntl.ioctl(self.read_fd, termios.TIOCSWINSZ, size)  # the master sets the pair's
        except OSError:
            pass  # not a window (a serial line): the pty keeps 0x0, like the original

    def fill(self) -> None:
        """Read what is there (non-blocking), up to PENDING_MAX waiting bytes."""
        while not self.eof and len(self.pending) < PENDING_MAX:
            try:
                data = os.read(self.read_fd, CHUNK)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.EIO:  # a pty master reads EIO once every slave is closed
                    raise
                data = b""
            if not data:
                self.eof = True
                return
            if not self.discard:
                self.pending += data
            self.tail += data
            if len(self.tail) > TAIL_BYTES:
                del self.tail[:-TAIL_BYTES]

    def flush(self) -> None:
        while self.pending:
            try:
                written = os.write(self.writer, self.pending[:CHUNK])
            except BlockingIOError:
                return
            except OSError:
                # The reader of our output is gone (EPIPE) or the terminal hung up (EIO). Close
                # our end, as if the command wrote there itself: its next write gets SIGPIPE
                # (EIO on a pty), as `cmd | head` would without us. The guardian does not hold
                # a copy (Guardian closes launcher_fds()).
                self.pending.clear()
                self.discard = True
                self.eof = True
                os.close(self.read_fd)
                self.read_fd = -1
                return
            del self.pending[:written]

    def restore(self) -> None:
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.saved = {}
        os.set_blocking(self.writer, True)  # the run is over: no loop left to keep responsive

    def close(self) -> None:
        if self.read_fd >= 0:
            os.close(self.read_fd)
        os.close(self.writer)


class Relay:
    """The supervisor's output hook for one attempt (see the module docstring)."""

    def __init__(self) -> None:
        """Look at fds 1 and 2 now, before the backend opens fds of its own: when the launcher
        started with one closed, a new fd (an eventfd) may take its number later."""
        self.channels: list[_Channel] = []
        self._old_winch: Any = None
        self._tails: list[bytes] = []
        self._groups: list[list[int]] = []
        identities = {}
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
                # Close-on-exec: closed when we started, held by cli.py's /dev/null placeholder
                # (an fd inherited from our caller cannot be close-on-exec: it came through exec).
                if not os.get_inheritable(fd):
                    continue
            except OSError:
                continue  # closed: the command gets it closed too
            identities[fd] = (st.st_dev, st.st_ino)
        if 2 in identities:
            # stdout joins only when it is the same file: alone, it stays the caller's own.
            self._groups.append([1, 2] if identities.get(1) == identities[2] else [2])

    def start(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: started with that fd closed
                stream.flush()
        try:
            for targets in self._groups:
                self.channels.append(_Channel(targets))
        except BaseException:
            self.finish()
            raise
        if any(channel.pty for channel in self.channels):
            self._old_winch = _signal.signal(_signal.SIGWINCH, self._window_changed)

    def _window_changed(self, _signo: int, _frame: object) -> None:
        for channel in self.channels:
            if channel.pty and channel.saved:
                channel.copy_window_size()

    # -- the supervisor's poll loop -------------------------------------------------------------
    def wanted(self) -> dict[int, int]:
        """fd -> poll events to wait for now."""
        fds = {}
        for channel in self.channels:
            if not channel.eof and len(channel.pending) < PENDING_MAX:
                fds[channel.read_fd] = select.POLLIN
            if channel.pending and channel.nonblocking:
                fds[channel.writer] = select.POLLOUT
        return fds

    def ready(self, fd: int) -> None:
        for channel in self.channels:
            if fd == channel.read_fd:
                channel.fill()
                channel.flush()
            elif fd == channel.writer:
                channel.flush()

    # -- after the run --------------------------------------------------------------------------
    def finish(self) -> None:
        """Give the fds back, copy the rest of the output (to EOF, bounded), close."""
        if self._old_winch is not None:
            _signal.signal(_signal.SIGWINCH, self._old_winch)
            self._old_winch = None
        for channel in self.channels:
            if channel.saved:
                channel.restore()
        deadline = time.monotonic() + DRAIN_S
        try:
            while reading := [channel for channel in self.channels if not channel.eof]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                poller = select.poll()
                for channel in reading:
                    poller.register(channel.read_fd, select.POLLIN)
                poller.poll(left * 1000)
                for channel in reading:
                    channel.fill()
                    channel.flush()  # blocking now: waits for a slow reader, loses nothing
            for channel in self.channels:
                channel.flush()
        finally:
            self._tails = [bytes(channel.tail) for channel in self.channels]
            for channel in self.channels:
                channel.close()
            self.channels = []

    def launcher_fds(self) -> list[int]:
        """The fds only the launcher may hold: a forked helper (the guardian) closes them."""
        fds = []
        for channel in self.channels:
            fds += [channel.read_fd, channel.writer, *channel.saved.values()]
        return [fd for fd in fds if fd >= 0]

    def tails(self) -> list[bytes]:
        """The last retry.TAIL_BYTES of the relayed output (stderr, with stdout when they are one
        file) of the finished attempt."""
        return self._tails


def _raw_output(fd: int) -> None:
    """No output processing on the pty (ONLCR would turn \\n into \\r\\n): the command's bytes
    reach the real terminal unchanged, and the real terminal processes them as usual."""
    import termios

    attributes = termios.tcgetattr(fd)
    attributes[1] &= ~termios.OPOST
    termios.tcsetattr(fd, termios.TCSANOW, attributes)


def _writer(fd: int) -> tuple[int, bool]:
    """A descriptor to copy the output to, and whether it is non-blocking.

    O_NONBLOCK belongs to the open file description, which the caller's shell shares: setting it
    on fd 1 itself would break them. A pipe or a terminal can be opened again through /proc,
    which gives a description of our own; a regular file never blocks, and a socket cannot be
    reopened (those are written blocking).
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or os.isatty(fd):
        try:
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            return os.open(f"/proc/self/fd/{fd}", flags), True
        except OSError:
            pass
    return os.dup(fd), False
