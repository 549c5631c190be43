"""Per-user limits that break builds on a crowded host: processes (RLIMIT_NPROC), open files."""

from __future__ import annotations

import os
import resource

from sandbox.core.procfs import nproc_applies, user_tasks
from sandbox.doctor.check import Check

MIN_OPEN_FILES = 4096  # what the old guide told agents to set (`ulimit -n 4096`)


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def checks() -> list[Check]:
    uid = os.getuid()
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    used = user_tasks(uid)
    summary = f"processes (RLIMIT_NPROC): {_limit(soft)} (hard {_limit(hard)}), {used} tasks in use"
    details = {"soft": _limit(soft), "hard": _limit(hard), "tasks_in_use": used}
    if not nproc_applies():  # the rlimit backend's test too
        # docs/fallback.md, Pids: the rlimit backend can then only sample --pids.
        root = "; not enforced for root, so the rlimit backend only samples --pids (a burst of"
        root += " tasks shorter than its 5-50 ms interval can pass it; a cgroup backend binds)"
        nproc = Check("processes", "ok", summary + root, details=details)
    elif soft != resource.RLIM_INFINITY and used > soft * 0.8:
        nproc = Check(
            "processes",
            "warn",
            summary + ": nearly full, so thread and process creation fails (EAGAIN)",
            "raise nproc for this user in /etc/security/limits.conf (or LimitNPROC= of the "
            "service), or run fewer agents at once; meanwhile the launcher retries cargo/npm",
            details,
        )
    else:
        nproc = Check("processes", "ok", summary, details=details)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    summary = f"open files (RLIMIT_NOFILE): {_limit(soft)} (hard {_limit(hard)})"
    details = {"soft": _limit(soft), "hard": _limit(hard)}
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        nofile = Check(
            "open files",
            "warn",
            f"{summary}: below {MIN_OPEN_FILES}, large builds and test runs fail with EMFILE",
            f"ulimit -n {min(MIN_OPEN_FILES, hard) if hard != resource.RLIM_INFINITY else 4096} "
            "in the shell that starts the agents (the hard limit bounds it)",
            details,
        )
    else:
        nofile = Check("open files", "ok", summary, details=details)
    return [nproc, nofile]
