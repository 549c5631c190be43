"""The run command line: `aero-sandbox [OPTIONS] [--] COMMAND [ARG...]`.

The options are one table. The launcher parses the run grammar itself (a trailing command
after options is awkward in click, and importing click costs ~30 ms, three times Python's own
start-up); click serves the subcommands and --help, which shows this same table.
Command-line values win over environment values.
"""

from __future__ import annotations

from sandbox.errors import UsageError
from sandbox.frozen import Frozen
from sandbox.limits import (
    DEFAULT_KILL_AFTER_S,
    DEFAULT_MEMORY,
    DEFAULT_PIDS,
    Limits,
    parse_duration,
    parse_grace,
    parse_pids,
    parse_size,
)
from sandbox.selection import CHOICES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


class Option(Frozen):
    __slots__ = ("flags", "dest", "metavar", "env", "help")
    flags: tuple[str, ...]
    dest: str
    metavar: str | None  # None: a flag without a value
    env: str | None
    help: str

    def __init__(
        self, flags: tuple[str, ...], dest: str, metavar: str | None, env: str | None, help: str
    ) -> None:
        self._init(flags=flags, dest=dest, metavar=metavar, env=env, help=help)


OPTIONS = (
    Option(
        ("--mem",),
        "mem",
        "SIZE",
        "AERO_MEM_LIMIT",
        f"resident memory of the whole tree: 512M, 12G, 1.5GiB, 50%, unlimited [{DEFAULT_MEMORY}]",
    ),
    Option(
        ("--pids",),
        "pids",
        "N",
        "AERO_PIDS_LIMIT",
        f"tasks (threads included), or unlimited [{DEFAULT_PIDS}]",
    ),
    Option(
        ("--timeout",),
        "timeout",
        "DURATION",
        "AERO_TIMEOUT",
        "wall-clock limit: 90, 2.5, 1.5m, 1h30m; 0 means none [none]",
    ),
    Option(
        ("--kill-after",),
        "kill_after",
        "DURATION",
        "AERO_KILL_AFTER",
        f"grace between SIGTERM and SIGKILL on timeout [{DEFAULT_KILL_AFTER_S:g}s]",
    ),
    Option(
        ("--backend",),
        "backend",
        "|".join(CHOICES),
        "AERO_BACKEND",
        "where limits come from [auto]",
    ),
    Option(("--report",), "report", "FILE", None, "write the JSON report of the run to FILE"),
    Option(("-q", "--quiet"), "quiet", None, None, "no launcher lines on stderr"),
    Option(("-v", "--verbose"), "verbose", None, None, "say which backend and limits are used"),
)
_BY_FLAG = {flag: option for option in OPTIONS for flag in option.flags}


class RunRequest(Frozen):
    __slots__ = ("argv", "limits", "backend", "report", "verbosity")
    argv: list[str]
    limits: Limits
    backend: str
    report: str | None
    verbosity: int  # -1 quiet, 0 normal, 1 verbose

    def __init__(
        self, argv: list[str], limits: Limits, backend: str, report: str | None, verbosity: int
    ) -> None:
        self._init(argv=argv, limits=limits, backend=backend, report=report, verbosity=verbosity)


def parse_run(
    args: list[str], environ: Mapping[str, str], subcommands: tuple[str, ...] = ()
) -> RunRequest:
    values: dict[str, str] = {}
    flags: set[str] = set()
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            index += 1
            break
        if not arg.startswith("-") or arg == "-":
            if arg in subcommands:
                raise UsageError(
                    f"{arg!r} is a subcommand: put it first (aero-sandbox {arg}), "
                    f"or run a program of that name after --"
                )
            break
        flag, has_value, inline = arg.partition("=")
        option = _BY_FLAG.get(flag)
        if option is None:
            raise UsageError(f"unknown option {flag!r}; see aero-sandbox --help")
        if option.metavar is None:
            if has_value:
                raise UsageError(f"option {flag} takes no value")
            flags.add(option.dest)
        elif has_value:
            values[option.dest] = inline
        elif index + 1 < len(args):
            index += 1
            values[option.dest] = args[index]
        else:
            raise UsageError(f"option {flag} needs a value: {flag} {option.metavar}")
        index += 1
    argv = args[index:]
    if not argv:
        raise UsageError("no command given: aero-sandbox [OPTIONS] -- COMMAND [ARG...]")
    return build_request(argv, values, flags, environ)


def _value(dest: str, values: dict[str, str], environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(text, where it came from) for an option: the command line, else its environment variable."""
    if dest in values:
        option = next(o for o in OPTIONS if o.dest == dest)
        return values[dest], option.flags[-1]
    env = next(o.env for o in OPTIONS if o.dest == dest)
    if env and environ.get(env, "").strip():
        return environ[env], env
    return None


def build_request(
    argv: list[str], values: dict[str, str], flags: set[str], environ: Mapping[str, str]
) -> RunRequest:
    def get(dest: str, default: str) -> tuple[str, str]:
        return _value(dest, values, environ) or (default, dest)

    mem = parse_size(*get("mem", DEFAULT_MEMORY))
    pids = parse_pids(*get("pids", str(DEFAULT_PIDS)))
    timeout = parse_duration(*get("timeout", "0"))
    kill_after = parse_grace(*get("kill_after", str(DEFAULT_KILL_AFTER_S)))
    backend, where = get("backend", "auto")
    if backend not in CHOICES:
        raise UsageError(f"invalid {where} value {backend!r}: expected one of {', '.join(CHOICES)}")
    report = values.get("report")
    verbosity = -1 if "quiet" in flags else 1 if "verbose" in flags else 0
    return RunRequest(argv, Limits(mem, pids, timeout, kill_after), backend, report, verbosity)
