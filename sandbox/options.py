"""The run command line: `aero-sandbox [OPTIONS] [--] COMMAND [ARG...]`.

The options are one table. The launcher parses the run grammar itself (a trailing command
after options is awkward in click, and importing click costs ~30 ms, three times Python's own
start-up); click serves the subcommands and --help, which shows this same table.
Command-line values win over environment values.
"""

from __future__ import annotations

import os

from sandbox.backends.selection import CHOICES
from sandbox.core.commandline import ATTEMPTS_ENV, RETRIED_PROGRAMS, program
from sandbox.core.errors import UsageError
from sandbox.core.frozen import Frozen
from sandbox.core.limits import (
    AS_UNLIMITED,
    DEFAULT_KILL_AFTER_S,
    DEFAULT_MEMORY,
    DEFAULT_OOM_PRESSURE,
    DEFAULT_PIDS,
    Limits,
    parse_duration,
    parse_grace,
    parse_pids,
    parse_pressure,
    parse_size,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


PROTECT_ENV = "AERO_PROTECT_LIMITS"


class Option(Frozen):
    flags: tuple[str, ...]
    dest: str
    metavar: str | None  # None: a flag without a value
    env: str | None
    help: str


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
        ("--oom-pressure",),
        "oom_pressure",
        "PCT/DURATION",
        "AERO_OOM_PRESSURE",
        "end a sandbox thrashing at --mem as an OOM (137) once all its tasks were stalled on "
        f"memory this share of this window (PSI full); off disables [{DEFAULT_OOM_PRESSURE}]",
    ),
    Option(
        ("--as",),
        "address_space",
        "SIZE",
        "AERO_AS_LIMIT",
        "per-process address-space cap (RLIMIT_AS) of the rlimit backend, or unlimited "
        "[--mem; 256G for Node/WebAssembly, 32G for Rust builds]",
    ),
    Option(
        ("--backend",),
        "backend",
        "|".join(CHOICES),
        "AERO_BACKEND",
        "where limits come from [auto]",
    ),
    Option(
        ("--parent",),
        "parent",
        "PATH",
        "AERO_CGROUP_PARENT",
        "create the sandbox below this admin-made cgroup, a budget shared by all sandboxes in it "
        "(cgroup backend): /sys/fs/cgroup/agents, or agents relative to each cgroup mount",
    ),
    Option(
        ("--slice",),
        "slice",
        "NAME",
        "AERO_SLICE",
        "start the sandbox's scope in this systemd slice, whose own limits (MemoryMax...) all "
        "sandboxes in it share (systemd backend): aero-agents.slice",
    ),
    Option(
        ("--budget",),
        "budget",
        "NAME",
        "AERO_BUDGET",
        "run inside this budget, a memory/pids ceiling shared with every other run in it "
        "(aero-sandbox budget set): agents, agents/agent-17 (a systemd slice or a cgroup)",
    ),
    Option(
        ("--budget-mem",),
        "budget_mem",
        "SIZE",
        "AERO_BUDGET_MEM",
        "create the --budget with this memory cap when it does not exist yet",
    ),
    Option(
        ("--reserve",),
        "reserve",
        "SIZE",
        "AERO_RESERVE",
        "start only once the budget can take SIZE more (in queue order; at most 8 later runs "
        "may pass a waiting one) [none; "
        "--preset agent: a typical peak per command]",
    ),
    Option(
        ("--queue-timeout",),
        "queue_timeout",
        "DURATION",
        "AERO_QUEUE_TIMEOUT",
        "give up waiting for --reserve after DURATION: exit 75, nothing run [none]",
    ),
    Option(("--report",), "report", "FILE", None, "write the JSON report of the run to FILE"),
    Option(
        ("--preset",),
        "preset",
        "agent",
        None,
        "apply an environment preset to the command (agent: what `aero-sandbox env` prints)",
    ),
    Option(
        ("--attempts",),
        "attempts",
        "N",
        ATTEMPTS_ENV,
        "run again after a transient resource failure (rustc WouldBlock, EAGAIN); the env "
        "variable applies to cargo, rustc, npm, npx, pnpm, yarn, wasm-pack [3 for those, else 1]",
    ),
    Option(
        ("--expect",),
        "expect",
        "PATH",
        None,
        "after exit 0, PATH must exist and not be empty, else exit 123; repeatable",
    ),
    Option(
        ("--protect-limits",),
        "protect",
        None,
        PROTECT_ENV,
        "keep a root command from undoing its limits: cgroup filesystems read-only in a private "
        "mount namespace, CAP_SYS_ADMIN and CAP_SYS_RESOURCE dropped (root only; env 1/0)",
    ),
    Option(("-q", "--quiet"), "quiet", None, None, "no launcher lines on stderr"),
    Option(("-v", "--verbose"), "verbose", None, None, "say which backend and limits are used"),
)
_BY_FLAG = {flag: option for option in OPTIONS for flag in option.flags}
REPEATABLE = frozenset({"expect"})  # every occurrence counts, not only the last


class RunRequest(Frozen):
    argv: list[str]
    limits: Limits
    backend: str
    report: str | None
    verbosity: int  # -1 quiet, 0 normal, 1 verbose
    preset: str | None
    attempts: int
    expect: list[str]
    parent: str | None  # --parent: the cgroup every sandbox of a shared budget goes under
    slice: str | None  # --slice: the systemd slice every sandbox of a shared budget goes in
    budget: str | None  # --budget: agents/agent-17 (validated)
    budget_mem: int | None  # --budget-mem: the cap of a budget this run creates
    reserve: int | None  # --reserve: admission
    queue_timeout: float | None  # --queue-timeout: None waits as long as it takes


def parse_run(
    args: list[str], environ: Mapping[str, str], subcommands: tuple[str, ...] = ()
) -> RunRequest:
    values: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
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
        if option.dest in REPEATABLE:
            repeated.setdefault(option.dest, []).append(values.pop(option.dest))
        index += 1
    argv = args[index:]
    if not argv:
        raise UsageError("no command given: aero-sandbox [OPTIONS] -- COMMAND [ARG...]")
    return build_request(argv, values, flags, environ, repeated)


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
    argv: list[str],
    values: dict[str, str],
    flags: set[str],
    environ: Mapping[str, str],
    repeated: Mapping[str, list[str]] | None = None,
) -> RunRequest:
    def get(dest: str, default: str) -> tuple[str, str]:
        return _value(dest, values, environ) or (default, dest)

    mem = parse_size(*get("mem", DEFAULT_MEMORY))
    pids = parse_pids(*get("pids", str(DEFAULT_PIDS)))
    timeout = parse_duration(*get("timeout", "0"))
    kill_after = parse_grace(*get("kill_after", str(DEFAULT_KILL_AFTER_S)))
    pressure_pct, pressure_window = parse_pressure(*get("oom_pressure", DEFAULT_OOM_PRESSURE))
    as_text = _value("address_space", values, environ)
    address_space = None if as_text is None else parse_size(*as_text) or AS_UNLIMITED
    protected = "protect" in flags or _env_flag(PROTECT_ENV, environ)
    if protected and os.geteuid() != 0:
        raise UsageError(
            "--protect-limits needs root: it guards against a root command; a command that is "
            "not root cannot write the root-owned cgroup files anyway"
        )
    backend, where = get("backend", "auto")
    if backend not in CHOICES:
        raise UsageError(f"invalid {where} value {backend!r}: expected one of {', '.join(CHOICES)}")
    report = values.get("report")
    verbosity = -1 if "quiet" in flags else 1 if "verbose" in flags else 0
    preset = values.get("preset")
    if preset is not None:
        from sandbox.run.presets import NAMES

        if preset not in NAMES:
            raise UsageError(f"invalid --preset value {preset!r}: expected {', '.join(NAMES)}")
    # The env variable counts only for the build/test tools (its old meaning), --attempts for all.
    # Every other command runs once, without importing the retry module.
    attempts = 1
    if "attempts" in values or program(argv) in RETRIED_PROGRAMS:
        from sandbox.run import retry

        attempts = retry.attempts(argv, values.get("attempts"), environ)
    expect = list((repeated or {}).get("expect", []))
    parent_value = _value("parent", values, environ)
    parent = parent_value[0].strip() if parent_value else None
    slice_value = _value("slice", values, environ)
    slice_name = parse_slice(*slice_value) if slice_value else None
    budget, budget_mem, reserve, queue_timeout = _budget_options(argv, values, environ, preset)
    if budget is not None and backend not in ("auto", "cgroup"):
        # Never dropped silently: a systemd slice per level and the rlimit backend's cooperative
        # enforcement are not built (docs/budgets.md), so only cgroups this launcher makes hold one.
        raise UsageError(
            f"--budget needs the cgroup backend, not --backend {backend}: budgets in systemd "
            "slices and for the rlimit backend are not built yet (use --backend cgroup or auto)"
        )
    if budget is not None and (parent or slice_name):
        raise UsageError(
            "--budget cannot be combined with --parent or --slice: a budget is the shared "
            "parent (AERO_BUDGET_ROOT names the cgroup budgets live below)"
        )
    return RunRequest(
        argv,
        Limits(
            mem, pids, timeout, kill_after, address_space, protected, pressure_pct, pressure_window
        ),
        backend,
        report,
        verbosity,
        preset,
        attempts,
        expect,
        parent,
        slice_name,
        budget,
        budget_mem,
        reserve,
        queue_timeout,
    )


def _budget_options(
    argv: list[str], values: dict[str, str], environ: Mapping[str, str], preset: str | None
) -> tuple[str | None, int | None, int | None, float | None]:
    """(--budget, --budget-mem, --reserve, --queue-timeout); the last three need a budget."""
    budget_value = _value("budget", values, environ)
    budget = None
    if budget_value is not None:
        from sandbox.budgets.model import parse_name

        budget = "/".join(parse_name(budget_value[0], budget_value[1]))
    sizes = {}
    for dest in ("budget_mem", "reserve"):
        found = _value(dest, values, environ)
        sizes[dest] = parse_size(found[0], found[1]) if found else None
        if found and sizes[dest] is None and dest == "reserve":
            raise UsageError(f"invalid {found[1]} value {found[0]!r}: a reservation is a size")
    wait = _value("queue_timeout", values, environ)
    queue_timeout = parse_duration(wait[0], wait[1]) if wait else None
    if budget is None:
        needing = ("budget_mem", "reserve", "queue_timeout")
        given = [o.flags[-1] for o in OPTIONS if o.dest in needing and o.dest in values]
        if given:
            raise UsageError(f"{', '.join(given)} needs --budget NAME (or AERO_BUDGET)")
        return None, None, None, None
    reserve = sizes["reserve"]
    if reserve is None and preset == "agent":
        from sandbox.run.presets import default_reservation

        reserve = default_reservation(argv)
    return budget, sizes["budget_mem"], reserve, queue_timeout


def _env_flag(name: str, environ: Mapping[str, str]) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "no", "false", "off"):
        return False
    if raw in ("1", "yes", "true", "on"):
        return True
    raise UsageError(f"invalid {name} value {environ[name]!r}: expected 1 or 0 (yes/no)")


def parse_slice(text: str, where: str = "--slice") -> str:
    """A systemd slice unit name: letters, digits and :-_.\\ before ".slice" (systemd.unit(5))."""
    name = text.strip()
    stem = name.removesuffix(".slice")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.\\")
    if stem == name or not stem or not set(stem) <= allowed or stem.startswith("-"):
        raise UsageError(
            f"invalid {where} value {text!r}: expected a slice unit name such as "
            "aero-agents.slice (letters, digits, - _ . :, ending in .slice)"
        )
    return name
