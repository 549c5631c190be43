"""Issue 11 on pure cgroup v2 with systemd, as root and as the lingering user aero: an OOM in a
shared `--parent` kills only the sandbox the kernel chose (11.1), and a user's own registry
cannot make `gc` remove what an entry names or stop `list` (11.3, 11.4). tests/host/
test_hostile.py runs here too (the stage's default list): the rest of issue 11, with
fs.protected_symlinks=1 (the VM's default) as well as 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sandbox.registry import store
from tests.conftest import LAUNCHER, launcher_env, run_launcher
from tests.host.test_hostile import dead_pid
from tests.programs import ALLOCATE
from tests.vm.conftest import DELEGATED_SCOPE, PY

# Runs inside a scope systemd delegates to us (as aero: aero's own systemd), so that the parent
# and both sandboxes are in a subtree this uid may write: it moves into a leaf, enables the
# controllers, makes a 300 MiB parent, starts A, waits until A holds its memory, starts B.
DRIVER = r"""
import json, os, subprocess, sys, time
launcher, work, hold, grow = json.loads(sys.argv[1])
scope = "/sys/fs/cgroup" + open("/proc/self/cgroup").read().split("::", 1)[1].strip()
def write(path, text):
    with open(path, "w") as f:
        f.write(text)
os.mkdir(scope + "/driver")
write(scope + "/driver/cgroup.procs", str(os.getpid()))
write(scope + "/cgroup.subtree_control", "+memory +pids")
parent = scope + "/shared"
os.mkdir(parent)
write(parent + "/memory.max", str(300 << 20))
if os.path.exists(parent + "/memory.swap.max"):
    write(parent + "/memory.swap.max", "0")
def start(name, code):
    argv = [*launcher, "--backend", "cgroup", "--parent", parent, "--mem", "1G",
            "--report", f"{work}/{name}.json", "--", sys.executable, "-c", code]
    with open(f"{work}/{name}.err", "w") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
def until(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
codes = {}
a = start("a", hold)
try:
    until(lambda: os.path.exists(f"{work}/a.ready") or a.poll() is not None, 120)
    b = start("b", grow)
    try:
        codes["b"] = b.wait(300)
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()
    open(f"{work}/b.done", "w").close()
    codes["a"] = a.wait(300)
finally:
    if a.poll() is None:
        a.kill()
        a.wait()
    for _ in range(100):  # the sandboxes' last exits may still be settling
        try:
            os.rmdir(parent)
            break
        except OSError:
            time.sleep(0.1)
print(json.dumps(codes))
"""


def test_an_oom_under_a_shared_parent_kills_only_the_sandbox_it_hit(tmp_path: Path) -> None:
    """A holds 100M, B grows to 400M under one 300M --parent: the kernel kills B; A, woken by
    nothing of its own, runs to its end."""
    ready, done = tmp_path / "a.ready", tmp_path / "b.done"
    hold = (
        ALLOCATE.format(size=100 << 20)
        + f"\nimport os, time\nopen({str(ready)!r}, 'w').close()\nend = time.monotonic() + 120"
        + f"\nwhile not os.path.exists({str(done)!r}) and time.monotonic() < end: time.sleep(0.1)"
    )
    grow = ALLOCATE.format(size=400 << 20)
    setup = json.dumps([LAUNCHER, str(tmp_path), hold, grow])
    proc = subprocess.run(
        [*DELEGATED_SCOPE, "--", PY, "-c", DRIVER, setup],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert proc.returncode == 0, (proc.stderr, errors)
    codes = json.loads(proc.stdout.splitlines()[-1])
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert codes == {"a": 0, "b": 137}, (codes, errors)
    assert a["reason"] == "exited" and a["oom_kills"] in (0, None), a
    assert b["reason"] == "oom" and (b["oom_kills"] or 0) >= 1, b


@contextlib.contextmanager
def own_registry() -> Iterator[Path]:
    """This uid's registry directory (root: /run/aero-sandbox; aero: $XDG_RUNTIME_DIR's);
    what the test plants there is removed afterwards."""
    directory = Path(store.own_directory())
    directory.mkdir(mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
    before = set(os.listdir(directory))
    try:
        yield directory
    finally:
        for name in set(os.listdir(directory)) - before:
            with contextlib.suppress(OSError):
                os.unlink(directory / name)


def test_own_registry_entries_cannot_make_gc_remove_or_list_fail(tmp_path: Path) -> None:
    """As root and as aero: an entry of this uid's own registry names directories outside any
    cgroup mount (one named like a sandbox); malformed, FIFO, /dev/zero and 2 MiB entries."""
    empty_tree = tmp_path / "empty"
    (empty_tree / "a" / "b").mkdir(parents=True)
    sandbox_name = tmp_path / "aero-sandbox-1-abcdef"
    sandbox_name.mkdir()
    pid = dead_pid()
    magic = "aero-sandbox-registry 1\n"
    with own_registry() as directory:
        (directory / f"{pid}-aaaaaa").write_text(
            f"{magic}pid {pid}\nstarted 1\nsandbox.cgroups.memory {empty_tree}\n"
            f"sandbox.cgroups.pids {sandbox_name}\nsandbox.cgroups.unified {empty_tree}/a/b\n"
            "arg x\n"
        )
        (directory / f"{pid}-000001").write_text(f"{magic}pid {pid}\nstarted abc\narg x\n")
        (directory / f"{pid}-000002").write_text(f"{magic}pid ²\nstarted 1\narg x\n")
        os.mkfifo(directory / f"{pid}-000003")
        os.symlink("/dev/zero", directory / f"{pid}-000004")
        big = "arg " + "x" * (2 << 20) + "\n"
        (directory / f"{pid}-000005").write_text(f"{magic}pid {pid}\nstarted 1\n{big}")
        shown = run_launcher(["list"], timeout=120)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        notes = [line for line in shown.stderr.splitlines() if str(directory) in line]
        assert len(notes) >= 5, shown.stderr
        for args in (["gc", "--dry-run"], ["gc"]):
            gc = run_launcher(args, timeout=120)
            assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc.stderr
            assert str(empty_tree) not in gc.stdout and str(sandbox_name) not in gc.stdout
    assert (empty_tree / "a" / "b").is_dir() and sandbox_name.is_dir()
