"""When the systemd backend refuses, and what it says: decisions only, with fake pystemd modules."""

from __future__ import annotations

import os
import socket
import sys
import types
from pathlib import Path

import pytest

from sandbox.backends import selection
from sandbox.backends import systemd as systemd_backend
from sandbox.backends.systemd import bus as bus_module
from sandbox.backends.systemd import scope
from sandbox.cgroups import cgroupfs
from sandbox.core.errors import BackendUnavailable, UsageError
from sandbox.core.limits import Limits
from sandbox.options import parse_run

LIMITS = Limits(1 << 30, 100)


@pytest.fixture
def systemd_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """systemd runs as PID 1 on pure cgroup v2, and we are not inside a sandbox."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    own = tmp_path / "own-cgroup"
    own.write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    monkeypatch.setattr(selection, "systemd_running", lambda: True)
    monkeypatch.setattr(scope, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(scope, "OWN_CGROUP", str(own))
    return tmp_path


def fake_pystemd(
    monkeypatch: pytest.MonkeyPatch,
    open_error: str | None,
    pid_seen: int | None = None,
    direct_fd: int | None = None,
) -> list[str]:
    """pystemd.dbuslib / dbusexc stand-ins: a bus that fails to open, or one whose manager's
    cgroup is "" (the system manager's) and which sees us with `pid_seen` (default: our pid).
    The manager's private socket (DBusAddress) refuses us, unless `direct_fd` is given: then it
    opens, and that socket's other end is the manager. Returns the connections opened."""
    opened: list[str] = []

    class DBusBaseError(Exception):
        pass

    class DBusAddress:
        def __init__(self, address: bytes, peer_to_peer: bool = False) -> None:
            assert address.startswith(b"unix:path=") and peer_to_peer

        def open(self) -> None:
            if direct_fd is None:
                raise DBusBaseError("[err -111]: Could not open a bus to DBus")
            opened.append("direct")

        def get_fd(self) -> int:
            assert direct_fd is not None
            return direct_fd

        def match_signal(self, sender: bytes | None, *args: object) -> None:
            assert sender is None  # a direct connection's messages carry no sender

        def get_property(self, *args: object) -> bytes:
            return b""

        def close(self) -> None:
            pass

    class DBus:
        def __init__(self, user_mode: bool = False) -> None:
            self.user_mode = user_mode

        def open(self) -> None:
            if open_error:
                raise DBusBaseError(open_error)
            opened.append("bus")

        def match_signal(self, *args: object) -> None:
            pass

        def get_property(self, *args: object) -> bytes:
            return b""

        def get_unique_name(self) -> bytes:
            return b":1.42"

        def call_method(self, *args: object) -> types.SimpleNamespace:
            assert args[3] == b"GetConnectionUnixProcessID"
            return types.SimpleNamespace(body=pid_seen or os.getpid())

        def get_fd(self) -> int:
            return -1  # sd_bus_get_fd's -errno: no socket to shut down

        def close(self) -> None:
            pass

    package = types.ModuleType("pystemd")
    dbuslib = types.ModuleType("pystemd.dbuslib")
    dbusexc = types.ModuleType("pystemd.dbusexc")
    dbuslib.DBus = DBus  # type: ignore[attr-defined]
    dbuslib.DBusAddress = DBusAddress  # type: ignore[attr-defined]
    dbuslib.apply_signature = lambda signature, values: values  # type: ignore[attr-defined]
    dbusexc.DBusBaseError = DBusBaseError  # type: ignore[attr-defined]
    package.dbuslib, package.dbusexc = dbuslib, dbusexc  # type: ignore[attr-defined]
    for name, module in (
        ("pystemd", package),
        ("pystemd.dbuslib", dbuslib),
        ("pystemd.dbusexc", dbusexc),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return opened


def refusal(slice_name: str | None = None) -> BackendUnavailable:
    with pytest.raises(BackendUnavailable) as caught:
        selection.make("systemd", slice_name=slice_name).prepare(LIMITS, ["true"])
    return caught.value


def test_without_systemd_as_pid_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "systemd_running", lambda: False)
    with pytest.raises(BackendUnavailable, match="not running as PID 1"):
        selection.make("systemd")


def test_without_pystemd_the_fix_is_the_extra(
    systemd_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("pystemd", "pystemd.dbuslib", "pystemd.dbusexc"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError
    err = refusal()
    assert "pystemd is not installed" in err.message
    assert "pip install 'aero-sandbox[systemd]'" in (err.remedy or "")
    assert "libsystemd-dev" in (err.remedy or "")


def test_a_user_without_a_bus_is_told_about_linger(
    systemd_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pystemd(monkeypatch, open_error=None)
    monkeypatch.setattr(systemd_backend.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    err = refusal()
    assert "no user bus" in err.message
    assert "loginctl enable-linger" in (err.remedy or "")


def test_a_user_bus_without_a_manager_is_told_about_linger(
    systemd_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pystemd(monkeypatch, open_error="[err -2]: Could not open a bus to DBus")
    monkeypatch.setattr(systemd_backend.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    err = refusal()
    assert "no systemd manager answers on the user's bus" in err.message
    assert "loginctl enable-linger" in (err.remedy or "")


def test_a_manager_without_the_memory_controller(
    systemd_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pystemd(monkeypatch, open_error=None)
    (systemd_host / "cgroup.controllers").write_text("cpu pids\n")
    err = refusal()
    assert "cannot set memory limits" in err.message
    assert "Delegate=" in (err.remedy or "")


def test_hybrid_hierarchy_is_quiet(systemd_host: Path) -> None:
    (systemd_host / "cgroup.controllers").unlink()
    err = refusal()
    assert "legacy or hybrid" in err.message and err.remedy is None


def test_nested_inside_a_sandbox_is_quiet(systemd_host: Path) -> None:
    (systemd_host / "own-cgroup").write_text(
        "0::/system.slice/aero-sandbox-7-abcdef.scope/command\n"
    )
    err = refusal()
    assert "inside a sandbox already" in err.message and "--backend cgroup" in err.message
    assert err.remedy is None  # nothing to fix: auto uses the cgroup backend, silently


def test_a_cgroup_namespace_is_quiet(systemd_host: Path) -> None:
    (systemd_host / "own-cgroup").write_text("0::/\n")
    err = refusal()
    assert "cgroup namespace" in err.message and err.remedy is None


def test_a_pid_namespace_is_quiet(systemd_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd 252 takes a scope's members by pid: ours would name another process there."""
    fake_pystemd(monkeypatch, open_error=None, pid_seen=os.getpid() + 1000)
    err = refusal()
    assert "pid namespace" in err.message and err.remedy is None


@pytest.fixture
def private_socket(systemd_host: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system manager's private socket is there (root's), with no manager behind it yet."""
    path = systemd_host / "private"
    path.touch()
    monkeypatch.setattr(bus_module, "SYSTEM_PRIVATE_SOCKET", str(path))
    monkeypatch.setattr(bus_module.os, "geteuid", lambda: 0)
    return path


def test_the_private_socket_is_used_where_it_answers(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No bus, no GetConnectionUnixProcessID: the manager's pid namespace is compared with ours
    through the socket's peer credentials (here the manager is this very process)."""
    ours, managers = socket.socketpair()
    with ours, managers:
        opened = fake_pystemd(monkeypatch, open_error="no bus", direct_fd=ours.fileno())
        backend = selection.make("systemd")
        backend.prepare(LIMITS, ["true"])
        backend.remove()
    assert opened == ["direct"]


def test_a_manager_outside_our_pid_namespace_is_refused_on_the_private_socket(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, managers = socket.socketpair()
    with ours, managers:
        fake_pystemd(monkeypatch, open_error="no bus", direct_fd=ours.fileno())
        # SO_PEERCRED gives pid 0 for a peer outside our pid namespace
        monkeypatch.setattr(bus_module, "_peer_credentials", lambda fd: (0, 0))
        err = refusal()
    assert "pid namespace" in err.message and err.remedy is None


def test_a_refusing_private_socket_falls_back_to_the_bus(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = fake_pystemd(monkeypatch, open_error=None)
    backend = selection.make("systemd")
    backend.prepare(LIMITS, ["true"])
    backend.remove()
    assert opened == ["bus"]


def test_someone_elses_socket_is_not_the_manager(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, managers = socket.socketpair()
    with ours, managers:
        opened = fake_pystemd(monkeypatch, open_error=None, direct_fd=ours.fileno())
        monkeypatch.setattr(bus_module, "_peer_credentials", lambda fd: (os.getpid(), 4242))
        backend = selection.make("systemd")
        backend.prepare(LIMITS, ["true"])
        backend.remove()
    assert opened == ["direct", "bus"]


def test_closing_ends_the_connection_for_every_holder_of_its_socket(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked guardian keeps a copy of the fd: the manager must see the connection end."""
    ours, managers = socket.socketpair()
    with ours, managers:
        fake_pystemd(monkeypatch, open_error="no bus", direct_fd=ours.fileno())
        copy = os.dup(ours.fileno())  # the guardian's
        try:
            bus_module.Bus.connect().close()
            managers.settimeout(5)
            assert managers.recv(1) == b""  # end of file, though `copy` is still open
        finally:
            os.close(copy)


def test_peer_credentials_name_the_other_end() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert bus_module._peer_credentials(ours.fileno()) == (os.getpid(), os.geteuid())
        ours.send(b"x")  # the fd is still open and ours: detached, not closed
        assert theirs.recv(1) == b"x"


def test_the_managers_cgroup_is_read_from_where_it_put_itself(tmp_path: Path) -> None:
    assert bus_module._manager_cgroup(1 << 30) is None  # no such process
    assert bus_module._manager_cgroup(os.getpid()) in (None, "")  # not a manager: not sure


def test_slice_is_refused_by_other_backends() -> None:
    with pytest.raises(BackendUnavailable, match="only the systemd backend"):
        selection.make("cgroup", slice_name="a.slice")


class Refusing:
    name = "systemd"

    def prepare(self, limits: Limits, argv: list[str]) -> None:
        raise BackendUnavailable("systemd", "pystemd is not installed", "pip install ...")


class Accepting:
    name = "cgroup"

    def prepare(self, limits: Limits, argv: list[str]) -> None:
        pass


def test_auto_moves_on_and_keeps_the_fix_for_one_stderr_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cgroupfs, "inside_sandbox", lambda proc_cgroup=None: False)
    monkeypatch.setattr(selection, "systemd_running", lambda: True)
    fakes = {"systemd": Refusing, "cgroup": Accepting}
    monkeypatch.setattr(
        selection, "make", lambda name, parent=None, slice_name=None, budget=None: fakes[name]()
    )
    backend, choice = selection.prepare("auto", LIMITS, ["true"])
    assert backend.name == "cgroup"
    line = "systemd backend unavailable: pystemd is not installed (pip install ...)"
    assert choice["refused"]["systemd"] == line
    assert choice["notices"] == [line]
    with pytest.raises(BackendUnavailable, match="pystemd is not installed"):
        selection.prepare("systemd", LIMITS, ["true"])


def test_slice_option_and_environment() -> None:
    assert parse_run(["--slice", "aero-agents.slice", "true"], {}).slice == "aero-agents.slice"
    assert parse_run(["true"], {"AERO_SLICE": "a.slice"}).slice == "a.slice"
    assert parse_run(["true"], {}).slice is None


@pytest.mark.parametrize("bad", ["aero-agents", ".slice", "a b.slice", "a/b.slice", "-x.slice"])
def test_bad_slice_names(bad: str) -> None:
    with pytest.raises(UsageError, match="expected a slice unit name"):
        parse_run(["--slice", bad, "true"], {})


def test_a_read_only_cgroupfs_is_quiet(systemd_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend makes the scope's own cgroups (holder, command): it needs to write there."""
    fake_pystemd(monkeypatch, open_error=None)
    monkeypatch.setattr(systemd_backend.os, "access", lambda path, mode: False)
    err = refusal()
    assert "read-only cgroupfs" in err.message and err.remedy is None
