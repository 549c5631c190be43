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

from tests import budget_cases as case
from tests.conftest import LAUNCHER, communicate, launcher_env, run_launcher, wait_until
from tests.vm.conftest import SYSTEMCTL


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
        "MemoryMax": str(256 * case.M), "TasksMax": "100", "ActiveState": "active",
        "Description": f"aero-sandbox budget {budget}",
    }  # fmt: skip
    (path,) = cgroups_of(budget)
    assert path.endswith(f"/aero.slice/{unit}")
    assert Path(path, "memory.max").read_text().strip() == str(256 * case.M)
    first = cli("--budget", budget, "--", "cat", "/proc/self/cgroup")
    assert first.returncode == 0, first.stderr
    assert f"/aero.slice/{unit}/aero-sandbox-" in first.stdout
    # The slice outlives its members: a second run finds it with the same caps.
    kept = show(unit, "ActiveState", "MemoryMax")
    assert kept == {"ActiveState": "active", "MemoryMax": str(256 * case.M)}
    changed = cli("budget", "set", budget, "--mem", "200M")
    assert changed.returncode == 0, changed.stderr
    assert show(unit, "MemoryMax")["MemoryMax"] == str(200 * case.M)
    rows = {r["name"]: r for r in json.loads(cli("budget", "list", "--json").stdout)}
    assert rows[budget]["slice"] == unit and rows[budget]["memory_cap_bytes"] == 200 * case.M


def test_rm_refuses_while_a_member_runs_then_the_slice_is_gone(budget: str) -> None:
    assert cli("budget", "set", budget, "--mem", "256M").returncode == 0
    hold = case.HOLD.format(size=10 * case.M, seconds=60)
    member = start("--budget", budget, "--", case.PY, "-c", hold)
    try:
        assert case.first_line(member).startswith("holding")
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
    data = case.neighbour_survives(cli, start, inner, tmp_path)
    assert data["backend"] == "systemd" and data["sandbox"]["slice"] == slice_of(inner)


def test_the_outer_cap_wins_and_own_mem_stays_oom(budget: str, tmp_path: Path) -> None:
    case.outer_cap_wins(cli, budget, tmp_path)
    case.own_mem_is_oom(cli, f"{budget}/inner", tmp_path)


def test_a_victim_is_retried_after_admission(budget: str, tmp_path: Path) -> None:
    case.victim_is_retried(cli, budget, tmp_path)


def test_queue_timeout_is_75(budget: str, tmp_path: Path) -> None:
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    hold = case.HOLD.format(size=case.M, seconds=30)
    holder = start("--budget", budget, "--reserve", "800M", "--", case.PY, "-c", hold)
    try:
        assert case.first_line(holder).startswith("holding")
        case.gives_up_with_75(cli, budget, tmp_path)
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
        assert show(slice_of(f"{budget}/a-1"), "MemoryMax")["MemoryMax"] == str(200 * case.M)
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
