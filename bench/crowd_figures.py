"""bench/crowd.py's figures: the admission rule simulated without overhead, and where mode c's
time goes, job by job (from the timeline crowd.py's watcher records)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.budgets.admission import Ticket, decide  # noqa: E402
from sandbox.budgets.model import Caps, Level  # noqa: E402

INTERPRETER = 12 << 20  # what python itself takes on top of a job's bytes


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
    """Where mode c's time goes, per job (medians, seconds)."""
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
    }
