"""The memory-pressure kill's decision (pressure over a window, never one sample), its option,
and the lines it and `--kill-after 0` print. The real kernel: tests/host/test_pressure.py."""

from __future__ import annotations

import pytest

from sandbox import report
from sandbox.cgroups.pressure import decide
from sandbox.core.errors import UsageError
from sandbox.core.limits import Limits, parse_pressure
from sandbox.core.result import Attempt, Placement, Pressure, Reason, RunResult, Usage, message
from sandbox.options import parse_run

S = 1_000_000  # microseconds


def test_one_stalled_second_is_not_a_window() -> None:
    samples: list[tuple[float, int]] = []
    assert decide(samples, 100.0, 0, 50, 10) is None
    assert decide(samples, 101.0, 1 * S, 50, 10) is None  # 100% for a second: wait


def test_a_window_above_the_threshold_decides() -> None:
    samples: list[tuple[float, int]] = []
    for second in range(10):
        assert decide(samples, 100.0 + second, int(second * 0.8 * S), 50, 10) is None
    fired = decide(samples, 110.0, 8 * S, 50, 10)
    assert fired == Pressure(stall_pct=80.0, over_s=10.0, threshold_pct=50, window_s=10)


def test_a_window_below_the_threshold_does_not() -> None:
    samples: list[tuple[float, int]] = []
    for second in range(30):  # 40% stalled, for long
        assert decide(samples, float(second), int(second * 0.4 * S), 50, 10) is None
    assert len(samples) <= 12  # only what the window needs is kept


def test_a_burst_after_a_calm_spell_is_averaged_over_the_whole_gap() -> None:
    samples: list[tuple[float, int]] = []
    decide(samples, 0.0, 0, 50, 10)
    # Next event 30 s later, after 4 s of full stall: 13% of the span, not a kill.
    assert decide(samples, 30.0, 4 * S, 50, 10) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50%/10s", (50.0, 10.0)),
        ("80/1m", (80.0, 60.0)),
        ("off", (None, 10.0)),
        ("OFF", (None, 10.0)),
    ],
)
def test_pressure_forms(text: str, expected: tuple[float | None, float]) -> None:
    assert parse_pressure(text) == expected


@pytest.mark.parametrize("text", ["50%", "0%/10s", "100%/10s", "50%/0.5s", "x/10s", "50%/", ""])
def test_bad_pressure_values_name_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match=r"--oom-pressure .*PERCENT/DURATION"):
        parse_pressure(text)


def test_option_and_environment() -> None:
    limits = parse_run(["--oom-pressure", "70%/20s", "true"], {}).limits
    assert (limits.oom_pressure_pct, limits.oom_pressure_window_s) == (70.0, 20.0)
    limits = parse_run(["true"], {"AERO_OOM_PRESSURE": "off"}).limits
    assert limits.oom_pressure_pct is None
    default = parse_run(["true"], {}).limits
    assert default.oom_pressure_pct is not None


def _result(reason: str, limits: Limits, usage: Usage, grace: bool = False) -> RunResult:
    return RunResult(
        reason=reason,
        exit_code=137,
        wall_s=1.0,
        usage=usage,
        limits=limits,
        sandbox=Placement(),
        killed_after_grace=grace,
    )


def test_pressure_line_and_report_carry_the_figures() -> None:
    stall = Pressure(stall_pct=91.5, over_s=10.2, threshold_pct=50, window_s=10)
    result = _result(Reason.OOM, Limits(150 << 20, None), Usage(150 << 20, 0, None, 1.0, stall))
    line = message(result)
    assert line is not None
    assert "memory pressure" in line and "91.5% of the last 10.2s" in line and "50%" in line
    attempt = Attempt(result=result, backend_name="cgroup", choice={}, not_enforced=[])
    request = parse_run(["x"], {})
    assert report.build(request, attempt, result)["memory_pressure"]["stall_pct"] == 91.5


def test_kill_after_zero_says_sigkill_at_once() -> None:
    limits = Limits(None, None, timeout_s=5.0, kill_after_s=0.0)
    line = message(_result(Reason.TIMEOUT, limits, Usage(), grace=True))
    assert line == "timed out after 5s; sent SIGKILL at once (--kill-after 0)"
    limits = Limits(None, None, timeout_s=5.0, kill_after_s=2.0)
    line = message(_result(Reason.TIMEOUT, limits, Usage(), grace=True))
    assert line == "timed out after 5s; sent SIGTERM, then SIGKILL after 2s"
