"""Issue 11's parsing and decision fixes, without a kernel: ASCII-only numbers, sizes of at least
one page, bounded durations, strict registry entries, escaped command lines, the OOM line naming
the limit that was hit, and which mounts --protect-limits makes read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.core.errors import UsageError
from sandbox.core.limits import Limits, parse_duration, parse_size
from sandbox.core.result import EXIT_OOM, Reason, RunResult, Usage, message
from sandbox.options import parse_run
from sandbox.registry import inventory
from sandbox.registry import store as registry
from sandbox.run import presets

# (command line, environment, what the one line must name): every one is a UsageError (125).
BAD_INPUTS = [
    (["--pids", "²", "true"], {}, "'²'"),
    (["--pids", "١٢", "true"], {}, "'١٢'"),
    (["--pids", "99999999999", "true"], {}, "'99999999999'"),
    (["--attempts", "³", "true"], {}, "'³'"),
    (["true"], {"AERO_PIDS_LIMIT": "²"}, "AERO_PIDS_LIMIT"),
    (["cargo", "build"], {"AERO_SAFE_RUN_RUSTC_RETRIES": "²"}, "AERO_SAFE_RUN_RUSTC_RETRIES"),
    (["--mem", "0.0001K", "true"], {}, "'0.0001K'"),
    (["--mem", "100", "true"], {}, "'100'"),
    (["--as", "0.0001K", "true"], {}, "'0.0001K'"),
    (["--mem", "1e300G", "true"], {}, "'1e300G'"),
    (["--mem", "١G", "true"], {}, "'١G'"),
    (["--mem", "1_0G", "true"], {}, "'1_0G'"),
    (["--timeout", "1e300", "true"], {}, "'1e300'"),
    (["--timeout", "9000h", "true"], {}, "'9000h'"),
    (["--timeout", "²s", "true"], {}, "'²s'"),
    (["--timeout", "1_0", "true"], {}, "'1_0'"),
    (["--kill-after", "1e300", "true"], {}, "'1e300'"),
    (["true"], {"AERO_PROTECT_LIMITS": "maybe"}, "AERO_PROTECT_LIMITS"),
]


@pytest.mark.parametrize(("args", "environ", "named"), BAD_INPUTS)
def test_bad_numbers_are_usage_errors_naming_the_value(
    args: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(UsageError) as caught:
        parse_run(args, environ)
    assert named in caught.value.line() and "\n" not in caught.value.line()


@pytest.mark.parametrize("name", ["AERO_CARGO_BUILD_JOBS", "AERO_RUST_CODEGEN_UNITS"])
def test_preset_numbers_are_ascii_digits_only(name: str) -> None:
    with pytest.raises(UsageError, match=name):
        presets.agent_environment({name: "²"}, triple=(None, "test"))


def test_long_but_real_durations_are_accepted() -> None:
    assert parse_duration("700h") == 700 * 3600
    assert parse_duration("600h", "--kill-after") == 600 * 3600
    request = parse_run(["--timeout", "700h", "--kill-after", "600h", "true"], {})
    assert request.limits.timeout_s == 700 * 3600 and request.limits.kill_after_s == 600 * 3600


def test_one_page_is_the_smallest_size() -> None:
    assert parse_size("4K") == 4096
    assert parse_size("4096") == 4096
    with pytest.raises(UsageError, match="one page"):
        parse_size("4095")


def test_protect_limits_flag_and_environment() -> None:
    assert parse_run(["true"], {}).limits.protected is False
    assert parse_run(["--protect-limits", "true"], {}).limits.protected is True
    assert parse_run(["true"], {"AERO_PROTECT_LIMITS": "1"}).limits.protected is True
    assert parse_run(["true"], {"AERO_PROTECT_LIMITS": "0"}).limits.protected is False


HOSTILE_ENTRY_TEXTS = [
    "started abc",
    "started nan",
    "started inf",
    "started 1_0",
    "pid ²",
    "pid -1",
    "guardian ²",
    "memory_bytes ²",
    "timeout_s abc",
]


@pytest.mark.parametrize("line", HOSTILE_ENTRY_TEXTS)
def test_a_malformed_entry_is_refused_with_a_reason(line: str, tmp_path: Path) -> None:
    good = {"pid": "pid 12", "started": "started 1.5"}
    key = line.split()[0]
    lines = [registry.MAGIC, *(v for k, v in good.items() if k != key), line, "arg x"]
    path = tmp_path / "12-abcdef"
    path.write_text("\n".join(lines) + "\n")
    assert registry.parse(path.read_text()) is None
    with pytest.raises(registry.BadEntry, match="malformed"):
        registry.load(str(path), None)


def test_an_oversized_or_foreign_entry_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "12-abcdef"
    path.write_text(f"{registry.MAGIC}\npid 12\nstarted 1\n" + "arg x\n" * registry.MAX_ENTRY_BYTES)
    with pytest.raises(registry.BadEntry, match="larger than"):
        registry.load(str(path), None)
    path.write_text(f"{registry.MAGIC}\npid 12\nstarted 1\n")
    assert registry.load(str(path), None)["pid"] == 12
    with pytest.raises(registry.BadEntry, match="owned by uid"):
        registry.load(str(path), path.stat().st_uid + 1)


def test_list_escapes_control_characters_of_a_command_line() -> None:
    assert inventory.printable("echo \x1b[2J\x07 ok") == "echo \\x1b[2J\\x07 ok"
    assert inventory.printable("a\nb\u2028c \udcff") == "a\\nb\\u2028c \\xff"
    assert inventory.printable("plain ünïcode") == "plain ünïcode"


def test_only_our_names_are_gc_candidates() -> None:
    assert inventory.made_by_us("aero-sandbox-12-abcdef")
    assert inventory.made_by_us("aero-sandbox-12-abcdef.scope")
    for name in ("aero-sandbox-evil", "aero-sandbox-²-x", "empty", "aero-leaf", "aero-sandbox-1"):
        assert not inventory.made_by_us(name)
    assert not inventory.sandbox_cgroup("/tmp/aero-sandbox-1-abcdef")
    assert not inventory.sandbox_cgroup("relative/aero-sandbox-1-abcdef")


def _oom(memory: int | None) -> RunResult:
    return RunResult(
        reason=Reason.OOM,
        exit_code=EXIT_OOM,
        wall_s=1.0,
        usage=Usage(peak_memory_bytes=300 << 20, oom_kills=1),
        limits=Limits(memory, 4096),
        sandbox={},
    )


def test_the_oom_line_names_the_enclosing_limit_when_it_is_smaller() -> None:
    line = message(_oom(1 << 30), (300 << 20, "/sys/fs/cgroup/memory/budget"))
    assert line is not None
    assert "300.0 MiB limit of /sys/fs/cgroup/memory/budget" in line and "1.0 GiB" in line
    own = message(_oom(256 << 20), (1 << 30, "/sys/fs/cgroup/memory/budget"))
    assert own is not None and "its 256.0 MiB limit" in own


def test_protect_finds_every_cgroup_mount() -> None:
    from sandbox.core.protect import MS_NODEV, MS_NOEXEC, MS_NOSUID, cgroup_mounts

    mountinfo = (
        "25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
        "28 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
        "29 28 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - "
        "cgroup2 cgroup2 rw,nsdelegate\n"
        "33 28 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - "
        "cgroup cgroup rw,memory\n"
        "34 28 0:32 / /sys/fs/cgroup/my\\040pids rw,relatime shared:16 - cgroup cgroup rw,pids\n"
    )
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    assert cgroup_mounts(mountinfo) == [
        ("/sys/fs/cgroup/unified", flags),
        ("/sys/fs/cgroup/memory", flags),
        ("/sys/fs/cgroup/my pids", 0),
    ]
