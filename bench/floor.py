"""The bare path, the floor under the launcher's start-up (bench/launch.py times it).

    python3 bench/floor.py

Only what a cgroup sandbox cannot avoid: make a cgroup below our own in the memory, pids and
unified (v2) hierarchies, set memory and pids limits, fork, write the child into each
cgroup.procs, exec `true`, wait, remove the cgroups. No discovery beyond /proc/self/cgroup,
no checks, no registry, no guardian. Hierarchies are assumed mounted at /sys/fs/cgroup/<name>
(v1) and /sys/fs/cgroup/unified or /sys/fs/cgroup (v2), as on Debian and Ubuntu.
"""

import os

ROOT = "/sys/fs/cgroup"
NAME = f"floor-{os.getpid()}"


def directories() -> list[tuple[str, str]]:
    """(cgroup directory to create, limit file or '') for memory, pids and the unified one."""
    found = []
    with open("/proc/self/cgroup") as f:
        lines = f.read().split("\n")
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            found.append((f"{ROOT}/memory{path}", "memory.limit_in_bytes"))
        elif controllers == "pids":
            found.append((f"{ROOT}/pids{path}", "pids.max"))
        elif controllers == "":
            v2 = f"{ROOT}/unified" if os.path.isdir(f"{ROOT}/unified") else ROOT
            limit = "" if found or v2 != ROOT else "memory.max"  # pure v2: limits live here
            found.append((f"{v2}{path}", limit))
    return [(os.path.join(parent, NAME), limit) for parent, limit in found]


def main() -> None:
    made = directories()
    for path, limit in made:
        os.mkdir(path)
        if limit:
            with open(f"{path}/{limit}", "w") as f:
                f.write("1073741824" if limit.startswith("memory") else "4096")
    try:
        pid = os.fork()
        if pid == 0:
            for path, _ in made:
                fd = os.open(path + "/cgroup.procs", os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)
            os.execv("/bin/true", ["true"])
        os.waitpid(pid, 0)
    finally:
        for path, _ in made:
            os.rmdir(path)


main()
