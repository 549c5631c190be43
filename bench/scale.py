#!/usr/bin/env python3
"""Scale check for crowded hosts (issue 6): many sandboxes at once, `list`, and what is left.

    .venv/bin/python bench/scale.py [--count 100] [--sleep 30] [--backend auto] [--json]

Starts COUNT real launchers at once, each `aero-sandbox --mem 256M -- sleep SLEEP`, then:
  1. all start: each shows up as a live registry entry (bounded wait);
  2. `aero-sandbox list --json` shows all of them: its wall time, best and worst of 5 runs;
  3. the launchers' own memory: Rss and Pss of every launcher and its guardian
     (/proc/PID/smaps_rollup), in total and per launcher;
  4. after every command ends (SIGTERM to each launcher, as `docker stop` does, unless
     --natural waits for `sleep` to finish): no launcher, guardian or command process is left,
     no cgroup named after a launcher pid, no registry entry.
Run it as the user the sandboxes are for (root here). It never touches sandboxes it did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.cgroups import cgroupfs  # noqa: E402
from sandbox.core import identity  # noqa: E402
from sandbox.registry import store as registry  # noqa: E402


def launcher() -> list[str]:
    installed = Path(sys.executable).parent / "aero-sandbox"
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "sandbox"]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AERO_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def live_entries(pids: set[int]) -> dict[int, str]:
    """launcher pid -> its live registry entry, for the launchers we started."""
    found = {}
    for directory in registry.directories():
        for path in registry.paths(directory):
            pid = int(os.path.basename(path).partition("-")[0])
            if pid in pids and registry.is_live(path):
                found[pid] = path
    return found


def timed_list(pids: set[int]) -> tuple[float, int, list[dict[str, object]]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [*launcher(), "list", "--json"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
        check=True,
    )
    took = time.perf_counter() - start
    rows = [row for row in json.loads(proc.stdout) if row["launcher_pid"] in pids]
    return took, len(json.loads(proc.stdout)), rows


def rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes from /proc/PID/smaps_rollup (Linux 4.14+)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0]) * 1024
    return values["Rss"], values["Pss"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def leftovers(pids: set[int], others: set[int]) -> dict[str, list[str]]:
    cgroups = []
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):
        for name in list(dirs):
            if identity.launcher_pid(name) in pids:
                cgroups.append(os.path.join(top, name))
                dirs.remove(name)
    entries = [
        path
        for directory in registry.directories()
        for path in os.listdir(directory)
        if path.lstrip(".").partition("-")[0].isdigit()
        and int(path.lstrip(".").partition("-")[0]) in pids
    ]
    processes = [str(pid) for pid in sorted(pids | others) if alive(pid)]
    return {"cgroups": cgroups, "registry_entries": entries, "processes": processes}


class _FakeBackend:
    name = "cgroup"

    def describe(self) -> dict[str, object]:
        cgroups = {k: f"/sys/fs/cgroup/{k}/aero-sandbox-1-abcdef" for k in ("memory", "pids")}
        return {"cgroups": cgroups, "cgroup_mode": "hybrid"}


def registry_cost(rounds: int = 500) -> dict[str, float]:
    """Microseconds a launcher spends on its registry entry: register + note_guardian, and
    unregister (which sweeps the directory: with the live sandboxes' entries present)."""
    from sandbox.core.limits import Limits

    backend, limits = _FakeBackend(), Limits(1 << 30, 4096, 600.0)
    write, remove = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        entry = registry.register(backend, ["npm", "test"], limits)  # type: ignore[arg-type]
        registry.note_guardian(entry, 1)
        middle = time.perf_counter()
        registry.unregister(entry)
        write.append(middle - start)
        remove.append(time.perf_counter() - middle)

    def us(values: list[float], at: float) -> float:
        return round(sorted(values)[int(len(values) * at)] * 1e6, 1)

    return {
        "register_median_us": us(write, 0.5),
        "register_p90_us": us(write, 0.9),
        "unregister_median_us": us(remove, 0.5),
        "unregister_p90_us": us(remove, 0.9),
    }


def mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--sleep", type=float, default=30.0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--natural", action="store_true", help="let sleep end by itself")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    argv = [*launcher(), "--backend", args.backend, "--mem", "256M", "--", "sleep"]
    started_at = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*argv, str(args.sleep)],
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for _ in range(args.count)
    ]
    pids = {p.pid for p in procs}
    results: dict[str, object] = {"count": args.count, "backend": args.backend}
    guardians: set[int] = set()
    commands: set[int] = set()
    try:
        deadline = time.monotonic() + max(60.0, args.count * 0.5)
        while len(live_entries(pids)) < args.count and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        registered = len(live_entries(pids))
        results["all_started"] = registered == args.count
        results["start_all_s"] = round(time.perf_counter() - started_at, 2)
        failed = [p for p in procs if p.poll() is not None]
        if failed:
            results["failed_early"] = [
                (p.returncode, p.stderr.read().decode() if p.stderr else "") for p in failed[:3]
            ]

        times, rows, total = [], [], 0
        for _ in range(5):
            took, total, rows = timed_list(pids)
            times.append(took)
        results["list_s"] = {
            "best": round(min(times), 3),
            "median": round(statistics.median(times), 3),
            "worst": round(max(times), 3),
        }
        results["list_rows_ours"] = len(rows)
        results["list_rows_total"] = total
        results["list_backends"] = sorted({str(r["backend"]) for r in rows})
        results["registry_cost"] = registry_cost()  # with all the live entries in the directory

        sums = {"launcher": [0, 0], "guardian": [0, 0]}  # role -> [Rss, Pss]
        measured = 0
        for row in rows:
            guardian = row.get("guardian_pid")
            try:
                pair = {"launcher": rollup(int(str(row["launcher_pid"])))}
                if guardian:
                    pair["guardian"] = rollup(int(str(guardian)))
            except OSError:
                continue
            for role, (r, p) in pair.items():
                sums[role][0] += r
                sums[role][1] += p
            measured += 1
            guardians.update([int(str(guardian))] if guardian else [])
            for path in dict(row.get("cgroups") or {}).values():
                commands.update(cgroupfs.procs(str(path)))
        each = max(measured, 1)
        rss = sums["launcher"][0] + sums["guardian"][0]
        pss = sums["launcher"][1] + sums["guardian"][1]
        results["memory"] = {
            "launchers_measured": measured,
            "rss_total_bytes": rss,
            "pss_total_bytes": pss,
            "rss_per_launcher_bytes": rss // each,
            "pss_per_launcher_bytes": pss // each,
            "launcher_alone": {
                "rss_bytes": sums["launcher"][0] // each,
                "pss_bytes": sums["launcher"][1] // each,
            },
            "guardian_alone": {
                "rss_bytes": sums["guardian"][0] // each,
                "pss_bytes": sums["guardian"][1] // each,
            },
        }
    finally:
        if not args.natural:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # forwarded to sleep; the launcher cleans up
        ended_at = time.monotonic()
        for proc in procs:
            try:
                proc.wait(timeout=max(5.0, args.sleep + 60 - (time.monotonic() - ended_at)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    results["exit_codes"] = sorted({p.returncode for p in procs})
    settle = time.monotonic() + 5  # released guardians exit on their own; init reaps them
    while time.monotonic() < settle and any(leftovers(pids, guardians | commands).values()):
        time.sleep(0.1)
    results["left_behind"] = leftovers(pids, guardians | commands)
    clean = not any(results["left_behind"].values())  # type: ignore[union-attr]

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        memory = results.get("memory", {})
        assert isinstance(memory, dict)
        list_s = results.get("list_s", {})
        assert isinstance(list_s, dict)
        print(f"sandboxes started at once:    {args.count} (backend {args.backend})")
        print(
            f"all registered:               {results['all_started']} "
            f"after {results['start_all_s']} s"
        )
        print(
            f"list --json, wall time:       best {list_s.get('best')} s, median "
            f"{list_s.get('median')} s, worst {list_s.get('worst')} s "
            f"({results.get('list_rows_ours')} of ours, {results.get('list_rows_total')} total)"
        )
        if memory:
            print(
                f"launcher + guardian memory:   Rss {mib(memory['rss_per_launcher_bytes'])}, "
                f"Pss {mib(memory['pss_per_launcher_bytes'])} per launcher; "
                f"Pss {mib(memory['pss_total_bytes'])} for all {memory['launchers_measured']}"
            )
            for role in ("launcher", "guardian"):
                alone = memory[f"{role}_alone"]
                print(
                    f"  {role + ' alone:':<28}Rss {mib(alone['rss_bytes'])}, "
                    f"Pss {mib(alone['pss_bytes'])}"
                )
        cost = results.get("registry_cost", {})
        assert isinstance(cost, dict)
        if cost:
            print(
                f"registry entry, per run:      write {cost['register_median_us']} us "
                f"(p90 {cost['register_p90_us']}), remove + sweep "
                f"{cost['unregister_median_us']} us (p90 {cost['unregister_p90_us']})"
            )
        print(f"exit codes:                   {results['exit_codes']}")
        print(f"left behind:                  {results['left_behind']}")
    ok = bool(results["all_started"]) and results.get("list_rows_ours") == args.count and clean
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
