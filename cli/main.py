"""`squall`: the entry point and its command groups."""

from __future__ import annotations

import typer

from . import (
    agent_cmd,
    app_cmd,
    context_cmd,
    doctor_cmd,
    federate_cmd,
    run_cmd,
    secret_cmd,
    server_cmd,
    stack_cmd,
    workflow_cmd,
)

__all__ = ["app", "main"]

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
)
app.add_typer(workflow_cmd.app, name="workflow")
app.add_typer(app_cmd.app, name="app")
app.command(name="run")(run_cmd.run)
app.command(name="server")(server_cmd.server)
app.add_typer(context_cmd.app, name="context")
app.add_typer(secret_cmd.app, name="secret")
app.add_typer(federate_cmd.federate_app, name="federate")
app.add_typer(federate_cmd.catalog_app, name="catalog")
app.command(name="agent")(agent_cmd.agent)
app.add_typer(stack_cmd.app, name="stack")
app.command(name="doctor")(doctor_cmd.doctor)


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
    """Console-script entry point."""
    app()
