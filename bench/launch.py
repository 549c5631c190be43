#!/usr/bin/env python3
"""Launch overhead, timeout latency and the launcher's own memory (issue: speed of the core).

    .venv/bin/python bench/launch.py [--runs 200]

Interleaved runs (one of each command per round, so drifts of the machine hit all alike) of:
  python -c pass                   the same interpreter the launcher runs on
  aero-sandbox --mem 1G -- true    the installed entry point, backend auto
  runexec --no-container -- true   BenchExec, when `runexec` is on PATH or named by $RUNEXEC
                                   (python3 -m venv /tmp/bx; /tmp/bx/bin/pip install benchexec)
Prints a Markdown table (median, p90, ratio to python) for the README.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> float:
    # No timeout= here: Popen.wait(timeout) polls with sleeps of up to 50 ms, which would be
    # measured as the launcher's time. os.waitpid blocks and returns at once.
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.waitpid(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = 0
    return took


def commands() -> dict[str, list[str]]:
    launcher = str(BIN / "aero-sandbox")
    found = {
        "python3 -c pass": [sys.executable, "-c", "pass"],
        "aero-sandbox --mem 1G -- true": [launcher, "--mem", "1G", "--", "true"],
    }
    runexec = os.environ.get("RUNEXEC") or shutil.which("runexec")
    if runexec:
        found["runexec --no-container -- true"] = [
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
        took = timed([launcher, "-q", "--timeout", "0.5", "--", "sleep", "10"])
        late.append(took - 0.5)
    return sorted(late)


def launcher_peak_rss() -> int:
    """Max RSS (KiB) of the launcher process itself: ru_maxrss of our waited children."""
    launcher = str(BIN / "aero-sandbox")
    subprocess.run([launcher, "--", "sleep", "0.3"], check=True, timeout=60)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


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
    aero = next(m for n, m, _ in rows if n.startswith("aero"))
    bench = next((m for n, m, _ in rows if n.startswith("runexec")), None)
    if bench:
        print(f"\naero-sandbox / runexec: {aero / bench:.2f}x")
    late = timeout_latency(max(10, args.runs // 10))
    print(
        f"\n`--timeout 0.5` on an obedient `sleep`: returns {statistics.median(late) * 1e3:.0f} ms "
        f"(median), {late[-1] * 1e3:.0f} ms (max) after the deadline, {len(late)} runs"
    )
    print(f"\nLauncher peak RSS: {launcher_peak_rss() / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
