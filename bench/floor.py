"""The bare path, the floor under the launcher's start-up (bench/launch.py times it).

    python3 bench/floor.py

Only what a cgroup sandbox cannot avoid: make a cgroup below our own in the memory, pids and
unified (v2) hierarchies, set memory and pids limits, start the child inside them, exec `true`,
wait, remove the cgroups. No discovery beyond /proc/self/cgroup, no checks, no registry, no
guardian. Hierarchies are assumed mounted at /sys/fs/cgroup/<name> (v1) and
/sys/fs/cgroup/unified or /sys/fs/cgroup (v2), as on Debian and Ubuntu.

The cheapest way in, measured (interleaved, 0.15 s apart so each run starts cold, as a
launcher's does): the child is born in the v2 cgroup (clone3 with CLONE_INTO_CGROUP, Linux
5.7+) and moves itself into each v1 cgroup through `tasks` (it has one thread, so that moves
all of it). Neither takes cgroup_threadgroup_rwsem for writing, whose first writer after a quiet
spell waits for an RCU grace period: fork + three cgroup.procs writes took 17 ms (median), fork
+ v2 cgroup.procs + v1 tasks 20 ms, clone3 into v2 + v1 tasks 4.8 ms, on the 2-core development
VM (Linux 6.18, loaded). Where clone3 is refused (an older kernel), fork and cgroup.procs.

Cheaper still, where scripts/install built sandbox/core/syscalls.c: the same clone3 sharing the
parent's memory (CLONE_VM | CLONE_VFORK, as posix_spawn), the child writing the `tasks` files
the parent opened and exec'ing at once, which the launcher does too (no copy of the parent's
page tables, no _ctypes to import). Only that C module is imported, not the launcher's Python.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    from sandbox.core._syscalls import spawn as shared_clone
except ImportError:
    shared_clone = None
import _ctypes  # noqa: E402 - after the C module's path

ROOT = "/sys/fs/cgroup"
NAME = f"floor-{os.getpid()}"
SYS_CLONE3 = 435  # x86-64, arm64 and every other architecture's unified table
CLONE_INTO_CGROUP = 0x200000000
SIGCHLD = 17


class _Int(_ctypes._SimpleCData):
    _type_ = "l"


class _Function(_ctypes.CFuncPtr):
    # PYTHONAPI: the GIL stays held across the call, so the child returns holding it.
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO | _ctypes.FUNCFLAG_PYTHONAPI
    _restype_ = _Int


class _Libc:
    _handle = _ctypes.dlopen(None)


_syscall = _Function(("syscall", _Libc))


def directories() -> list[tuple[str, str]]:
    """(cgroup directory to create, limit file or ''): the unified one first, then memory and
    pids (v1) on a hybrid host; on pure v2 the unified one alone holds the limits."""
    found = []
    with open("/proc/self/cgroup") as f:
        lines = [line for line in f.read().split("\n") if line.count(":") >= 2]
    pure_v2 = all(line.startswith("0::") for line in lines)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            found.append((f"{ROOT}/memory{path}", "memory.limit_in_bytes"))
        elif controllers == "pids":
            found.append((f"{ROOT}/pids{path}", "pids.max"))
        elif controllers == "":
            v2 = ROOT if pure_v2 else f"{ROOT}/unified"
            found.insert(0, (f"{v2}{path}", "memory.max" if pure_v2 else ""))
    return [(os.path.join(parent, NAME), limit) for parent, limit in found]


def start(made: list[tuple[str, str]]) -> int:
    """The child, in every cgroup of `made` (the unified one first), exec'ing true."""
    born_in, others = made[0][0], [path for path, _ in made[1:]]
    fd = os.open(born_in, os.O_RDONLY | os.O_DIRECTORY)
    if shared_clone is not None:
        joins = [os.open(f"{path}/tasks", os.O_WRONLY) for path in others]
        errors, report = os.pipe()
        try:
            # path, PATH, argv, environment, cgroup, joins, rlimits, nice, keep SIGPIPE and
            # SIGXFSZ ignored, signal mask, error pipe (sandbox/core/syscalls.c)
            pid: int = shared_clone(
                b"/bin/true", b"/bin", [b"true"], None, fd,
                [(join, b"tasks") for join in joins], [], None, False, False, b"", report,
            )  # fmt: skip
        finally:
            for join in [fd, *joins, errors, report]:
                os.close(join)
        return pid
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    # tls, set_tid, set_tid_size, cgroup (a u64 each)
    fields = [CLONE_INTO_CGROUP, 0, 0, 0, SIGCHLD, 0, 0, 0, 0, 0, fd]
    args = b"".join(value.to_bytes(8, "little") for value in fields)
    pid = _syscall(SYS_CLONE3, args, len(args))
    joins = [f"{path}/tasks" for path in others]
    if pid < 0:  # no clone3 or no CLONE_INTO_CGROUP (Linux < 5.7): fork, then cgroup.procs
        pid = os.fork()
        joins = [f"{path}/cgroup.procs" for path, _ in made]
    if pid == 0:
        for file in joins:
            join = os.open(file, os.O_WRONLY)
            os.write(join, b"0")
            os.close(join)
        os.execv("/bin/true", ["true"])
    os.close(fd)
    return pid


def main() -> None:
    made = directories()
    for path, limit in made:
        os.mkdir(path)
        if limit:
            with open(f"{path}/{limit}", "w") as f:
                f.write("1073741824" if limit.startswith("memory") else "4096")
    try:
        os.waitpid(start(made), 0)
    finally:
        for path, _ in made:
            os.rmdir(path)


main()
