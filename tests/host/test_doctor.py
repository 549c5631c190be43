"""`aero-sandbox doctor` on the real host: it prepares and removes a real sandbox (the host
conftest checks that no cgroup is left behind), and names what this machine can enforce."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sandbox import doctor
from sandbox.backends import selection
from sandbox.cgroups import cgroupfs
from sandbox.core.errors import SandboxError
from tests.conftest import launcher_env, need, run_launcher


def run_doctor(*args: str, cwd: Path | None = None, **env: str) -> tuple[int, str, str]:
    proc = run_launcher(["doctor", *args], env=launcher_env(**env), cwd=cwd, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def checks(text: str) -> dict[str, dict[str, object]]:
    return {check["name"]: check for check in json.loads(text)["checks"]}


def test_doctor_names_the_backend_and_systemd(tmp_path: Path) -> None:
    code, out, err = run_doctor(cwd=tmp_path)
    found = checks(run_doctor("--json", cwd=tmp_path)[1])
    backend = found["backend"]
    chosen = backend["details"]["chosen"]  # type: ignore[index]
    assert f"auto picks {chosen}" in out
    if not selection.systemd_running():
        assert "systemd is absent" in out
        assert found["systemd"]["status"] in ("info", "warn")
    if backend["status"] == "ok":
        assert code == 0 and "verdict: sandboxes here enforce memory (exit 0)" in out
    assert err == ""


def test_doctor_on_this_development_host(tmp_path: Path) -> None:
    """This machine: root, no systemd as PID 1, hybrid cgroups: the cgroup backend."""
    if os.geteuid() != 0 or selection.systemd_running():
        # Which host this is, not a capability it lacks: a plain skip (the VM runs the next one).
        pytest.skip("describes the development host: root without systemd")
    mode = doctor.cgroup_mode(cgroupfs.discover())
    code, out, _ = run_doctor(cwd=tmp_path)
    assert code == 0
    assert "auto picks cgroup" in out and "systemd is absent: not PID 1" in out
    assert f"  {mode};" in out or f" {mode}; controllers we may use" in out
    found = checks(run_doctor("--json", cwd=tmp_path)[1])
    assert found["backend"]["details"]["chosen"] == "cgroup"  # type: ignore[index]
    assert found["backend"]["status"] == "ok"
    delegated = found["cgroups"]["details"]["delegated"]  # type: ignore[index]
    assert "memory" in delegated
    if any(h.version == 2 for h in cgroupfs.discover()) and doctor.kernel_version() >= (5, 14):
        assert found["cgroup v2"]["details"]["cgroup.kill"] is True  # type: ignore[index]
    assert found["processes"]["details"]["tasks_in_use"] > 0  # type: ignore[index]


def test_doctor_on_a_systemd_host(tmp_path: Path) -> None:
    """The VM stage: systemd as PID 1 on pure cgroup v2, as root and as a lingering user."""
    if not selection.systemd_running():
        pytest.skip("describes a host with systemd as PID 1 (the VM stage)")
    code, out, _ = run_doctor(cwd=tmp_path)
    assert code == 0, out
    assert "auto picks systemd" in out
    found = checks(run_doctor("--json", cwd=tmp_path)[1])
    assert found["backend"]["details"]["chosen"] == "systemd"  # type: ignore[index]
    assert found["backend"]["status"] == "ok"
    assert found["systemd"]["status"] == "ok"


def test_doctor_json_matches_exit_status(tmp_path: Path) -> None:
    code, out, _ = run_doctor("--json", cwd=tmp_path)
    data = json.loads(out)
    assert data["exit_code"] == code
    assert data["memory_enforced"] == (code != doctor.EXIT_NO_MEMORY_SANDBOX)
    names = [check["name"] for check in data["checks"]]
    wanted = ("kernel", "start-up", "cgroups", "systemd", "processes", "open files", "machine")
    for name in (*wanted, "node"):
        assert name in names
    assert names[-1] == "backend"


def test_node_against_nvmrc(tmp_path: Path) -> None:
    need(shutil.which("node") is not None, "node is not installed")
    (tmp_path / ".nvmrc").write_text("v1.2.3\n")
    project = tmp_path / "web" / "src"
    project.mkdir(parents=True)
    code, out, _ = run_doctor(cwd=project)
    if checks(run_doctor("--json", cwd=project)[1])["backend"]["status"] != "ok":
        pytest.skip("no memory-enforcing backend: exit 1 wins")
    assert code == doctor.EXIT_PROJECT_ERROR
    assert "does not match" in out and "AERO_ALLOW_UNSUPPORTED_NODE=1" in out
    code, out, _ = run_doctor(cwd=project, AERO_ALLOW_UNSUPPORTED_NODE="1")
    assert code == 0 and "allowed by AERO_ALLOW_UNSUPPORTED_NODE" in out
    import subprocess

    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    (tmp_path / ".nvmrc").write_text(version.strip().split(".")[0] + "\n")  # "v20"
    found = checks(run_doctor("--json", cwd=project)[1])
    assert found["node"]["status"] == "ok"


@pytest.mark.parametrize(
    ("wanted", "actual", "expected"),
    [
        ("20", "v20.11.1", True),
        ("v20.11", "v20.11.1", True),
        ("v20.11.1", "v20.11.1", True),
        ("v20.11.0", "v20.11.1", False),
        ("18", "v20.11.1", False),
        ("lts/iron", "v20.11.1", None),
        ("node", "v20.11.1", None),
    ],
)
def test_node_version_comparison(wanted: str, actual: str, expected: bool | None) -> None:
    assert doctor.node_matches(wanted, actual) is expected


def test_no_memory_sandbox_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*_args: object) -> object:
        raise SandboxError("no backend can run here: cgroup backend unavailable: ... (fix)")

    monkeypatch.setattr(selection, "prepare", refuse)
    diagnosis = doctor.diagnose(environ={}, cwd=str(tmp_path))
    assert diagnosis.exit_code == doctor.EXIT_NO_MEMORY_SANDBOX
    assert not diagnosis.memory_enforced
    assert "no sandbox here can enforce memory" in doctor.render(diagnosis)


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v595", (6, 18)),
        ("5.10.0-28-amd64", (5, 10)),
        ("4.19rc1", (4, 19)),
        ("x", (0, 0)),
    ],
)
def test_kernel_version(release: str, expected: tuple[int, int]) -> None:
    assert doctor.kernel_version(release) == expected
