"""The backend `auto` picks, found by doing it: a real sandbox is prepared through the same
selection a run uses (with small limits), inspected, and removed again."""

from __future__ import annotations

import os

from sandbox.backends import selection
from sandbox.core.errors import SandboxError
from sandbox.core.limits import Limits
from sandbox.doctor.check import Check
from sandbox.doctor.host import v2_files

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# The probe sandbox: small, and never run anything in it.
PROBE_LIMITS = Limits(memory_bytes=64 << 20, pids=64)


def check(environ: Mapping[str, str]) -> tuple[Check, dict[str, dict[str, bool]]]:
    """Prepare a real sandbox the way a run does (the shared-budget parent cgroup or slice of
    the environment included), note what it is, remove it.

    Returns the check and, for each cgroup directory of the sandbox, which of cgroup.kill and
    memory.peak it had (looked at here, before the removal)."""
    from sandbox.options import parse_slice

    parent = environ.get("AERO_CGROUP_PARENT", "").strip() or None
    slice_text = environ.get("AERO_SLICE", "").strip()
    try:
        slice_name = parse_slice(slice_text, "AERO_SLICE") if slice_text else None
        backend, choice = selection.prepare("auto", PROBE_LIMITS, ["true"], parent, slice_name)
    except SandboxError as err:
        return (
            Check(
                "backend",
                "error",
                f"auto finds no backend: {err.line()}",
                "see each backend's remedy above; the cgroup backend needs root or a delegated "
                "cgroup (systemd-run --user --scope -p Delegate=yes aero-sandbox ...)",
                {"chosen": None},
            ),
            {},
        )
    try:
        described = backend.describe()
        not_enforced = list(backend.not_enforced)
        dirs = list(described.cgroups.values())
        probed = {d: v2_files(d) for d in dirs}  # now: remove() below deletes them
    finally:
        backend.remove()
    left = [d for d in dirs if os.path.exists(d)]
    if left:
        raise SandboxError(f"the probe sandbox was not removed: {', '.join(left)}")
    refused = choice.get("refused", {})
    why = "; ".join(refused.values()) if refused else "the first in the order"
    summary = f"auto picks {backend.name} (after: {why})"
    if not_enforced:
        summary += f"; not enforced here: {', '.join(not_enforced)}"
    details = {
        "chosen": backend.name,
        "refused": refused,
        "not_enforced": not_enforced,
        "sandbox": described.as_report(),
    }
    if "memory" in not_enforced:
        return Check("backend", "error", summary, "see the cgroups fixes above", details), probed
    remedy = None
    if "pids" in not_enforced:
        remedy = "delegate the pids controller to our cgroup (or run as root) to cap tasks"
    return Check("backend", "ok" if remedy is None else "warn", summary, remedy, details), probed
