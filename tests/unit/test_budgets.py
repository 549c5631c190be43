"""Budgets: names, the admission decision, tickets as hostile input, the OOM verdict, options."""

from __future__ import annotations

import os

import pytest

from sandbox.budgets import admission, files, tickets
from sandbox.budgets.admission import Ticket, decide, too_big
from sandbox.budgets.model import Caps, Level, directory_names, levels, parse_name, segment_of
from sandbox.budgets.oom import verdict
from sandbox.core.errors import UsageError
from sandbox.options import parse_run
from sandbox.run.presets import default_reservation

G = 1 << 30


@pytest.mark.parametrize("name", ["agents", "agents/agent-17", "a", "A.b_c-9", "x/y/z"])
def test_good_names(name: str) -> None:
    assert "/".join(parse_name(name)) == name


@pytest.mark.parametrize(
    "name", ["", "/agents", "agents/", "a//b", "-a", ".a", "_a", "a b", "a/../b", "é", "a" * 101]
)
def test_bad_names_name_the_value_and_the_forms(name: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_name(name)
    assert repr(name) in err.value.line() and "agents/agent-17" in err.value.line()


def test_levels_and_directories() -> None:
    parts = parse_name("agents/agent-17")
    assert levels(parts) == ["agents", "agents/agent-17"]
    assert directory_names(parts) == ["aero-budget-agents", "aero-budget-agent-17"]
    assert segment_of("aero-budget-agent-17") == "agent-17"
    assert segment_of("aero-sandbox-1-abc") is None


def level(name: str, cap: int | None, usage: int = 0) -> Level:
    return Level(name, None, Caps(cap), usage, None)


def ticket(number: int, reserve: int, running: bool = False, budget: str = "agents") -> Ticket:
    return Ticket(number, 100 + number, budget, reserve, 0.0, running, ["true"])


def test_fits_when_free_covers_the_reservation() -> None:
    mine = ticket(3, 2 * G)
    assert decide(mine, [ticket(1, 1 * G, True), mine], [level("agents", 4 * G, G)]).admitted


def test_usage_above_reservations_counts() -> None:
    mine = ticket(3, 2 * G)
    found = decide(mine, [ticket(1, 1 * G, True), mine], [level("agents", 4 * G, 3 * G)])
    assert not found.admitted and found.free == G and found.level == "agents"


def test_what_processes_hold_counts_not_page_cache_or_leftovers() -> None:
    """Usage 3G of which the processes hold 0.5G (the rest page cache, and what removed members
    left charged): a 3.5G reservation fits beside the 1G reserved (held_bytes, when read)."""
    mine = ticket(3, 3 * G)
    found = Level("agents", None, Caps(4 * G), 3 * G, None, G // 2)
    assert decide(mine, [ticket(1, G, True), mine], [found]).admitted
    assert not decide(ticket(3, 3 * G + 1), [ticket(1, G, True)], [found]).admitted


def test_window_0_is_strict_first_come_first_served() -> None:
    # A 3G waiter ahead cannot fit in 2G free; a 1G one behind it would, but waits its turn.
    big, small = ticket(2, 3 * G), ticket(3, 1 * G)
    tickets = [ticket(1, 2 * G, True), big, small]
    chain = [level("agents", 4 * G)]
    assert not decide(big, tickets, chain, window=0).admitted
    found = decide(small, tickets, chain, window=0)
    assert not found.admitted and found.ahead == 1


def test_a_small_run_passes_a_big_one_that_cannot_start_yet() -> None:
    # Backfill: the 1G run uses room the 3G one cannot use yet.
    big, small = ticket(2, 3 * G), ticket(3, 1 * G)
    tickets = [ticket(1, 2 * G, True), big, small]
    chain = [level("agents", 4 * G)]
    assert not decide(big, tickets, chain).admitted
    assert decide(small, tickets, chain).admitted


def test_a_waiting_run_is_passed_at_most_window_times() -> None:
    # Only runs that queued within WINDOW tickets after the big one may pass it: the stream of
    # small ones behind them waits for it, so it is never starved.
    window = admission.WINDOW
    big = ticket(2, 3 * G)
    near, far = ticket(2 + window, G // 4), ticket(3 + window, G // 4)
    tickets = [ticket(1, 2 * G, True), big, near, far]
    chain = [level("agents", 4 * G)]
    assert decide(near, tickets, chain).admitted
    found = decide(far, tickets, chain)
    assert not found.admitted and found.ahead == 2 and found.free == 2 * G


def test_earlier_runs_that_fit_keep_their_claim() -> None:
    # 2G free: the 1.5G run ahead fits and starts first; the 1G run behind it must not take its
    # room although the 3G head waits (the passes go in queue order).
    first, second = ticket(3, 3 * G // 2), ticket(4, 1 * G)
    tickets = [ticket(1, 2 * G, True), ticket(2, 3 * G), first, second]
    chain = [level("agents", 4 * G)]
    assert decide(first, tickets, chain).admitted
    assert not decide(second, tickets, chain).admitted


def test_other_budgets_waiters_do_not_block() -> None:
    mine = ticket(3, 1 * G, budget="agents/b")
    tickets = [ticket(1, 3 * G, budget="agents/a"), mine]
    chain = [level("agents", None), level("agents/b", 2 * G)]
    assert decide(mine, tickets, chain).admitted


def test_nested_the_outer_cap_also_applies() -> None:
    mine = ticket(2, 2 * G, budget="agents/b")
    tickets = [ticket(1, 3 * G, True, budget="agents/a"), mine]
    chain = [level("agents", 4 * G), level("agents/b", 12 * G)]
    found = decide(mine, tickets, chain)
    assert not found.admitted and found.level == "agents"


def test_look_decides_like_the_locked_read_without_admitting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = str(tmp_path)
    os.chmod(state, 0o700)
    chain = [level("b", 2 * G)]
    first, second = admission.Queue(state), admission.Queue(state)
    try:
        one = first.enqueue("b", 3 * G // 2, ["a"])
        two = second.enqueue("b", G, ["b"])
        assert not second.look(two, lambda: chain).admitted  # the first one's claim counts
        assert first.look(one, lambda: chain).admitted
        assert first.ticket_path is not None and "/w-" in first.ticket_path  # look admits nobody
        assert first.try_admit(one, lambda: chain).admitted and "/r-" in first.ticket_path
        # The renamed ticket is known without reading it again, and now runs: 0.5G free.
        found = second.look(two, lambda: chain)
        assert not found.admitted and found.free == G // 2
        assert sorted(t.running for t in second.known.values()) == [False, True]
        first.leave()
        assert second.look(two, lambda: chain).admitted
    finally:
        first.leave()
        second.leave()


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
def test_a_waiter_wakes_when_a_reservation_is_given_back(tmp_path, monkeypatch, inotify) -> None:  # type: ignore[no-untyped-def]
    """Admitted on the release itself, not by the periodic full read (pushed out of reach here):
    through inotify, and by the directory's mtime where inotify is refused."""
    import threading

    from sandbox.run.supervisor import wait_for_signal

    monkeypatch.setattr(admission, "FULL_S", 3600.0)
    if not inotify:

        def refused(path: str, mask: int) -> int:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(admission.linux, "inotify", refused)
    state = str(tmp_path)
    os.chmod(state, 0o700)
    chain = [level("b", 2 * G)]
    holder, waiter = admission.Queue(state), admission.Queue(state)
    admitted: list[float] = []
    try:
        held = holder.enqueue("b", 2 * G, ["holder"])
        assert holder.try_admit(held, lambda: chain).admitted
        mine = waiter.enqueue("b", G, ["waiter"])
        thread = threading.Thread(
            target=lambda: admitted.append(
                admission.wait_for_admission(
                    waiter, mine, lambda: chain, 30.0, wait_for_signal, lambda line: None
                )
            ),
            daemon=True,
        )
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not admitted  # still waiting: no room
        holder.release()
        thread.join(20)
        assert not thread.is_alive() and admitted
        assert waiter.ticket_path is not None and "/r-" in waiter.ticket_path
    finally:
        holder.leave()
        waiter.leave()


def test_a_reservation_no_cap_can_hold_is_refused() -> None:
    assert "can never fit in budget agents" in (too_big(5 * G, [level("agents", 4 * G)]) or "")
    assert too_big(5 * G, [level("agents", None)]) is None


def test_ticket_round_trip_and_hostile_contents() -> None:
    text = tickets.format_ticket(Ticket(7, 42, "agents", G, 1.5, False, ["echo", "a\nb"]))
    parsed = tickets.parse(text, "/x/w-000000000007-42-abcdef")
    assert parsed is not None and parsed.number == 7 and parsed.argv == ["echo", "a\nb"]
    assert not parsed.running
    for bad in (text.replace("pid 42", "pid ²"), text.replace("reserve", "reserve x"), "junk"):
        assert tickets.parse(bad, "/x/w-000000000007-42-abcdef") is None
    assert tickets.parse(text, "/x/q-000000000007-42-abcdef") is None


def test_reader_refuses_symlinks_fifos_and_huge_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "target"
    target.write_text("secret")
    os.symlink(target, tmp_path / "w-000000000001-1-aaaaaa")
    os.mkfifo(tmp_path / "w-000000000002-1-aaaaaa")
    (tmp_path / "w-000000000003-1-aaaaaa").write_bytes(b"x" * (files.MAX_BYTES + 1))
    assert files.read_own(str(tmp_path / "w-000000000001-1-aaaaaa")) is None
    assert files.read_own(str(tmp_path / "w-000000000002-1-aaaaaa")) is None  # no hang
    assert files.read_own(str(tmp_path / "w-000000000003-1-aaaaaa")) is None
    assert tickets.read_tickets(str(tmp_path)) == []


def test_oom_verdict() -> None:
    assert verdict(False, True, ["agents"], ["agents"]) is None  # a sibling's OOM: not us
    assert verdict(True, True, [], ["agents"]) == ("oom", None)
    assert verdict(True, False, ["agents"], ["agents"]) == ("budget_oom", "agents")
    assert verdict(True, False, [], ["a", "a/b"]) == ("oom", None)  # a limit above the budget
    assert verdict(True, True, ["a"], ["a"]) == ("budget_oom", "a")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["cargo", "build", "--release", "--locked"], 8 * G),
        (["cargo", "+nightly", "build", "-r"], 8 * G),
        (["cargo", "test", "--locked"], 4 * G),
        (["env", "X=1", "cargo", "build"], 4 * G),
        (["wasm-pack", "build"], 4 * G),
        (["npx", "playwright", "test"], 2 * G),
        (["cargo", "fmt"], None),
        (["ls"], None),
    ],
)
def test_agent_preset_reservations(argv: list[str], expected: int | None) -> None:
    assert default_reservation(argv) == expected


def test_run_options() -> None:
    request = parse_run(
        ["--budget", "agents/a", "--reserve", "1G", "--queue-timeout", "1m", "true"], {}
    )
    assert (request.budget, request.reserve, request.queue_timeout) == ("agents/a", G, 60.0)
    env = {"AERO_BUDGET": "agents", "AERO_BUDGET_MEM": "12G"}
    request = parse_run(["--preset", "agent", "cargo", "build", "--release"], env)
    assert (request.budget, request.budget_mem, request.reserve) == ("agents", 12 * G, 8 * G)
    request = parse_run(["--preset", "agent", "--reserve", "1G", "cargo", "build"], env)
    assert request.reserve == G  # overridable
    for args in (["--reserve", "1G", "true"], ["--budget", "a//b", "true"]):
        with pytest.raises(UsageError):
            parse_run(args, {})
    with pytest.raises(UsageError):
        parse_run(["--budget", "a", "--parent", "x", "true"], {})
    for backend in ("rlimit", "systemd"):
        with pytest.raises(UsageError, match="--budget needs the cgroup backend"):
            parse_run(["--backend", backend, "true"], {"AERO_BUDGET": "agents"})


# -- cgroup v2 on a fake tree (the development host has no v2 memory controller) ---------------
def fake_v2(tmp_path) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    from sandbox.cgroups.cgroupfs import Hierarchy

    own = tmp_path / "own"
    own.mkdir()
    (own / "cgroup.controllers").write_text("memory pids\n")
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    return Hierarchy(2, str(tmp_path), frozenset({"memory", "pids"}), str(own)), str(own)


def test_v2_levels_caps_and_reading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sandbox.budgets import cgroup as levels_fs

    place, own = fake_v2(tmp_path)
    parts = ("agents", "agent-17")
    made = levels_fs.ensure([place], parts)  # type: ignore[list-item]
    assert made == [f"{own}/aero-budget-agents", f"{own}/aero-budget-agents/aero-budget-agent-17"]
    inner = made[-1]
    for name, text in (("memory.current", "1048576\n"), ("memory.max", "max\n"),
                       ("pids.max", "max\n"), ("memory.peak", "2097152\n")):  # fmt: skip
        (tmp_path / inner.removeprefix(str(tmp_path) + "/") / name).write_text(text)
    levels_fs.set_caps([place], parts, Caps(12 * G, 100))  # type: ignore[list-item]
    level = levels_fs.read_level([place], parts)  # type: ignore[list-item]
    assert (level.caps.memory_bytes, level.caps.pids, level.usage_bytes) == (12 * G, 100, 1 << 20)
    assert level.peak_bytes == 2 << 20
    levels_fs.set_caps([place], parts, Caps(None, None))  # type: ignore[list-item]
    assert levels_fs.read_level([place], parts).caps == Caps(None, None)  # type: ignore[list-item]
    with pytest.raises(Exception, match="its members use 1.0 MiB"):
        levels_fs.set_caps([place], parts, Caps(4096, None))  # type: ignore[list-item]


def test_v2_budget_watch_tells_a_budget_oom_from_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sandbox.budgets.oom import BudgetWatch

    outer, inner, sandbox = (tmp_path / n for n in ("outer", "inner", "sandbox"))
    for path in (outer, inner, sandbox):
        path.mkdir()
        (path / "memory.events.local").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    watch = BudgetWatch("a/b", [("a", str(outer)), ("a/b", str(inner))], 2)
    assert watch.classify(str(sandbox), 2) is None  # nothing happened
    (outer / "memory.events.local").write_text("max 3\noom 1\noom_kill 0\n")
    assert watch.classify(str(sandbox), 2) is None  # a neighbour was the victim
    (sandbox / "memory.events.local").write_text("max 0\noom 0\noom_kill 1\noom_group_kill 1\n")
    assert watch.classify(str(sandbox), 2) == "budget_oom"
    assert watch.describe()["ran_out"]["budget"] == "a"  # type: ignore[index]
    own = BudgetWatch("a/b", [("a", str(outer)), ("a/b", str(inner))], 2)
    (sandbox / "memory.events.local").write_text("max 5\noom 1\noom_kill 2\n")
    assert own.classify(str(sandbox), 2) == "oom"  # its own memory.max; no level ran out since


# -- the systemd backend's slices (budgets/slices.py) ---------------------------------------------
def test_slice_names_nest_by_level_and_escape_a_dash_in_a_segment() -> None:
    from sandbox.budgets.model import slice_names, slice_segments

    assert slice_names(("agents", "agent-17")) == [
        "aero-agents.slice",
        "aero-agents-agent\\x2d17.slice",
    ]
    assert slice_names(("a.b_c",)) == ["aero-a.b_c.slice"]
    for parts in (("agents",), ("agents", "agent-17"), ("x-1", "y-2", "z")):
        assert slice_segments(slice_names(parts)[-1]) == parts
    for foreign in ("aero.slice", "user-1000.slice", "aero-.slice", "aero-a--b.slice",
                    "aero-x.scope", "aero-_a.slice"):  # fmt: skip
        assert slice_segments(foreign) is None, foreign


def test_slice_levels_are_the_cgroups_systemd_makes() -> None:
    from sandbox.budgets import cgroup as levels_fs
    from sandbox.budgets.model import SLICES
    from sandbox.cgroups.cgroupfs import Hierarchy

    top = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/aero.slice"
    place = Hierarchy(2, "/sys/fs/cgroup", frozenset({"memory", "pids", SLICES}), top)
    assert levels_fs.level_dir(place, ("agents", "agent-17")) == (
        f"{top}/aero-agents.slice/aero-agents-agent\\x2d17.slice"
    )


def test_own_limit_on_the_scope_is_oom_not_budget_oom(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The systemd backend holds --mem on the scope, above <scope>/command."""
    from sandbox.budgets.oom import BudgetWatch

    level, scope, command = (tmp_path / n for n in ("level", "scope", "scope/command"))
    for path in (level, scope, command):
        path.mkdir()
        (path / "memory.events.local").write_text("oom 0\noom_kill 0\n")
    watch = BudgetWatch("a", [("a", str(level))], 2)
    (scope / "memory.events.local").write_text("max 2\noom 1\noom_kill 0\n")
    (command / "memory.events.local").write_text("oom 0\noom_kill 1\n")
    assert watch.classify(str(command), 2, own_limit=str(scope)) == "oom"
    (scope / "memory.events.local").write_text("oom 0\noom_kill 0\n")
    (level / "memory.events.local").write_text("oom 1\noom_kill 0\n")
    assert watch.classify(str(command), 2, own_limit=str(scope)) == "budget_oom"


class FakeManager:
    """systemd as budgets/slices.py uses it: transient slices are cgroup directories."""

    def __init__(self, top: str) -> None:
        from sandbox.budgets.slices import DESCRIPTION

        self.top, self.description, self.units = top, DESCRIPTION, {}  # type: ignore[var-annotated]

    def path(self, unit: str) -> str:
        from sandbox.budgets.model import slice_names, slice_segments

        parts = slice_segments(unit)
        assert parts is not None
        return os.path.join(self.top, *slice_names(parts))

    def start_scope(self, unit: str, properties: list[tuple[str, object]]) -> str:
        os.makedirs(self.path(unit))
        for name in ("memory.current", "memory.peak"):
            with open(os.path.join(self.path(unit), name), "w") as f:
                f.write("0\n")
        self.units[unit] = dict(properties)["Description"]
        self._apply(unit, properties)
        return "done"

    def manager(self, method: str, _sig: bytes, values: list, properties=None):  # type: ignore[no-untyped-def]
        if method == "SetUnitProperties":
            self._apply(values[0].decode(), properties)
            return None
        return [(u.encode(), d.encode(), b"loaded", b"active") for u, d in self.units.items()]

    def _apply(self, unit: str, properties: list[tuple[str, object]]) -> None:
        from sandbox.budgets.slices import INFINITY

        for name, file in (("MemoryMax", "memory.max"), ("TasksMax", "pids.max")):
            value = dict(properties).get(name)
            if value is not None:
                with open(os.path.join(self.path(unit), file), "w") as f:
                    f.write("max\n" if value == INFINITY else f"{value}\n")

    def stop_unit(self, unit: str) -> None:
        for name in os.listdir(self.path(unit)):
            os.unlink(os.path.join(self.path(unit), name))
        os.rmdir(self.path(unit))
        del self.units[unit]


def test_slices_make_cap_list_and_remove_only_ours(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sandbox.budgets import cgroup as levels_fs
    from sandbox.budgets import slices
    from sandbox.budgets.model import SLICES
    from sandbox.cgroups.cgroupfs import Hierarchy

    top = tmp_path / "aero.slice"
    top.mkdir()
    (top / "aero-admins.slice").mkdir()  # an admin's: no Description of ours
    bus = FakeManager(str(top))
    places = [Hierarchy(2, str(tmp_path), frozenset({"memory", "pids", SLICES}), str(top))]
    parts = ("agents", "agent-17")
    made = slices.ensure(bus, places, parts)  # type: ignore[arg-type]
    assert made == [str(top / "aero-agents.slice"),
                    str(top / "aero-agents.slice" / "aero-agents-agent\\x2d17.slice")]  # fmt: skip
    assert slices.ensure(bus, places, parts) == []  # type: ignore[arg-type]
    slices.set_caps(bus, places, parts, Caps(12 * G, 100))  # type: ignore[arg-type]
    assert levels_fs.read_level(places, parts).caps == Caps(12 * G, 100)
    assert levels_fs.read_level(places, parts[:1]).caps == Caps(None, None)
    assert slices.names(bus, places) == [("agents",), parts]  # type: ignore[arg-type]
    assert levels_fs.names_below(places, ("agents",)) == ["aero-agents-agent\\x2d17.slice"]
    removed = slices.remove(bus, places, ("agents",))  # type: ignore[arg-type]
    assert removed == [made[1], made[0]] and not bus.units
    assert (top / "aero-admins.slice").is_dir()
