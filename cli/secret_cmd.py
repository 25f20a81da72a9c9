"""`squall secret set|list|delete`: the values behind `secret://user/NAME` references."""

from __future__ import annotations

import sys

import typer

from .output import Format, die, escape, out, print_json
from .workflow_ops import CONTEXT, OUTPUT, _backend, _guard

__all__ = ["app"]

app = typer.Typer(
    help=(
        "Store the secrets Fuzzfiles refer to as secret://user/NAME, secret://group/NAME or "
        "secret://organization/NAME: encrypted at rest, resolved for the run's owner when a "
        "container starts or data moves, never printed, and masked in logs and events. "
        "On this machine's store with no context, on the server of the current one else."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

GROUP = typer.Option(
    "", "--group", help="For secret://group/...: which of your groups (default: your only one)."
)


@app.command("set")
def set_(
    ref: str = typer.Argument(..., help="secret://user/NAME, secret://group/NAME, ..."),
    group: str = GROUP,
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Set a secret from stdin (a value, or for transfers and images a JSON/YAML mapping).

    A user secret is yours; a group secret is your group's (any member's runs may use it);
    an organization secret is everyone's, and takes the admin permission.

    **Examples**

        printf '%s' "$NGC_API_KEY" | squall secret set secret://user/NGC_API_KEY
        squall secret set secret://group/S3 --group chem < s3-credentials.json
    """
    if sys.stdin.isatty():
        die("pipe the value on stdin (it is never taken from the command line)")
    value = sys.stdin.buffer.read()
    if not value.strip():
        die("the value on stdin is empty")
    value = value.rstrip(b"\n") if value.count(b"\n") == 1 else value
    backend = _backend(context)
    info = _guard(lambda: backend.set_secret(ref, value, group))
    if output is Format.json:
        print_json({"ref": info.ref, "scope": info.scope, "holder": info.holder})
        return
    holder = f" (group {escape(info.holder)})" if info.scope == "group" else ""
    out.print(f"set {escape(ref)}{holder}")


@app.command("list")
def list_(
    everything: bool = typer.Option(False, "--all", help="Every holder's (admin)."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """List the secrets you may use: yours, your groups', the organization's (names only)."""
    backend = _backend(context)
    found = _guard(lambda: backend.secrets(everything))
    if output is Format.json:
        print_json(
            [
                {"ref": s.ref, "scope": s.scope, "holder": s.holder, "updated_at": s.updated_at}
                for s in found
            ]
        )
        return
    for s in found:
        holder = f"  ({escape(s.scope)} {escape(s.holder)})" if s.holder else ""
        out.print(f"{escape(s.ref)}{holder}")


@app.command()
def delete(
    ref: str = typer.Argument(..., help="The secret to delete."),
    group: str = GROUP,
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Delete a secret."""
    backend = _backend(context)
    _guard(lambda: backend.delete_secret(ref, group))
    if output is Format.json:
        print_json({"deleted": ref})
        return
    out.print(f"deleted {escape(ref)}")
