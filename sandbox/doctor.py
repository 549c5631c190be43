"""`aero-sandbox doctor`: what this host can enforce, and how to get more.

Every finding is a Check: a status (ok, info, warn, error), one line in plain words, and the
exact remedy when something is missing. The backend finding is not guessed from files: a real
sandbox is prepared through the same `auto` selection a run uses (with small limits), inspected,
and removed again.

Exit status (EXIT_* below): 0 a sandbox that enforces memory runs here and nothing is in error;
1 no sandbox here can enforce memory; 2 sandboxes work, but a project check failed (the Node
version against .nvmrc; AERO_ALLOW_UNSUPPORTED_NODE=1 turns that error into a warning).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess

from sandbox.backends import selection
from sandbox.cgroups import cgroupfs
from sandbox.cgroups.enclosing import enclosing_memory_limit
from sandbox.core.errors import SandboxError
from sandbox.core.frozen import Frozen
from sandbox.core.limits import Limits, format_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from sandbox.cgroups.cgroupfs import Hierarchy

EXIT_OK = 0
EXIT_NO_MEMORY_SANDBOX = 1
EXIT_PROJECT_ERROR = 2

# The probe sandbox: small, and never run anything in it.
PROBE_LIMITS = Limits(memory_bytes=64 << 20, pids=64)
KILL_KERNEL = (5, 14)  # cgroup.kill
PEAK_KERNEL = (5, 19)  # memory.peak
MIN_OPEN_FILES = 4096  # what the old guide told agents to set (`ulimit -n 4096`)
PYSTEMD_REMEDY = (
    "pip install 'aero-sandbox[systemd]' (it builds against libsystemd: "
    "apt-get install libsystemd-dev pkg-config gcc python3-dev first)"
)
CGROUP_V2_REMEDY = (
    "boot with systemd.unified_cgroup_hierarchy=1 (pure cgroup v2) for memory.peak, "
    "cgroup.kill and memory.oom.group in one hierarchy"
)


class Check(Frozen):
    __slots__ = ("name", "status", "summary", "remedy", "details")
    name: str
    status: str  # ok | info | warn | error
    summary: str
    remedy: str | None
    details: dict[str, Any]

    def __init__(
        self,
        name: str,
        status: str,
        summary: str,
        remedy: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._init(name=name, status=status, summary=summary, remedy=remedy, details=details or {})


class Diagnosis(Frozen):
    __slots__ = ("checks", "memory_enforced", "exit_code")
    checks: list[Check]
    memory_enforced: bool
    exit_code: int

    def __init__(self, checks: list[Check], memory_enforced: bool, exit_code: int) -> None:
        self._init(checks=checks, memory_enforced=memory_enforced, exit_code=exit_code)

    def as_json(self) -> dict[str, Any]:
        return {
            "checks": [check.as_dict() for check in self.checks],
            "memory_enforced": self.memory_enforced,
            "exit_code": self.exit_code,
        }


def diagnose(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Diagnosis:
    environ = os.environ if environ is None else environ
    cwd = cwd or os.getcwd()
    hierarchies = cgroupfs.discover()
    backend_check, probed = _backend(environ)
    checks = [
        _kernel(),
        _cgroups(hierarchies),
        _cgroup_v2_files(hierarchies, probed),
        *_systemd(backend_check),
        *_user_limits(),
        _machine(),
        _node(environ, cwd),
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


# -- kernel and cgroups ---------------------------------------------------------------------------
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


def _kernel() -> Check:
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
    versions = {h.version for h in hierarchies}
    if versions == {2}:
        return "v2"
    if versions == {1, 2}:
        return "hybrid"
    if versions == {1}:
        return "v1"
    return "none"


def _usable(hierarchies: list[Hierarchy]) -> dict[str, str]:
    """controller -> where we can use it (the same choice the cgroup backend makes)."""
    v2 = next((h for h in hierarchies if h.version == 2), None)
    found: dict[str, str] = {}
    for controller in ("memory", "pids"):
        if v2 is not None and controller in v2.controllers and os.access(v2.own, os.W_OK):
            found[controller] = f"v2 {v2.own}"
            continue
        v1 = next(
            (
                h
                for h in hierarchies
                if h.version == 1 and controller in h.controllers and os.access(h.own, os.W_OK)
            ),
            None,
        )
        if v1 is not None:
            found[controller] = f"v1 {v1.own}"
    return found


def _cgroups(hierarchies: list[Hierarchy]) -> Check:
    mode = cgroup_mode(hierarchies)
    usable = _usable(hierarchies)
    details = {
        "mode": mode,
        "delegated": usable,
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
    where = "; ".join(f"{c} from {w}" for c, w in usable.items()) or "none"
    summary = f"{mode}; controllers we may use: {where}"
    missing = [c for c in ("memory", "pids") if c not in usable]
    if missing:
        remedy = (
            f"no writable {' or '.join(missing)} controller for our cgroup: run as root, or in a "
            "delegated cgroup (systemd-run --user --scope -p Delegate=yes aero-sandbox ...)"
        )
        return Check("cgroups", "warn", summary, remedy, details)
    if mode in ("hybrid", "v1"):
        return Check("cgroups", "info", summary, CGROUP_V2_REMEDY, details)
    return Check("cgroups", "ok", summary, details=details)


def _v2_files(directory: str) -> dict[str, bool]:
    return {name: os.path.exists(f"{directory}/{name}") for name in ("cgroup.kill", "memory.peak")}


def _cgroup_v2_files(hierarchies: list[Hierarchy], probed: dict[str, dict[str, bool]]) -> Check:
    """Whether cgroup.kill and memory.peak exist, looked up in a real v2 cgroup: the probe sandbox
    (seen by _backend before it removed it), else our own cgroup (the root has neither file)."""
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
    files = probed[where] if in_probe else _v2_files(where)
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


# -- systemd --------------------------------------------------------------------------------------
def _connects(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _bus_path(address: str | None, fallback: str) -> str:
    """The socket of a D-Bus address `unix:path=/run/...` (other transports: the fallback)."""
    for part in (address or "").split(";")[0].partition(":")[2].split(","):
        key, _, value = part.partition("=")
        if key == "path":
            return value
    return fallback


def _systemd(backend: Check) -> list[Check]:
    pid1 = _read("/proc/1/comm").strip() or "unknown"
    running = selection.systemd_running()
    uid = os.getuid()
    system_bus = _bus_path(os.environ.get("DBUS_SYSTEM_BUS_ADDRESS"), "/run/dbus/system_bus_socket")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    user_bus = _bus_path(os.environ.get("DBUS_SESSION_BUS_ADDRESS"), f"{runtime}/bus")
    has_system_bus, has_user_bus = _connects(system_bus), _connects(user_bus)
    checks = []
    other_works = backend.status == "ok"
    if running:
        checks.append(Check("systemd", "ok", "systemd is PID 1", details={"pid1": pid1}))
    else:
        checks.append(
            Check(
                "systemd",
                "info" if other_works else "warn",
                f"systemd is absent: not PID 1 (PID 1 is {pid1!r})",
                None
                if other_works
                else "the systemd backend needs a host booted with systemd; without it, run as "
                "root or in a delegated cgroup for the cgroup backend",
                {"pid1": pid1},
            )
        )
    bus_details = {"system": system_bus, "user": user_bus}
    bus_summary = (
        f"system bus {'answers' if has_system_bus else 'absent'} ({system_bus}); "
        f"user bus {'answers' if has_user_bus else 'absent'} ({user_bus})"
    )
    needed = has_system_bus if uid == 0 else has_user_bus
    bus_remedy = None
    if running and not needed:
        bus_remedy = (
            "start dbus (apt-get install dbus; systemctl start dbus)"
            if uid == 0
            else "log in through a systemd session (ssh or login), or: loginctl enable-linger "
            "$USER; export XDG_RUNTIME_DIR=/run/user/$(id -u)"
        )
    checks.append(Check("D-Bus", "ok" if needed else "info", bus_summary, bus_remedy, bus_details))
    if uid != 0:
        user = _user_name(uid)
        lingering = os.path.exists(f"/var/lib/systemd/linger/{user}")
        checks.append(
            Check(
                "linger",
                "ok" if lingering or not running else "info",
                f"linger {'on' if lingering else 'off'} for {user}",
                None
                if lingering or not running
                else f"loginctl enable-linger {user} (keeps your user manager, and the sandboxes' "
                "scopes, alive without a login session)",
            )
        )
    try:
        import pystemd  # noqa: F401

        checks.append(Check("pystemd", "ok", "pystemd imports"))
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken libsystemd
        checks.append(
            Check(
                "pystemd",
                "warn" if running else "info",
                f"pystemd does not import ({type(err).__name__})",
                PYSTEMD_REMEDY if running else None,
            )
        )
    return checks


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# -- per-user limits, machine -------------------------------------------------------------------
def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def user_tasks(uid: int) -> int:
    """Threads of every process of `uid`: what RLIMIT_NPROC counts."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            for line in _read(f"/proc/{name}/status").splitlines():
                if line.startswith("Threads:"):
                    count += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return count


def _user_limits() -> list[Check]:
    uid = os.getuid()
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    used = user_tasks(uid)
    summary = f"processes (RLIMIT_NPROC): {_limit(soft)} (hard {_limit(hard)}), {used} tasks in use"
    details = {"soft": _limit(soft), "hard": _limit(hard), "tasks_in_use": used}
    if uid == 0:
        nproc = Check("processes", "ok", summary + "; not enforced for root", details=details)
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


def _meminfo() -> dict[str, int]:
    values = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[key] = int(words[0]) * 1024
    return values


def _machine() -> Check:
    info = _meminfo()
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0))
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    swap = info.get("SwapTotal", 0)
    summary = (
        f"memory {format_size(total)} ({format_size(available)} available), swap "
        f"{format_size(swap) if swap else 'none'}; {cores} cores ({usable} usable by us)"
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
            "usable_cores": usable,
            "enclosing_memory_bytes": enclosing,
            "enclosing_cgroup": where,
        },
    )


# -- Node -----------------------------------------------------------------------------------------
def find_nvmrc(start: str) -> str | None:
    path = os.path.abspath(start)
    while True:
        candidate = os.path.join(path, ".nvmrc")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def node_matches(wanted: str, actual: str) -> bool | None:
    """Whether Node `actual` (v20.11.1) satisfies .nvmrc's `wanted` (20, 20.11, v20.11.1); None
    when `wanted` is an alias (lts/*, node) that cannot be checked without nvm."""
    want = wanted.strip().removeprefix("v").split(".")
    have = actual.strip().removeprefix("v").split(".")
    if not want or not all(part.isdigit() for part in want):
        return None
    return have[: len(want)] == want


def _node(environ: Mapping[str, str], cwd: str) -> Check:
    nvmrc = find_nvmrc(cwd)
    actual = _node_version()
    if nvmrc is None:
        found = f"Node {actual}" if actual else "no node on PATH"
        return Check("node", "info", f"no .nvmrc in {cwd} or above ({found})")
    wanted = _read(nvmrc).strip().splitlines()[0].strip() if _read(nvmrc).strip() else ""
    details = {"nvmrc": nvmrc, "wanted": wanted, "found": actual}
    allowed = environ.get("AERO_ALLOW_UNSUPPORTED_NODE", "").strip().lower() in ("1", "true", "yes")
    failing = "warn" if allowed else "error"
    remedy = f"nvm install && nvm use (reads {nvmrc})" + (
        "" if allowed else ", or set AERO_ALLOW_UNSUPPORTED_NODE=1 to go on with this Node"
    )
    if actual is None:
        summary = f"{nvmrc} wants Node {wanted}; no node on PATH"
        return Check("node", failing, summary, remedy, details)
    matches = node_matches(wanted, actual)
    if matches is None:
        return Check(
            "node",
            "info",
            f"{nvmrc} names {wanted!r} (an alias: not checked); Node {actual}",
            details=details,
        )
    if matches:
        return Check("node", "ok", f"Node {actual} matches {nvmrc} ({wanted})", details=details)
    allowed_note = " (allowed by AERO_ALLOW_UNSUPPORTED_NODE)" if allowed else ""
    return Check(
        "node",
        failing,
        f"Node {actual} does not match {nvmrc} ({wanted}){allowed_note}",
        remedy,
        details,
    )


def _node_version() -> str | None:
    import shutil

    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# -- the backend `auto` picks ---------------------------------------------------------------------
def _backend(environ: Mapping[str, str]) -> tuple[Check, dict[str, dict[str, bool]]]:
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
        described = backend.describe().as_report()
        not_enforced = list(backend.not_enforced)
        cgroups = described.get("cgroups")
        dirs = [p for p in cgroups.values() if isinstance(p, str)] if cgroups else []
        probed = {d: _v2_files(d) for d in dirs}  # now: remove() below deletes them
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
        "sandbox": described,
    }
    if "memory" in not_enforced:
        return Check("backend", "error", summary, "see the cgroups fixes above", details), probed
    remedy = None
    if "pids" in not_enforced:
        remedy = "delegate the pids controller to our cgroup (or run as root) to cap tasks"
    return Check("backend", "ok" if remedy is None else "warn", summary, remedy, details), probed


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
