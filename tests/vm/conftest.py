"""The VM stage's tests: a Debian VM with systemd as PID 1 on pure cgroup v2 (vagrant/).

They run only where AERO_VM=1 (set by vagrant/guest-stage.sh), as root and as a lingering user.
There every capability is required (AERO_REQUIRE_CAPABILITIES=1): a missing one fails.

Each behaviour runs in two modes (the `mode` fixture):
    systemd    `--backend auto`, which must pick systemd: a transient scope per run
    cgroup     `--backend cgroup` inside a scope systemd gives us with Delegate=yes
               (systemd-run [--user] --scope -p Delegate=yes): pure v2 direct, the backend moves
               into a leaf and enables the controllers itself
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.backends.selection import systemd_running
from tests.conftest import LAUNCHER, launcher_env, need, read_report, sandbox_cgroups, wait_until

USER = os.geteuid() != 0
SYSTEMCTL = ["systemctl", "--user"] if USER else ["systemctl"]
# systemd-run --scope execs the command in a new scope: same pid, exit code and signals.
SCOPE = ["systemd-run"] + (["--user"] if USER else []) + ["--quiet", "--scope"]
DELEGATED_SCOPE = SCOPE + ["-p", "Delegate=yes"]


@pytest.fixture(autouse=True)
def vm_only() -> None:
    if os.environ.get("AERO_VM") != "1":
        pytest.skip("VM stage only (AERO_VM=1): bash vagrant/qemu-stage runs it")
    need(systemd_running(), "systemd is not PID 1 in this VM")


def units() -> set[str]:
    """aero-sandbox units systemd still knows (loaded, active or not)."""
    out = subprocess.run(
        SYSTEMCTL + ["list-units", "--all", "--plain", "--no-legend", "aero-sandbox-*"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(autouse=True)
def nothing_left_behind(vm_only: None):
    before_cgroups, before_units = sandbox_cgroups(), units()
    yield
    # A launcher's guardian may still be finishing a removal: allow it a moment.
    wait_until(lambda: not (sandbox_cgroups() - before_cgroups), timeout=5)
    wait_until(lambda: not (units() - before_units), timeout=5)
    assert not sandbox_cgroups() - before_cgroups, "cgroups left behind"
    assert not units() - before_units, "units left behind"


class Mode:
    """How a test launches aero-sandbox in one of the two modes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, args: list[str]) -> list[str]:
        if self.name == "systemd":
            return LAUNCHER + args
        return DELEGATED_SCOPE + ["--"] + LAUNCHER + ["--backend", "cgroup"] + args

    def popen(self, args: list[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start the launcher (systemd-run --scope execs it: the pid is the launcher's)."""
        kwargs.setdefault("env", launcher_env())
        kwargs.setdefault("text", True)
        return subprocess.Popen(self.argv(args), start_new_session=True, **kwargs)  # type: ignore[call-overload]

    def run(
        self, args: list[str], timeout: float = 90, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run to the end, bounded; on overrun kill its whole process group."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def check_report(self, path: Path) -> dict[str, object]:
        """The report, after checking the backend this mode must use."""
        data = read_report(path)
        assert data["backend"] == self.name, data["backend_choice"]
        sandbox = data["sandbox"]
        assert isinstance(sandbox, dict)
        if self.name == "systemd":
            assert str(sandbox["unit"]).endswith(".scope")
            assert sandbox["cgroups"]["memory"].endswith("/" + sandbox["unit"])
            assert sandbox["cgroup_mode"] == "v2"
        return data


def process_states(pid: int) -> str:
    """The launcher's threads and children as /proc shows them: what a hung run waits on."""
    lines = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            status = Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines()
            wanted = [s for s in status if s.startswith(("State", "SigPnd", "ShdPnd", "SigBlk"))]
            wchan = Path(f"/proc/{pid}/task/{task}/wchan").read_text()
            lines.append(f"{pid}/{task} {wanted} wchan={wchan}")
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            status = Path(f"/proc/{child}/status").read_text().splitlines()
            wanted = [s for s in status if s.startswith(("Name", "State", "SigPnd", "SigCgt"))]
            lines.append(f"child {child} {wanted} wchan={Path(f'/proc/{child}/wchan').read_text()}")
    except OSError as err:
        lines.append(str(err))
    return "\n".join(lines)


@pytest.fixture(params=["systemd", "cgroup"], ids=["auto-systemd", "cgroup-in-delegated-scope"])
def mode(request: pytest.FixtureRequest) -> Mode:
    return Mode(request.param)


PY = sys.executable
