#!/usr/bin/env python3
"""A crowd of agents' jobs sharing one memory budget (issue 14), run three ways in one go.

    .venv/bin/python bench/crowd.py [--jobs 40] [--cap 4G] [--seed 14] [--json]

N jobs with peaks of 0.3-1.5 GiB and durations of 1-6 s drawn from a fixed seed (total demand
several times the cap, which stands for the host), all started at once:

  a  per-command --mem (peak + 20%) under a plain parent cgroup capped at CAP (today's best)
  b  a budget capped at CAP, same --mem, no reservations, no retries
  c  the same budget with --reserve (the job's peak) and --attempts 3 (a budget_oom victim
     runs again after admission)
  f  the floor (row "floor"): the same jobs admitted by the same rule (admission.decide) with no
     aero-sandbox at all, one process forking each job into one plain cgroup capped at CAP and
     learning of each exit from wait4 (crowd_figures.run_floor). What c loses to it is ours;
     what it loses to the ideal is the machine's. Interleave: --modes fcfcfc --no-solo

For each: jobs lost (did not finish with exit 0), OOM kills (by the kernel's OOM killer, retried
budget_oom victims included), pressure kills (the launcher's --oom-pressure kill: also `oom`),
the peak of the parent/budget vs its cap (the kernel's watermark), processes outside
the budget touched (a canary holding 256 MiB beside it, in our own cgroup, must live), and the
makespan vs the ideal (sum of peak x duration / cap; from the nominal durations, from each job
timed alone first, and for c from each job's run time in the crowd), the admission rule
simulated with no overhead, and for c where the time went, job by job (crowd_figures.py).
Run as root on a host with cgroups. Every cgroup it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.budgets import cgroup as levels_fs  # noqa: E402
from sandbox.budgets import membership  # noqa: E402
from sandbox.core.limits import format_size, parse_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crowd_figures import (  # noqa: E402
    INTERPRETER,
    JOB,
    Parent,
    breakdown,
    result,
    run_floor,
    simulate,
)
from scale import environment, launcher  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


def crowd(count: int, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [
        (int(rng.uniform(0.3, 1.5) * GIB), round(rng.uniform(1.0, 6.0), 2)) for _ in range(count)
    ]


def budget_peak(name: str) -> int | None:
    places = levels_fs.bases()
    return levels_fs.read_level(places, (name,)).peak_bytes


class Watcher(threading.Thread):
    """Samples the budget's queue directory and the launchers every 5 ms: when each ticket
    appeared (w-: queued), was admitted (r-) and went away (the reservation given back), and when
    each launcher exited."""

    def __init__(self, state: str | None, procs: list[subprocess.Popen[bytes]]) -> None:
        super().__init__(daemon=True)
        self.state, self.procs = state, procs
        self.seen: dict[int, dict[str, float]] = {}  # ticket number -> pid, queued, admitted, gone
        self.exited: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            now = time.time()
            names = set()
            try:
                names = set(os.listdir(self.state)) if self.state else set()
            except OSError:
                pass
            live = set()
            for name in names:
                kind, _, rest = name.partition("-")
                if kind not in ("w", "r"):
                    continue
                number, pid = (int(x) for x in rest.split("-")[:2])
                live.add(number)
                row = self.seen.setdefault(number, {"pid": pid, "queued": now})
                if kind == "r":
                    row.setdefault("admitted", now)
            for number, row in self.seen.items():
                if number not in live:
                    row.setdefault("gone", now)
            for proc in self.procs:
                if proc.pid not in self.exited and proc.poll() is not None:
                    self.exited[proc.pid] = now
            if len(self.exited) == len(self.procs):
                return


def run_mode(mode: str, jobs: list[tuple[int, float]], cap: int, workdir: Path) -> dict:
    base = launcher()
    env = environment()
    parent = None
    state = None
    budget = f"crowd-{os.getpid()}-{mode}"
    if mode == "a":
        parent = Parent(cap)
    else:
        subprocess.run(
            [*base, "budget", "set", budget, "--mem", str(cap)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        state = membership.state_dir(levels_fs.bases(), (budget,), create=False)
    procs: list[subprocess.Popen[bytes]] = []
    watcher = Watcher(state, procs)
    launched = []
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
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
            stamps = workdir / f"{mode}-{index}.stamps"
            command = [sys.executable, "-c", JOB, str(peak), str(seconds), str(stamps)]
            launched.append(time.time())
            procs.append(
                subprocess.Popen(
                    [*base, *args, "--", *command],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            if index == 0:
                watcher.start()
        watcher.join(timeout=900)
        watcher.stop.set()
        makespan = max(watcher.exited.values()) - start
        for proc in procs:
            proc.wait(timeout=60)  # reaped: their CPU counts in RUSAGE_CHILDREN
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_seen = parent.peak() if parent else budget_peak(budget)
    finally:
        watcher.stop.set()
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
    # The kernel's OOM killer (the sandbox's own counter) and the launcher's memory-pressure kill
    # (--oom-pressure: a full parent stalls every member in reclaim), which both end as `oom`.
    kills = sum(1 for r in reports if r.get("oom_kills") or r["reason"] == "budget_oom")
    kills += sum(1 for r in reports for why in r.get("retried_for", []) if "budget_oom" in why)
    pressure = sum(1 for r in reports if r.get("memory_pressure") and not r.get("oom_kills"))
    per_job = []
    for index, (peak, seconds) in enumerate(jobs):
        pid = procs[index].pid
        tickets = sorted((n, t) for n, t in watcher.seen.items() if t["pid"] == pid)
        stamps_file = workdir / f"{mode}-{index}.stamps"
        stamps = [float(x) for x in stamps_file.read_text().split()] if stamps_file.exists() else []
        row: dict[str, object] = {
            "peak": peak,
            "nominal_s": seconds,
            "launched": launched[index],
            "exited": watcher.exited.get(pid),
            "reason": reports[index]["reason"],
            "kernel_oom_kills": reports[index].get("oom_kills"),  # the sandbox's own counter
            "retried_for": reports[index].get("retried_for", []),
            "detail": reports[index].get("detail"),
            "memory_pressure": reports[index].get("memory_pressure"),
        }
        if tickets:  # the last attempt's ticket: the one that ran to the end
            last = tickets[-1][1]
            row.update(
                queued=last.get("queued"), admitted=last.get("admitted"), released=last.get("gone")
            )
        if stamps:
            row.update(job_start=stamps[0], faulted=stamps[1], job_end=stamps[2])
        per_job.append(row)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    # job_cpu: the commands' (the last attempt's, from the reports); the launcher's share is
    # everything else: launchers, waiting, setup
    job_cpu = sum(r.get("cpu_s") or 0.0 for r in reports)
    launcher_cpu = cpu - job_cpu
    row = result(mode, jobs, cap, lost, kills, pressure, peak_seen, makespan, job_cpu, launcher_cpu)
    return {**row, "per_job": per_job}


def solo_times(jobs: list[tuple[int, float]], workdir: Path) -> list[float]:
    """Each job alone, bare (no sandbox, nothing beside it): its process's wall time."""
    found = []
    for index, (peak, seconds) in enumerate(jobs):
        began = time.monotonic()
        stamps = workdir / f"solo-{index}.stamps"
        subprocess.run(
            [sys.executable, "-c", JOB, str(peak), str(seconds), str(stamps)], check=True
        )
        found.append(time.monotonic() - began)
    return found


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
    parser.add_argument("--no-solo", action="store_true", help="skip timing each job alone")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="write every figure, per job too, as JSON here")
    options = parser.parse_args()
    cap = parse_size(options.cap) or 4 * GIB
    jobs = crowd(options.jobs, options.seed)
    demand = sum(peak for peak, _s in jobs)
    sizes = [peak + INTERPRETER for peak, _s in jobs]
    rows = []
    load_before = os.getloadavg()[0]
    witness = canary()
    try:
        with tempfile.TemporaryDirectory(prefix="aero-crowd-") as tmp:
            solo = None if options.no_solo else solo_times(jobs, Path(tmp))
            for mode in options.modes:
                if mode == "f":
                    row = run_floor(jobs, cap, Path(tmp))
                else:
                    row = run_mode(mode, jobs, cap, Path(tmp))
                row["outside_touched"] = 0 if witness.poll() is None else 1
                if solo is not None:
                    held = sum(p * t for (p, _), t in zip(jobs, solo, strict=True))
                    row["ideal_solo_s"] = round(held / cap, 2)
                    row["vs_ideal_solo"] = round(row["makespan_s"] / row["ideal_solo_s"], 2)
                if mode in "cf":
                    row["breakdown"] = breakdown(row)
                rows.append(row)
    finally:
        witness.kill()
        witness.wait()
    nominal = [seconds for _p, seconds in jobs]
    figures: dict = {
        "jobs": options.jobs,
        "seed": options.seed,
        "demand_bytes": demand,
        "cap_bytes": cap,
        "load_before": round(load_before, 1),
        "rows": rows,
        "solo_s": solo,
        "rule_alone_nominal_s": round(simulate(sizes, nominal, cap), 2),
    }
    if solo is not None:
        figures["rule_alone_solo_s"] = round(simulate(sizes, solo, cap), 2)
    if options.save:
        Path(options.save).write_text(json.dumps(figures, indent=2))
    if options.json:
        print(json.dumps(figures, indent=2))
        return 0
    ideal = rows[0]["ideal_s"] if rows else 0.0
    print(
        f"{options.jobs} jobs, seed {options.seed}: peaks sum to {format_size(demand)} "
        f"({demand / cap:.1f}x the {format_size(cap)} cap); load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores"
    )
    line = f"ideal (sum peak x duration / cap): {ideal} s from the nominal durations"
    if solo is not None:
        line += f", {rows[0]['ideal_solo_s']} s from each job's measured solo wall time"
    print(line)
    line = f"the admission rule alone (no overhead): {figures['rule_alone_nominal_s']} s nominal"
    if solo is not None:
        line += f", {figures['rule_alone_solo_s']} s solo"
    print(line)
    print(
        "| way | jobs lost | OOM kills | pressure kills | peak vs cap | outside touched "
        "| makespan | vs ideal | vs solo ideal | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = row["peak_bytes"]
        print(
            f"| {row['mode']} | {row['jobs_lost']} | {row['oom_kills']} | "
            f"{row['pressure_kills']} | "
            f"{format_size(peak)} / {format_size(cap)} | {row['outside_touched']} | "
            f"{row['makespan_s']} s | {row['makespan_vs_ideal']}x | "
            f"{row.get('vs_ideal_solo', '-')}x | {row['load']} |"
        )
        print(f"    CPU: jobs {row['job_cpu_s']} s, launchers {row['launcher_cpu_s']} s")
        for key, value in row.get("breakdown", {}).items():
            unit = " s" if key.endswith("_s") else " s (median)"
            unit = "" if key in ("vs_ideal_from_crowd_run", "reserved_vs_cap") else unit
            print(f"    {key}: {value}{unit}")
    floors = [r for r in rows if r["mode"] == "floor"]
    pairs = list(zip(floors, [r for r in rows if r["mode"] == "c"], strict=False))
    if pairs:  # in run order: interleaved, so the host's load weighs on both alike
        ratios = ", ".join(f"{c['makespan_s'] / f['makespan_s']:.2f}" for f, c in pairs)
        print(f"c's makespan over the floor's, pair by pair: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
