"""Budgets on the systemd backend (issue 14): a transient slice per level in the system manager
(root) or the user's (aero), members as the backend's scopes in the innermost one.

Each test makes budgets named after its pid and removes them (`budget rm`), then checks that no
slice of them is left in systemd and no cgroup of them in /sys/fs/cgroup; the conftest checks
that no aero-sandbox-* scope or sandbox cgroup is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LAUNCHER, communicate, launcher_env, run_launcher, wait_until
from tests.vm.conftest import PY, SYSTEMCTL

M = 1 << 20
# Holds its memory until the flag file exists (at most 120 s): a slow host (the VM stage's
# emulation) must not end the neighbour before the victim even starts.
HOLD_UNTIL = (
    "import os, time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); "
    "print('holding', flush=True); end = time.monotonic() + 120\n"
    "while not os.path.exists({flag!r}) and time.monotonic() < end: time.sleep(0.05)"
)
HOLD = (
    "import sys, time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); "
    "print('holding', flush=True); time.sleep({seconds})"
)
VICTIM = (  # makes itself the kernel's first choice of victim, then allocates
    "open('/proc/self/oom_score_adj', 'w').write('1000'); "
    "b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); print('survived')"
)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_launcher(list(args), timeout=timeout)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LAUNCHER, *args],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def first_line(proc: subprocess.Popen[str], stream: str = "stdout", timeout: float = 90) -> str:
    import select

    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    if select.select([pipe], [], [], timeout)[0]:
        return pipe.readline()
    raise AssertionError(f"no line on {stream} within {timeout}s")


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return communicate(proc, timeout)


def slice_of(name: str) -> str:
    return "aero-" + "-".join(p.replace("-", "\\x2d") for p in name.split("/")) + ".slice"


def show(unit: str, *names: str) -> dict[str, str]:
    out = subprocess.run(
        SYSTEMCTL + ["show", unit, *(f"--property={n}" for n in names)],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def slices_of(budget: str) -> set[str]:
    """Loaded units of this budget (the slice and any nested in it), active or not."""
    out = subprocess.run(
        SYSTEMCTL + ["list-units", "--all", "--plain", "--no-legend", "aero-*.slice"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    mine = slice_of(budget)[: -len(".slice")]
    found = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {u for u in found if u == mine + ".slice" or u.startswith(mine + "-")}


def cgroups_of(budget: str) -> list[str]:
    mine = slice_of(budget)
    return [top for top, _dirs, _files in os.walk("/sys/fs/cgroup") if top.endswith("/" + mine)]


def report(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


@pytest.fixture
def budget() -> Iterator[str]:
    """A fresh budget name; it and all below it are removed, and nothing of them may remain."""
    name = f"vm{os.getpid()}-{time.monotonic_ns() % 10**6}"
    yield name
    removed = cli("budget", "rm", name)
    assert removed.returncode == 0 or "no budget" in removed.stderr, removed.stderr
    assert wait_until(lambda: not slices_of(name), timeout=10), slices_of(name)
    assert not cgroups_of(name), "budget cgroups left behind"


def test_a_budget_is_a_slice_with_its_caps_kept_between_runs(budget: str) -> None:
    made = cli("budget", "set", budget, "--mem", "256M", "--pids", "100")
    assert made.returncode == 0, made.stderr
    unit = slice_of(budget)
    props = show(unit, "MemoryMax", "TasksMax", "ActiveState", "Description")
    assert props == {
        "MemoryMax": str(256 * M), "TasksMax": "100", "ActiveState": "active",
        "Description": f"aero-sandbox budget {budget}",
    }  # fmt: skip
    (path,) = cgroups_of(budget)
    assert path.endswith(f"/aero.slice/{unit}")
    assert Path(path, "memory.max").read_text().strip() == str(256 * M)
    first = cli("--budget", budget, "--", "cat", "/proc/self/cgroup")
    assert first.returncode == 0, first.stderr
    assert f"/aero.slice/{unit}/aero-sandbox-" in first.stdout
    # The slice outlives its members: a second run finds it with the same caps.
    kept = show(unit, "ActiveState", "MemoryMax")
    assert kept == {"ActiveState": "active", "MemoryMax": str(256 * M)}
    changed = cli("budget", "set", budget, "--mem", "200M")
    assert changed.returncode == 0, changed.stderr
    assert show(unit, "MemoryMax")["MemoryMax"] == str(200 * M)
    rows = {r["name"]: r for r in json.loads(cli("budget", "list", "--json").stdout)}
    assert rows[budget]["slice"] == unit and rows[budget]["memory_cap_bytes"] == 200 * M


def test_rm_refuses_while_a_member_runs_then_the_slice_is_gone(budget: str) -> None:
    assert cli("budget", "set", budget, "--mem", "256M").returncode == 0
    member = start("--budget", budget, "--", PY, "-c", HOLD.format(size=10 * M, seconds=60))
    try:
        assert first_line(member).startswith("holding")
        refused = cli("budget", "rm", budget)
        assert refused.returncode == 125 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"budget {budget} is in use" in refused.stderr
        rows = {r["name"]: r for r in json.loads(cli("budget", "list", "--json").stdout)}
        assert rows[budget]["running"] == 1
    finally:
        member.send_signal(signal.SIGTERM)
        finish(member)
    removed = cli("budget", "rm", budget)
    assert removed.returncode == 0, removed.stderr
    assert not cgroups_of(budget)


def test_caps_sum_the_neighbour_survives_and_the_victim_is_budget_oom(
    budget: str, tmp_path: Path
) -> None:
    inner = f"{budget}/agent-1"  # a '-' inside a segment: escaped, not a level
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    assert cli("budget", "set", inner, "--mem", "300M").returncode == 0
    assert cgroups_of(inner)[0].endswith(f"/{slice_of(budget)}/{slice_of(inner)}")
    neighbour = start(
        "--budget", inner, "--report", str(tmp_path / "a.json"),
        "--", PY, "-c", HOLD_UNTIL.format(size=150 * M, flag=str(tmp_path / "end")),
    )  # fmt: skip
    try:
        assert first_line(neighbour).startswith("holding")
        victim = cli(
            "--budget", inner, "--mem", "1G", "--report", str(tmp_path / "b.json"),
            "--", PY, "-c", VICTIM.format(size=200 * M),
        )  # fmt: skip
    finally:
        (tmp_path / "end").touch()
        done = finish(neighbour)
    assert done.returncode == 0, done.stderr
    assert report(tmp_path / "a.json")["reason"] == "exited"
    assert victim.returncode == 137, victim.stderr
    data = report(tmp_path / "b.json")
    assert data["backend"] == "systemd" and data["sandbox"]["slice"] == slice_of(inner)
    assert data["reason"] == "budget_oom", victim.stderr
    assert data["budget"]["ran_out"]["budget"] == inner
    assert data["budget"]["ran_out"]["cap_bytes"] == 300 * M


def test_the_outer_cap_wins_and_own_mem_stays_oom(budget: str, tmp_path: Path) -> None:
    assert cli("budget", "set", budget, "--mem", "200M").returncode == 0
    assert cli("budget", "set", f"{budget}/inner", "--mem", "1G").returncode == 0
    proc = cli(
        "--budget", f"{budget}/inner", "--report", str(tmp_path / "r.json"),
        "--", PY, "-c", VICTIM.format(size=300 * M),
    )  # fmt: skip
    assert proc.returncode == 137
    data = report(tmp_path / "r.json")
    assert data["reason"] == "budget_oom" and data["budget"]["ran_out"]["budget"] == budget
    own = cli(
        "--budget", f"{budget}/inner", "--mem", "100M", "--report", str(tmp_path / "o.json"),
        "--", PY, "-c", VICTIM.format(size=150 * M),
    )  # fmt: skip
    assert own.returncode == 137
    assert report(tmp_path / "o.json")["reason"] == "oom", own.stderr


def test_a_victim_is_retried_after_admission(budget: str, tmp_path: Path) -> None:
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
    assert proc.stdout.strip() == "second attempt"


def test_queue_timeout_is_75(budget: str, tmp_path: Path) -> None:
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    holder = start("--budget", budget, "--reserve", "800M", "--", PY, "-c", HOLD.format(
        size=M, seconds=30))
    try:
        assert first_line(holder).startswith("holding")
        gave_up = cli(
            "--budget", budget, "--reserve", "500M", "--queue-timeout", "0.5",
            "--report", str(tmp_path / "q.json"), "--", "echo", "ran",
        )  # fmt: skip
        assert gave_up.returncode == 75 and gave_up.stdout == "", gave_up.stderr
        assert report(tmp_path / "q.json")["reason"] == "queue_timeout"
    finally:
        holder.send_signal(signal.SIGTERM)
        finish(holder)


def test_budget_mem_creates_it_and_gc_removes_only_empty_budget_slices_of_ours(
    budget: str,
) -> None:
    admins = f"aero-{budget}admin.slice"  # an admin's slice below aero.slice: never collected
    subprocess.run(
        SYSTEMCTL + ["set-property", "--runtime", admins, "MemoryMax=100M"], check=True, timeout=30
    )
    try:
        subprocess.run(SYSTEMCTL + ["start", admins], check=True, timeout=30)
        env = launcher_env(AERO_BUDGET=f"{budget}/a-1", AERO_BUDGET_MEM="200M")
        proc = run_launcher(["--", "cat", "/proc/self/cgroup"], timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"/{slice_of(budget)}/{slice_of(budget + '/a-1')}/aero-sandbox-" in proc.stdout
        assert show(slice_of(f"{budget}/a-1"), "MemoryMax")["MemoryMax"] == str(200 * M)
        gc = cli("gc")
        assert gc.returncode == 0, gc.stderr
        assert wait_until(lambda: not slices_of(budget), timeout=10), slices_of(budget)
        assert not cgroups_of(budget)
        assert show(admins, "ActiveState")["ActiveState"] == "active"
    finally:
        subprocess.run(SYSTEMCTL + ["stop", admins], timeout=30)
        subprocess.run(SYSTEMCTL + ["revert", admins], timeout=30, capture_output=True)


def test_another_backend_never_lands_in_a_budget_slice(budget: str) -> None:
    """A run pinned to another backend never lands in a budget slice: 125 and one line."""
    assert cli("budget", "set", budget, "--mem", "256M").returncode == 0
    proc = cli("--backend", "rlimit", "--budget", budget, "--", "true")
    assert proc.returncode == 125 and proc.stderr.count("\n") == 1, proc.stderr
