"""The JSON report: README.md's schema table against the keys sandbox/report.py writes."""

from __future__ import annotations

import re
from pathlib import Path

from sandbox import report
from sandbox.core.limits import Limits
from sandbox.core.result import Attempt, Placement, RunResult, Usage
from sandbox.options import parse_run
from tests.conftest import ROOT, read_report, run_launcher

# Objects whose keys depend on the backend (documented per backend in README and docs/).
BACKEND_SPECIFIC = {"sandbox"}


def documented() -> dict[str, set[str] | None]:
    """key -> the keys README names for it when it is an object (None: not an object)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## JSON report", 1)[1].split("\n## ", 1)[0]
    keys: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        inner = set(re.findall(r"`([a-z_]+)`", cells[2])) if cells[1] == "object" else None
        for name in names:
            keys[name] = inner
    return keys


def check(data: dict[str, object]) -> None:
    schema = documented()
    assert set(data) == set(schema), "README.md's report table and the report differ"
    assert list(data) == [key for key in schema if key in data], "not in the table's order"
    for key, inner in schema.items():
        if inner is None or key in BACKEND_SPECIFIC:
            continue
        value = data[key]
        assert isinstance(value, dict)
        assert set(value) <= inner, f"{key}: {set(value) - inner} not in README.md"


def test_report_built_from_a_result_matches_the_readme_table() -> None:
    request = parse_run(["--expect", "out", "--report", "r.json", "--", "true"], {})
    result = RunResult(
        reason="exited",
        exit_code=0,
        child_exit_code=0,
        wall_s=0.5,
        usage=Usage(peak_memory_bytes=1 << 20, cpu_s=0.1),
        limits=Limits(memory_bytes=1 << 30, pids=64),
        sandbox=Placement(cgroups={"memory": "/sys/fs/cgroup/x"}, cgroup_mode="v2"),
    )
    choice = {"requested": "auto", "chosen": "cgroup", "refused": {"systemd": "why"}}
    attempt = Attempt(
        result=result,
        backend_name="cgroup",
        choice={**choice, "notices": ["why"]},
        not_enforced=["pids"],
        enclosing=(512 << 20, "/sys/fs/a"),
    )
    data = report.build(request, attempt, result, ["EAGAIN (os error 11)"], ["out is missing"])
    check(data)
    assert data["backend_choice"] == choice  # notices decide stderr lines, not the report
    assert data["effective_memory_bytes"] == 512 << 20
    assert data["expect"] == {"paths": ["out"], "problems": ["out is missing"]}
    assert data["limits"]["address_space_bytes"] is None  # type: ignore[index]


def test_report_of_a_real_run_matches_the_readme_table(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    missing = tmp_path / "never-written"
    done = run_launcher(
        ["--backend", "rlimit", "--report", str(path), "--expect", str(missing), "--", "true"],
        timeout=60,
    )
    assert done.returncode == 123, done.stderr
    data = read_report(path)
    check(data)
    assert data["reason"] == "missing_output"
