"""What a command line runs, looked through wrappers: shared by retries, presets and the rlimit
backend's address-space choice. Which programs are retried by default is here, not in
sandbox/run/retry.py, so that every other command's run never imports that module."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# Build and test tools whose failures under contention are usually transient (the old
# safe-run.sh retried these). `cargo nextest` is `cargo`; the binary itself is cargo-nextest.
RETRIED_PROGRAMS = frozenset(
    {"cargo", "rustc", "cargo-nextest", "npm", "npx", "pnpm", "yarn", "wasm-pack"}
)
ATTEMPTS_ENV = "AERO_SAFE_RUN_RUSTC_RETRIES"  # the old safe-run.sh name: attempts, 1 disables


def program(argv: Sequence[str]) -> str:
    """The program a command line runs: the basename, looking through `env [-u X] [VAR=x]...`."""
    index = 0
    while index < len(argv):
        name = os.path.basename(argv[index])
        if name != "env":
            return name
        index += 1
        while index < len(argv):  # env's options and assignments
            arg = argv[index]
            if arg == "--":
                index += 1
                break
            if arg in ("-u", "--unset", "-C", "--chdir"):
                index += 2
            elif arg.startswith("-") or ("=" in arg and not arg.startswith("=")):
                index += 1
            else:
                break
    return ""
