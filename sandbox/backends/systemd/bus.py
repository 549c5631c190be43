"""The connection to systemd over D-Bus, through pystemd.dbuslib (an optional extra).

pystemd is imported only when a bus is opened (~30 ms with its object API; see lean_import.py).
What we ask of systemd: start a transient scope and hear its job end, read a unit's cgroup,
stop a unit and wait, list and kill the scopes of dead launchers.

Like systemctl and systemd-run, we talk to the manager over its private socket where we may
(/run/systemd/private as root, $XDG_RUNTIME_DIR/systemd/private for a user's manager): a direct
connection has no Hello and no AddMatch round trip, no dbus-daemon relaying each message, and
systemd sends its job signals to every direct connection unasked. The bus is the fallback
(another socket path, a manager that refuses us there).
"""

from __future__ import annotations

import os
import sys
import time

from sandbox.backends.systemd.lean_import import import_dbuslib
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
SYSTEM_PRIVATE_SOCKET = "/run/systemd/private"
INIT_SCOPE = "/init.scope"  # where a manager puts itself, below its own cgroup (systemd >= 237)


def manager_kind() -> str:
    return "system" if os.geteuid() == 0 else "user"


def private_socket(user: bool) -> str | None:
    """The manager's own socket, which systemctl uses; None where we cannot know it."""
    if not user:
        return SYSTEM_PRIVATE_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return f"{runtime}/systemd/private" if runtime else None


class Bus:
    """A connection to systemd (pystemd.dbuslib) that hears when its own jobs end."""

    def __init__(self, dbuslib: Any, errors: Any, bus: Any, manager_pid: int | None = None) -> None:
        self._dbuslib = dbuslib
        self._errors = errors
        self._bus = bus
        # A direct connection: the manager's pid as this process sees it (SO_PEERCRED), 0 when
        # the manager is outside our pid namespace. None on the bus.
        self.manager_pid = manager_pid
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
        # JobRemoved to the client that queued the job even without Manager.Subscribe(). A direct
        # connection's messages carry no sender: matching on one would never match there.
        sender = None if manager_pid is not None else _DESTINATION
        bus.match_signal(sender, _MANAGER_PATH, _MANAGER, b"JobRemoved", job_removed)

    @classmethod
    def connect(cls) -> Bus:
        """The manager's private socket where it lets us in, else the system bus as root, the
        user's bus (its systemd --user) otherwise."""
        try:
            dbuslib, errors = import_dbuslib()
        except ImportError as err:
            raise BackendUnavailable(
                "systemd", f"pystemd is not installed ({err})", INSTALL_REMEDY
            ) from err
        user = os.geteuid() != 0
        direct = _connect_direct(dbuslib, errors, private_socket(user))
        if direct is not None:
            return cls._checked(direct, cls(dbuslib, errors, direct[0], direct[1]), user)
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
        except errors.DBusBaseError as err:
            raise _no_manager(user, err) from err
        return cls._checked((bus, None), cls(dbuslib, errors, bus), user)

    @classmethod
    def _checked(cls, opened: tuple[Any, int | None], connection: Bus, user: bool) -> Bus:
        """Does a systemd manager answer on this connection? Its cgroup tells what it may limit:
        read from /proc where we know its pid, else asked (a round trip)."""
        bus, manager_pid = opened
        try:
            root = _manager_cgroup(manager_pid) if manager_pid else None
            if root is None:
                root = _text(
                    bus.get_property(_DESTINATION, _MANAGER_PATH, _MANAGER, b"ControlGroup", b"s")
                )
        except connection._errors.DBusBaseError as err:
            connection.close()
            raise _no_manager(user, err) from err
        connection.root = root
        return connection

    def close(self) -> None:
        """End the connection for every process that holds its socket, then free it. A forked
        guardian holds a copy of the fd until the launcher exits, and a direct connection that
        nobody reads would pile up in the manager the signals it sends to every one of them."""
        fd = self._bus.get_fd()
        if fd >= 0:
            import _socket

            sock = _socket.socket(fileno=fd)
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (any more): nothing to end
            finally:
                sock.detach()
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

    def foreign_pid_namespace(self) -> str | None:
        """None when systemd sees our pids as we do (the pids we give it name our processes);
        else what shows that it does not."""
        if self.manager_pid is None:
            seen = self.our_pid()
            return None if seen == os.getpid() else f"pid {os.getpid()} here, {seen} to the bus"
        if self.manager_pid == 0:  # SO_PEERCRED: the manager is outside our pid namespace
            return f"pid {os.getpid()} here, the manager outside this pid namespace"
        # Visible to us, the manager's pid namespace is ours or one below it: as deep as ours
        # (NSpid lists a pid per level; status is readable for anyone's process) means ours.
        ours, its = _pid_levels("self"), _pid_levels(str(self.manager_pid))
        if ours is None or its is None:
            return f"no NSpid in /proc/{self.manager_pid}/status to compare ours with"
        return None if ours == its else f"the manager, pid {self.manager_pid}, in one below it"

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
            try:
                self.kill_unit(name)
            except SandboxError:
                pass

    def kill_unit(self, unit: str) -> None:
        """SIGKILL every process of the unit; systemd then stops it, its cgroup being empty."""
        kill = self._dbuslib.apply_signature(b"ssi", [unit.encode(), b"all", _signal.SIGKILL])
        try:
            self._call(b"KillUnit", kill)
        except self._errors.DBusBaseError as err:
            raise SandboxError(f"systemd refused to kill {unit}: {err}") from err

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


def _connect_direct(dbuslib: Any, errors: Any, path: str | None) -> tuple[Any, int] | None:
    """A peer-to-peer connection to the manager at `path` and the manager's pid as we see it;
    None if it is not there or refuses us (only root may use the system manager's)."""
    if path is None or not os.path.exists(path):
        return None
    bus = dbuslib.DBusAddress(b"unix:path=" + path.encode(), peer_to_peer=True)
    try:
        bus.open()
    except errors.DBusBaseError:
        return None
    try:
        pid, uid = _peer_credentials(bus.get_fd())
    except OSError:
        pid, uid = 0, -1
    if uid not in (0, os.geteuid()):  # a socket of someone else's, not our manager's
        bus.close()
        return None
    return bus, pid


def _peer_credentials(fd: int) -> tuple[int, int]:
    """SO_PEERCRED: the pid (0 outside our pid namespace) and uid of the socket's other end.
    _socket, not socket: that one loads enum and selectors (~3 ms of start-up)."""
    import _socket

    sock = _socket.socket(fileno=fd)
    try:
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    finally:
        sock.detach()  # the fd stays sd-bus's
    return int.from_bytes(creds[0:4], sys.byteorder), int.from_bytes(creds[4:8], sys.byteorder)


def _pid_levels(pid: str) -> int | None:
    """How many pid namespaces deep the process is, counted from /proc's (Linux 4.1+)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) - 1
    except OSError:
        pass
    return None


def _manager_cgroup(pid: int) -> str | None:
    """The manager's cgroup, from where it puts itself (<its cgroup>/init.scope); None if unsure."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    path = text.partition("0::")[2].split("\n", 1)[0]
    return path.removesuffix(INIT_SCOPE) if path.endswith(INIT_SCOPE) else None


def _no_manager(user: bool, err: Exception) -> BackendUnavailable:
    where = "the system bus" if not user else "the user's bus"
    return BackendUnavailable(
        "systemd",
        f"no systemd manager answers on {where}: {err}",
        linger_remedy() if user else "start dbus (systemctl start dbus)",
    )


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
