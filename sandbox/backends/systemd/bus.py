"""The connection to systemd over D-Bus, through pystemd.dbuslib (an optional extra).

pystemd is imported only when a bus is opened (~30 ms with its object API; see import_dbuslib).
What we ask of systemd: start a transient scope and hear its job end, read a unit's cgroup,
stop a unit and wait, list and kill the scopes of dead launchers.
"""

from __future__ import annotations

import os
import time

from sandbox.backends.systemd.properties import encode_properties, usec
from sandbox.core import identity
from sandbox.core.errors import BackendUnavailable, SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any
else:
    import _signal  # the C half of `signal`: `signal` itself costs ~4 ms of start-up

JOB_TIMEOUT_S = 10.0  # bound on systemd starting or stopping our scope

INSTALL_REMEDY = (
    "pip install 'aero-sandbox[systemd]': pystemd builds from source and needs libsystemd-dev, "
    "pkg-config, a C compiler and the Python headers (scripts/install installs them where apt "
    "exists); or use --backend cgroup"
)

_DESTINATION = b"org.freedesktop.systemd1"
_MANAGER_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"
_SCOPE = b"org.freedesktop.systemd1.Scope"
_UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"


def import_dbuslib() -> tuple[Any, Any]:
    """pystemd.dbuslib and pystemd.dbusexc, without running pystemd/__init__.py.

    That file loads pystemd's whole object API (lxml, typing, inspect...), of which we use
    nothing: 13 of the 34 ms the import takes on the development machine, and about 250 of
    360 ms under the VM stage's emulation. So unless pystemd is imported already, the package is
    entered as a bare module with its search path, and only the two submodules load.
    """
    import sys

    if "pystemd" not in sys.modules:
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("pystemd")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'pystemd'")
        package = type(sys)("pystemd")
        package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
        package.__file__, package.__package__ = spec.origin, "pystemd"
        sys.modules["pystemd"] = package
    try:
        import pystemd.dbusexc as errors
        import pystemd.dbuslib as dbuslib
    except ImportError:
        if getattr(sys.modules.get("pystemd"), "__path__", None) is not None:
            sys.modules.pop("pystemd", None)  # a bare package that leads nowhere: forget it
        raise
    return dbuslib, errors


def manager_kind() -> str:
    return "system" if os.geteuid() == 0 else "user"


class Bus:
    """A connection to systemd (pystemd.dbuslib) that hears when its own jobs end."""

    def __init__(self, dbuslib: Any, errors: Any, bus: Any) -> None:
        self._dbuslib = dbuslib
        self._errors = errors
        self._bus = bus
        # The manager's own cgroup: "" for the system manager, user@UID.service's for a user's.
        self.root = ""
        self._jobs: dict[bytes, str] = {}
        jobs = self._jobs

        def job_removed(message: Any, error: Any = None, userdata: Any = None) -> None:
            message.process_reply(False)
            _id, job, _unit, result = message.body
            jobs[job] = result.decode()

        # sd-bus keeps only a borrowed pointer to the callback: we keep it alive.
        self._job_removed = job_removed
        # Subscribed before any job starts, so its JobRemoved cannot pass unheard. systemd sends
        # JobRemoved to the client that queued the job even without Manager.Subscribe().
        bus.match_signal(_DESTINATION, _MANAGER_PATH, _MANAGER, b"JobRemoved", job_removed)

    @classmethod
    def connect(cls) -> Bus:
        """The system bus as root, the user's bus (its systemd --user) otherwise."""
        try:
            dbuslib, errors = import_dbuslib()
        except ImportError as err:
            raise BackendUnavailable(
                "systemd", f"pystemd is not installed ({err})", INSTALL_REMEDY
            ) from err
        user = os.geteuid() != 0
        if user and not (
            os.environ.get("DBUS_SESSION_BUS_ADDRESS") or os.environ.get("XDG_RUNTIME_DIR")
        ):
            raise BackendUnavailable(
                "systemd",
                "no user bus: XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS are unset",
                linger_remedy(),
            )
        bus = dbuslib.DBus(user_mode=user)
        try:
            bus.open()
            connection = cls(dbuslib, errors, bus)
            # Does a systemd manager answer on this bus? Its cgroup tells what it may limit.
            connection.root = _text(
                bus.get_property(_DESTINATION, _MANAGER_PATH, _MANAGER, b"ControlGroup", b"s")
            )
        except errors.DBusBaseError as err:
            where = "the system bus" if not user else "the user's bus"
            raise BackendUnavailable(
                "systemd",
                f"no systemd manager answers on {where}: {err}",
                linger_remedy() if user else "start dbus (systemctl start dbus)",
            ) from err
        return connection

    def close(self) -> None:
        self._bus.close()

    def _call(
        self,
        method: bytes,
        args: list[tuple[int, Any]],
        path: bytes = _MANAGER_PATH,
        interface: bytes = _MANAGER,
    ) -> Any:
        # pystemd gives a reply of one value as that value, of several as a list.
        return self._bus.call_method(_DESTINATION, path, interface, method, args).body

    def start_scope(self, unit: str, properties: list[tuple[str, object]]) -> str:
        """Start the scope and wait (bounded) for its job; return the job's result ("done")."""
        apply = self._dbuslib.apply_signature
        args = apply(b"ss", [unit.encode(), b"fail"])
        args += encode_properties(properties, apply)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        try:
            job = self._call(b"StartTransientUnit", args)
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused to start {unit}: {err}") from err
        return self._wait_job(job, f"start {unit}")

    def manager(
        self, method: str, signature: bytes, values: list[Any],
        properties: list[tuple[str, object]] | None = None,
    ) -> Any:
        """Any other Manager method (budgets' slices: SetUnitProperties, ListUnitsByPatterns),
        its arguments given by signature and values, then an a(sv) of unit properties."""
        args = self._dbuslib.apply_signature(signature, values)
        if properties is not None:
            args += encode_properties(properties, self._dbuslib.apply_signature)
        try:
            return self._call(method.encode(), args)
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused {method}: {err}") from err

    def our_pid(self) -> int:
        """Our pid as the bus (and so systemd) sees it: another number in a pid namespace."""
        name = self._bus.get_unique_name()
        args = self._dbuslib.apply_signature(b"s", [name])
        try:
            reply = self._bus.call_method(
                b"org.freedesktop.DBus",
                b"/org/freedesktop/DBus",
                b"org.freedesktop.DBus",
                b"GetConnectionUnixProcessID",
                args,
            )
        except self._errors.DBusBaseError as err:
            raise BackendUnavailable("systemd", f"the bus does not tell our pid: {err}") from err
        return int(reply.body)

    def scope_cgroup(self, unit: str) -> str | None:
        """The scope's cgroup (below the hierarchy's root), None when it has none (any more)."""
        path = self._dbuslib.path_encode(_UNIT_PATH_PREFIX, unit.encode())
        try:
            value = _text(self._bus.get_property(_DESTINATION, path, _SCOPE, b"ControlGroup", b"s"))
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"cannot read the cgroup of {unit}: {err}") from err
        return value or None

    def stop_unit(self, unit: str) -> None:
        """Stop the unit and wait (bounded) until systemd has removed it; gone already is fine."""
        try:
            job = self._call(
                b"StopUnit", self._dbuslib.apply_signature(b"ss", [unit.encode(), b"replace"])
            )
        except self._errors.DBusNoSuchUnitError:
            return
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused to stop {unit}: {err}") from err
        self._wait_job(job, f"stop {unit}")

    def stop_stale_scopes(self) -> None:
        """Kill the scopes of launchers that died with neither cleanup nor timeout (both the
        launcher and its guardian killed): a daemon they left would otherwise keep one forever."""
        args = self._dbuslib.apply_signature(b"asas", [[], [b"aero-sandbox-*.scope"]])
        try:
            units = self._call(b"ListUnitsByPatterns", args)
        except self._errors.DBusBaseError:
            return  # systemd < 230: no such method; `aero-sandbox gc` remains
        for row in units or []:
            name = _text(row[0])  # (name, description, load state, active state, ...)
            pid = identity.launcher_pid(name.removesuffix(".scope"))
            if pid is None or pid == os.getpid() or identity.pid_exists(pid):
                continue
            kill = self._dbuslib.apply_signature(b"ssi", [name.encode(), b"all", _signal.SIGKILL])
            try:
                self._call(b"KillUnit", kill)
            except self._errors.DBusBaseError:
                pass

    def _wait_job(self, job: bytes, what: str) -> str:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            while job not in self._jobs:
                self._bus.process()  # dispatches one queued message (our JobRemoved callback)
                if job in self._jobs:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError(
                        f"systemd did not finish the job to {what} within {JOB_TIMEOUT_S:g} s"
                    )
                # Short slices: process() handles one message per call, and a second one
                # already read from the socket would not wake a long wait.
                self._bus.wait(usec(min(left, 0.02)))
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"lost the bus while waiting to {what}: {err}") from err
        return self._jobs.pop(job)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def linger_remedy() -> str:
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (
        f"`loginctl enable-linger {user}` starts the user's systemd without a login; then "
        f"XDG_RUNTIME_DIR=/run/user/{os.getuid()} (or use --backend cgroup)"
    )
