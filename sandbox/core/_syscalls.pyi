# The types of the C module sandbox/core/syscalls.c builds (scripts/native-module).

def prctl(option: int, value: int, /) -> int: ...
def signalfd(mask: bytes, flags: int, /) -> int: ...
def inotify_init1(flags: int, /) -> int: ...
def inotify_add_watch(fd: int, path: bytes, mask: int, /) -> int: ...
def spawn(
    path: bytes | None,
    search: bytes,
    argv: list[bytes],
    envp: list[bytes] | None,
    cgroup_fd: int,
    joins: list[tuple[int, bytes]],
    limits: list[tuple[int, int]],
    nice: int | None,
    keep_pipe: bool,
    keep_xfsz: bool,
    mask: bytes,
    report_fd: int,
    /,
) -> int: ...
