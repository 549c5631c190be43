"""Which backend runs the command. The order is the design:

    systemd  systemd is PID 1 and a bus answers: the cgroup tree is systemd's, ask it for a scope
    cgroup   when we can create cgroups below our own (root, a delegated subtree, a container)
    rlimit   anywhere else: rlimits and a watchdog (fallback/)

`auto` tries them in that order and keeps each refusal's reason for the report; asking for one
backend by name tries only that one. Backend modules are imported only when tried.
"""

from __future__ import annotations

import os

from sandbox.cgroups import cgroupfs
from sandbox.core.errors import BackendUnavailable, SandboxError
from sandbox.core.limits import Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandbox.backends.protocol import Backend
    from sandbox.budgets.membership import Membership as Budget

BACKENDS = ("systemd", "cgroup", "rlimit")
CHOICES = ("auto",) + BACKENDS


def systemd_running() -> bool:
    """sd_booted(): systemd creates /run/systemd/system when it runs as PID 1."""
    return os.path.isdir("/run/systemd/system")


def make(
    name: str,
    parent: str | None = None,
    slice_name: str | None = None,
    budget: Budget | None = None,
) -> Backend:
    if slice_name is not None and name != "systemd":
        # The same for --slice: only a systemd scope can be placed in a slice.
        raise BackendUnavailable(
            name,
            "--slice names a systemd slice, which only the systemd backend uses",
            "use --backend systemd where systemd runs, or --parent with the cgroup backend",
        )
    if parent is not None and name != "cgroup":
        # A shared budget must never be dropped silently: only the cgroup backend honours it.
        raise BackendUnavailable(
            name,
            "--parent names a cgroupfs directory, which only the cgroup backend uses",
            "use --backend cgroup, or --slice with systemd",
        )
    if budget is not None and budget.slice is not None:
        # The budget is a tree of systemd slices (budgets/slices.py): only a scope goes in one.
        if name != "systemd" or slice_name is not None:
            raise BackendUnavailable(
                name,
                f"budget {budget.name} lives in systemd's {budget.slice}, where only the systemd "
                "backend's scopes go" + ("; --slice names another" if slice_name else ""),
                "drop --slice, or use --backend systemd (auto does); AERO_BACKEND=cgroup (or "
                "AERO_BUDGET_ROOT) keeps budgets in cgroups instead",
            )
        if not systemd_running():
            raise BackendUnavailable("systemd", "systemd is not running as PID 1 on this host")
        from sandbox.budgets.slices import backend as member_backend

        return member_backend(budget.slice, budget.watch)
    if budget is not None and name != "cgroup":
        # Never drop a budget silently: a cgroup budget takes the cgroup backend's sandboxes.
        raise BackendUnavailable(
            name,
            f"budget {budget.name} is a cgroup tree of this launcher's, where only the cgroup "
            "backend's sandboxes go",
            "run as root or in a delegated cgroup, with --backend cgroup or auto; the systemd "
            "backend keeps budgets in slices (docs/budgets.md)",
        )
    if name == "cgroup":
        from sandbox.backends.cgroup import CgroupBackend

        if budget is not None:
            return CgroupBackend(hierarchies=budget.placement, budget=budget.watch)
        return CgroupBackend(parent=parent)
    if name == "systemd":
        if not systemd_running():
            raise BackendUnavailable("systemd", "systemd is not running as PID 1 on this host")
        from sandbox.backends.systemd import SystemdBackend  # pystemd only in its prepare()

        return SystemdBackend(slice_name)
    if name == "rlimit":
        from fallback.backend import RlimitBackend

        return RlimitBackend()
    raise SandboxError(f"unknown backend {name!r}")


def prepare(
    requested: str,
    limits: Limits,
    argv: list[str],
    parent: str | None = None,
    slice_name: str | None = None,
    budget: Budget | None = None,
) -> tuple[Backend, dict[str, Any]]:
    """A prepared backend and the record of how it was chosen (for the report).

    "notices" lists the refusals worth a line without -v: systemd runs here but its backend
    could not (no pystemd, no user manager...), and the refusal says how to fix that.
    """
    names: tuple[str, ...] = BACKENDS if requested == "auto" else (requested,)
    refused: dict[str, str] = {}
    if requested == "auto" and cgroupfs.inside_sandbox():
        # A new systemd scope would be a sibling of the enclosing sandbox, outside its limits.
        # The enclosing sandbox is delegated to us: the inner one goes inside it.
        names = tuple(name for name in names if name != "systemd")
        refused["systemd"] = "systemd backend skipped: nested inside a sandbox, using its cgroup"
    notices: list[str] = []
    for name in names:
        try:
            backend = make(name, parent, slice_name, budget)
            backend.prepare(limits, argv)
        except BackendUnavailable as err:
            if requested != "auto":
                raise
            refused[name] = err.line()
            if name == "systemd" and err.remedy and systemd_running():
                notices.append(err.line())
            continue
        choice = {"requested": requested, "chosen": name, "refused": refused, "notices": notices}
        return backend, choice
    raise SandboxError("no backend can run here: " + "; ".join(refused.values()))
