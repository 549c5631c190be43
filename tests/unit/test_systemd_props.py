"""The limits -> transient scope properties table, and its D-Bus encoding. No bus needed."""

from __future__ import annotations

import re

import pytest

from sandbox.backends.systemd.properties import (
    DESCRIPTION_CHARS,
    HOLDER_TASKS,
    RUNTIME_MARGIN_S,
    SIGNATURES,
    describe_command,
    encode_properties,
    unit_properties,
)
from sandbox.core.limits import Limits

G = 1 << 30


def props(limits: Limits, slice_name: str | None = None) -> dict[str, object]:
    return dict(unit_properties(limits, ["npm", "test"], [101, 102], slice_name))


def test_every_limit_becomes_a_property() -> None:
    got = props(Limits(2 * G, 64, timeout_s=30.0, kill_after_s=4.0))
    assert got["MemoryMax"] == 2 * G
    assert got["MemorySwapMax"] == 0
    assert got["TasksMax"] == 64 + HOLDER_TASKS  # the holder is one task of the scope
    assert got["RuntimeMaxUSec"] == int((30 + 4 + RUNTIME_MARGIN_S) * 1_000_000)
    assert got["TimeoutStopUSec"] == 4_000_000
    assert got["PIDs"] == [101, 102]
    assert got["Description"] == "aero-sandbox: npm test"


def test_the_scope_is_delegated_collected_and_survives_an_oom_kill() -> None:
    got = props(Limits(G, 10))
    assert got["Delegate"] is True
    assert got["CollectMode"] == "inactive-or-failed"
    # stop/kill would end the unit, holder and cgroup included, before we read memory.events.
    assert got["OOMPolicy"] == "continue"


def test_unlimited_sets_no_limit_properties() -> None:
    got = props(Limits(None, None))
    for name in ("MemoryMax", "MemorySwapMax", "TasksMax", "RuntimeMaxUSec", "Slice"):
        assert name not in got


def test_no_grace_still_lets_systemd_send_sigkill() -> None:
    # TimeoutStopUSec=0 means "no timeout" to systemd, so never SIGKILL: 1 us is the least.
    assert props(Limits(None, None, kill_after_s=0.0))["TimeoutStopUSec"] == 1


def test_slice() -> None:
    assert props(Limits(G, 10), "aero-agents.slice")["Slice"] == "aero-agents.slice"


def test_every_property_has_a_dbus_type() -> None:
    limits = Limits(G, 10, timeout_s=1.0)
    for name, _value in unit_properties(limits, ["x"], [1], "a.slice"):
        assert re.fullmatch(r"[sbt]|au", SIGNATURES[name]), name


def test_values_match_their_types() -> None:
    checks = {
        "s": lambda v: isinstance(v, str),
        "b": lambda v: isinstance(v, bool),
        "t": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64,
        "au": lambda v: isinstance(v, list) and all(0 < p < 1 << 32 for p in v),
    }
    limits = Limits(12 * G, 4096, timeout_s=600.0, kill_after_s=10.0)
    for name, value in unit_properties(limits, ["x"], [4242, 4243], "a.slice"):
        assert checks[SIGNATURES[name]](value), (name, value)


def test_long_commands_are_cut_in_the_description() -> None:
    text = describe_command(["node", "x" * 1000])
    assert len(text) == DESCRIPTION_CHARS and text.endswith("...")
    assert describe_command(["true"]) == "aero-sandbox: true"
    assert describe_command(["sh", "-c", "a\n\tb"]) == "aero-sandbox: sh -c a b"


def fake_apply_signature(signature: bytes, values: list[object]) -> list[tuple[int, object]]:
    if signature.startswith(b"a"):
        items = values[0]
        assert isinstance(items, list)
        return [(ord("a"), signature[1:])] + [(signature[1], v) for v in items] + [(-1, None)]
    return [(signature[0], values[0])]


def test_encoding_wraps_each_property_in_a_struct_and_a_variant() -> None:
    args = encode_properties([("TasksMax", 11), ("PIDs", [7])], fake_apply_signature)
    assert args == [
        (ord("a"), b"(sv)"),
        (ord("r"), b"sv"),
        (ord("s"), b"TasksMax"),
        (ord("v"), b"t"),
        (ord("t"), 11),
        (-1, None),
        (-1, None),
        (ord("r"), b"sv"),
        (ord("s"), b"PIDs"),
        (ord("v"), b"au"),
        (ord("a"), b"u"),
        (ord("u"), 7),
        (-1, None),
        (-1, None),
        (-1, None),
        (-1, None),
    ]


def test_encoding_with_pystemd() -> None:
    """pystemd's own encoder accepts every value of the table (where pystemd is installed)."""
    dbuslib = pytest.importorskip("pystemd.dbuslib")
    limits = Limits(G, 10, timeout_s=5.0)
    args = encode_properties(
        unit_properties(limits, ["x"], [1, 2], "a.slice"), dbuslib.apply_signature
    )
    opened = sum(1 for kind, _ in args if kind in (ord("a"), ord("r"), ord("v")))
    closed = sum(1 for kind, _ in args if kind == -1)
    assert opened == closed
    assert (ord("u"), 2) in args
