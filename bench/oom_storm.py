"""OOM storm: many sandboxes run out of memory at once; every report must say `oom` with the
kernel's kill counted (oom_kills >= 1). On cgroup v1 the OOM eventfd fires before the kernel
picks its victim, so a launcher that kills on the wake-up alone reports oom_kills 0.

    python bench/oom_storm.py [--rounds 3] [--concurrent 40] [--launcher CMD]

Prints, per round, how many reports were oom and how many of those had oom_kills >= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

GROW = "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"


def storm(launcher: list[str], concurrent: int, directory: str) -> tuple[int, int, list[str]]:
    procs = []
    for i in range(concurrent):
        report = os.path.join(directory, f"{i}.json")
        argv = launcher + ["--mem", "64M", "--report", report, "--", sys.executable, "-c", GROW]
        procs.append((report, subprocess.Popen(argv, stderr=subprocess.DEVNULL)))
    oom = counted = 0
    odd = []
    for report, proc in procs:
        proc.wait(timeout=300)
        with open(report) as f:
            data = json.load(f)
        if data["reason"] == "oom":
            oom += 1
            counted += (data["oom_kills"] or 0) >= 1
        else:
            odd.append(f"{data['reason']} exit {data['exit_code']}")
    return oom, counted, odd


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=40)
    parser.add_argument("--launcher", default=f"{sys.executable} -m sandbox")
    args = parser.parse_args()
    launcher = shlex.split(args.launcher)
    bad = 0
    for round_number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as directory:
            oom, counted, odd = storm(launcher, args.concurrent, directory)
        bad += args.concurrent - counted
        print(
            f"round {round_number}: {oom}/{args.concurrent} oom, {counted} with oom_kills >= 1"
            + (f"; other: {odd}" if odd else "")
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
