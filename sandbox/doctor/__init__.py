"""`aero-sandbox doctor`: what this host can enforce, and how to get more.

Every finding is a Check (check.py): a status (ok, info, warn, error), one line in plain words,
and the exact remedy when something is missing. The checks, in the order they are shown:

    host.py        kernel version, how fast this installation starts a run, cgroup hierarchies
                   and the controllers a sandbox gets (the cgroup backend's own choice),
                   cgroup.kill/memory.peak, the machine's size
    systemd.py     systemd as PID 1, the bus the systemd backend talks to, linger, pystemd
    userlimits.py  RLIMIT_NPROC (tasks counted as the kernel does) and RLIMIT_NOFILE
    project.py     the Node version against .nvmrc
    probe.py       the backend `auto` picks, by preparing (and removing) a real sandbox

Exit status (EXIT_* below): 0 a sandbox that enforces memory runs here and nothing is in error;
1 no sandbox here can enforce memory; 2 sandboxes work, but a project check failed (the Node
version against .nvmrc; AERO_ALLOW_UNSUPPORTED_NODE=1 turns that error into a warning).
"""

from __future__ import annotations

import os

from sandbox.cgroups import cgroupfs
from sandbox.doctor import host, probe, project, systemd, userlimits
from sandbox.doctor.check import Check, Diagnosis
from sandbox.doctor.host import cgroup_mode, kernel_version
from sandbox.doctor.project import node_matches

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "EXIT_NO_MEMORY_SANDBOX",
    "EXIT_OK",
    "EXIT_PROJECT_ERROR",
    "Check",
    "Diagnosis",
    "cgroup_mode",
    "diagnose",
    "kernel_version",
    "node_matches",
    "render",
]

EXIT_OK = 0
EXIT_NO_MEMORY_SANDBOX = 1
EXIT_PROJECT_ERROR = 2


def diagnose(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Diagnosis:
    environ = os.environ if environ is None else environ
    cwd = cwd or os.getcwd()
    hierarchies = cgroupfs.discover()
    backend_check, probed = probe.check(environ)
    checks = [
        host.kernel(),
        host.start_up(),
        host.cgroups(hierarchies),
        host.cgroup_v2_files(hierarchies, probed),
        *systemd.checks(backend_check),
        *userlimits.checks(),
        host.machine(),
        project.check(environ, cwd),
        _budgets(),
        backend_check,
    ]
    memory = backend_check.status == "ok"
    if not memory:
        code = EXIT_NO_MEMORY_SANDBOX
    elif any(check.status == "error" for check in checks):
        code = EXIT_PROJECT_ERROR
    else:
        code = EXIT_OK
    return Diagnosis(checks, memory, code)



def _budgets() -> Check:
    from sandbox.budgets.manage import doctor_summary

    status, summary, details = doctor_summary()
    return Check("budgets", status, summary, details=details)


def render(diagnosis: Diagnosis) -> str:
    lines = ["aero-sandbox doctor: what this host can enforce", ""]
    for check in diagnosis.checks:
        lines.append(f"  {check.status:<5}  {check.name:<12} {check.summary}")
        if check.remedy:
            lines.append(f"  {'':<5}  {'':<12} fix: {check.remedy}")
    lines.append("")
    if diagnosis.exit_code == EXIT_OK:
        lines.append("verdict: sandboxes here enforce memory (exit 0)")
    elif diagnosis.exit_code == EXIT_PROJECT_ERROR:
        lines.append("verdict: sandboxes here enforce memory, but a check above failed (exit 2)")
    else:
        lines.append("verdict: no sandbox here can enforce memory; see the fixes above (exit 1)")
    return "\n".join(lines)
