"""End a sandbox that thrashes at its memory limit: memory pressure held over a window.

The kernel's OOM killer fires only when nothing can be reclaimed. A sandbox at its limit whose
page cache (its own program text included) can still be dropped and read back in is never
OOM-killed: it thrashes, in D state, until the timeout (Chromium at --mem 150M on a v1 memory
cgroup: ~300 major faults/s, oom_kill 0, for minutes). Like systemd-oomd, we decide on pressure
over a window, never on one sample: the share of wall time in which every task of the sandbox
was stalled on memory (PSI "full" of the cgroup's memory.pressure, Linux 4.20+). When that share,
measured from the cumulative stall counter (`total=`, microseconds) at both ends of the window,
reaches the threshold, the sandbox is ended like an OOM: reason `oom`, exit 137, the figures in
the report's `memory_pressure` and on the stderr line.

PSI is accounted per cgroup of the unified (v2) hierarchy, whether or not any controller is
enabled there, so a hybrid host's controller-less v2 directory has it too. A PSI trigger
(Linux 5.2+) wakes the supervisor at most once per trigger window while the stall in that window
exceeds the threshold: nothing is sampled while the sandbox runs well. The trigger signals with
POLLPRI and always reads as POLLIN, so the supervisor, which polls its fds for POLLIN, is given an
epoll fd that holds the trigger for POLLPRI alone: readable only when the trigger fires. Without
PSI (a v1-only host, a kernel booted with psi=0) there is no watch: `memory_pressure` stays null.
"""

from __future__ import annotations

import errno
import os
import select
import time

from sandbox.cgroups import cgroupfs
from sandbox.core.result import Pressure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandbox.core.limits import Limits

# The trigger's window: 1 s as root; unprivileged triggers must use whole multiples of 2 s
# (Linux 6.4+), so that is the second try.
TRIGGER_WINDOWS_US = (1_000_000, 2_000_000)


class PressureWatch:
    """One sandbox's memory-pressure watch. `fd` is polled for POLLIN; call check() on news and
    when `tick_s` (seconds from the last check) has passed.

    With `arm_after_s`, the trigger is made by the first check() after that delay, not now:
    closing a trigger costs its closer a synchronize_rcu() and the stop of the cgroup's psimon
    kthread (psi_trigger_destroy; 4-20 ms on the 2-core development VM, Linux 6.18), the largest
    single cost of a short run's tear-down. A command that ends within the delay never has one.
    Nothing is lost: the arming check records the stall counter, which has counted since the
    cgroup was made, so the decision over a window can come as early as it would have.
    """

    def __init__(
        self,
        directory: str,
        threshold_pct: float,
        window_s: float,
        arm_after_s: float = 0.0,
        memory_dir: str | None = None,
        own_bytes: int | None = None,
    ) -> None:
        self.file = directory + "/memory.pressure"
        self.memory_dir, self.own_bytes = memory_dir, own_bytes  # for culprit()
        self.threshold_pct = threshold_pct
        self.window_s = window_s
        self._trigger: int | None = None
        # The epoll fd exists from the start, so the supervisor polls it from the start: it
        # holds the trigger for POLLPRI alone once there is one, and reads idle until it fires.
        self._epoll: select.epoll | None = select.epoll()  # close-on-exec
        self.fd: int | None = self._epoll.fileno()
        self._armed = False
        self._arm_at = time.monotonic() + arm_after_s  # not before: the tear-down checks too
        self._off = False  # no PSI here after all: never fires
        self.tick_s: float | None = arm_after_s
        self.fired: Pressure | None = None
        self._samples: list[tuple[float, int]] = []  # (monotonic s, cumulative full stall us)
        if not arm_after_s:
            try:
                self._arm()
            except OSError:
                self.close()
                raise

    def _arm(self) -> None:
        """Make the trigger. Raises OSError when the file is missing or PSI is off."""
        self._armed = True
        self._trigger = _open_trigger(self.file, self.threshold_pct)
        if self._trigger is not None and self._epoll is not None:
            self._epoll.register(self._trigger, select.EPOLLPRI)
        # Where triggers are refused, the supervisor calls check() every second instead.
        self.tick_s = None if self._trigger is not None else 1.0

    def check(self) -> bool:
        """True once the stall share over the last window reached the threshold (stays True)
        while this sandbox fills the limit it stalls at (see `culprit`)."""
        if not self._armed:
            if time.monotonic() < self._arm_at:
                return False
            try:
                self._arm()
            except OSError:  # no memory.pressure (Linux < 4.20, psi=0): the OOM killer alone
                self._off, self.tick_s = True, None
                return False
        if self._epoll is not None:
            self._epoll.poll(0)  # take the trigger's event, so the fd reads idle again
        if self.fired is not None:
            return True
        if self._off:
            return False
        total = read_full_total(self.file)
        if total is None:
            return False
        fired = decide(self._samples, time.monotonic(), total, self.threshold_pct, self.window_s)
        if fired is not None and (
            self.memory_dir is None or culprit(self.memory_dir, self.own_bytes)
        ):
            self.fired = fired
        return self.fired is not None

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = self.fd = None
        if self._trigger is not None:
            os.close(self._trigger)
            self._trigger = None


def watch(
    directory: str | None,
    limits: Limits,
    arm_after_s: float = 0.0,
    *,
    memory_dir: str | None = None,
) -> PressureWatch | None:
    """A watch on the cgroup `directory` (a v2 one), or None when it is off or PSI is missing
    (known at once only when armed at once: see PressureWatch). `memory_dir`: the sandbox's
    memory cgroup (where its --mem is set), for culprit()."""
    if directory is None or limits.oom_pressure_pct is None or limits.memory_bytes is None:
        return None
    try:
        return PressureWatch(
            directory,
            limits.oom_pressure_pct,
            limits.oom_pressure_window_s,
            arm_after_s,
            memory_dir,
            limits.memory_bytes,
        )
    except OSError:
        return None  # no memory.pressure (Linux < 4.20, psi=0): the OOM killer alone


def decide(
    samples: list[tuple[float, int]],
    now: float,
    total: int,
    threshold_pct: float,
    window_s: float,
) -> Pressure | None:
    """Record (now, total) in `samples`; the figures when the stall share over at least the last
    `window_s` seconds reached `threshold_pct`, else None. Keeps only the samples it needs."""
    samples.append((now, total))
    old = [i for i, (when, _) in enumerate(samples) if now - when >= window_s]
    if not old:
        return None
    del samples[: old[-1]]  # the newest sample at least a window old is the reference
    since, stalled = samples[0]
    share = 100.0 * (total - stalled) / 1e6 / (now - since)
    if share < threshold_pct:
        return None
    return Pressure(
        stall_pct=round(share, 1),
        over_s=round(now - since, 2),
        threshold_pct=threshold_pct,
        window_s=window_s,
    )


def read_full_total(path: str) -> int | None:
    """The `full` line's total= (microseconds every task was stalled), or None if unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("full "):
            for field in line.split():
                if field.startswith("total="):
                    return int(field[6:])
    return None


def _open_trigger(path: str, threshold_pct: float) -> int | None:
    """A PSI trigger fd (POLLPRI when the full stall in a trigger window passes the threshold),
    or None where triggers are refused. Raises OSError when the file is missing or PSI is off."""
    if read_full_total(path) is None:
        raise OSError(errno.ENOENT, "no PSI memory.pressure", path)
    for window_us in TRIGGER_WINDOWS_US:
        stall_us = max(1, min(window_us - 1, int(window_us * threshold_pct / 100)))
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"full {stall_us} {window_us}\0".encode())
            return fd
        except OSError:
            os.close(fd)
    return None


# A sandbox stalls on memory when its own limit is full, and equally when a limit it shares (a
# budget, --parent, a container) is full of its neighbours' memory. Every member of a full
# budget then stalls together, and each launcher deciding on its own sandbox's stall alone
# killed them all: bench/crowd.py, a budget without reservations, lost 32 of 40 jobs to the
# pressure kill, none retried. So the pressure kill takes only the sandbox that fills a limit:
# its own (usage at 90% of it), or a smaller shared one it holds more than half of, which at
# most one sandbox can. Victims are left to the kernel's OOM killer, whose kill the budget's
# counters classify (budget_oom, run again when --attempts allows).
OWN_SHARE = 0.9
SHARED_SHARE = 0.5


def culprit(memory_dir: str, own_bytes: int | None) -> bool:
    """Whether the sandbox whose memory cgroup is `memory_dir` (v1 or v2) fills the limit it
    stalls at: its own (`own_bytes`, --mem), or more than half of a limit enclosing it."""
    usage = cgroupfs.read_int(memory_dir + "/memory.current")
    if usage is None:
        usage = cgroupfs.read_int(memory_dir + "/memory.usage_in_bytes")
    if usage is None:
        return True  # cannot tell (the cgroup is gone): the stall alone decides, as before
    if own_bytes is not None and usage >= OWN_SHARE * own_bytes:
        return True
    from sandbox.cgroups.enclosing import enclosing_memory_limit  # only when a watch fires

    shared, _where = enclosing_memory_limit(os.path.dirname(memory_dir))
    return shared is not None and usage > SHARED_SHARE * shared
