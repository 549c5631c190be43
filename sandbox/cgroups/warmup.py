"""Start the RCU grace period that moving the child into its cgroups will wait for, at start-up.

A write to a cgroup.procs file takes cgroup_threadgroup_rwsem, a per-cpu rwsem, for writing.
The first writer after a quiet spell waits for an RCU grace period (rcu_sync_enter(): 5-15 ms
on the development VM, as long as Python's start-up); a writer that comes while it waits, or
until about one grace period after the last writer left, does not wait again
(kernel/rcu/sync.c). So at start-up a thread writes this process into the cgroup it is already
in (the kernel moves nothing), and the grace period runs while Python imports and prepares the
sandbox. When the child moves itself into the sandbox it has passed, or mostly.

Best effort: where the file cannot be written (not root, no delegation) nothing happens. A
kernel that takes a lighter lock (the `favordynmods` mount option) needs none of this.

Since Linux 5.7 it is not started (sandbox/cli.py checks): the child is born in its v2 cgroup
(clone3 CLONE_INTO_CGROUP, backends/cgroup.py) and joins v1 ones through `tasks`, and no writer
waits (on 6.18; a kernel that still takes the rwsem for a `tasks` write makes a v1-only host
wait). There the warm-up would only hurt: its writer waits out the grace period holding
cgroup_mutex, and the sandbox's mkdirs wait behind it. (Where a seccomp filter refuses clone3,
the child's cgroup.procs write waits the grace period itself.)
"""

from __future__ import annotations

import _thread
import os
import sys

from sandbox.cgroups import cgroupfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`, without its enums (~4 ms)


def start() -> None:
    """Start the warm-up write in a thread; never raises, never waits."""
    if sys.warnoptions:
        # The thread may still wait in its write when we fork; Python 3.12+ warns of forks in
        # a process with threads (ignored by default): honour -W / PYTHONWARNINGS by not trying.
        return
    try:
        hierarchies = cgroupfs.discover(read_controllers=False)
        # A v1 hierarchy first: the cgroup backend never moves the launcher there, while on v2
        # it may move it into a leaf (backends/cgroup.py, _enable_controllers): not to be undone.
        own = min(hierarchies, key=lambda h: h.version).own
        fd = os.open(own + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return
    # The thread needs the GIL to reach its write, which the imports hold: by default it would
    # ask for it only after 5 ms (the switch interval). It sets the default back at once.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    # A thread gets the mask of the thread that starts it: with every signal blocked, no signal
    # is ever delivered to it. Else the kernel could hand it the SIGCHLD (or a SIGTERM) that the
    # supervisor, which blocks them later, waits for, and Python would drop it.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        _thread.start_new_thread(_move_into_own_cgroup, (fd, interval))
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


def _move_into_own_cgroup(fd: int, interval: float) -> None:  # pragma: no cover - a thread
    sys.setswitchinterval(interval)
    try:
        os.write(fd, b"0")  # 0: the writer's own process, into the cgroup it is in
    except OSError:
        pass
    finally:
        os.close(fd)
