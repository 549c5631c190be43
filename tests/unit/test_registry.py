"""The registry's file format, its stale-entry sweep, --parent resolution, the enclosing limit
walk and list's figures, on fake files in tmp_path (no locks held by other processes here:
tests/host/test_list_gc.py does that with real launchers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.backends.cgroup import at_parent
from sandbox.cgroups.cgroupfs import Hierarchy
from sandbox.cgroups.enclosing import enclosing_memory_limit, for_sandbox
from sandbox.core.errors import SandboxError, UsageError
from sandbox.core.limits import Limits
from sandbox.core.result import Placement
from sandbox.options import parse_run
from sandbox.registry import gc, inventory
from sandbox.registry import store as registry


class FakeBackend:
    name = "cgroup"

    def __init__(self, describe: dict[str, object]) -> None:
        self._describe = describe

    def describe(self) -> FakeBackend:  # stands in for a Placement: only its report is read
        return self

    def as_report(self) -> dict[str, object]:
        return self._describe


def test_entry_round_trip_keeps_every_argument_byte() -> None:
    argv = ["sh", "-c", "echo 'a\nb' \\ done", "", "tab\there", "cr\rlf", "\udcff-not-utf8"]
    backend = FakeBackend(
        {
            "cgroups": {"memory": "/sys/fs/cgroup/memory/aero-sandbox-1-abc", "pids": None},
            "cgroup_mode": "hybrid",
            "unit": "aero-sandbox-1-abc.scope",
            "ignored": ["lists", "are", "not", "kept"],
        }
    )
    text = registry._format(backend, argv, Limits(1 << 30, 4096, 90.0))  # type: ignore[arg-type]
    entry = registry.parse(text, "/x")
    assert entry is not None
    assert entry["argv"] == argv
    assert entry["pid"] == os.getpid()
    assert entry["backend"] == "cgroup"
    assert entry["limits"] == {"memory_bytes": 1 << 30, "pids": 4096, "timeout_s": 90.0}
    assert entry["sandbox"] == {
        "cgroups": {"memory": "/sys/fs/cgroup/memory/aero-sandbox-1-abc"},
        "cgroup_mode": "hybrid",
        "unit": "aero-sandbox-1-abc.scope",
    }


def test_unlimited_values_read_back_as_none() -> None:
    text = registry._format(FakeBackend({}), ["true"], Limits(None, None))  # type: ignore[arg-type]
    entry = registry.parse(text + "guardian 77\n")
    assert entry is not None
    assert entry["limits"] == {"memory_bytes": None, "pids": None, "timeout_s": None}
    assert entry["guardian"] == 77


@pytest.mark.parametrize("text", ["", "something else\npid 1\n", "aero-sandbox-registry 1\n"])
def test_parse_rejects_what_is_not_a_complete_entry(text: str) -> None:
    assert registry.parse(text) is None


def test_sweep_removes_dead_launchers_entries_whose_sandbox_is_gone(tmp_path: Path) -> None:
    dead = _dead_pid()
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    with_cgroup = f"{registry.MAGIC}\npid {dead}\nstarted 1\nsandbox.cgroups.memory {cgroup}\n"
    files = {
        f"{dead}-aaaaaa": f"{registry.MAGIC}\npid {dead}\nstarted 1\n",
        f".{dead}-bbbbbb": "",  # a write that never finished
        f"{dead}-cccccc": with_cgroup,  # its cgroup is still there: gc's business
        # Its cgroup is gone, where we can see: removed.
        f"{dead}-eeeeee": with_cgroup.replace(str(cgroup), str(tmp_path / "gone")),
        # Where its cgroup would be is not in our view (another mount namespace): kept.
        f"{dead}-ffffff": with_cgroup.replace(str(cgroup), str(tmp_path / "not-here" / "cg")),
        f"{os.getpid()}-dddddd": "",  # a live pid: not even opened
        "README": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    removed = registry.sweep(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        f".{dead}-bbbbbb", f"{dead}-aaaaaa", f"{dead}-eeeeee"
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{dead}-cccccc", f"{dead}-ffffff", f"{os.getpid()}-dddddd", "README", "cg"]
    )


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


HYBRID = "memory", "pids", "cpu", "unified"


def _hybrid(root: Path) -> list[Hierarchy]:
    for name in HYBRID:
        (root / name / "agents").mkdir(parents=True)
    (root / "unified" / "agents" / "cgroup.controllers").write_text("\n")
    return [
        Hierarchy(1, str(root / "memory"), frozenset({"memory"}), str(root / "memory/me")),
        Hierarchy(1, str(root / "pids"), frozenset({"pids"}), str(root / "pids")),
        Hierarchy(1, str(root / "cpu"), frozenset({"cpu"}), str(root / "cpu")),
        Hierarchy(2, str(root / "unified"), frozenset(), str(root / "unified")),
    ]


@pytest.mark.parametrize(
    "given", ["agents", "agents/", "{root}/memory/agents", "{root}/unified/agents/"]
)
def test_parent_is_the_same_relative_path_in_every_hierarchy_used(
    tmp_path: Path, given: str
) -> None:
    placed = at_parent(_hybrid(tmp_path), given.format(root=tmp_path))
    assert sorted(h.own for h in placed) == sorted(
        str(tmp_path / name / "agents") for name in ("memory", "pids", "unified")
    )


def test_parent_missing_in_one_hierarchy_names_it(tmp_path: Path) -> None:
    hierarchies = _hybrid(tmp_path)
    (tmp_path / "pids" / "agents").rmdir()
    with pytest.raises(SandboxError) as err:
        at_parent(hierarchies, "agents")
    assert str(tmp_path / "pids" / "agents") in err.value.line()
    assert "mkdir" in err.value.line()


@pytest.mark.parametrize("given", ["", "/", "../agents", "agents/../..", "/etc/agents"])
def test_parent_bad_forms_are_usage_errors(tmp_path: Path, given: str) -> None:
    with pytest.raises(UsageError) as err:
        at_parent(_hybrid(tmp_path), given)
    assert "--parent" in err.value.line()


def test_parent_option_and_environment() -> None:
    assert parse_run(["--parent", "agents", "true"], {}).parent == "agents"
    assert parse_run(["true"], {"AERO_CGROUP_PARENT": "/sys/fs/cgroup/x"}).parent == (
        "/sys/fs/cgroup/x"
    )
    assert parse_run(["true"], {}).parent is None


def _limits(root: Path, files: dict[str, str]) -> None:
    for path, value in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(value + "\n")


def test_enclosing_limit_v1_smallest_ancestor_wins(tmp_path: Path) -> None:
    unlimited = str(0x7FFFFFFFFFFFF000)
    _limits(
        tmp_path,
        {
            "memory/memory.limit_in_bytes": unlimited,
            "memory/ctr/memory.limit_in_bytes": str(4 << 30),
            "memory/ctr/agents/memory.limit_in_bytes": str(6 << 30),
            "memory/ctr/agents/me/memory.limit_in_bytes": unlimited,
        },
    )
    found = enclosing_memory_limit(str(tmp_path / "memory/ctr/agents/me"))
    assert found == (4 << 30, str(tmp_path / "memory/ctr"))


def test_enclosing_limit_v2_max_is_no_limit(tmp_path: Path) -> None:
    _limits(
        tmp_path,
        {
            "slice/memory.max": "max",
            "slice/scope/memory.max": "max",
        },
    )
    assert enclosing_memory_limit(str(tmp_path / "slice/scope")) == (None, None)
    (tmp_path / "slice/memory.max").write_text(f"{1 << 30}\n")
    assert enclosing_memory_limit(str(tmp_path / "slice/scope")) == (
        1 << 30,
        str(tmp_path / "slice"),
    )


def test_enclosing_limit_of_a_sandbox_starts_above_its_own_cgroup(tmp_path: Path) -> None:
    _limits(
        tmp_path,
        {
            "ctr/memory.max": str(2 << 30),
            "ctr/aero-sandbox-1-abc/memory.max": str(8 << 30),
        },
    )
    sandbox = Placement(cgroups={"memory": str(tmp_path / "ctr/aero-sandbox-1-abc")})
    assert for_sandbox(sandbox) == (2 << 30, str(tmp_path / "ctr"))


def test_list_reads_v1_and_v2_memory_files(tmp_path: Path) -> None:
    _limits(
        tmp_path,
        {
            "v2/memory.current": "1000",
            "v2/memory.peak": "2000",
            "v2/memory.max": "max",
            "v1/memory.usage_in_bytes": "10",
            "v1/memory.max_usage_in_bytes": "20",
            "v1/memory.limit_in_bytes": str(0x7FFFFFFFFFFFF000),
        },
    )
    assert inventory._memory(str(tmp_path / "v2")) == (1000, 2000, None)
    assert inventory._memory(str(tmp_path / "v1")) == (10, 20, None)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "-"), (512, "512B"), (1536, "1.5K"), (12 << 30, "12.0G")],
)
def test_size_column(value: int | None, shown: str) -> None:
    assert inventory.size(value) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"), [(5.9, "5s"), (192, "3m12s"), (7500, "2h05m"), (90000, "1d01h")]
)
def test_age_column(seconds: float, shown: str) -> None:
    assert inventory.age(seconds) == shown


def test_gc_parent_looks_wherever_the_parent_exists(tmp_path: Path) -> None:
    hierarchies = _hybrid(tmp_path)
    (tmp_path / "pids" / "agents").rmdir()  # gc is lenient: a run's --parent is not
    expected = [str(tmp_path / n / "agents") for n in ("memory", "cpu", "unified")]
    assert sorted(gc.parent_dirs("agents", hierarchies)) == sorted(expected)
    absolute = gc.parent_dirs(str(tmp_path / "memory" / "agents"), hierarchies)
    assert sorted(absolute) == sorted(expected)
    with pytest.raises(UsageError):
        gc.parent_dirs("nowhere", hierarchies)
    with pytest.raises(UsageError):
        gc.parent_dirs("../agents", hierarchies)
