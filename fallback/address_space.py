"""The per-process backstop under the watchdog: which RLIMIT_AS and RLIMIT_DATA a command gets.

The watchdog bounds the resident memory of the whole tree and decides what --mem means. The
kernel's per-process limits are only a backstop for what a starved watchdog cannot see in
time, so they sit well above --mem: at --mem + max(--mem, 1 GiB). At --mem itself they broke
programs far below the limit: V8 workers abort "JavaScript heap out of memory" at ~215 MiB of
tree RSS under RLIMIT_DATA=300M, Chromium's renderers need 450-670 MiB of VmData for 50-150 MiB
resident (docs/fallback.md has the measurements).

    RLIMIT_AS    every mapping counts, reservations included (what `ulimit -v` set in the old
                 shell scripts). Commands known to reserve far more address space than they use
                 get more: V8 reserves about 10 GiB per WebAssembly memory (four
                 `WebAssembly.Memory({maximum: 65536})` need 41 GiB), so Node and its launchers
                 get 256G; LLVM's reservations in Rust builds need about 32G; Chromium's
                 renderers reserve 1.4 TiB each, so Chromium gets no RLIMIT_AS at all.
    RLIMIT_DATA  writable private mappings only (Linux 4.7+): PROT_NONE reservations do not
                 count, so it catches a single process that allocates far past the limit where
                 RLIMIT_AS was raised. V8 (Node, Chromium) commits a WebAssembly memory's
                 initial size as one writable mapping of up to 4 GiB, touched only as used:
                 at --mem 400M a page asking for 2 GiB got a RangeError (exit 1) where a cgroup
                 OOM-kills it once it uses 400M; so V8 programs get 4 GiB of headroom, and the
                 watchdog decides as for everything else.

An explicit `--as SIZE|unlimited` (or AERO_AS_LIMIT) replaces both: the person asking knows
their program (AddressSanitizer maps a 15 TiB shadow that either limit would refuse).
Measurements behind these choices: docs/fallback.md.
"""

from __future__ import annotations

from sandbox.core.commandline import program
from sandbox.core.frozen import Frozen
from sandbox.core.limits import AS_UNLIMITED

NODE_CAP = 256 << 30
RUST_CAP = 32 << 30
UNCAPPED = -1  # RESERVERS: no RLIMIT_AS at all
HEADROOM = 1 << 30  # at least this much above --mem, and at least --mem itself
V8_HEADROOM = 4 << 30  # wasm32's largest memory, committed (not used) in one mapping

# Programs that reserve large virtual ranges, by the basename of what the command line runs
# (looking through `env VAR=x`): every Node launcher runs V8, whose WebAssembly memories and
# pointer-compression cages are reservations, not allocations.
RESERVERS: dict[str, tuple[int, str]] = {
    **{
        name: (NODE_CAP, "Node/V8 reserves address space for WebAssembly memories")
        for name in (
            "node",
            "nodejs",
            "npm",
            "npx",
            "pnpm",
            "yarn",
            "bun",
            "deno",
            "wasm-pack",
            "playwright",
            "vitest",
            "jest",
        )
    },
    **{
        name: (RUST_CAP, "LLVM reserves address space in Rust builds")
        for name in ("cargo", "rustc", "cargo-nextest")
    },
    **{
        name: (UNCAPPED, "Chromium's renderers reserve about 1.4 TiB of address space each")
        for name in (
            "chromium",
            "chromium-browser",
            "chrome",
            "google-chrome",
            "google-chrome-stable",
            "chrome-headless-shell",
            "headless_shell",
        )
    },
}


def with_headroom(memory_bytes: int, headroom: int = HEADROOM) -> int:
    """The per-process backstop for a tree limited to `memory_bytes`: far enough above it that
    only the watchdog, which counts the whole tree's resident memory, decides at --mem."""
    return memory_bytes + max(memory_bytes, headroom)


class Backstop(Frozen):
    """The rlimits to set in the child (None: leave the inherited one) and why."""

    address_space: int | None
    data: int | None
    why: str


def backstop(argv: list[str], memory_bytes: int | None, requested: int | None) -> Backstop:
    """`requested` is Limits.address_space_bytes: None when --as was not given."""
    if requested == AS_UNLIMITED:
        return Backstop(None, None, "--as unlimited")
    if requested is not None:
        return Backstop(requested, None, "--as")
    if memory_bytes is None:
        return Backstop(None, None, "no --mem limit")
    name = program(argv)
    v8 = name in RESERVERS and RESERVERS[name][0] in (NODE_CAP, UNCAPPED)
    backstop = with_headroom(memory_bytes, V8_HEADROOM if v8 else HEADROOM)
    cap, why = RESERVERS.get(name, (backstop, "--mem + headroom"))
    return Backstop(None if cap == UNCAPPED else max(cap, backstop), backstop, why)
