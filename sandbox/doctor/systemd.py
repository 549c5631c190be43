"""systemd as PID 1, the D-Bus the systemd backend would talk to, linger, pystemd."""

from __future__ import annotations

import os
import socket

from sandbox.backends import selection
from sandbox.doctor.check import Check, read

PYSTEMD_REMEDY = (
    "pip install 'aero-sandbox[systemd]' (it builds against libsystemd: "
    "apt-get install libsystemd-dev pkg-config gcc python3-dev first)"
)


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


def checks(backend: Check) -> list[Check]:
    pid1 = read("/proc/1/comm").strip() or "unknown"
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
