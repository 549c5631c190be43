"""What a command line runs, looked through wrappers: shared by retries, presets and the rlimit
backend's address-space choice."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


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
