"""The click side of the CLI: --help for the whole tool, and the subcommands."""

from __future__ import annotations

import click

from sandbox import __version__
from sandbox.options import OPTIONS
from sandbox.run.presets import SHELLS


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
    lines.append("137 killed for memory (its own --mem, or its budget ran out); 125 aero-sandbox")
    lines.append("failed (bad usage included); 126 not executable; 127 not found; 123 exited 0")
    lines.append("but an --expect path is missing or empty; 75 --queue-timeout: never admitted")
    lines.append("into its budget, not run.")
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


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON array, for scripts")
def list_command(as_json: bool) -> None:
    """Every live sandbox you may see: command, backend, age, memory now/peak/limit, tasks.

    \b
    PID is the launcher's; LIMIT is the effective memory limit (the sandbox's own, or a
    smaller one set on a cgroup above it). Root sees every user's sandboxes.
    """
    from sandbox.budgets.manage import waiting_runs
    from sandbox.registry import inventory

    notes: list[str] = []
    rows = inventory.live_sandboxes(notes) + waiting_runs()
    rows.sort(key=lambda row: row["started"])
    for note in notes:  # an entry another user planted or broke: said, and the rest is listed
        click.echo(f"aero-sandbox: {inventory.printable(note)}", err=True)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(inventory.table(rows))


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@click.option(
    "--parent",
    "parents",
    multiple=True,
    metavar="PATH",
    help="also look below this parent cgroup (as given to a run's --parent); repeatable",
)
def gc_command(dry_run: bool, parents: tuple[str, ...]) -> None:
    """Remove what crashed launchers left: empty sandbox cgroups and stale registry entries.

    A live sandbox is never touched. A sandbox whose launcher is gone but whose processes
    still run is left alone and reported.
    """
    from sandbox.registry import gc

    dirs = [path for parent in parents for path in gc.parent_dirs(parent)]
    done = gc.collect(dry_run=dry_run, parents=dirs)
    verb = "would remove" if dry_run else "removed"
    for path in done.cgroups:
        click.echo(f"{verb} cgroup {path}")
    for path in done.entries:
        click.echo(f"{verb} registry entry {path}")
    for line in done.kept:
        click.echo(f"kept {line}")
    from sandbox.budgets.manage import collect

    removed, kept = collect(dry_run)
    for path in removed:
        click.echo(f"{verb} budget cgroup {path}")
    for line in kept:
        click.echo(f"kept {line}")


@cli.command("env")
@click.option("--shell", type=click.Choice(SHELLS), default="bash", help="syntax [bash]")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: variable -> value or null")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="parallelism of builds, tests and the linker [AERO_CARGO_BUILD_JOBS, else 1]",
)
def env_command(shell: str, as_json: bool, jobs: int | None) -> None:
    """Print the agent environment preset as shell code.

    \b
    eval "$(aero-sandbox env)"                  # bash, zsh
    aero-sandbox env --shell fish | source      # fish
    aero-sandbox --preset agent -- cargo test   # the same, for one command

    A null (JSON) or `unset` is a variable the preset removes (an sccache wrapper).
    """
    import os

    from sandbox.run import presets

    env = presets.agent_environment(os.environ, jobs=jobs)
    if as_json:
        import json

        click.echo(json.dumps({"env": env.changes, "notes": env.notes}, indent=2))
    else:
        click.echo(presets.render(env, shell), nl=False)


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="the findings as one JSON object")
def doctor_command(as_json: bool) -> None:
    """What this host can enforce, and the fix for each missing piece.

    \b
    Prepares (and removes) a real sandbox to see which backend `auto` picks.
    Exit status: 0 a sandbox that enforces memory runs here; 1 none can;
    2 sandboxes work, but a project check failed (Node against .nvmrc).
    """
    from sandbox import doctor

    diagnosis = doctor.diagnose()
    if as_json:
        import json

        click.echo(json.dumps(diagnosis.as_json(), indent=2))
    else:
        click.echo(doctor.render(diagnosis))
    raise click.exceptions.Exit(diagnosis.exit_code)


@cli.group("budget")
def budget_group() -> None:
    """Budgets: one memory/pids ceiling shared by every run in it (docs/budgets.md).

    \b
    aero-sandbox budget set agents --mem 80%
    aero-sandbox budget set agents/agent-17 --mem 12G
    aero-sandbox --budget agents/agent-17 --reserve 8G -- cargo build --release

    Budgets live below the cgroup the launcher runs in, or below AERO_BUDGET_ROOT (--root).
    """


_ROOT_HELP = "the admin-made cgroup budgets live below [AERO_BUDGET_ROOT, else our own cgroup]"


@budget_group.command("set")
@click.argument("name")
@click.option("--mem", "mem", required=True, metavar="SIZE", help="memory cap: 12G, 80%, unlimited")
@click.option("--pids", "pids", metavar="N", help="tasks cap [unlimited]")
@click.option("--root", metavar="PATH", help=_ROOT_HELP)
def budget_set(name: str, mem: str, pids: str | None, root: str | None) -> None:
    """Create budget NAME, or change its caps."""
    from sandbox.budgets.manage import set_budget
    from sandbox.core.limits import format_size, parse_pids, parse_size

    memory = parse_size(mem, "--mem")
    tasks = parse_pids(pids, "--pids") if pids is not None else None
    where = set_budget(name, memory, tasks, root)
    pids_text = tasks or "unlimited"
    click.echo(f"budget {name}: memory {format_size(memory)}, pids {pids_text} ({where})")


@budget_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON array, for scripts")
@click.option("--root", metavar="PATH", help=_ROOT_HELP)
def budget_list(as_json: bool, root: str | None) -> None:
    """Each budget: caps, usage now and peak, reservations, running members, waiting runs."""
    from sandbox.budgets.manage import rows, table

    found = rows(root)
    if as_json:
        import json

        click.echo(json.dumps(found, indent=2))
    elif found:
        click.echo(table(found))


@budget_group.command("rm")
@click.argument("name")
@click.option("--root", metavar="PATH", help=_ROOT_HELP)
def budget_rm(name: str, root: str | None) -> None:
    """Remove budget NAME (and budgets nested in it); refused while runs are in it or wait."""
    from sandbox.budgets.manage import remove

    for path in remove(name, root):
        click.echo(f"removed cgroup {path}")
