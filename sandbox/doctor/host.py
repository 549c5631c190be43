"""The host's own checks: kernel, cgroup hierarchies, cgroup v2 files, machine size, and how
fast this installation can start a run.

What a sandbox would use is not re-derived here: the cgroup backend's own choice of hierarchy per
controller (backends.cgroup.controller_sources) and cgroupfs's name for the mix of versions.
"""

from __future__ import annotations

import os
import sys

from sandbox.backends.cgroup import CONTROLLERS, controller_sources
from sandbox.cgroups import cgroupfs
from sandbox.cgroups.enclosing import enclosing_memory_limit
from sandbox.core import linux
from sandbox.core.limits import format_size
from sandbox.doctor.check import Check, read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandbox.cgroups.cgroupfs import Hierarchy

KILL_KERNEL = (5, 14)  # cgroup.kill
PEAK_KERNEL = (5, 19)  # memory.peak
CGROUP_V2_REMEDY = (
    "boot with systemd.unified_cgroup_hierarchy=1 (pure cgroup v2) for memory.peak, "
    "cgroup.kill and memory.oom.group in one hierarchy"
)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or os.uname().release
    numbers = []
    for part in release.split(".")[:2]:
        digits = ""
        for char in part:  # "19rc1" -> 19, "44-fc" -> 44
            if not char.isdigit():
                break
            digits += char
        numbers.append(int(digits) if digits else 0)
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def kernel() -> Check:
    uname = os.uname()
    version = kernel_version(uname.release)
    summary = f"Linux {uname.release} on {uname.machine}"
    if version >= PEAK_KERNEL:
        return Check("kernel", "ok", summary, details={"release": uname.release})
    missing = "memory.peak (5.19+)" if version >= KILL_KERNEL else "cgroup.kill (5.14+)"
    return Check(
        "kernel",
        "warn",
        f"{summary}: older than {missing} needs",
        "upgrade to Linux 5.19 or later: without cgroup.kill a tree is killed by a loop "
        "(a fork race is possible), without memory.peak the peak memory is unknown",
        {"release": uname.release},
    )


def cgroup_mode(hierarchies: list[Hierarchy]) -> str:
    return cgroupfs.cgroup_mode({h.version for h in hierarchies})


def usable(hierarchies: list[Hierarchy]) -> dict[str, str]:
    """controller -> where a sandbox gets it (the cgroup backend's choice), when we may write
    there."""
    return {
        controller: f"v{hierarchy.version} {hierarchy.own}"
        for controller, hierarchy in controller_sources(hierarchies).items()
        if os.access(hierarchy.own, os.W_OK)
    }


def cgroups(hierarchies: list[Hierarchy]) -> Check:
    mode = cgroup_mode(hierarchies)
    found = usable(hierarchies)
    details = {
        "mode": mode,
        "delegated": found,
        "hierarchies": [
            {
                "version": h.version,
                "mount": h.mount,
                "own": h.own,
                "controllers": sorted(h.controllers),
                "writable": os.access(h.own, os.W_OK),
            }
            for h in hierarchies
        ],
    }
    if mode == "none":
        return Check(
            "cgroups",
            "warn",
            "no cgroup filesystem is mounted",
            "mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup), "
            "or use the rlimit backend",
            details,
        )
    where = "; ".join(f"{c} from {w}" for c, w in found.items()) or "none"
    summary = f"{mode}; controllers we may use: {where}"
    missing = [c for c in CONTROLLERS if c not in found]
    if missing:
        remedy = (
            f"no writable {' or '.join(missing)} controller for our cgroup: run as root, or in a "
            "delegated cgroup (systemd-run --user --scope -p Delegate=yes aero-sandbox ...)"
        )
        return Check("cgroups", "warn", summary, remedy, details)
    if mode in ("hybrid", "v1"):
        return Check("cgroups", "info", summary, CGROUP_V2_REMEDY, details)
    return Check("cgroups", "ok", summary, details=details)


def v2_files(directory: str) -> dict[str, bool]:
    return {name: os.path.exists(f"{directory}/{name}") for name in ("cgroup.kill", "memory.peak")}


def cgroup_v2_files(hierarchies: list[Hierarchy], probed: dict[str, dict[str, bool]]) -> Check:
    """Whether cgroup.kill and memory.peak exist, looked up in a real v2 cgroup: the probe sandbox
    (seen by the probe before it removed it), else our own cgroup (the root has neither file)."""
    v2 = next((h for h in hierarchies if h.version == 2), None)
    if v2 is None:
        return Check(
            "cgroup v2",
            "info",
            "no cgroup v2 hierarchy: cgroup.kill and memory.peak do not exist here",
            CGROUP_V2_REMEDY,
        )
    mount = v2.mount.rstrip("/") + "/"
    in_probe = [d for d in probed if d.startswith(mount)]
    where = in_probe[0] if in_probe else v2.own
    if not in_probe and not os.path.exists(where + "/cgroup.type"):
        return Check(
            "cgroup v2",
            "info",
            "not checked: no v2 cgroup of ours to look in (we sit in the root cgroup and the "
            "probe sandbox has no v2 part)",
        )
    files = probed[where] if in_probe else v2_files(where)
    kill, peak = files["cgroup.kill"], files["memory.peak"]
    memory_on_v2 = "memory" in v2.controllers
    details = {"checked_in": where, "cgroup.kill": kill, "memory.peak": peak}
    said = [f"cgroup.kill {'present' if kill else 'missing'}"]
    if memory_on_v2:
        said.append(f"memory.peak {'present' if peak else 'missing'}")
    else:
        said.append("memory.peak n/a (memory is not on v2 here; v1 memory.max_usage_in_bytes)")
    summary = f"{', '.join(said)} (looked in {'the probe sandbox' if in_probe else 'our cgroup'})"
    if kill and (peak or not memory_on_v2):
        return Check("cgroup v2", "ok", summary, details=details)
    return Check(
        "cgroup v2",
        "warn",
        summary,
        "upgrade to Linux 5.14+ for cgroup.kill and 5.19+ for memory.peak",
        details,
    )


def _meminfo() -> dict[str, int]:
    values = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[key] = int(words[0]) * 1024
    return values


def machine() -> Check:
    info = _meminfo()
    cores = os.cpu_count() or 0
    usable_cores = len(os.sched_getaffinity(0))
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    swap = info.get("SwapTotal", 0)
    summary = (
        f"memory {format_size(total)} ({format_size(available)} available), swap "
        f"{format_size(swap) if swap else 'none'}; {cores} cores ({usable_cores} usable by us)"
    )
    # A container's or an admin's cgroup above us caps every sandbox, whatever --mem says.
    enclosing, where = enclosing_memory_limit()
    if enclosing is not None:
        summary += f"; sandboxes here get at most {format_size(enclosing)} (the limit of {where})"
    return Check(
        "machine",
        "ok",
        summary,
        details={
            "memory_bytes": total,
            "available_bytes": available,
            "swap_bytes": swap,
            "cores": cores,
            "usable_cores": usable_cores,
            "enclosing_memory_bytes": enclosing,
            "enclosing_cgroup": where,
        },
    )


START_UP_REMEDY = (
    "bash scripts/install in the checkout (with gcc and the Python headers, which it installs "
    "from apt as root), and run the venv's bin/aero-sandbox"
)


def start_up() -> Check:
    """What makes each run start faster (README, "Speed"): the C module that starts the command
    without copying the launcher (sandbox/core/syscalls.c), and the bundle the entry reads our
    modules from (sandbox/bundle.py: only when started through that entry)."""
    native = linux.native_spawn is not None
    bundled = any(type(finder).__module__ == "sandbox.bundle" for finder in sys.meta_path)
    said = [
        "commands start by a clone sharing the launcher's memory"
        if native
        else "sandbox/core/_syscalls is not built: each command starts by a fork (~1 ms more)",
        "modules from the entry's bundle"
        if bundled
        else "no bundle in use: modules found one by one (~1.5 ms more)",
    ]
    details = {"native_spawn": native, "bundle": bundled}
    if native and bundled:
        return Check("start-up", "ok", "; ".join(said), details=details)
    return Check("start-up", "info", "; ".join(said), START_UP_REMEDY, details)
