"""`squall context create|use|list|delete`: which server the CLI talks to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .output import Format, die, escape, out, print_json

__all__ = ["app"]

app = typer.Typer(
    help=(
        "Point the CLI at a Squall server. The built-in context `local` means this machine's "
        "store, with no server."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@app.command()
def create(
    name: str = typer.Argument(..., help="A name for the context."),
    server: str = typer.Option(..., "--server", help="HOST:PORT of the server."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File with the server's token (default: read stdin)."
    ),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", help="CA certificate (PEM) of a TLS server; without it: plaintext."
    ),
    use: bool = typer.Option(True, "--use/--no-use", help="Make it the current context."),
) -> None:
    """Save a server and its token (0600, in ~/.config/squall/contexts.yaml).

    **Examples**

        squall context create lab --server 127.0.0.1:7433 \\
            --token-file "${SQUALL_DATA_DIR:-$HOME/.local/share/squall}/server-token"
        printf "%s" "$TOKEN" | squall context create prod \\
            --server squall.example.org:443 --ca-file ca.pem
    """
    from orchestrator.errors import SquallError

    from .contexts import Context, ContextFile

    token = (token_file.read_text() if token_file else sys.stdin.read()).strip()
    if not token:
        die("no token given (use --token-file, or pipe it on stdin)")
    contexts = ContextFile()
    try:
        contexts.add(
            Context(
                name=name,
                server=server,
                token=token,
                ca_file=str(ca_file.resolve()) if ca_file else "",
            )
        )
        if use:
            contexts.use(name)
    except SquallError as exc:
        die(str(exc), exc.category)
    contexts.save()
    out.print(f"context {escape(name)} -> {escape(server)}" + (" (current)" if use else ""))


@app.command("use")
def use_(name: str = typer.Argument(..., help="A context name, or `local`.")) -> None:
    """Make a context the current one."""
    from orchestrator.errors import SquallError

    from .contexts import ContextFile

    contexts = ContextFile()
    try:
        contexts.use(name)
    except SquallError as exc:
        die(str(exc), exc.category)
    contexts.save()
    out.print(f"using {escape(name)}")


@app.command("list")
def list_(
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """List contexts; the current one is marked (tokens are never shown)."""
    from rich.table import Table

    from .contexts import LOCAL, ContextFile

    contexts = ContextFile()
    rows: list[dict[str, Any]] = [
        {"name": LOCAL, "server": "", "tls": False, "current": contexts.current == LOCAL}
    ]
    rows += [
        {
            "name": c.name,
            "server": c.server,
            "tls": bool(c.ca_file),
            "current": c.name == contexts.current,
        }
        for c in contexts.contexts.values()
    ]
    if output is Format.json:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("", "NAME", "SERVER", "TLS"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            "*" if r["current"] else "",
            escape(r["name"]),
            escape(r["server"]) or "(this machine)",
            "yes" if r["tls"] else "",
        )
    out.print(table)


@app.command()
def delete(name: str = typer.Argument(..., help="The context to forget.")) -> None:
    """Forget a context (the current one falls back to `local`)."""
    from orchestrator.errors import Category

    from .contexts import LOCAL, ContextFile

    contexts = ContextFile()
    if contexts.contexts.pop(name, None) is None:
        die(f"no context {name!r}", Category.NOT_FOUND)
    if contexts.current == name:
        contexts.current = LOCAL
    contexts.save()
    out.print(f"deleted {escape(name)}")
