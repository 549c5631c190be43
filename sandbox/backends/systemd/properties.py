"""The transient scope's unit properties: our limits as systemd's, and their D-Bus types.

Plain data, like pystemd's systemd1/unit_signatures.py, unit-tested without a bus.
"""

from __future__ import annotations

from sandbox.core.limits import Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HOLDER_TASKS = 1  # TasksMax counts the holder too (scope.py: what keeps the scope alive)
# systemd's own timeout comes this long after ours (timeout + kill-after), so the launcher, when
# alive, always acts first and reports; systemd only steps in when nobody else can.
RUNTIME_MARGIN_S = 5.0
DESCRIPTION_CHARS = 256

# D-Bus types of the unit properties we set (pystemd's own table lacks PIDs: a scope started
# through it fails with KeyError b'PIDs').
SIGNATURES = {
    "Description": "s",
    "CollectMode": "s",
    "PIDs": "au",
    "Slice": "s",
    "Delegate": "b",
    "OOMPolicy": "s",
    "MemoryMax": "t",
    "MemorySwapMax": "t",
    "TasksMax": "t",
    "RuntimeMaxUSec": "t",
    "TimeoutStopUSec": "t",
}


def unit_properties(
    limits: Limits, argv: list[str], pids: list[int], slice_name: str | None
) -> list[tuple[str, object]]:
    """The transient scope's properties, in the order systemd receives them."""
    properties: list[tuple[str, object]] = [
        ("Description", describe_command(argv)),
        # Unload the unit when it ends, failed or not: nothing is left for `systemctl reset-failed`.
        ("CollectMode", "inactive-or-failed"),
        ("PIDs", pids),
        # The subtree below the scope is ours to arrange (holder, command, memory.oom.group).
        ("Delegate", True),
        # stop/kill (scopes default to stop) end the unit at the first OOM kill, holder
        # included, and take memory.peak and memory.events with it before we read them; the
        # kernel kills <scope>/command as one group instead (memory.oom.group).
        ("OOMPolicy", "continue"),
    ]
    if slice_name:
        properties.append(("Slice", slice_name))
    if limits.memory_bytes is not None:
        properties += [("MemoryMax", limits.memory_bytes), ("MemorySwapMax", 0)]
    if limits.pids is not None:
        properties.append(("TasksMax", limits.pids + HOLDER_TASKS))
    if limits.timeout_s:
        budget = limits.timeout_s + limits.kill_after_s + RUNTIME_MARGIN_S
        properties.append(("RuntimeMaxUSec", usec(budget)))
    # The grace systemd gives between SIGTERM and SIGKILL when it stops the scope itself (its
    # RuntimeMaxUSec, `systemctl stop`). 0 would mean no SIGKILL at all to systemd: 1 us at least.
    properties.append(("TimeoutStopUSec", max(1, usec(limits.kill_after_s))))
    return properties


def describe_command(argv: list[str]) -> str:
    """One line: systemctl shows a description with a newline (`sh -c` scripts) as unprintable."""
    text = "aero-sandbox: " + " ".join(" ".join(arg.split()) for arg in argv)
    return text if len(text) <= DESCRIPTION_CHARS else text[: DESCRIPTION_CHARS - 3] + "..."


def encode_properties(
    properties: list[tuple[str, object]], apply_signature: Any
) -> list[tuple[int, Any]]:
    """The a(sv) argument in pystemd.dbuslib's form: the (type code, value) list that its
    call_method takes, which dbuslib's own signature_array builds (a private format: the
    contract test in tests/unit/test_systemd_props.py checks it against the installed pystemd)."""
    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for name, value in properties:
        signature = SIGNATURES[name].encode()
        args += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), signature)]
        args += apply_signature(signature, [value])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


def usec(seconds: float) -> int:
    return int(round(seconds * 1_000_000))
