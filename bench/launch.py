#!/usr/bin/env python3
"""Launch overhead, timeout latency and the launcher's own memory (issue: speed of the core).

    .venv/bin/python bench/launch.py [--runs 200]

Interleaved runs (one of each command per round, so drifts of the machine hit all alike) of:
  python -c pass                   the same interpreter the launcher runs on
  bare floor (bench/floor.py)      only what a cgroup sandbox cannot avoid: three cgroups made,
                                   the child cloned into the v2 one (sharing memory where the C
                                   module is built), joining v1 through `tasks`, exec, rmdir
                                   (root, or a delegated cgroup; left out where it cannot run)
  aero-sandbox --mem 1G -- true    the installed entry point, backend auto
  aero-sandbox --backend rlimit    the fallback: rlimits and a watchdog, no cgroup
  runexec --no-container -- true   BenchExec, when `runexec` is on PATH or named by $RUNEXEC
                                   (python3 -m venv /tmp/bx; /tmp/bx/bin/pip install benchexec)
Prints Markdown tables for the README: each command's median, p90 and ratio to python, then
each target of the speed issue beside the measured value.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
FLOOR = Path(__file__).with_name("floor.py")
PYTHON = "python3 -c pass"
BARE = "bare floor (bench/floor.py)"
AERO = "aero-sandbox --mem 1G -- true"
RLIMIT = "aero-sandbox --backend rlimit --mem 1G -- true"
RUNEXEC = "runexec --no-container -- true"


def timed(argv: list[str], expect: int = 0) -> float:
    # No timeout= here: Popen.wait(timeout) polls with sleeps of up to 50 ms, which would be
    # measured as the launcher's time. os.waitpid blocks and returns at once.
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status = os.waitpid(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = 0
    if os.waitstatus_to_exitcode(status) != expect:
        raise SystemExit(f"{' '.join(argv)} failed ({status}): run it by hand to see why")
    return took


def commands() -> dict[str, list[str]]:
    launcher = str(BIN / "aero-sandbox")
    found = {PYTHON: [sys.executable, "-c", "pass"]}
    floor = [sys.executable, str(FLOOR)]
    if subprocess.run(floor, stderr=subprocess.DEVNULL).returncode == 0:
        found[BARE] = floor
    else:
        print(f"(no bare floor: {FLOOR.name} cannot make cgroups here)\n")
    found[AERO] = [launcher, "--mem", "1G", "--", "true"]
    found[RLIMIT] = [launcher, "--backend", "rlimit", "--mem", "1G", "--", "true"]
    runexec = os.environ.get("RUNEXEC") or shutil.which("runexec")
    if runexec:
        found[RUNEXEC] = [
            runexec,
            "--no-container",
            "--quiet",
            "--output",
            os.devnull,
            "--",
            "true",
        ]
    return found


def launch_overhead(runs: int) -> list[tuple[str, float, float]]:
    cmds = commands()
    for argv in cmds.values():  # warm caches
        for _ in range(5):
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


def timeout_latency(runs: int) -> list[float]:
    launcher = str(BIN / "aero-sandbox")
    late = []
    for _ in range(runs):
        took = timed([launcher, "-q", "--timeout", "0.5", "--", "sleep", "10"], expect=124)
        late.append(took - 0.5)
    return sorted(late)


def launcher_peak_rss() -> int:
    """Max RSS (KiB) of the launcher process itself (its own rusage, not its children's)."""
    launcher = str(BIN / "aero-sandbox")
    proc = subprocess.Popen([launcher, "--", "sleep", "0.3"])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    if status != 0:
        raise SystemExit(f"{launcher} -- sleep 0.3 failed ({status})")
    return usage.ru_maxrss


def targets(rows: list[tuple[str, float, float]], late: list[float], rss_kib: int) -> list[str]:
    """The speed issue's targets, each beside what this run measured."""
    median = {name: m for name, m, _ in rows}
    base = median[PYTHON]
    found = []

    def target(what: str, wanted: str, measured: str, met: bool) -> None:
        found.append(f"| {what} | {wanted} | {measured} | {'met' if met else '**not met**'} |")

    for name in (AERO, RLIMIT):
        ratio = median[name] / base
        target(f"`{name}` / python", "<= 1.50x", f"{ratio:.2f}x", ratio <= 1.5)
    if BARE in median:
        gap = (median[AERO] - median[BARE]) / base
        target(
            "cgroup backend above the bare floor",
            "<= 0.30x python",
            f"{gap:+.2f}x (floor {median[BARE] / base:.2f}x)",
            gap <= 0.3,
        )
    if RUNEXEC in median:
        ratio = median[AERO] / median[RUNEXEC]
        target("aero-sandbox / runexec", "<= 0.60x", f"{ratio:.2f}x", ratio <= 0.6)
    late_median = statistics.median(late)
    target(
        "`--timeout 0.5` returns after the deadline (median)",
        "<= 0.3 s",
        f"{late_median * 1e3:.0f} ms median, {late[-1] * 1e3:.0f} ms max",
        late_median <= 0.3,
    )
    target("launcher peak RSS", "<= 30 MB", f"{rss_kib / 1024:.1f} MiB", rss_kib * 1024 <= 30e6)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rows = launch_overhead(args.runs)
    base = rows[0][1]
    print(f"Launch overhead, {args.runs} interleaved runs each, on {os.cpu_count()} cores:\n")
    print("| command | median | p90 | median / python |")
    print("|---|---|---|---|")
    for name, median, p90 in rows:
        print(f"| `{name}` | {median * 1e3:.1f} ms | {p90 * 1e3:.1f} ms | {median / base:.2f}x |")
    late = timeout_latency(max(10, args.runs // 10))
    rss = launcher_peak_rss()
    print("\n| target | wanted | measured | |")
    print("|---|---|---|---|")
    for line in targets(rows, late, rss):
        print(line)


if __name__ == "__main__":
    main()
