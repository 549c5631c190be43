"""The `agent` environment preset: settings that keep one build from exhausting the memory, threads
or processes of a host shared by many agents (what the old scripts/agent-env.sh exported).

`aero-sandbox env` prints it as shell code; `aero-sandbox --preset agent -- CMD` applies it to one
command. Both start from `agent_environment(environ)`: a mapping of variable -> new value, or None
for a variable to unset. Inputs (all optional):

    AERO_CARGO_BUILD_JOBS / --jobs N     parallelism of everything below [1]
    AERO_RUST_CODEGEN_UNITS (alias AERO_CODEGEN_UNITS)  -> CARGO_PROFILE_DEV_CODEGEN_UNITS
    AERO_DISABLE_RUSTC_WRAPPER=1         clear every rustc wrapper, not only sccache
    AERO_ISOLATE_CARGO_HOME=1|DIR        a CARGO_HOME of this checkout's own (or DIR)

The lld thread cap goes into Cargo's per-target flags only: rustc links wasm32 with
`rust-lld -flavor wasm`, which rejects the `-Wl,` form, so a global RUSTFLAGS cap breaks wasm
builds.
"""

from __future__ import annotations

import os
import sys

from sandbox.core.errors import UsageError
from sandbox.core.limits import is_ascii_digits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping

NAMES = ("agent",)
SHELLS = ("bash", "zsh", "sh", "fish")
NODE_HEAP_MB = 4096
WASM_FLAGS = "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS"
WRAPPERS = (
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
)
# Everything that follows the job count: rustc's own pools, test harnesses, Aero's Tokio runtimes.
THREAD_VARIABLES = (
    "CARGO_BUILD_JOBS",
    "RUSTC_WORKER_THREADS",
    "RAYON_NUM_THREADS",
    "RUST_TEST_THREADS",
    "NEXTEST_TEST_THREADS",
    "AERO_TOKIO_WORKER_THREADS",
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

# Rust's name for the CPU in `<arch>-unknown-linux-<libc>` host triples.
_RUST_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "i686": "i686",
    "riscv64": "riscv64gc",
    "ppc64le": "powerpc64le",
    "s390x": "s390x",
    "loongarch64": "loongarch64",
}
_64_BIT = {"x86_64", "aarch64", "riscv64gc", "powerpc64le", "s390x", "loongarch64"}


class Environment:
    """The preset's changes (name -> value, None = unset) and notes for the person reading them."""

    def __init__(self) -> None:
        self.changes: dict[str, str | None] = {}
        self.notes: list[str] = []


def _positive(text: str, what: str) -> int:
    raw = text.strip()
    if not is_ascii_digits(raw) or int(raw) < 1:
        raise UsageError(f"invalid {what} value {text!r}: expected a whole number, 1 or more")
    return int(raw)


def agent_environment(
    environ: Mapping[str, str],
    jobs: int | None = None,
    cwd: str | None = None,
    triple: tuple[str | None, str] | None = None,
) -> Environment:
    """The agent preset for a process whose environment is `environ` (pure: nothing is applied).

    `triple` is (host triple or None, where it came from); by default host_triple() finds it.
    """
    env = Environment()
    changes = env.changes
    if jobs is None:
        text = environ.get("AERO_CARGO_BUILD_JOBS", "").strip()
        jobs = _positive(text, "AERO_CARGO_BUILD_JOBS") if text else 1
    for name in THREAD_VARIABLES:
        changes[name] = str(jobs)
    changes["CARGO_INCREMENTAL"] = "1"
    node = environ.get("NODE_OPTIONS", "").strip()
    if "--max-old-space-size" not in node and "--max_old_space_size" not in node:
        node = f"{node} --max-old-space-size={NODE_HEAP_MB}".strip()
    changes["NODE_OPTIONS"] = node  # a size already there is the user's choice: kept
    changes["PW_TEST_WORKERS"] = "1"

    host, source = triple if triple is not None else host_triple()
    if host is None:
        env.notes.append(f"no linker thread cap for native builds: {source}")
    else:
        env.notes.append(f"host triple {host} ({source})")
        name = target_flags_variable(host)
        changes[name] = _with_thread_cap(environ.get(name, ""), f"-Wl,--threads={jobs}")
    changes[WASM_FLAGS] = _with_thread_cap(environ.get(WASM_FLAGS, ""), f"--threads={jobs}")
    # An old habit put the native cap in the global flags, which breaks wasm: move it out.
    for name, separator in (("RUSTFLAGS", " "), ("CARGO_ENCODED_RUSTFLAGS", "\x1f")):
        value = environ.get(name)
        if value:
            kept = separator.join(_without_thread_caps(value.split(separator)))
            if kept != value:
                changes[name] = kept or None
            if kept:
                env.notes.append(
                    f"{name} is set: Cargo then ignores the per-target flags (and their linker "
                    f"thread cap); move its flags into {WASM_FLAGS} and the host's variable"
                )

    for what in ("AERO_RUST_CODEGEN_UNITS", "AERO_CODEGEN_UNITS"):  # the second is an alias
        units = environ.get(what, "").strip()
        if units:
            changes["CARGO_PROFILE_DEV_CODEGEN_UNITS"] = str(_positive(units, what))
            break

    if _flag(environ, "AERO_DISABLE_RUSTC_WRAPPER"):
        # Set empty rather than unset: an empty value also overrides build.rustc-wrapper in
        # Cargo's config files.
        for name in WRAPPERS:
            changes[name] = ""
    else:
        for name in WRAPPERS:
            words = environ.get(name, "").split()
            if words and "sccache" in os.path.basename(words[0]):
                changes[name] = None

    isolate = environ.get("AERO_ISOLATE_CARGO_HOME", "").strip()
    if isolate.lower() in _TRUE:
        changes["CARGO_HOME"] = os.path.join(checkout_root(cwd or os.getcwd()), ".cargo-home")
    elif isolate.lower() not in _FALSE:
        changes["CARGO_HOME"] = os.path.abspath(os.path.expanduser(isolate))
    return env


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"invalid {name} value {value!r}: expected 1 or 0")


def target_flags_variable(triple: str) -> str:
    """Cargo's per-target RUSTFLAGS variable: CARGO_TARGET_<TRIPLE, upper case, - and . as _>."""
    return "CARGO_TARGET_" + triple.upper().replace("-", "_").replace(".", "_") + "_RUSTFLAGS"


def _is_thread_cap(codegen: str) -> bool:
    arg = codegen.removeprefix("link-arg=")
    return arg != codegen and (arg.startswith("-Wl,--threads=") or arg.startswith("--threads="))


def _without_thread_caps(tokens: list[str]) -> list[str]:
    """Flags minus any linker thread cap (`-C link-arg=...--threads=N`, in any of its spellings)."""
    kept: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in ("-C", "--codegen") and index + 1 < len(tokens):
            if _is_thread_cap(tokens[index + 1]):
                index += 2
                continue
        elif (token.startswith("-C") and _is_thread_cap(token[2:])) or (
            token.startswith("--codegen=") and _is_thread_cap(token[len("--codegen=") :])
        ):
            index += 1
            continue
        if token:
            kept.append(token)
        index += 1
    return kept


def _with_thread_cap(flags: str, link_arg: str) -> str:
    """The flags already there (Cargo splits these on whitespace), with our cap replacing any
    earlier one: evaluating the preset twice, or with another --jobs, leaves one cap."""
    return " ".join([*_without_thread_caps(flags.split()), "-C", f"link-arg={link_arg}"])


def checkout_root(start: str) -> str:
    """The nearest directory holding `.git` (a checkout or a worktree), else `start` itself."""
    path = os.path.abspath(start)
    while True:
        if os.path.exists(os.path.join(path, ".git")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return os.path.abspath(start)
        path = parent


def host_triple() -> tuple[str | None, str]:
    """(Rust host triple or None, where it came from). From uname and the C library when the
    machine is a common one (no process to start); else from `rustc -vV` when rustc exists."""
    machine = os.uname().machine
    arch = _RUST_ARCH.get(machine)
    libc = _libc()
    # A 32-bit userland on a 64-bit kernel: uname names the kernel's machine, not rustc's.
    if arch is not None and libc is not None and (arch not in _64_BIT or sys.maxsize > 2**32):
        c_library = "glibc" if libc == "gnu" else libc
        return f"{arch}-unknown-linux-{libc}", f"from uname ({machine}) and {c_library}"
    return _rustc_host()


def _libc() -> str | None:
    try:
        if os.confstr("CS_GNU_LIBC_VERSION"):
            return "gnu"
    except (ValueError, OSError):
        pass
    try:
        if any(name.startswith("ld-musl-") for name in os.listdir("/lib")):
            return "musl"
    except OSError:
        pass
    return None


def _rustc_host() -> tuple[str | None, str]:
    import shutil
    import subprocess

    rustc = shutil.which("rustc")
    if rustc is None:
        return None, f"unknown machine {os.uname().machine!r} and no rustc on PATH to ask"
    try:
        out = subprocess.run(
            [rustc, "-vV"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"`rustc -vV` failed: {err}"
    for line in out.splitlines():
        if line.startswith("host: "):
            return line[len("host: ") :].strip(), "from `rustc -vV`"
    return None, "`rustc -vV` names no host"


def apply(env: Environment, environ: MutableMapping[str, str]) -> None:
    for name, value in env.changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def render(env: Environment, shell: str) -> str:
    """Shell code that applies the preset when evaluated: `eval "$(aero-sandbox env)"`."""
    lines = [f"# aero-sandbox env: {note}" for note in env.notes]
    for name, value in env.changes.items():
        if shell == "fish":
            lines.append(f"set -e {name}" if value is None else f"set -gx {name} {_fish(value)}")
        else:
            lines.append(f"unset {name}" if value is None else f"export {name}={_posix(value)}")
    return "\n".join(lines) + "\n"


def _posix(value: str) -> str:
    """Single quotes keep every byte literal in sh, bash and zsh; a ' closes, escapes, reopens."""
    return "'" + value.replace("'", "'\\''") + "'"


def _fish(value: str) -> str:
    """In fish single quotes only \\\\ and \\' are escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- default reservations (--preset agent with --budget) ----------------------------------------
# Typical peaks from the agents' resource guide (docs/budgets.md): a run reserves this much of
# its budget before it starts unless --reserve/AERO_RESERVE says otherwise.
GIB = 1 << 30
RESERVATIONS = (
    ("cargo build --release", 8 * GIB),
    ("cargo (debug builds, tests, doc)", 4 * GIB),
    ("wasm-pack", 4 * GIB),
    ("playwright", 2 * GIB),
)
_CARGO_HEAVY = frozenset({"build", "b", "test", "t", "run", "r", "doc", "bench", "nextest"})
_PLAYWRIGHT_RUNNERS = frozenset({"npx", "pnpm", "yarn", "bunx", "pnpx"})


def default_reservation(argv: list[str]) -> int | None:
    """The agent preset's reservation for a command line, or None (no wait) for anything else."""
    from sandbox.core.commandline import program

    name = program(argv)
    where = next((i for i, arg in enumerate(argv) if name and os.path.basename(arg) == name), None)
    words = [] if where is None else argv[where + 1 :]
    table = dict(RESERVATIONS)
    if name in ("cargo", "cargo-nextest"):
        command = next((w for w in words if not w.startswith(("-", "+"))), "")
        if command not in _CARGO_HEAVY and name == "cargo":
            return None
        if "--release" in words or "-r" in words:
            return table["cargo build --release"]
        return table["cargo (debug builds, tests, doc)"]
    if name == "wasm-pack":
        return table["wasm-pack"]
    if name == "playwright" or (name in _PLAYWRIGHT_RUNNERS and "playwright" in words[:2]):
        return table["playwright"]
    return None
