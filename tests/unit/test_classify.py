"""How a run's ending maps to a reason and an exit status (timeout(1) conventions)."""

from __future__ import annotations

import os
import signal

from sandbox.core.limits import Limits
from sandbox.core.result import Placement, Reason, RunResult, Usage, classify, message

LIMITS = Limits(1 << 30, 100, 5.0)


def exited(code: int) -> int:
    return code << 8


def killed(signo: int) -> int:
    return signo


def test_own_exit_code() -> None:
    assert classify(exited(3), None, Usage(), LIMITS) == (Reason.EXITED, 3, 3, None)


def test_signal_is_128_plus_n() -> None:
    assert classify(killed(signal.SIGSEGV), None, Usage(), LIMITS)[:2] == (Reason.SIGNALED, 139)


def test_timeout_wins_over_how_the_child_died() -> None:
    assert classify(killed(signal.SIGKILL), Reason.TIMEOUT, Usage(), LIMITS)[:2] == (
        Reason.TIMEOUT,
        124,
    )
    assert classify(exited(0), Reason.TIMEOUT, Usage(), LIMITS)[:2] == (Reason.TIMEOUT, 124)


def test_oom_is_137() -> None:
    assert classify(exited(1), Reason.OOM, Usage(oom_kills=1), LIMITS)[:2] == (Reason.OOM, 137)


def test_pids_reason_keeps_the_childs_code() -> None:
    usage = Usage(pids_limit_hits=7)
    assert classify(exited(1), None, usage, LIMITS)[:2] == (Reason.PIDS, 1)
    assert classify(exited(0), None, usage, LIMITS)[:2] == (Reason.EXITED, 0)


def test_a_watchdog_kill_for_pids_is_pids_however_the_child_ended() -> None:
    """The rlimit watchdog killed the tree over --pids while the main process exited 0: the
    report said `exited` with pids_limit_hits 1 and peak_tasks 231 (issue 12)."""
    usage = Usage(pids_limit_hits=1)
    limits = Limits(None, 64)
    assert classify(exited(0), Reason.PIDS, usage, limits) == (Reason.PIDS, 137, 0, None)
    killed_by_us = killed(signal.SIGKILL)
    assert classify(killed_by_us, Reason.PIDS, usage, limits)[:2] == (Reason.PIDS, 137)


def test_waitstatus_helpers_agree_with_os() -> None:
    assert os.waitstatus_to_exitcode(exited(5)) == 5
    assert os.waitstatus_to_exitcode(killed(9)) == -9


def test_oom_line_gives_limit_and_peak() -> None:
    result = RunResult(
        reason=Reason.OOM,
        exit_code=137,
        wall_s=1.0,
        usage=Usage(peak_memory_bytes=1 << 30),
        limits=LIMITS,
        sandbox=Placement(),
    )
    line = message(result)
    assert line is not None and "1.0 GiB limit" in line and "peak 1.0 GiB" in line


def test_no_line_for_a_normal_exit() -> None:
    result = RunResult(
        reason=Reason.EXITED,
        exit_code=0,
        wall_s=1.0,
        usage=Usage(),
        limits=LIMITS,
        sandbox=Placement(),
    )
    assert message(result) is None
