"""The click side of the CLI: --help for the whole tool, and the subcommands."""

from __future__ import annotations

import click

from sandbox import __version__
from sandbox.options import OPTIONS


def _run_help() -> str:
    lines = [
        "\b",
        "Run options (before the command; command-line values win over the environment):",
    ]
    for option in OPTIONS:
        left = ", ".join(option.flags) + (f" {option.metavar}" if option.metavar else "")
        env = f" (env {option.env})" if option.env else ""
        lines.append(f"  {left:<28} {option.help}{env}")
    lines.append("")
    lines.append("\b")
    lines.append("Exit status: the command's own; 128+N killed by signal N; 124 timed out;")
    lines.append("137 killed for memory; 125 aero-sandbox failed (bad usage included);")
    lines.append("126 not executable; 127 not found.")
    return "\n".join(lines)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_run_help(),
    invoke_without_command=True,
)
@click.version_option(__version__, prog_name="aero-sandbox")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run COMMAND inside real kernel resource limits.

    \b
    aero-sandbox [OPTIONS] [--] COMMAND [ARG...]
    aero-sandbox --mem 12G --timeout 10m -- npm test
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
