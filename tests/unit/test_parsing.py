"""The forms users type: sizes, durations, pids, the run command line and its environment."""

from __future__ import annotations

import pytest

from sandbox.core.errors import UsageError
from sandbox.core.limits import parse_duration, parse_grace, parse_pids, parse_size, physical_memory
from sandbox.options import parse_run

G = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1G", G),
        ("1g", G),
        ("1GiB", G),
        ("1gib", G),
        ("1Gi", G),
        ("1GB", G),
        ("12G", 12 * G),
        ("512M", 512 << 20),
        ("1.5G", 3 * G // 2),
        ("64k", 64 << 10),
        ("2T", 2 << 40),
        ("8192", 8192),
        ("8192b", 8192),
        ("unlimited", None),
        ("infinity", None),
        ("MAX", None),
    ],
)
def test_sizes(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


def test_percent_of_physical_memory() -> None:
    assert parse_size("50%") == physical_memory() // 2


@pytest.mark.parametrize(
    "text", ["12X", "-5G", "0", "", "G", "1.2.3G", "1i", "1.5", "0%", "101%", "nan"]
)
def test_bad_sizes_name_value_and_forms(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_size(text)
    assert repr(text) in err.value.line() and "unlimited" in err.value.line()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", 90.0),
        ("2.5", 2.5),
        ("1.5m", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("0", None),
        ("0s", None),
    ],
)
def test_durations(text: str, expected: float | None) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["abc", "-3", "1h1h", "m", "1m30", "", "5d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="1h30m"):
        parse_duration(text)


def test_kill_after_zero_means_no_grace() -> None:
    assert parse_grace("0") == 0.0


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("4096", 4096), ("unlimited", None)])
def test_pids(text: str, expected: int | None) -> None:
    assert parse_pids(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "many"])
def test_bad_pids(text: str) -> None:
    with pytest.raises(UsageError, match="positive whole number"):
        parse_pids(text)


def test_run_grammar_and_defaults() -> None:
    request = parse_run(["--mem", "1G", "--timeout=10m", "--", "npm", "test", "--mem"], {})
    assert request.argv == ["npm", "test", "--mem"]
    assert request.limits.memory_bytes == G and request.limits.timeout_s == 600
    assert request.limits.pids == 4096 and request.limits.kill_after_s == 10
    assert request.backend == "auto" and request.verbosity == 0


def test_command_without_double_dash_ends_options() -> None:
    assert parse_run(["-q", "ls", "-l"], {}).argv == ["ls", "-l"]


def test_environment_defaults_and_command_line_wins() -> None:
    env = {"AERO_MEM_LIMIT": "8G", "AERO_TIMEOUT": "600", "AERO_PIDS_LIMIT": "unlimited"}
    request = parse_run(["--", "cargo", "test"], env)
    assert request.limits.memory_bytes == 8 * G and request.limits.timeout_s == 600
    assert request.limits.pids is None
    assert parse_run(["--mem", "2G", "--", "x"], env).limits.memory_bytes == 2 * G


def test_unlimited_memory_from_environment() -> None:
    assert parse_run(["--", "x"], {"AERO_MEM_LIMIT": "unlimited"}).limits.memory_bytes is None


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(UsageError, match="AERO_MEM_LIMIT"):
        parse_run(["--", "x"], {"AERO_MEM_LIMIT": "lots"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command"),
        (["--mem", "1G"], "no command"),
        (["--mem"], "needs a value"),
        (["--frobnicate", "--", "x"], "unknown option"),
        (["--backend", "docker", "--", "x"], "auto, systemd, cgroup, rlimit"),
        (["-q=1", "--", "x"], "takes no value"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_run(args, {})


def test_a_subcommand_after_options_is_ambiguous() -> None:
    with pytest.raises(UsageError, match="subcommand"):
        parse_run(["--mem", "1G", "doctor"], {}, ("doctor",))
