#!/usr/bin/env python3
"""What the rlimit backend's watchdog costs, and how far past --mem a fast-growing tree gets.

    .venv/bin/python bench/watchdog.py [--seconds 10] [--processes 50]

1. CPU cost: a tree of N processes (`sleep`, then `node` idling with its 7 threads when node is
   installed) is sampled the way the backend samples it (fallback.watchdog.Watchdog, at the
   interval it chooses) for --seconds; the CPU time the sampling used over the wall time it
   covered is its share of one core. For reference, the same with psutil
   (`children(recursive=True)` + `memory_info()`), at the same interval.
2. PSS cost: reading the tree's PSS (smaps_rollup), which the watchdog does only to confirm a
   sum over the limit, per GB resident.
3. Overshoot: aero-sandbox --backend rlimit --mem 400M runs three children that each grow by
   25 MB every 100 ms (750 MB/s in all); the report's peak_memory_bytes says how far past the
   limit the tree got before the watchdog killed it.
Prints Markdown tables for docs/fallback.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fallback import proctree  # noqa: E402
from fallback.watchdog import Watchdog  # noqa: E402
from sandbox.core import procfs  # noqa: E402

GROW = """
import os, sys, time
for n in range(3):
    if os.fork() == 0:
        chunks = []
        for step in range(16):
            chunks.append(bytearray(25 << 20))
            chunks[-1][::4096] = b"x" * len(chunks[-1][::4096])
            time.sleep(0.1)
        os._exit(0)
for n in range(3):
    os.wait()
"""


def start_tree(argv: list[str], count: int) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for _ in range(count)]
    time.sleep(2.0)  # let them start (node takes ~50 ms each on 2 cores)
    return procs


def stop_tree(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


def watchdog_cost(procs: list[subprocess.Popen[bytes]], seconds: float) -> tuple[float, float, int]:
    """(CPU ms per sample, % of one core, samples) of the backend's own sampling loop."""
    watchdog = Watchdog(os.getpid(), 1 << 50, None)
    watchdog.adopt(procs[0].pid, set())
    cpu = samples = 0.0
    deadline = time.monotonic() + seconds
    began = time.monotonic()
    while time.monotonic() < deadline:
        before = time.thread_time()
        watchdog.sample()
        cpu += time.thread_time() - before
        samples += 1
        time.sleep(watchdog.interval_s)
    wall = time.monotonic() - began
    assert len(watchdog.members) == len(procs), (len(watchdog.members), len(procs))
    return 1000 * cpu / samples, 100 * cpu / wall, int(samples)


def psutil_cost(procs: list[subprocess.Popen[bytes]], seconds: float, interval: float) -> float:
    """CPU ms per sample of the psutil equivalent (not used by the backend)."""
    import psutil

    me = psutil.Process()
    cpu = samples = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = time.thread_time()
        total = 0
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        cpu += time.thread_time() - before
        samples += 1
        time.sleep(interval)
    return 1000 * cpu / samples


def pss_cost(procs: list[subprocess.Popen[bytes]]) -> tuple[float, float]:
    """(ms per PSS read of the whole tree, resident GB it covered)."""
    resident = 0
    for proc in procs:
        data = procfs.read(f"/proc/{proc.pid}/statm") or b"0 0"
        resident += int(data.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = time.thread_time()
    rounds = 5
    for _ in range(rounds):
        for proc in procs:
            proctree.proportional(proc.pid)
    return 1000 * (time.thread_time() - before) / rounds, resident / (1 << 30)


def overshoot() -> tuple[str, int | None, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "sandbox", "--backend", "rlimit", "--mem", "400M", "-q"]
            + ["--report", str(report), "--", sys.executable, "-c", GROW],
            env=env,
            timeout=60,
            check=False,
        )
        data = json.loads(report.read_text())
    return data["reason"], data["peak_memory_bytes"], data["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=50)
    args = parser.parse_args()
    trees = {"sleep": ["sleep", "600"]}
    if shutil.which("node"):
        trees["node (7 threads each)"] = ["node", "-e", "setTimeout(() => {}, 600000)"]
    print(f"## Watchdog CPU cost, {args.processes} processes, {args.seconds:g} s each\n")
    print("| tree | interval | watchdog ms/sample | % of one core | psutil ms/sample |")
    print("|---|---|---|---|---|")
    pss_rows = []
    for name, argv in trees.items():
        procs = start_tree(argv, args.processes)
        try:
            per_sample, share, samples = watchdog_cost(procs, args.seconds)
            interval = args.seconds / samples
            reference = psutil_cost(procs, args.seconds / 2, interval)
            pss_rows.append((name, *pss_cost(procs)))
        finally:
            stop_tree(procs)
        print(
            f"| {name} | {interval * 1000:.0f} ms | {per_sample:.2f} | {share:.2f} % "
            f"| {reference:.2f} |"
        )
    print("\n## PSS of the whole tree (read only to confirm a sum over --mem)\n")
    print("| tree | ms per read | resident GB |")
    print("|---|---|---|")
    for name, ms, gb in pss_rows:
        print(f"| {name} | {ms:.1f} | {gb:.2f} |")
    print("\n## Overshoot: three children growing 250 MB/s each, --mem 400M\n")
    print("| run | reason | peak | wall |")
    print("|---|---|---|---|")
    for run in range(1, 6):
        reason, peak, wall = overshoot()
        shown = f"{peak / (1 << 20):.0f} MiB" if peak else "unknown"
        print(f"| {run} | {reason} | {shown} | {wall:.2f} s |")


if __name__ == "__main__":
    main()
