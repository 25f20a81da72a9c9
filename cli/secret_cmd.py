"""`squall secret set|list|delete`: the values behind `secret://user/NAME` references."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from .output import Format, die, escape, out, print_json

if TYPE_CHECKING:
    from orchestrator.secrets import SecretStore

__all__ = ["app"]

app = typer.Typer(
    help=(
        "Store the secrets Fuzzfiles refer to as secret://user/NAME or secret://group/NAME "
        "(kept 0600 in the data directory; never printed, logged or recorded in runs)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _store() -> SecretStore:
    from orchestrator.local_site import LocalSettings
    from orchestrator.secrets import SecretStore

    return SecretStore(LocalSettings().data_dir / "secrets")


@app.command("set")
def set_(ref: str = typer.Argument(..., help="secret://user/NAME or secret://group/NAME.")) -> None:
    """Set a secret from stdin (a value, or for transfers a JSON/YAML mapping).

    **Examples**

        printf '%s' "$NGC_API_KEY" | squall secret set secret://user/NGC_API_KEY
        squall secret set secret://user/S3 < s3-credentials.json
    """
    from orchestrator.errors import SquallError

    if sys.stdin.isatty():
        die("pipe the value on stdin (it is never taken from the command line)")
    value = sys.stdin.buffer.read()
    if not value.strip():
        die("the value on stdin is empty")
    try:
        _store().set(ref, value.rstrip(b"\n") if value.count(b"\n") == 1 else value)
    except SquallError as exc:
        die(str(exc), exc.category)
    out.print(f"set {escape(ref)}")


@app.command("list")
def list_(
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """List the secrets that are set (names only)."""
    refs = _store().list()
    if output is Format.json:
        print_json(refs)
    else:
        for ref in refs:
            out.print(escape(ref))


@app.command()
def delete(ref: str = typer.Argument(..., help="The secret to delete.")) -> None:
    """Delete a secret."""
    from orchestrator.errors import Category, SquallError

    try:
        found = _store().delete(ref)
    except SquallError as exc:
        die(str(exc), exc.category)
    if not found:
        die(f"{ref} is not set", Category.NOT_FOUND)
    out.print(f"deleted {escape(ref)}")
