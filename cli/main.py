"""`squall`: the entry point and its command groups."""

from __future__ import annotations

import gc
import os

import typer

from .lazy import LazyGroup

__all__ = ["COMMANDS", "YOUNG_GC", "app", "main"]

# Each command's module is imported, and the command built, when it is used (cli/lazy.py):
# name -> "module:attribute", a function (one command) or a Typer app (a command group).
# `squall --help` lists them in this order.
COMMANDS = {
    "run": "cli.run_cmd:run",
    "server": "cli.server_cmd:server",
    "agent": "cli.agent_cmd:agent",
    "doctor": "cli.doctor_cmd:doctor",
    "scheduler": "cli.schedule_cmd:scheduler",
    "login": "cli.admin_cmd:login",
    "workflow": "cli.workflow_cmd:app",
    "schedule": "cli.schedule_cmd:app",
    "app": "cli.app_cmd:app",
    "context": "cli.context_cmd:app",
    "secret": "cli.secret_cmd:app",
    "admin": "cli.admin_cmd:app",
    "federate": "cli.federate_cmd:federate_app",
    "catalog": "cli.federate_cmd:catalog_app",
    "stack": "cli.stack_cmd:app",
    "image": "cli.image_cmd:app",
}


# allocations (less deallocations) between collections of the youngest generation, see main
YOUNG_GC = 100_000


class _Squall(LazyGroup):
    lazy = COMMANDS


app = typer.Typer(
    name="squall",
    help=(
        "Squall runs Fuzzfile workflows where they are cheapest: on this machine, on-prem "
        "clusters or ephemeral cloud clusters.\n\n"
        "Start with **squall run FILE** to run a Fuzzfile on this machine; "
        "**squall workflow validate FILE** checks one, and "
        "**squall workflow graph FILE** shows the order its jobs run in."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Squall,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"squall {version('squall')}")
        except PackageNotFoundError:  # running from a source tree that was not installed
            typer.echo("squall (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Squall: cloud-burst orchestration for HPC and AI workflows."""


def main() -> None:
    """Console-script entry point.

    Three settings for a process that runs one command (issue 13's start-up goal;
    bench/cli_startup.py has the times):

    - No pydantic plugins, here and in the processes the command starts, unless
      PYDANTIC_DISABLE_PLUGINS says otherwise (set empty, it loads them all): Squall has
      none, and looking for them reads the entry points of every installed package when the
      first validator is built (about 4 ms of validate).
    - When the command is over, the objects it leaves are frozen (`gc.freeze`), so the
      interpreter's shutdown skips its full collections over them: about 15 ms of
      `squall --help` and 20 ms of `squall workflow validate`. Objects alive at exit are
      released as before; reference cycles among them are left to the operating system
      (Python never promised their `__del__` at exit).
    - The youngest generation is collected after YOUNG_GC allocations instead of 700:
      start-up makes a few hundred thousand objects that live as long as the process
      (modules, classes, validators), and the default threshold walks them over and over in
      full collections (about 15 ms of validate). A long-running command (`run`, `server`)
      collects as before, less often, each young collection walking at most that many.
    """
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    gc.set_threshold(YOUNG_GC, *gc.get_threshold()[1:])
    try:
        app()
    finally:
        gc.freeze()
