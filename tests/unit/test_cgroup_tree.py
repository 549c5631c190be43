"""cgroup discovery and the pure-v2 decisions, on fake cgroup trees built in tmp_path.

The kernel's files are plain files here: a write replaces the content, so these tests check
what the backend decides and writes, not what the kernel would do with it (tests/host and the
VM stage do that).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.backends.cgroup import CgroupBackend
from sandbox.cgroups import cgroupfs
from sandbox.cgroups.cgroupfs import Hierarchy, discover
from sandbox.cgroups.v2 import LEAF
from sandbox.cgroups.v2 import sandbox_parent as _enable_controllers
from sandbox.core import identity
from sandbox.core.errors import BackendUnavailable
from sandbox.core.limits import Limits

HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
35 30 0:31 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
38 30 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "8:pids:/\n4:memory:/agents/a1\n3:cpu,cpuacct:/x\n0::/\n"


def make_dirs(root: Path, *paths: str) -> None:
    for path in paths:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)


def test_discover_hybrid(tmp_path: Path) -> None:
    info = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", str(tmp_path))
    make_dirs(tmp_path, "memory/agents/a1", "pids", "cpu,cpuacct/x", "unified")
    found = {
        (h.version, tuple(sorted(h.controllers))): h.own for h in discover(HYBRID_CGROUP, info)
    }
    assert found[(1, ("memory",))] == str(tmp_path / "memory/agents/a1")
    assert found[(1, ("pids",))] == str(tmp_path / "pids")
    assert found[(1, ("cpu", "cpuacct"))] == str(tmp_path / "cpu,cpuacct/x")
    assert found[(2, ())] == str(tmp_path / "unified")


def test_discover_bind_mounted_subtree(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: the mount root is our container's path."""
    info = f"40 30 0:40 /docker/abc {tmp_path} rw - cgroup2 cgroup2 rw\n"
    make_dirs(tmp_path, "inner")
    (hierarchy,) = discover("0::/docker/abc/inner\n", info, read_controllers=False)
    assert hierarchy.own == str(tmp_path / "inner")


def test_discover_skips_a_cgroup_outside_the_mount(tmp_path: Path) -> None:
    info = f"40 30 0:40 /docker/abc {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert discover("0::/elsewhere\n", info, read_controllers=False) == []
    assert discover("0::/../x\n", f"40 30 0:40 / {tmp_path} rw - cgroup2 cgroup2 rw\n") == []


@pytest.fixture(autouse=True)
def kernel_like_mkdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """mkdir in cgroupfs makes the interface files; a fake tree gets the ones of an old kernel."""
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        for name in (
            "cgroup.procs",
            "cgroup.controllers",
            "cgroup.subtree_control",
            "memory.max",
            "pids.max",
            "memory.events",
            "pids.events",
        ):
            Path(path, name).write_text("")

    def rmdir(path: str) -> None:  # cgroupfs removes its interface files with the directory
        for file in Path(path).iterdir():
            if file.is_file():
                file.unlink()
        real_rmdir(path)

    real_rmdir = os.rmdir
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)


def fake_v2(root: Path, procs: str = "", subtree: str = "", is_root: bool = False) -> Path:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text(subtree)
    (root / "cgroup.procs").write_text(procs)
    if not is_root:
        (root / "cgroup.type").write_text("domain\n")
    return root


def test_enable_controllers_moves_processes_into_a_leaf_first(tmp_path: Path) -> None:
    own = fake_v2(tmp_path / "own", procs="4242\n")
    assert _enable_controllers(str(own), {"memory", "pids"}) == str(own)
    assert (own / LEAF / "cgroup.procs").read_text() == "4242"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_processes_of_another_pid_namespace_make_the_backend_unavailable(tmp_path: Path) -> None:
    """Under `unshare --pid` in a cgroup shared with the host, outsiders read as pid 0: we
    cannot move them, so auto must move on (to rlimit) instead of retrying in vain."""
    own = fake_v2(tmp_path / "own", procs="1\n0\n0\n")
    with pytest.raises(BackendUnavailable, match="outside this pid namespace"):
        _enable_controllers(str(own), {"memory", "pids"})
    assert not (own / LEAF).exists()
    assert (own / "cgroup.subtree_control").read_text() == ""


def test_a_launcher_already_in_the_leaf_uses_the_leafs_parent(tmp_path: Path) -> None:
    """The second launcher in a delegated cgroup runs in aero-leaf: no leaf of the leaf."""
    own = fake_v2(tmp_path / "own", subtree="memory pids\n")
    leaf = fake_v2(own / LEAF, procs="4242\n")
    assert _enable_controllers(str(leaf), {"memory", "pids"}) == str(own)
    assert not (leaf / LEAF).exists()


def test_root_cgroup_may_keep_its_processes(tmp_path: Path) -> None:
    own = fake_v2(tmp_path / "root", procs="1\n", is_root=True)
    _enable_controllers(str(own), {"memory"})
    assert not (own / LEAF).exists()
    assert (own / "cgroup.subtree_control").read_text() == "+memory"


def test_already_enabled_controllers_touch_nothing(tmp_path: Path) -> None:
    own = fake_v2(tmp_path / "own", procs="7\n", subtree="memory pids\n")
    _enable_controllers(str(own), {"memory", "pids"})
    assert not (own / LEAF).exists()


def test_v2_backend_on_an_old_kernel(tmp_path: Path) -> None:
    """No cgroup.kill (before 5.14), no memory.peak (before 5.19): still runs, peak is null."""
    own = fake_v2(tmp_path / "own", subtree="memory pids")
    hierarchy = Hierarchy(2, str(tmp_path), frozenset({"memory", "pids"}), str(own))
    backend = CgroupBackend([hierarchy])
    backend.prepare(Limits(100 << 20, 64), ["true"])
    sandbox = backend.describe().cgroups["unified"]
    assert Path(sandbox, "memory.max").read_text() == str(100 << 20)
    assert Path(sandbox, "memory.swap.max").exists() is False  # only written where it exists
    assert Path(sandbox, "pids.max").read_text() == "64"
    usage = backend.measure()
    assert usage.peak_memory_bytes is None and usage.cpu_s is None
    backend.kill_all()  # no cgroup.kill: kills what cgroup.procs lists (nothing) and returns
    backend.remove()
    assert not Path(sandbox).exists()


def test_missing_memory_controller_is_unavailable(tmp_path: Path) -> None:
    own = fake_v2(tmp_path / "own")
    (own / "cgroup.controllers").write_text("cpu\n")
    hierarchy = Hierarchy(2, str(tmp_path), frozenset({"cpu"}), str(own))
    with pytest.raises(BackendUnavailable, match="memory controller"):
        CgroupBackend([hierarchy]).prepare(Limits(1 << 30, 10), ["true"])


def test_limit_that_does_not_take_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = fake_v2(tmp_path / "own", subtree="memory pids")
    hierarchy = Hierarchy(2, str(tmp_path), frozenset({"memory", "pids"}), str(own))
    monkeypatch.setattr(cgroupfs, "read_int", lambda path: 12345)
    backend = CgroupBackend([hierarchy])
    with pytest.raises(Exception, match="did not take"):
        backend.prepare(Limits(1 << 30, 10), ["true"])


def test_stale_sandbox_names() -> None:
    assert identity.launcher_pid("aero-sandbox-123-abcdef") == 123
    assert identity.launcher_pid("aero-leaf") is None
    assert identity.launcher_pid("aero-sandbox-x-1") is None


def test_nesting_is_detected_from_our_own_cgroup() -> None:
    assert cgroupfs.inside_sandbox("0::/system.slice/aero-sandbox-12-abcdef.scope/aero-leaf\n")
    assert cgroupfs.inside_sandbox("4:memory:/process_api/x/aero-sandbox-1-a1b2c3\n0::/\n")
    assert not cgroupfs.inside_sandbox("0::/user.slice/user-1000.slice/session-2.scope\n")


def test_guardian_notes_rebuild_the_cgroups_to_clean_up() -> None:
    """A spawned guardian gets the sandbox as lines and rebuilds what guardian_cleanup() needs:
    the cgroups in kill_all's order (v2 first), each of its version, and their parents."""
    from sandbox.cgroups import v1, v2

    made = CgroupBackend()
    made.created = [v2.Cgroup("/u/aero-sandbox-1-a"), v1.Cgroup("/m/p a/aero-sandbox-1-a")]
    made._parents = {"/u", "/m/p a"}
    notes = made.guardian_notes()
    assert notes is not None
    rebuilt = CgroupBackend.from_notes([*notes, "entry /run/aero-sandbox/1-b"])
    assert [(type(c), c.path) for c in rebuilt.created] == [(type(c), c.path) for c in made.created]
    assert rebuilt._parents == made._parents
    made._parents.add("/odd\nname")  # a line cannot hold it: the guardian is forked instead
    assert made.guardian_notes() is None
