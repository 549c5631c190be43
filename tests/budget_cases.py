"""What a budget must do whichever backend holds it: the programs the budget tests run and the
checks both tiers share (tests/host/test_budgets.py: cgroups; tests/vm/test_budgets_vm.py:
systemd slices). Each check takes its tier's `cli` (runs the launcher to its end) and `start`
(starts it): the tier decides the backend, the environment and the budget's place.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import communicate

M = 1 << 20
PY = sys.executable
HOLD = (
    "import sys, time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); "
    "print('holding', flush=True); time.sleep({seconds})"
)
# Holds its memory until the flag file exists (at most 120 s): a slow host (the VM stage's
# emulation) must not end the neighbour before the victim even starts.
HOLD_UNTIL = (
    "import os, time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); "
    "print('holding', flush=True); end = time.monotonic() + 120\n"
    "while not os.path.exists({flag!r}) and time.monotonic() < end: time.sleep(0.05)"
)
# Makes itself the kernel's first choice of victim, then allocates.
VICTIM = (
    "open('/proc/self/oom_score_adj', 'w').write('1000'); "
    "b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); print('survived')"
)

Cli = Callable[..., subprocess.CompletedProcess[str]]
Start = Callable[..., subprocess.Popen[str]]


def first_line(proc: subprocess.Popen[str], stream: str = "stdout", timeout: float = 90) -> str:
    """The next line the launcher writes on `stream`; fails the test after `timeout` seconds."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    if select.select([pipe], [], [], timeout)[0]:
        return pipe.readline()
    raise AssertionError(f"no line on {stream} within {timeout}s")


def report(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def neighbour_survives(cli: Cli, start: Start, budget: str, tmp_path: Path) -> dict:  # type: ignore[type-arg]
    """In `budget`, capped at 300M: a neighbour holding 150M lives on, while a 200M victim (which
    fits its own 1G --mem: only the sum overflows) ends as budget_oom naming the budget and its
    cap, in one line. Returns the victim's report for the tier's own checks."""
    end = tmp_path / "end"
    neighbour = start(
        "--budget", budget, "--report", str(tmp_path / "a.json"),
        "--", PY, "-c", HOLD_UNTIL.format(size=150 * M, flag=str(end)),
    )  # fmt: skip
    try:
        assert first_line(neighbour).startswith("holding")
        victim = cli(
            "--budget", budget, "--mem", "1G", "--report", str(tmp_path / "b.json"),
            "--", PY, "-c", VICTIM.format(size=200 * M),
        )  # fmt: skip
    finally:
        end.touch()
        done = communicate(neighbour, 120)
    assert done.returncode == 0, done.stderr
    assert report(tmp_path / "a.json")["reason"] == "exited"
    assert victim.returncode == 137, victim.stderr
    data = report(tmp_path / "b.json")
    assert data["reason"] == "budget_oom", victim.stderr
    assert data["budget"]["ran_out"]["budget"] == budget
    assert data["budget"]["ran_out"]["cap_bytes"] == 300 * M
    assert f"budget {budget} ran out (cap 300.0 MiB" in victim.stderr
    assert victim.stderr.count("\n") == 1
    return data


def outer_cap_wins(cli: Cli, budget: str, tmp_path: Path) -> None:
    """`budget` at 200M around `budget`/inner at 1G: a 300M run in the inner one is the outer
    one's victim (the smaller cap wins, as the kernel charges every level), and is named so."""
    assert cli("budget", "set", budget, "--mem", "200M").returncode == 0
    assert cli("budget", "set", f"{budget}/inner", "--mem", "1G").returncode == 0
    proc = cli(
        "--budget", f"{budget}/inner", "--report", str(tmp_path / "r.json"),
        "--", PY, "-c", VICTIM.format(size=300 * M),
    )  # fmt: skip
    assert proc.returncode == 137
    data = report(tmp_path / "r.json")
    assert data["reason"] == "budget_oom", proc.stderr
    assert data["budget"]["ran_out"]["budget"] == budget  # the outer level ran out


def own_mem_is_oom(cli: Cli, budget: str, tmp_path: Path) -> None:
    """A member over its own --mem (100M) in a budget with room is `oom`, not `budget_oom`."""
    proc = cli(
        "--budget", budget, "--mem", "100M", "--report", str(tmp_path / "o.json"),
        "--", PY, "-c", VICTIM.format(size=300 * M),
    )  # fmt: skip
    assert proc.returncode == 137
    assert report(tmp_path / "o.json")["reason"] == "oom", proc.stderr


def victim_is_retried(cli: Cli, budget: str, tmp_path: Path) -> None:
    """A budget_oom victim with --attempts 2 and a reservation runs again after admission."""
    assert cli("budget", "set", budget, "--mem", "300M").returncode == 0
    flag = tmp_path / "first-attempt-done"
    program = (
        f"import os; p = {str(flag)!r}\n"
        "if os.path.exists(p): print('second attempt'); raise SystemExit(0)\n"
        "open(p, 'w').close()\n" + VICTIM.format(size=400 * M).replace("; ", "\n")
    )
    proc = cli(
        "--budget", budget, "--reserve", "100M", "--attempts", "2",
        "--report", str(tmp_path / "r.json"), "--", PY, "-c", program,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = report(tmp_path / "r.json")
    assert data["attempts"] == 2 and data["retried_for"][0].startswith("budget_oom")
    assert "as its budget's OOM victim" in proc.stderr
    assert proc.stdout.strip() == "second attempt"


def gives_up_with_75(cli: Cli, budget: str, tmp_path: Path) -> None:
    """While 800M of `budget`'s 1G are reserved: 500M more waits, and gives up at its
    --queue-timeout with 75 and reason queue_timeout, the command never run."""
    gave_up = cli(
        "--budget", budget, "--reserve", "500M", "--queue-timeout", "0.5",
        "--report", str(tmp_path / "q.json"), "--", "echo", "ran",
    )  # fmt: skip
    assert gave_up.returncode == 75 and gave_up.stdout == "", gave_up.stderr
    assert "waiting for 500.0 MiB in budget" in gave_up.stderr
    assert "--queue-timeout" in gave_up.stderr.splitlines()[-1]
    assert report(tmp_path / "q.json")["reason"] == "queue_timeout"
