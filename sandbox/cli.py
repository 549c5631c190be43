"""The command line. `main()` is the entry point.

A run (`aero-sandbox [OPTIONS] [--] COMMAND...`) is parsed by sandbox.options, without
importing click; the subcommands (doctor, env, list, gc) and --help are click commands.
Only this module turns errors into exit codes: 125 for the launcher's own, like timeout(1).
"""

from __future__ import annotations

import os
import sys

from sandbox.core.errors import SandboxError
from sandbox.core.result import EXIT_ERROR

SUBCOMMANDS = ("doctor", "env", "list", "gc", "budget")
HELP_FLAGS = ("-h", "--help", "--version")
# What the spawned guardian (bin/aero-sandbox.c) hands the Python entry, without arguments, when
# its launcher died without cleaning up: sandbox/run/guardian.py.
GUARDIAN_NOTES = "AERO_SANDBOX_GUARDIAN_NOTES"


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    if not args and GUARDIAN_NOTES in os.environ:  # never a run: a run has a command
        from sandbox.run.guardian import clean_up_after

        clean_up_after(os.environ[GUARDIAN_NOTES])
        return 0
    _hold_closed_std_fds()
    try:
        if args and (args[0] in SUBCOMMANDS or args[0] in HELP_FLAGS):
            return _click_main(args)
        from sandbox.options import parse_run

        if args[:1] == ["run"]:
            args = args[1:]
        request = parse_run(args, os.environ, SUBCOMMANDS)
        if request.backend in ("auto", "cgroup") and _before_clone_into_cgroup():
            from sandbox.cgroups import warmup

            warmup.start()  # while the rest is imported: see sandbox/cgroups/warmup.py
        from sandbox.launch import execute

        return execute(request)
    except SandboxError as err:
        if sys.stderr is not None:  # None: started with `2>&-`
            sys.stderr.write(f"aero-sandbox: {err.line()}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _before_clone_into_cgroup() -> bool:
    """Linux before 5.7, where the child cannot be born in its cgroup: only there does the
    warm-up help (sandbox/cgroups/warmup.py), and only there is it imported."""
    try:
        major, minor = os.uname().release.split(".")[:2]
        return (int(major), int("".join(c for c in minor if c.isdigit()) or 0)) < (5, 7)
    except ValueError:  # a release string of another shape: a kernel of our time
        return False


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalization: tearing down every module and a full
    garbage collection cost a few ms after the command's output is all out, and nothing of ours
    needs them (the sandbox is gone, every file closed); only Python's own buffers are flushed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the fd was closed when Python started
                stream.flush()
        except OSError:  # a closed pipe: Python's own exit reports that as status 120
            code = code or 120
    os._exit(code)


def _hold_closed_std_fds() -> None:
    """Started with stdin, stdout or stderr closed (`2>&-`), the next file we open (a cgroup's
    eventfd, a pipe, the signalfd) would get that number, and our stderr lines would be written
    into it. Hold each closed one with /dev/null, close-on-exec: the command still finds it
    closed, as its caller meant."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)


def _click_main(args: list[str]) -> int:
    import click

    from sandbox.commands import cli

    try:
        # Without standalone mode, click returns a subcommand's click.exceptions.Exit code.
        code = cli.main(args=args, prog_name="aero-sandbox", standalone_mode=False)
    except click.ClickException as err:  # click's own usage errors
        sys.stderr.write(f"aero-sandbox: {err.format_message()}\n")
        return EXIT_ERROR
    return code if isinstance(code, int) else 0
