#!/usr/bin/env python3
"""A crowd of agents' jobs sharing one memory budget (issue 14), run three ways in one go.

    .venv/bin/python bench/crowd.py [--jobs 40] [--cap 4G] [--seed 14] [--json]

N jobs with peaks of 0.3-1.5 GiB and durations of 1-6 s drawn from a fixed seed (total demand
several times the cap, which stands for the host), all started at once:

  a  per-command --mem (peak + 20%) under a plain parent cgroup capped at CAP (today's best)
  b  a budget capped at CAP, same --mem, no reservations, no retries
  c  the same budget with --reserve (the job's peak) and --attempts 3 (a budget_oom victim
     runs again after admission)

For each: jobs lost (did not finish with exit 0), OOM kills (attempts ended by oom or
budget_oom), the peak of the parent/budget vs its cap (the kernel's watermark), processes outside
the budget touched (a canary holding 256 MiB beside it, in our own cgroup, must live), and the
makespan vs the ideal (sum of peak x duration / cap). Run as root on a host with cgroups.
Every cgroup it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.budgets import cgroup as levels_fs  # noqa: E402
from sandbox.cgroups import cgroupfs, tree  # noqa: E402
from sandbox.core.limits import format_size, parse_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import environment, launcher  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
# Takes its peak at once (MAP_POPULATE: the kernel faults every page in), holds it, exits 0.
JOB = (
    "import mmap, sys, time\n"
    "start = time.monotonic(); peak, seconds = int(sys.argv[1]), float(sys.argv[2])\n"
    "flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE\n"
    "held = mmap.mmap(-1, peak, flags=flags)\n"
    "time.sleep(max(0.0, seconds - (time.monotonic() - start)))\n"
)
INTERPRETER = 12 * MIB  # what python itself takes on top of the job's bytes


def crowd(count: int, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [
        (int(rng.uniform(0.3, 1.5) * GIB), round(rng.uniform(1.0, 6.0), 2)) for _ in range(count)
    ]


class Parent:
    """Mode a: a plain cgroup with a memory cap, made in each hierarchy, for --parent."""

    def __init__(self, cap: int) -> None:
        places = levels_fs.bases()
        memory = levels_fs.memory_base(places)
        relative = os.path.relpath(memory.own, memory.mount) + f"/crowd-parent-{os.getpid()}"
        self.paths = [os.path.join(h.mount, relative) for h in places]
        for path in self.paths:
            os.makedirs(path, exist_ok=True)
        self.memory = os.path.join(memory.mount, relative)
        self.version = memory.version
        if self.version == 2:
            cgroupfs.write(self.memory + "/memory.max", str(cap))
        else:
            cgroupfs.write(self.memory + "/memory.limit_in_bytes", str(cap))
            if os.path.exists(self.memory + "/memory.memsw.limit_in_bytes"):
                cgroupfs.write(self.memory + "/memory.memsw.limit_in_bytes", str(cap))

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return cgroupfs.read_int(f"{self.memory}/{name}")

    def remove(self) -> None:
        for path in sorted(self.paths, key=len, reverse=True):
            tree.remove(path, timeout_s=2)


def budget_peak(name: str) -> int | None:
    places = levels_fs.bases()
    return levels_fs.read_level(places, (name,)).peak_bytes


def run_mode(mode: str, jobs: list[tuple[int, float]], cap: int, workdir: Path) -> dict:
    base = launcher()
    env = environment()
    parent = None
    budget = f"crowd-{os.getpid()}-{mode}"
    if mode == "a":
        parent = Parent(cap)
    else:
        subprocess.run([*base, "budget", "set", budget, "--mem", str(cap)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    procs = []
    start = time.monotonic()
    try:
        for index, (peak, seconds) in enumerate(jobs):
            report = workdir / f"{mode}-{index}.json"
            args = ["--mem", str(int(peak * 1.2) + INTERPRETER), "--report", str(report), "-q"]
            if mode == "a":
                assert parent is not None
                args += ["--parent", parent.memory, "--attempts", "1"]
            elif mode == "b":
                args += ["--budget", budget, "--attempts", "1"]
            else:
                reserve = str(peak + INTERPRETER)
                args += ["--budget", budget, "--reserve", reserve, "--attempts", "3"]
            command = [sys.executable, "-c", JOB, str(peak), str(seconds)]
            procs.append(subprocess.Popen([*base, *args, "--", *command], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ends = []
        for proc in procs:
            proc.wait(timeout=900)
            ends.append(time.monotonic())
        makespan = max(ends) - start
        peak_seen = parent.peak() if parent else budget_peak(budget)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if parent is not None:
            parent.remove()
        else:
            subprocess.run([*base, "budget", "rm", budget], env=env, stdout=subprocess.DEVNULL)
    reports = [json.loads((workdir / f"{mode}-{i}.json").read_text()) for i in range(len(jobs))]
    lost = sum(1 for r in reports if r["exit_code"] != 0)
    kills = sum(1 for r in reports if r["reason"] in ("oom", "budget_oom"))
    kills += sum(1 for r in reports for why in r.get("retried_for", []) if "budget_oom" in why)
    ideal = sum(peak * seconds for peak, seconds in jobs) / cap
    return {
        "mode": mode,
        "jobs_lost": lost,
        "oom_kills": kills,
        "peak_bytes": peak_seen,
        "cap_bytes": cap,
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "makespan_vs_ideal": round(makespan / ideal, 2),
    }


def canary() -> subprocess.Popen[bytes]:
    """A process beside the crowd (in our own cgroup) holding 256 MiB: it must survive."""
    code = "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096]); "
    code += "__import__('time').sleep(3600)"
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--cap", default="4G")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--modes", default="abc")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    cap = parse_size(options.cap) or 4 * GIB
    jobs = crowd(options.jobs, options.seed)
    demand = sum(peak for peak, _s in jobs)
    rows = []
    witness = canary()
    try:
        with tempfile.TemporaryDirectory(prefix="aero-crowd-") as tmp:
            for mode in options.modes:
                row = run_mode(mode, jobs, cap, Path(tmp))
                row["outside_touched"] = 0 if witness.poll() is None else 1
                rows.append(row)
    finally:
        witness.kill()
        witness.wait()
    if options.json:
        print(json.dumps({"jobs": options.jobs, "demand_bytes": demand, "rows": rows}, indent=2))
        return 0
    print(f"{options.jobs} jobs, seed {options.seed}: peaks sum to {format_size(demand)} "
          f"({demand / cap:.1f}x the {format_size(cap)} cap)")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| way | jobs lost | OOM kills | peak vs cap | outside touched | makespan | vs ideal |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        peak = row["peak_bytes"]
        print(f"| {row['mode']} | {row['jobs_lost']} | {row['oom_kills']} | "
              f"{format_size(peak)} / {format_size(cap)} | {row['outside_touched']} | "
              f"{row['makespan_s']} s | {row['makespan_vs_ideal']}x ({row['ideal_s']} s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
