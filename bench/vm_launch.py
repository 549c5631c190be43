#!/usr/bin/env python3
"""Launch overhead on systemd + pure cgroup v2 (the VM stage): systemd backend vs cgroup backend.

Inside the VM, through the stage (prints the table into its log, as root and as the user aero):

    AERO_VM_PYTEST_ARGS="-s -q bench/vm_launch.py" bash vagrant/qemu-stage

or by hand on any systemd host with the project installed:

    systemd-run [--user] --scope -p Delegate=yes -- python3 bench/vm_launch.py [--runs 30]

(the cgroup backend needs the delegated scope around it; the systemd backend makes its own).
Interleaved runs, one of each command per round, so drifts of the machine hit all alike, of:
  python3 -c pass                           the interpreter the launcher runs on
  systemd-run [--user] --scope true         what systemd itself takes to start a scope
  aero-sandbox --backend systemd -- true    a transient scope per run, through pystemd
  aero-sandbox --backend cgroup -- true     cgroups made below ours, in the delegated scope
  floor: python + pystemd scope + true      the least a Python launcher on pystemd can do: load
                                            dbuslib, connect as the backend does, start a scope
                                            with itself in it, wait for the job, exec true
Prints a Markdown table: median, p90, and the median minus python's; then the speed target of
the systemd backend beside its measurement: its median at most python3 -c pass plus
systemd-run --scope true, both measured in the same run (no worse than a shell wrapper around
systemd-run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

USER = os.geteuid() != 0
SCOPE = ["systemd-run"] + (["--user"] if USER else []) + ["--quiet", "--scope"]

# The floor: only what any Python launcher on pystemd must do, through the backend's own
# connection (sandbox/backends/systemd/bus.py), so the gap above it is the launcher's own.
FLOOR = """
import os
from sandbox.backends.systemd.bus import Bus
bus = Bus.connect()
assert bus.start_scope(f"aero-floor-{os.getpid()}.scope", [("PIDs", [os.getpid()])]) == "done"
bus.close()
os.execvp("true", ["true"])
"""


def timed(argv: list[str]) -> float:
    # os.waitpid blocks and returns at once; Popen.wait(timeout=) would poll with sleeps.
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status = os.waitpid(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = 0
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({status}): run it by hand to see why")
    return took


def commands() -> dict[str, list[str]]:
    # The installed command, as a user runs it (with its bundle: sandbox/bundle.py), where the
    # venv has one; else this checkout's package.
    entry = os.path.join(os.path.dirname(sys.executable), "aero-sandbox")
    launcher = [entry] if os.path.exists(entry) else [sys.executable, "-m", "sandbox"]
    launcher += ["--mem", "1G"]
    return {
        "python3 -c pass": [sys.executable, "-c", "pass"],
        " ".join(SCOPE[:-1] + ["--scope", "true"]): SCOPE + ["true"],
        "aero-sandbox --backend systemd -- true": launcher + ["--backend", "systemd", "--", "true"],
        "aero-sandbox --backend cgroup -- true": launcher + ["--backend", "cgroup", "--", "true"],
        "floor: python + pystemd scope + true": [sys.executable, "-c", FLOOR],
    }


def measure(runs: int) -> list[tuple[str, float, float]]:
    cmds = commands()
    for argv in cmds.values():  # warm caches, and fail early if one cannot run here
        for _ in range(3):
            timed(argv)
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, argv in cmds.items():
            samples[name].append(timed(argv))
    rows = []
    for name, values in samples.items():
        values.sort()
        rows.append((name, statistics.median(values), values[int(len(values) * 0.9)]))
    return rows


def target(rows: list[tuple[str, float, float]]) -> list[str]:
    """The systemd backend's target beside the measured value."""
    median = {name: m for name, m, _ in rows}
    names = list(median)
    python, scope, systemd = median[names[0]], median[names[1]], median[names[2]]
    wanted = python + scope
    met = "met" if systemd <= wanted else "**not met**"
    floor = median[names[4]]
    return [
        "| target | wanted | measured | |",
        "|---|---|---|---|",
        f"| `{names[2]}` | <= python3 + `{names[1]}` = {wanted * 1e3:.0f} ms "
        f"| {systemd * 1e3:.0f} ms ({systemd / wanted:.2f}x) | {met} |",
        f"| {names[4]} | | {floor * 1e3:.0f} ms ({floor / wanted:.2f}x) | "
        f"launcher's own: +{(systemd - floor) * 1e3:.0f} ms |",
    ]


def table(runs: int) -> str:
    rows = measure(runs)
    base = rows[0][1]
    who = "user aero (systemd --user)" if USER else "root (system manager)"
    lines = [
        f"Launch overhead as {who}, {runs} interleaved runs each, {os.cpu_count()} vCPUs:",
        "",
        "| command | median | p90 | median - python |",
        "|---|---|---|---|",
    ]
    for index, (name, median, p90) in enumerate(rows):
        extra = f"+{(median - base) * 1e3:.0f} ms" if index else ""
        lines.append(f"| `{name}` | {median * 1e3:.0f} ms | {p90 * 1e3:.0f} ms | {extra} |")
    return "\n".join([*lines, "", *target(rows)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(table(args.runs), flush=True)


def test_vm_launch_overhead() -> None:
    """The stage's entry (pytest collects this file when named on its command line)."""
    import pytest

    if os.environ.get("AERO_VM") != "1":
        pytest.skip("VM stage only (AERO_VM=1)")
    runs = os.environ.get("AERO_BENCH_RUNS", "30")
    argv = SCOPE + ["-p", "Delegate=yes", "--", sys.executable, __file__, "--runs", runs]
    # Not from the source tree: `python -m sandbox` must find the installed package.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd="/")
    print("\n" + proc.stdout + proc.stderr)
    assert proc.returncode == 0


if __name__ == "__main__":
    main()
