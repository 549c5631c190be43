"""Which RLIMIT_AS / RLIMIT_DATA the rlimit backend gives a command, and how --as is parsed."""

from __future__ import annotations

import pytest

from fallback.address_space import NODE_CAP, RUST_CAP, backstop, with_headroom
from sandbox.core.errors import UsageError
from sandbox.core.limits import AS_UNLIMITED
from sandbox.options import parse_run

G = 1 << 30


@pytest.mark.parametrize(
    "argv",
    [
        ["node", "app.js"],
        ["/usr/bin/node", "-e", "0"],
        ["npm", "-w", "web", "run", "test:unit"],
        ["npx", "playwright", "test"],
        ["pnpm", "test"],
        ["yarn", "vitest"],
        ["bun", "test"],
        ["deno", "test"],
        ["wasm-pack", "test", "--node"],
        ["playwright", "test"],
        ["vitest", "run"],
        ["jest"],
        ["env", "FOO=1", "node", "x.js"],
        ["/usr/bin/env", "-u", "HOME", "NODE_OPTIONS=--max-old-space-size=4096", "npm", "test"],
        ["env", "--", "node"],
    ],
)
def test_node_and_webassembly_commands_get_256g(argv: list[str]) -> None:
    chosen = backstop(argv, 12 * G, None)
    assert chosen.address_space == NODE_CAP == 256 * G
    # Reservations do not count in RLIMIT_DATA: it keeps the same headroom as for any command.
    assert chosen.data == 24 * G


@pytest.mark.parametrize(
    "argv",
    [["cargo", "build"], ["rustc", "x.rs"], ["cargo-nextest", "run"], ["env", "A=1", "cargo"]],
)
def test_rust_builds_get_32g(argv: list[str]) -> None:
    assert backstop(argv, 12 * G, None).address_space == RUST_CAP == 32 * G


@pytest.mark.parametrize("argv", [["python3", "x.py"], ["make", "test"], ["nodemon-like"], ["env"]])
def test_other_commands_get_the_headroom(argv: list[str]) -> None:
    chosen = backstop(argv, 2 * G, None)
    assert (chosen.address_space, chosen.data) == (4 * G, 4 * G)


@pytest.mark.parametrize(
    ("memory", "expected"),
    [(150 << 20, (150 << 20) + G), (300 << 20, (300 << 20) + G), (G, 2 * G), (12 * G, 24 * G)],
)
def test_the_backstop_sits_well_above_mem(memory: int, expected: int) -> None:
    """Chromium's renderers need 450 MiB of RLIMIT_DATA whatever --mem is; Node's 8 workers
    aborted at 215 MiB of RSS under RLIMIT_DATA=300M (docs/fallback.md)."""
    assert with_headroom(memory) == expected >= memory + 450 * (1 << 20)


@pytest.mark.parametrize(
    "argv", [["chromium", "--headless"], ["/usr/bin/google-chrome"], ["env", "A=1", "chrome"]]
)
def test_chromium_gets_no_address_space_cap(argv: list[str]) -> None:
    chosen = backstop(argv, 300 << 20, None)
    assert (chosen.address_space, chosen.data) == (None, (300 << 20) + 4 * G)


def test_mem_above_the_bump_wins() -> None:
    assert backstop(["node"], 300 * G, None).address_space == 600 * G


def test_no_memory_limit_sets_no_backstop() -> None:
    chosen = backstop(["python3"], None, None)
    assert (chosen.address_space, chosen.data) == (None, None)


def test_explicit_value_wins_and_drops_rlimit_data() -> None:
    chosen = backstop(["node"], 12 * G, 8 * G)
    assert (chosen.address_space, chosen.data) == (8 * G, None)


def test_explicit_unlimited_sets_nothing() -> None:
    chosen = backstop(["python3"], 12 * G, AS_UNLIMITED)
    assert (chosen.address_space, chosen.data) == (None, None)


@pytest.mark.parametrize(
    ("args", "environ", "expected"),
    [
        (["--", "node"], {}, None),
        (["--as", "8G", "--", "node"], {}, 8 * G),
        (["--as=unlimited", "--", "node"], {}, AS_UNLIMITED),
        (["--", "node"], {"AERO_AS_LIMIT": "64G"}, 64 * G),
        (["--", "node"], {"AERO_AS_LIMIT": "unlimited"}, AS_UNLIMITED),
        (["--as", "1G", "--", "node"], {"AERO_AS_LIMIT": "64G"}, G),  # the command line wins
    ],
)
def test_as_option(args: list[str], environ: dict[str, str], expected: int | None) -> None:
    assert parse_run(args, environ).limits.address_space_bytes == expected


@pytest.mark.parametrize(
    ("args", "environ", "named"),
    [
        (["--as", "lots", "--", "node"], {}, "--as"),
        (["--", "node"], {"AERO_AS_LIMIT": "-1G"}, "AERO_AS_LIMIT"),
    ],
)
def test_bad_as_value_names_it_and_the_forms(
    args: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(UsageError) as err:
        parse_run(args, environ)
    assert named in str(err.value) and "unlimited" in str(err.value)
