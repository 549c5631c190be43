"""Budgets and admission against the real kernel (issue 14). Each test removes its budgets.

The cgroup backend's budgets (aero-budget-* cgroups): every launcher here runs with
AERO_BACKEND=cgroup, so that where systemd runs (the VM stage) they are not systemd's slices,
which tests/vm/test_budgets_vm.py covers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.budgets import cgroup as levels_fs
from sandbox.budgets.membership import state_root
from tests.budget_cases import (
    HOLD,
    HOLD_UNTIL,
    PY,
    M,
    first_line,
    gives_up_with_75,
    neighbour_survives,
    outer_cap_wins,
    own_mem_is_oom,
    report,
    victim_is_retried,
)
from tests.conftest import (
    LAUNCHER,
    communicate,
    launcher_env,
    need,
    need_kernel_sandbox,
    wait_until,
)

# A user under systemd (the VM stage's aero) may write no cgroup its launchers start in: the
# budgets go below one scope systemd delegates to the user (AERO_BUDGET_ROOT), and every launcher
# runs in a delegated scope of its own, so that it may move its sandbox there (delegated_root).
USER_UNDER_SYSTEMD = os.geteuid() != 0 and os.path.isdir("/run/systemd/system")
DELEGATED_SCOPE = ["systemd-run", "--user", "--quiet", "--scope", "-p", "Delegate=yes", "--"]
_root: dict[str, str] = {}  # AERO_BUDGET_ROOT for a user under systemd


def cgroup_env(**extra: str) -> dict[str, str]:
    return launcher_env(AERO_BACKEND="cgroup", **{**_root, **extra})


def launcher() -> list[str]:
    return (DELEGATED_SCOPE if USER_UNDER_SYSTEMD else []) + LAUNCHER


@pytest.fixture(scope="module", autouse=True)
def delegated_root() -> Iterator[None]:
    """For a user under systemd: a delegated user scope, held by a `sleep` in its leaf `holder`,
    with memory and pids enabled for the budgets below it."""
    if not USER_UNDER_SYSTEMD:
        yield
        return
    holder = subprocess.Popen(
        DELEGATED_SCOPE + ["sleep", "3600"], start_new_session=True, stdin=subprocess.DEVNULL
    )
    try:
        own = f"/proc/{holder.pid}/cgroup"
        assert wait_until(lambda: ".scope" in Path(own).read_text(), timeout=30)
        scope = "/sys/fs/cgroup" + Path(own).read_text().strip().partition("::")[2]
        os.mkdir(scope + "/holder")
        Path(scope, "holder", "cgroup.procs").write_text(str(holder.pid))
        Path(scope, "cgroup.subtree_control").write_text("+memory +pids")
        _root["AERO_BUDGET_ROOT"] = scope
        yield
    finally:
        _root.clear()
        holder.kill()
        holder.wait(timeout=30)


_can_make: tuple[bool, str] | None = None


@pytest.fixture(autouse=True)
def kernel_sandbox() -> None:
    """Budgets need cgroups this launcher may create (root, or a delegated subtree)."""
    global _can_make
    need_kernel_sandbox()
    if _can_make is None:
        name = f"probe{os.getpid()}"
        made = cli("budget", "set", name, "--mem", "64M")
        cli("budget", "rm", name)
        _can_make = (made.returncode == 0, f"cannot make a budget here: {made.stderr.strip()}")
    need(*_can_make)


@pytest.fixture
def budget() -> Iterator[str]:
    """A fresh budget name for the test; it and everything below it are removed at the end."""
    name = f"t{os.getpid()}-{time.monotonic_ns() % 10**6}"
    yield name
    cli("budget", "rm", name)
    assert not _budget_dirs(name), "budget cgroups left behind"


def _budget_dirs(name: str) -> list[str]:
    found = []
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d == f"aero-budget-{name}"]
    return found


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return communicate(start(*args, env=env), 120)


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*launcher(), *args],
        env=env or cgroup_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    done = communicate(proc, timeout)
    return done.returncode, done.stdout, done.stderr



def tickets() -> list[str]:
    found = []
    for top, _dirs, names in os.walk(state_root()):
        found += [os.path.join(top, n) for n in names if n[:2] in ("w-", "r-")]
    return found




# -- the model and the CLI ----------------------------------------------------------------------
def test_set_list_rm_and_refusal_while_a_member_runs(budget: str) -> None:
    made = cli("budget", "set", budget, "--mem", "256M", "--pids", "100")
    assert made.returncode == 0, made.stderr
    listed = json.loads(cli("budget", "list", "--json").stdout)
    mine = next(row for row in listed if row["name"] == budget)
    assert (mine["memory_cap_bytes"], mine["pids_cap"], mine["running"]) == (256 * M, 100, 0)
    member = start("--budget", budget, "--", PY, "-c", HOLD.format(size=10 * M, seconds=30))
    try:
        assert first_line(member).startswith("holding")
        refused = cli("budget", "rm", budget)
        assert refused.returncode == 125 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"budget {budget} is in use" in refused.stderr
        lowered = cli("budget", "set", budget, "--mem", "4M")  # below what the member uses
        assert lowered.returncode == 125 and "its members use" in lowered.stderr
        listed = json.loads(cli("budget", "list", "--json").stdout)
        assert next(r for r in listed if r["name"] == budget)["running"] == 1
    finally:
        member.send_signal(signal.SIGTERM)
        finish(member)
    removed = cli("budget", "rm", budget)
    assert removed.returncode == 0, removed.stderr
    assert not _budget_dirs(budget)


def test_missing_budget_is_125_with_the_command_that_makes_it(budget: str) -> None:
    proc = cli("--budget", budget, "--", "true")
    assert proc.returncode == 125 and proc.stderr.count("\n") == 1
    assert f"aero-sandbox budget set {budget} --mem SIZE" in proc.stderr


def test_budget_mem_creates_the_budget_once(budget: str, tmp_path: Path) -> None:
    env = cgroup_env(AERO_BUDGET=f"{budget}/agent-1", AERO_BUDGET_MEM="200M")
    proc = cli("--report", str(tmp_path / "r.json"), "--", "cat", "/proc/self/cgroup", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"aero-budget-{budget}/aero-budget-agent-1/aero-sandbox-" in proc.stdout
    data = report(tmp_path / "r.json")
    assert data["budget"]["name"] == f"{budget}/agent-1" and data["budget"]["created"]
    assert data["effective_memory_bytes"] == 200 * M
    listed = {r["name"]: r for r in json.loads(cli("budget", "list", "--json").stdout)}
    assert listed[budget]["memory_cap_bytes"] is None  # the outer level: no cap of its own
    assert listed[f"{budget}/agent-1"]["memory_cap_bytes"] == 200 * M


# -- the kernel enforces the sum ----------------------------------------------------------------
def test_caps_sum_across_members_and_the_neighbour_survives(budget: str, tmp_path: Path) -> None:
    assert cli("budget", "set", budget, "--mem", "300M").returncode == 0
    assert neighbour_survives(cli, start, budget, tmp_path)["oom_kills"] >= 1


def test_over_its_own_mem_in_a_budget_is_oom(budget: str, tmp_path: Path) -> None:
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    own_mem_is_oom(cli, budget, tmp_path)


def test_nested_the_smaller_cap_wins_and_is_named(budget: str, tmp_path: Path) -> None:
    outer_cap_wins(cli, budget, tmp_path)


def test_a_victim_is_retried_after_admission(budget: str, tmp_path: Path) -> None:
    victim_is_retried(cli, budget, tmp_path)


# -- admission ----------------------------------------------------------------------------------
def test_queue_timeout_is_75_and_the_timeout_counts_the_run_only(
    budget: str, tmp_path: Path
) -> None:
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    end = tmp_path / "end"
    holder = start(
        "--budget",
        budget,
        "--reserve",
        "800M",
        "--",
        PY,
        "-c",
        HOLD_UNTIL.format(size=M, flag=str(end)),
    )
    try:
        assert first_line(holder).startswith("holding")
        gives_up_with_75(cli, budget, tmp_path)
        # Waits 1.5 s and more for the holder, then runs 1 s inside a 2 s --timeout.
        waiter = start(
            "--budget", budget, "--reserve", "500M", "--timeout", "2",
            "--report", str(tmp_path / "w.json"), "--", "sleep", "1",
        )  # fmt: skip
        assert "waiting for 500.0 MiB" in first_line(waiter, "stderr")
        time.sleep(1.5)
        end.touch()
        code, _out, err = finish(waiter)
        assert code == 0, err
        assert report(tmp_path / "w.json")["budget"]["queue_wait_s"] > 1
    finally:
        end.touch()
        finish(holder)
    assert not tickets()


def test_a_big_reservation_is_passed_at_most_window_times_and_not_starved(
    budget: str, tmp_path: Path
) -> None:
    from sandbox.budgets.admission import WINDOW

    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    log = tmp_path / "log"
    release = tmp_path / "release"
    # Each run stamps its start and end; the holder holds until the test releases it (a slow
    # host, the VM stage's emulation, must not end it before any small run got its chance).
    stamp = (
        "import os, time; open({log!r}, 'a').write('{name} %f\\n' % time.time()); end = "
        "time.monotonic() + {s}\n"
        "while time.monotonic() < end and not os.path.exists({release!r}): time.sleep(0.05)\n"
        "open({log!r}, 'a').write('{name}-end %f\\n' % time.time())"
    )

    def run(name: str, reserve: str, seconds: float) -> subprocess.Popen[str]:
        code = stamp.format(log=str(log), name=name, s=seconds, release=str(release))
        return start("--budget", budget, "--reserve", reserve, "--", PY, "-c", code)

    def smalls_done() -> int:
        text = log.read_text() if log.exists() else ""
        return sum(1 for line in text.splitlines() if line.startswith("small") and "-end" in line)

    procs = [run("holder", "600M", 120)]
    smalls = WINDOW + 4
    try:
        assert wait_until(lambda: log.exists(), timeout=60)
        procs.append(run("big", "800M", 0.1))
        assert wait_until(lambda: "waiting" in _budget_row(budget, "waiting", 1), timeout=60)
        # A stream of small runs that would each fit beside the holder: their tickets come right
        # after the big one's, in whatever order their launchers get there.
        for index in range(smalls):
            procs.append(run(f"small{index}", "100M", 0.3))
            time.sleep(0.3)
        # The holder ends once every small run has either run (passed the big one) or queues
        # behind it: the big one and the rest wait (1 + smalls - passed), at most WINDOW passed.
        assert wait_until(
            lambda: smalls_done() >= 1 and smalls_done() + _waiting(budget) - 1 >= smalls,
            timeout=120,
        ), log.read_text()
        release.touch()
        results = [finish(p) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert all(code == 0 for code, _o, _e in results), results
    started = {line.split()[0]: float(line.split()[1]) for line in log.read_text().splitlines()}
    # Backfill: small runs used the room the big one could not use yet (it cannot start before
    # the holder ends)... but only the WINDOW runs that queued right after it may pass it; the
    # others wait for it, and it is admitted only once the holder is gone.
    passed = [i for i in range(smalls) if started[f"small{i}"] < started["holder-end"]]
    assert 1 <= len(passed) <= WINDOW, started
    # The big one starts within a bound: the holder's end, then at most WINDOW passes of 0.3 s
    # each, and the host's slowness (the VM stage emulates its CPU, 5-15 times slower).
    bound = 30 if os.environ.get("AERO_VM") == "1" else 10
    assert started["big"] - started["holder-end"] < bound, started
    assert not tickets()


def _waiting(budget: str) -> int:
    rows = json.loads(cli("budget", "list", "--json").stdout)
    return next((r["waiting"] for r in rows if r["name"] == budget), 0)


def _budget_row(budget: str, key: str, value: int) -> str:
    rows = json.loads(cli("budget", "list", "--json").stdout)
    row = next((r for r in rows if r["name"] == budget), None)
    return "waiting" if row is not None and row[key] >= value else ""


def holder_and_waiter(
    budget: str, seconds: float
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """A run holding 600M of a 1G budget for `seconds`, and one waiting for 900M behind it."""
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    code = HOLD.format(size=M, seconds=seconds)
    holder = start("--budget", budget, "--reserve", "600M", "--", PY, "-c", code)
    assert first_line(holder).startswith("holding")
    waiter = start("--budget", budget, "--reserve", "900M", "--", "echo", "never")
    assert "waiting for 900.0 MiB" in first_line(waiter, "stderr")
    return holder, waiter


def test_a_sigkilled_waiter_leaves_no_reservation(budget: str) -> None:
    holder, waiter = holder_and_waiter(budget, 60)
    try:
        listed = json.loads(cli("list", "--json").stdout)
        assert any(r.get("state") == "waiting" and r["launcher_pid"] == waiter.pid for r in listed)
        os.kill(waiter.pid, signal.SIGKILL)
        code, out, _err = finish(waiter)
        assert code == -signal.SIGKILL and out == ""
        holder.send_signal(signal.SIGTERM)
        # A later, larger run is not held behind the dead waiter's ticket.
        after = cli(
            "--budget", budget, "--reserve", "1000M", "--queue-timeout", "60", "--", "echo", "ran"
        )
        assert after.returncode == 0 and after.stdout == "ran\n", after.stderr
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGTERM)
        finish(holder)
    assert not tickets()


def test_a_signal_ends_a_waiting_launcher_at_once(budget: str) -> None:
    holder, waiter = holder_and_waiter(budget, 30)
    try:
        sent = time.monotonic()
        waiter.send_signal(signal.SIGTERM)
        code, out, err = finish(waiter, timeout=30)
        assert time.monotonic() - sent < 5
        assert code == 128 + signal.SIGTERM and out == ""
        assert "SIGTERM while waiting for admission" in err
        assert [t for t in tickets() if "-" + str(waiter.pid) + "-" in t] == []
    finally:
        holder.send_signal(signal.SIGTERM)
        finish(holder)


def test_what_earlier_runs_left_charged_never_holds_a_reservation_back(
    budget: str, tmp_path: Path
) -> None:
    """A run's page cache stays charged to the budget after its sandbox is gone (and some kernel
    memory with it): nobody's, and it may stay for good. A reservation of the whole cap must
    still start (it waited forever when admission counted the budget's whole usage)."""
    assert cli("budget", "set", budget, "--mem", "256M").returncode == 0
    wrote = cli("--budget", budget, "--", "dd", "if=/dev/zero", f"of={tmp_path / 'f'}", "bs=1M",
                "count=32", "conv=fsync")  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    places = levels_fs.bases(_root.get("AERO_BUDGET_ROOT"))
    left = levels_fs.read_level(places, (budget,))
    assert left.usage_bytes, "the test needs something left charged to the budget"
    whole = cli("--budget", budget, "--reserve", "256M", "--queue-timeout", "10", "--", "true")
    assert whole.returncode == 0, whole.stderr


def test_gc_removes_empty_budgets_only(budget: str) -> None:
    assert cli("budget", "set", f"{budget}/idle", "--mem", "100M").returncode == 0
    assert cli("budget", "set", f"{budget}/busy", "--mem", "100M").returncode == 0
    member = start("--budget", f"{budget}/busy", "--", PY, "-c", HOLD.format(size=M, seconds=30))
    try:
        assert first_line(member).startswith("holding")
        dry = cli("gc", "--dry-run")
        assert f"aero-budget-{budget}/aero-budget-idle" in dry.stdout
        done = cli("gc")
        assert done.returncode == 0, done.stderr
        names = [r["name"] for r in json.loads(cli("budget", "list", "--json").stdout)]
        assert f"{budget}/busy" in names and budget in names and f"{budget}/idle" not in names
    finally:
        member.send_signal(signal.SIGTERM)
        finish(member)
    cli("gc")
    names = [r["name"] for r in json.loads(cli("budget", "list", "--json").stdout)]
    assert not [n for n in names if n.startswith(budget)]
    # gc never removes the cgroup budgets live below (ours, or an admin's AERO_BUDGET_ROOT).
    for place in levels_fs.bases(_root.get("AERO_BUDGET_ROOT")):
        assert os.path.isdir(place.own)


def test_a_hundred_launchers_contending_leave_nothing_behind(budget: str) -> None:
    assert cli("budget", "set", budget, "--mem", "1G").returncode == 0
    procs = []
    try:
        for index in range(100):
            args = ["--budget", budget, "--reserve", "100M", "--queue-timeout", "300", "-q"]
            procs.append(start(*args, "--", PY, "-c", "import time; time.sleep(0.05)"))
            if index % 10 == 9:
                os.kill(procs[-1].pid, signal.SIGKILL)  # some die waiting, or running
        results = [finish(p, timeout=300) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    codes = [code for code, _o, _e in results]
    assert codes.count(0) >= 90 and set(codes) <= {0, -signal.SIGKILL}, codes
    assert wait_until(lambda: not tickets(), timeout=30) or not tickets()
    row = next(r for r in json.loads(cli("budget", "list", "--json").stdout) if r["name"] == budget)
    assert (row["running"], row["waiting"], row["reserved_bytes"]) == (0, 0, 0)
    assert cli("budget", "rm", budget).returncode == 0


def test_doctor_shows_budgets_and_where_they_live(budget: str) -> None:
    assert cli("budget", "set", budget, "--mem", "128M").returncode == 0
    found = json.loads(cli("doctor", "--json").stdout)
    check = next(c for c in found["checks"] if c["name"] == "budgets")
    assert budget in [row["name"] for row in check["details"]["budgets"]]
    where = levels_fs.bases(_root.get("AERO_BUDGET_ROOT"))
    assert check["details"]["where"] == levels_fs.memory_base(where).own


def test_an_admins_root_holds_the_budgets_and_gc_leaves_it(budget: str) -> None:
    """AERO_BUDGET_ROOT (budget set --root): an admin-made cgroup, the same path below each
    mount, holds the budgets; gc removes the empty budget, never the admin's cgroup."""
    if USER_UNDER_SYSTEMD:
        pytest.skip("an admin's cgroup: made by root (as a user, delegated_root plays one)")
    memory = levels_fs.memory_base(levels_fs.bases())
    relative = os.path.relpath(memory.own, memory.mount) + f"/aero-admin-{os.getpid()}"
    made: list[str] = []
    for place in levels_fs.bases():
        path = place.mount
        for part in relative.split("/"):
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path)
                made.append(path)
    root = os.path.join(memory.mount, relative)
    env = cgroup_env(AERO_BUDGET_ROOT=root)
    try:
        assert cli("budget", "set", budget, "--mem", "128M", env=env).returncode == 0
        proc = cli("--budget", budget, "--", "cat", "/proc/self/cgroup", env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"/aero-admin-{os.getpid()}/aero-budget-{budget}/aero-sandbox-" in proc.stdout
        assert budget not in cli("budget", "list").stdout  # not below our own cgroup
        assert budget in cli("budget", "list", "--root", root).stdout
        assert cli("gc", env=env).returncode == 0
        assert not _budget_dirs(budget)
        assert all(os.path.isdir(path) for path in made)
    finally:
        for path in sorted(made, key=len, reverse=True):
            os.rmdir(path)
