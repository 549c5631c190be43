"""What only the systemd backend does: the scope and its properties, --slice, RuntimeMaxSec when
nobody is left to stop the command, stale scopes, and the lines that name a refusal's fix."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from sandbox.registry import store as registry
from tests.conftest import LAUNCHER, launcher_env, pid_alive, run_launcher, wait_until
from tests.vm.conftest import DELEGATED_SCOPE, PY, SCOPE, SYSTEMCTL, USER, Mode, units
from tests.vm.test_core_vm import ALLOCATE, STUBBORN_TREE

SYSTEMD = Mode("systemd")

# Prints the properties systemd holds for the scope the command runs in.
SHOW_OWN_SCOPE = """
import subprocess, sys
scope = open("/proc/self/cgroup").read().strip().split("/")[-2]
print(scope)
print(subprocess.run(sys.argv[1:] + ["show", scope], capture_output=True, text=True).stdout)
"""


def show(unit: str, *names: str) -> dict[str, str]:
    out = subprocess.run(
        SYSTEMCTL + ["show", unit, "-p", ",".join(names)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_scope_carries_the_limits_and_the_command(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["--mem", "200M", "--pids", "30", "--timeout", "60", "--kill-after", "3"]
    proc = SYSTEMD.run(args + ["--report", str(report), "--", PY, "-c", SHOW_OWN_SCOPE, *SYSTEMCTL])
    assert proc.returncode == 0, proc.stderr
    data = SYSTEMD.check_report(report)
    unit = str(data["sandbox"]["unit"])  # type: ignore[index]
    scope, _, shown = proc.stdout.partition("\n")
    assert scope == unit and unit.startswith(f"aero-sandbox-{data['launcher_pid']}-")
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert props["MemoryMax"] == str(200 << 20)
    assert props["MemorySwapMax"] == "0"
    assert props["TasksMax"] == "31"  # the holder is one of them
    assert props["Delegate"] == "yes"
    assert props["OOMPolicy"] == "continue"
    assert props["CollectMode"] == "inactive-or-failed"
    assert props["RuntimeMaxUSec"] == "1min 8s"  # timeout + kill-after + 5 s margin
    assert props["Description"].startswith(f"aero-sandbox: {PY} -c")
    assert data["backend_choice"]["chosen"] == "systemd"  # type: ignore[index]
    assert set(data["sandbox"]["cgroups"]) == {"memory", "pids", "unified"}  # type: ignore[arg-type]


def test_a_slice_caps_the_sandboxes_in_it(tmp_path: Path) -> None:
    """--slice puts the scope in a slice whose own MemoryMax binds every sandbox in it."""
    slice_name = "aero-vmtest.slice"
    subprocess.run(
        SYSTEMCTL + ["set-property", "--runtime", slice_name, "MemoryMax=150M"],
        check=True,
        timeout=30,
    )
    try:
        report = tmp_path / "r.json"
        code = f"import time; {ALLOCATE.format(size=300 << 20)}; time.sleep(60)"
        args = ["--slice", slice_name, "--mem", "1G", "--report", str(report), "--"]
        proc = SYSTEMD.run(args + [PY, "-c", code])
        assert proc.returncode == 137, proc.stderr
        data = SYSTEMD.check_report(report)
        assert data["reason"] == "oom"
        assert data["sandbox"]["slice"] == slice_name  # type: ignore[index]
        assert f"/aero.slice/{slice_name}/aero-sandbox-" in data["sandbox"]["cgroups"]["memory"]  # type: ignore[index]
        env = launcher_env(AERO_SLICE=slice_name)
        proc = run_launcher(["--", "cat", "/proc/self/cgroup"], env=env, timeout=90)
        assert f"/{slice_name}/aero-sandbox-" in proc.stdout, proc.stderr
    finally:
        subprocess.run(SYSTEMCTL + ["stop", slice_name, "aero.slice"], timeout=30)
        subprocess.run(SYSTEMCTL + ["revert", slice_name], timeout=30, capture_output=True)


def test_systemd_ends_the_scope_when_launcher_and_guardian_are_gone(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """RuntimeMaxSec: with --timeout, systemd itself stops the scope even with nobody left."""
    pidfile = tmp_path / "pids"
    # 5 s: the tree must have written its pids before the timeout; under emulation on a busy
    # host, a user's scope plus Python's start-up took over 2 s.
    args = ["--timeout", "5", "--kill-after", "0.5", "--", PY, "-c", STUBBORN_TREE, str(pidfile)]
    launcher = SYSTEMD.popen(args)
    try:
        assert wait_until(pidfile.exists, timeout=60)
        tree = [int(p) for p in pidfile.read_text().split()]
        pids_to_kill += tree
        entry = next(
            registry.read(path)
            for path in registry.paths(registry.own_directory())
            if os.path.basename(path).startswith(f"{launcher.pid}-")
        )
        assert entry is not None and entry.get("guardian")
        unit = entry["sandbox"]["unit"]
        os.kill(entry["guardian"], signal.SIGKILL)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        # The main process dies with the launcher (PR_SET_PDEATHSIG), its children do not:
        # they ignore SIGTERM, and only systemd remains to stop them, at 5 + 0.5 + 5 s.
        assert wait_until(lambda: not [p for p in tree if pid_alive(p)], timeout=30)
        assert wait_until(lambda: unit not in units(), timeout=10)
        registry.sweep(registry.own_directory())
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


def test_a_later_run_kills_a_dead_launchers_scope() -> None:
    """A scope whose launcher and guardian were both killed, held by a daemon, with no
    timeout: the next run's teardown kills it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    unit = f"aero-sandbox-{dead.pid}-0badc0.scope"
    holder = subprocess.Popen(
        SCOPE + ["--unit", unit, "--", "sleep", "120"], start_new_session=True
    )
    try:
        assert wait_until(lambda: unit in units(), timeout=30)
        assert SYSTEMD.run(["--", "true"]).returncode == 0
        assert holder.wait(timeout=10) != 0
        assert wait_until(lambda: unit not in units(), timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def shadowed_pystemd(tmp_path: Path) -> dict[str, str]:
    """An environment where `import pystemd.dbuslib` fails, as where the extra is missing."""
    package = tmp_path / "shadow" / "pystemd"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('No module named pystemd')\n")
    env = launcher_env()
    env["PYTHONPATH"] = f"{package.parent}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_without_pystemd_auto_says_why_and_the_fix_once(tmp_path: Path) -> None:
    env = shadowed_pystemd(tmp_path)
    argv = LAUNCHER + ["--", "true"]
    if USER:  # a user's cgroup backend needs a delegated scope; root's works as it is
        argv = DELEGATED_SCOPE + ["--"] + argv
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)
    lines = [line for line in proc.stderr.splitlines() if "systemd backend unavailable" in line]
    assert len(lines) == 1, proc.stderr
    assert "pystemd is not installed" in lines[0]
    assert "pip install 'aero-sandbox[systemd]'" in lines[0] and "libsystemd-dev" in lines[0]
    assert proc.returncode == 0, proc.stderr


def test_without_pystemd_backend_systemd_fails_with_125(tmp_path: Path) -> None:
    env = shadowed_pystemd(tmp_path)
    proc = run_launcher(["--backend", "systemd", "--", "true"], env=env)
    assert proc.returncode == 125
    assert proc.stderr.count("\n") == 1 and "pip install 'aero-sandbox[systemd]'" in proc.stderr


# Root's launcher in a mount namespace where the manager's private socket is /dev/null: a
# connect() there is refused, as where systemd listens on no private socket for us.
HIDE_PRIVATE_SOCKET = [
    "unshare",
    "--mount",
    "sh",
    "-c",
    'mount --bind /dev/null /run/systemd/private && exec "$@"',
    "sh",
]


def run_without_private_socket(
    tmp_path: Path, args: list[str], **extra: str
) -> subprocess.CompletedProcess[str]:
    """The launcher where the manager's private socket cannot be used: hidden for root, a
    runtime directory without one for a user (whose bus address stays as it was)."""
    env = launcher_env(**extra)
    argv = LAUNCHER + args
    if USER:
        env.setdefault("DBUS_SESSION_BUS_ADDRESS", f"unix:path={env['XDG_RUNTIME_DIR']}/bus")
        env["XDG_RUNTIME_DIR"] = str(tmp_path)
    else:
        argv = HIDE_PRIVATE_SOCKET + argv
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)


def test_the_managers_private_socket_needs_no_bus() -> None:
    """Like systemctl, the launcher talks to the manager directly: no dbus-daemon in between."""
    variable = "DBUS_SESSION_BUS_ADDRESS" if USER else "DBUS_SYSTEM_BUS_ADDRESS"
    env = launcher_env(**{variable: "unix:path=/nonexistent/bus"})
    proc = run_launcher(["--backend", "systemd", "--mem", "100M", "--", "true"], env=env)
    assert proc.returncode == 0, proc.stderr


def test_without_the_private_socket_the_bus_serves(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["--backend", "systemd", "--mem", "100M", "--report", str(report), "--", "true"]
    proc = run_without_private_socket(tmp_path, args)
    assert proc.returncode == 0, proc.stderr
    assert SYSTEMD.check_report(report)["sandbox"]["unit"]  # type: ignore[index]


def test_no_bus_names_the_fix(tmp_path: Path) -> None:
    args = ["--backend", "systemd", "--", "true"]
    if USER:  # no user bus in sight: the fix is lingering
        env = launcher_env()
        env.pop("XDG_RUNTIME_DIR", None)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        proc = run_launcher(args, env=env)
        fix = "loginctl enable-linger"
    else:
        bogus = "unix:path=/nonexistent/bus"
        proc = run_without_private_socket(tmp_path, args, DBUS_SYSTEM_BUS_ADDRESS=bogus)
        fix = "start dbus"
    assert proc.returncode == 125 and proc.stderr.count("\n") == 1, proc.stderr
    assert "systemd backend unavailable" in proc.stderr and fix in proc.stderr
