#!/usr/bin/env python3
"""What the rlimit backend's watchdog costs, and how far past --mem a fast-growing tree gets.

    .venv/bin/python bench/watchdog.py [--seconds 10] [--processes 50] [--runs 5]

Targets (issue 13): a still 50-process tree costs < 2 % of a core; 8 processes allocating
together at ~1 GiB/s under --mem 1G are killed with the tree's peak <= 1.15x --mem.

1. CPU cost: a tree of N processes (`sleep`, then `node` idling with its 7 threads when node is
   installed) is sampled the way the backend samples it (fallback.watchdog.Watchdog, at the
   interval it chooses) for --seconds; the CPU time the sampling used over the wall time it
   covered is its share of one core. For reference, the same with psutil
   (`children(recursive=True)` + `memory_info()`), at the same interval.
2. PSS cost: reading the tree's PSS (smaps_rollup), which the watchdog does only to confirm a
   sum over the limit, per GB resident.
3. Overshoot: aero-sandbox --backend rlimit runs (a) three children that each grow by 25 MB
   every 100 ms (750 MB/s in all) under --mem 400M, (b) eight that each grow by 4 MB every
   31 ms (~1 GiB/s in all) under --mem 1G. The report's peak_memory_bytes says how far past the
   limit the tree got before the watchdog killed it; where a v1 memory controller is mounted
   the launcher runs in a cgroup of its own (no limit) whose max_usage_in_bytes is the kernel's
   count of the same peak, the launcher's own ~20 MB and page cache included.
Prints Markdown tables for docs/fallback.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
from sandbox.core.limits import parse_size  # noqa: E402

# argv: children, MB per step, seconds per step, steps. bytearray() zero-fills: every page is
# touched. Paced by a deadline, so a slow step does not slow the average rate.
GROW = """
import os, sys, time
children, size, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
pause = float(sys.argv[3])
for n in range(children):
    if os.fork() == 0:
        chunks, began = [], time.monotonic()
        for step in range(1, steps + 1):
            chunks.append(bytearray(size << 20))
            time.sleep(max(0.0, began + step * pause - time.monotonic()))
        os._exit(0)
for n in range(children):
    os.wait()
"""
CASES = {  # name: (--mem, children, MB per step, seconds per step, steps)
    "3 x 250 MB/s": ("400M", 3, 25, 0.1, 16),
    "8 x 128 MB/s (~1 GiB/s)": ("1G", 8, 4, 0.03125, 64),
}
MEM_CONTROLLER = "/sys/fs/cgroup/memory"


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


def own_memory_cgroup() -> str | None:
    """A new v1 memory cgroup under ours (no limit), or None where there is none to use."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            made = f"{MEM_CONTROLLER}{path.rstrip('/')}/aero-bench-{os.getpid()}"
            try:
                os.mkdir(made)
            except OSError:
                return None
            return made
    return None


def overshoot(case: str) -> tuple[str, int | None, int | None, float]:
    """(reason, the report's peak, the cgroup's peak or None, wall s) of one run of `case`."""
    mem, *grow = CASES[case]
    cgroup = own_memory_cgroup()

    def enter() -> None:
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            subprocess.run(
                [sys.executable, "-m", "sandbox", "--backend", "rlimit", "--mem", mem, "-q"]
                + ["--report", str(report), "--", sys.executable, "-c", GROW]
                + [str(value) for value in grow],
                env=env,
                timeout=60,
                check=False,
                preexec_fn=enter,
            )
            data = json.loads(report.read_text())
        kernel = None
        if cgroup is not None:
            kernel = int(Path(cgroup, "memory.max_usage_in_bytes").read_text())
    finally:
        if cgroup is not None:
            remove_cgroup(cgroup)
    return data["reason"], data["peak_memory_bytes"], kernel, data["wall_s"]


def remove_cgroup(cgroup: str) -> None:
    """rmdir once empty. The launcher's guardian, released at its end, may still be exiting;
    anything else left in it was started by this benchmark: kill it."""
    procs = Path(cgroup, "cgroup.procs")
    deadline = time.monotonic() + 5
    while (left := procs.read_text().split()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    while procs.read_text().split() and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    os.rmdir(cgroup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = {"sleep": ["sleep", "600"]}
    if shutil.which("node"):
        trees["node (7 threads each)"] = ["node", "-e", "setTimeout(() => {}, 600000)"]
    print(f"## Watchdog CPU cost, {args.processes} still processes, {args.seconds:g} s each\n")
    print(
        "| tree | interval | watchdog ms/sample | % of one core (target < 2 %) | psutil ms/sample |"
    )
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
    print("\n## Overshoot: the report's peak over --mem (target <= 1.15x)\n")
    print(
        "| case | --mem | runs | reason | peak / --mem: median (max) | kernel-counted peak, max |"
    )
    print("|---|---|---|---|---|---|")
    for case, (mem, *_grow) in CASES.items():
        limit = parse_size(mem)
        results = [overshoot(case) for _ in range(args.runs)]
        reasons = ", ".join(sorted({reason for reason, *_ in results}))
        ratios = sorted((peak or 0) / limit for _, peak, _, _ in results)
        kernel = [k for _, _, k, _ in results if k is not None]
        shown = f"{max(kernel) / (1 << 20):.0f} MiB" if kernel else "no v1 memory controller"
        print(
            f"| {case} | {mem} | {len(results)} | {reasons} "
            f"| {statistics.median(ratios):.3f}x ({ratios[-1]:.3f}x) | {shown} |"
        )


if __name__ == "__main__":
    main()
