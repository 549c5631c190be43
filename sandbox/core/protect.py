"""--protect-limits: keep a root command from undoing its own limits (README, "What the limits
protect against").

Runs in the forked child after it joined the sandbox and before it execs. Dropping capabilities
alone is not enough: root owns the cgroup files, and writing them needs no capability at all
(write -1 to memory.limit_in_bytes, `max` to pids.max, our pid to the root cgroup.procs). So:

1. a private mount namespace (unshare(CLONE_NEWNS), every mount made private so nothing
   propagates back to the host);
2. every cgroup filesystem remounted read-only in it: those writes get EROFS;
3. CAP_SYS_ADMIN (mount, umount, setns back into the host's namespace) and CAP_SYS_RESOURCE
   (raising the rlimits of the rlimit backend) dropped from the bounding, ambient and
   inheritable sets, so that root's exec does not get them back.

Imported only when the option is given: it loads ctypes.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
DROPPED = (CAP_SYS_ADMIN, CAP_SYS_RESOURCE)
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"--protect-limits: {what}: {os.strerror(err)}")


def cgroup_mounts(mountinfo: str) -> list[tuple[str, int]]:
    """(mount point, the per-mount flags to keep) of every cgroup filesystem in mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype in ("cgroup", "cgroup2"):
            point = fields[4].replace("\\040", " ")
            flags = sum(_KEPT_FLAGS.get(option, 0) for option in fields[5].split(","))
            found.append((point, flags))
    return found


def protect_limits() -> None:
    """In the child, before exec: cgroupfs read-only here, the two capabilities gone."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    with open("/proc/self/mountinfo") as f:
        mounts = cgroup_mounts(f.read())
    for point, flags in mounts:
        flags |= MS_REMOUNT | MS_BIND | MS_RDONLY
        _check(_libc.mount(None, point.encode(), None, flags, None), f"read-only {point}")
    for capability in DROPPED:
        _check(_libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0), "dropping a capability")
    # Ambient capabilities (Linux 4.3+) survive exec; EINVAL on older kernels: nothing to clear.
    cleared = _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if cleared < 0 and ctypes.get_errno() != 22:
        _check(-1, "clearing ambient capabilities")
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for capability in DROPPED:  # root's exec keeps the inheritable set: take them out of it
        data[capability // 32].inheritable &= ~(1 << (capability % 32))
    _check(_libc.capset(ctypes.byref(header), data), "capset")
