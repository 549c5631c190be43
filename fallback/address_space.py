"""The per-process backstop under the watchdog: which RLIMIT_AS and RLIMIT_DATA a command gets.

The watchdog bounds the resident memory of the whole tree, but only as often as it samples.
Between two samples the kernel's per-process limits stop what grows too fast:

    RLIMIT_AS    every mapping counts, reservations included (what `ulimit -v` set in the old
                 shell scripts). Capped at --mem, except for commands known to reserve far more
                 address space than they use: V8 reserves about 10 GiB per WebAssembly memory
                 (four `WebAssembly.Memory({maximum: 65536})` need 41 GiB), so Node and its
                 launchers get 256G; LLVM's reservations in Rust builds need about 32G.
    RLIMIT_DATA  writable private mappings only (Linux 4.7+): PROT_NONE reservations do not
                 count, so it stays at --mem for every command and still catches a single
                 process that allocates past the limit where RLIMIT_AS had to be raised.

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
}


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
    cap, why = RESERVERS.get(program(argv), (memory_bytes, "--mem"))
    return Backstop(max(cap, memory_bytes), memory_bytes, why)
