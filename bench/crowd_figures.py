"""bench/crowd.py's job, its plain parent cgroup, its figures (the admission rule simulated
without overhead, where a run's time goes job by job) and its floor: the same jobs admitted by the
same rule with no aero-sandbox at all, so that what c loses to the floor is ours and what the floor
loses to the ideal is the machine's."""

from __future__ import annotations

import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.budgets import cgroup as levels_fs  # noqa: E402
from sandbox.budgets.admission import Ticket, decide  # noqa: E402
from sandbox.budgets.model import Caps, Level  # noqa: E402
from sandbox.cgroups import cgroupfs, tree  # noqa: E402

INTERPRETER = 12 << 20  # what python itself takes on top of a job's bytes
# Takes its peak at once (MAP_POPULATE: the kernel faults every page in), holds it, exits 0.
# Stamps (wall clock) when it starts and when it lets go, in the file argv[3] (for the per-job
# table): the start, the moment its peak is faulted in, the end of its hold.
JOB = (
    "import mmap, sys, time\n"
    "start = time.time(); peak, seconds = int(sys.argv[1]), float(sys.argv[2])\n"
    "flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE\n"
    "held = mmap.mmap(-1, peak, flags=flags); faulted = time.time()\n"
    "time.sleep(max(0.0, seconds - (time.time() - start)))\n"
    "held.close(); end = time.time()\n"
    "open(sys.argv[3], 'w').write(f'{start} {faulted} {end}')\n"
)


class Parent:
    """Mode a: a plain cgroup with a memory cap, made in each hierarchy, for --parent."""

    def __init__(self, cap: int) -> None:
        places = levels_fs.bases()
        memory = levels_fs.memory_base(places)
        relative = os.path.relpath(memory.own, memory.mount) + f"/crowd-parent-{os.getpid()}"
        self.paths = [os.path.join(h.mount, relative) for h in places]
        # --parent wants the same path in every hierarchy; on a hybrid host our own cgroup in
        # pids/unified can be another one, so the directories above that we make go too.
        self.made: list[str] = []
        for path in self.paths:
            missing = []
            while not os.path.isdir(path):
                missing.append(path)
                path = os.path.dirname(path)
            for directory in reversed(missing):
                os.mkdir(directory)
                self.made.append(directory)
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

    def usage(self) -> int | None:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return cgroupfs.read_int(f"{self.memory}/{name}")

    def remove(self) -> None:
        for path in self.paths:
            tree.remove(path, timeout_s=2)
        for directory in sorted(self.made, key=len, reverse=True):
            try:
                os.rmdir(directory)  # only if empty: another process may use it by now
            except OSError:
                pass


def spawn(argv: list[str], cgroups: list[str]) -> int:
    """fork, move the child into the cgroups (each hierarchy's, as a sandbox would be), exec:
    the kernel charges and zeroes its pages exactly as in a sandbox, with nothing else around it."""
    pid = os.fork()
    if pid == 0:
        try:
            for path in cgroups:
                fd = os.open(path + "/cgroup.procs", os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return pid


def run_floor(jobs: list[tuple[int, float]], cap: int, workdir: Path) -> dict:
    """The floor: the same jobs, admitted by the same rule (admission.decide itself, reservation
    = peak + interpreter, the usage read from the kernel at each decision), with no aero-sandbox:
    this one process forks and execs each job into one plain cgroup capped at CAP and learns of
    each exit from wait4, so the hand-over is instant. Nothing here can be made faster by us."""
    parent = Parent(cap)
    waiting = [
        Ticket(i + 1, 0, "f", p + INTERPRETER, 0.0, False, []) for i, (p, _s) in enumerate(jobs)
    ]
    running: dict[int, Ticket] = {}  # pid -> its ticket, now running
    per_job: list[dict] = [{"peak": p, "nominal_s": s} for p, s in jobs]
    lost = kills = 0
    job_cpu = 0.0
    mine_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.time()
    try:
        while waiting or running:
            used = levels_fs.held_bytes(parent.memory, parent.version)
            level = Level("f", parent.memory, Caps(cap), parent.usage(), None, used)
            for ticket in list(waiting):
                if not decide(ticket, [*running.values(), *waiting], [level]).admitted:
                    continue
                waiting.remove(ticket)
                index = ticket.number - 1
                stamps = str(workdir / f"floor-{index}.stamps")
                argv = [sys.executable, "-c", JOB, str(jobs[index][0]), str(jobs[index][1]), stamps]
                per_job[index]["admitted"] = time.time()
                pid = spawn(argv, parent.paths)
                running[pid] = Ticket(ticket.number, pid, "f", ticket.reserve, 0.0, True, [])
            if not running:
                raise ValueError("a job larger than the cap")
            pid, status, usage = os.wait4(-1, 0)
            now = time.time()
            done = running.pop(pid, None)
            if done is None:  # not a job (the canary): crowd.py sees it gone
                continue
            row = per_job[done.number - 1]
            row.update(released=now, exited=now, reason="exit" if status == 0 else str(status))
            job_cpu += usage.ru_utime + usage.ru_stime
            lost += status != 0
            kills += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        makespan = time.time() - start
        peak_seen = parent.peak()
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        parent.remove()
    mine = resource.getrusage(resource.RUSAGE_SELF)
    for index, row in enumerate(per_job):
        row.update(launched=start, queued=start)
        stamps_file = workdir / f"floor-{index}.stamps"
        if stamps_file.exists():
            begun, faulted, ended = (float(x) for x in stamps_file.read_text().split())
            row.update(job_start=begun, faulted=faulted, job_end=ended)
    launcher_cpu = mine.ru_utime + mine.ru_stime - mine_before.ru_utime - mine_before.ru_stime
    # launcher_cpu: this process, deciding and forking (the jobs' exec and start-up are theirs)
    row = result("floor", jobs, cap, lost, kills, 0, peak_seen, makespan, job_cpu, launcher_cpu)
    return {**row, "per_job": per_job}


def result(
    mode: str,
    jobs: list[tuple[int, float]],
    cap: int,
    lost: int,
    kills: int,
    pressure: int,
    peak_seen: int,
    makespan: float,
    job_cpu: float,
    launcher_cpu: float,
) -> dict[str, object]:
    """One way's row (per_job is added by the caller): the ideal is sum(peak x duration) / cap."""
    ideal = sum(peak * seconds for peak, seconds in jobs) / cap
    return {
        "mode": mode,
        "jobs_lost": lost,
        "oom_kills": kills,
        "pressure_kills": pressure,
        "peak_bytes": peak_seen,
        "cap_bytes": cap,
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "makespan_vs_ideal": round(makespan / ideal, 2),
        "load": round(os.getloadavg()[0], 1),
        "job_cpu_s": round(job_cpu, 1),
        "launcher_cpu_s": round(launcher_cpu, 1),
    }


def simulate(sizes: list[int], durations: list[float], cap: int) -> float:
    """The makespan of the admission rule itself (admission.decide), all queued at 0, with no
    overhead at all: a run starts the instant decide lets it and holds its size for its duration."""
    waiting = [Ticket(i + 1, 0, "s", size, 0.0, False, []) for i, size in enumerate(sizes)]
    running: list[tuple[float, Ticket]] = []
    now = 0.0
    while waiting or running:
        for mine in list(waiting):
            tickets = [t for _end, t in running] + waiting
            level = Level("s", None, Caps(cap), 0, None)
            if decide(mine, tickets, [level]).admitted:
                waiting.remove(mine)
                started = Ticket(mine.number, 0, "s", mine.reserve, now, True, [])
                running.append((now + durations[mine.number - 1], started))
        if not running:
            raise ValueError("a job larger than the cap")
        now = min(end for end, _t in running)
        running = [(end, t) for end, t in running if end > now]
    return now


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def breakdown(row: dict) -> dict:
    """Where a run's time goes (c's or the floor's), per job (medians, seconds)."""
    jobs = [j for j in row["per_job"] if j.get("admitted") and j.get("job_start")]
    releases = sorted(j["released"] for j in jobs if j.get("released"))
    learn = []
    for j in jobs:
        before = [r for r in releases if j["queued"] < r < j["admitted"]]
        if before:  # it was waiting when a reservation was given back: how long until it knew
            learn.append(j["admitted"] - before[-1])
    # How full the budget was kept: reserved bytes over time, from the first admission to the
    # last release, against the cap.
    events = sorted(
        [(j["admitted"], j["peak"] + INTERPRETER) for j in jobs if j.get("released")]
        + [(j["released"], -(j["peak"] + INTERPRETER)) for j in jobs if j.get("released")]
    )
    held = area = 0.0
    for (when, change), (after, _c) in zip(events, events[1:] + events[-1:], strict=True):
        held += change
        area += held * (after - when)
    span = events[-1][0] - events[0][0] if events else 0.0
    # The ideal again, from how long each job really ran in the crowd (its first line to its
    # last: the CPU it shared with its neighbours and the host's other work included, the
    # launcher's start and tear-down not).
    ran = sum(j["peak"] * (j["job_end"] - j["job_start"]) for j in jobs) / row["cap_bytes"]
    return {
        "ideal_from_crowd_run_s": round(ran, 2),
        "vs_ideal_from_crowd_run": round(row["makespan_s"] / ran, 2),
        "reserved_vs_cap": round(area / span / row["cap_bytes"], 3) if span else None,
        "admission_wait": median([j["admitted"] - j["launched"] for j in jobs]),
        "queued_after_launch": median([j["queued"] - j["launched"] for j in jobs]),
        "release_to_next_admission": median(learn),
        "admitted_to_job_start": median([j["job_start"] - j["admitted"] for j in jobs]),
        "fault_in": median([j["faulted"] - j["job_start"] for j in jobs]),
        "run_minus_nominal": median([j["job_end"] - j["job_start"] - j["nominal_s"] for j in jobs]),
        "job_end_to_release": median(
            [j["released"] - j["job_end"] for j in jobs if j.get("released")]
        ),
        "release_to_launcher_exit": median(
            [j["exited"] - j["released"] for j in jobs if j.get("released") and j.get("exited")]
        ),
        "held_minus_nominal": median(
            [j["released"] - j["admitted"] - j["nominal_s"] for j in jobs if j.get("released")]
        ),
        **replay(row),
    }


def replay(row: dict) -> dict:
    """The makespan split into its parts: the rule simulated (no overhead) on the run's own queue
    order (c's launchers race to the queue) with each job's nominal duration, then with how long
    it really ran in the crowd, then with how long it held its reservation; and how late the
    first job started. Set against the floor's, each step shows where c's extra time went."""
    jobs = row["per_job"]
    if not all(j.get("released") and j.get("job_start") for j in jobs):
        return {}  # a job without a timeline (lost, or its ticket not seen)
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["queued"], i))
    sizes = [jobs[i]["peak"] + INTERPRETER for i in order]

    def rule(durations: list[float]) -> float:
        return round(simulate(sizes, durations, row["cap_bytes"]), 2)

    return {
        "first_job_start_s": round(min(j["job_start"] - j["launched"] for j in jobs), 2),
        "rule_in_its_queue_order_nominal_s": rule([jobs[i]["nominal_s"] for i in order]),
        "rule_on_crowd_run_s": rule([jobs[i]["job_end"] - jobs[i]["job_start"] for i in order]),
        "rule_on_held_s": rule([jobs[i]["released"] - jobs[i]["admitted"] for i in order]),
    }
