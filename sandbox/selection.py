"""Which backend runs the command. The order is the design:

    systemd  when systemd is PID 1 and a bus answers: the cgroup tree is systemd's, ask it for a scope
    cgroup   when we can create cgroups below our own (root, a delegated subtree, a container)
    rlimit   anywhere else: rlimits and a watchdog (fallback/)

`auto` tries them in that order and keeps each refusal's reason for the report; asking for one
backend by name tries only that one. Backend modules are imported only when tried.
"""

from __future__ import annotations

import os

from sandbox.errors import BackendUnavailable, SandboxError
from sandbox.limits import Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandbox.backend import Backend

BACKENDS = ("systemd", "cgroup", "rlimit")
CHOICES = ("auto",) + BACKENDS


def systemd_running() -> bool:
    """sd_booted(): systemd creates /run/systemd/system when it runs as PID 1."""
    return os.path.isdir("/run/systemd/system")


def make(name: str) -> Backend:
    if name == "cgroup":
        from sandbox.cgroup_backend import CgroupBackend

        return CgroupBackend()
    if name == "systemd":
        if not systemd_running():
            raise BackendUnavailable("systemd", "systemd is not running as PID 1 on this host")
        raise BackendUnavailable("systemd", "the systemd backend is not part of this version yet")
    if name == "rlimit":
        raise BackendUnavailable("rlimit", "the rlimit fallback is not part of this version yet")
    raise SandboxError(f"unknown backend {name!r}")


def prepare(requested: str, limits: Limits, argv: list[str]) -> tuple[Backend, dict[str, Any]]:
    """A prepared backend and the record of how it was chosen (for the report)."""
    names = BACKENDS if requested == "auto" else (requested,)
    refused: dict[str, str] = {}
    for name in names:
        try:
            backend = make(name)
            backend.prepare(limits, argv)
        except BackendUnavailable as err:
            if requested != "auto":
                raise
            refused[name] = err.line()
            continue
        return backend, {"requested": requested, "chosen": name, "refused": refused}
    raise SandboxError("no backend can run here: " + "; ".join(refused.values()))
