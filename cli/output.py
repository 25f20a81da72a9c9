"""How the CLI prints: one stdout for data, one stderr console for people, fixed exit codes."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from orchestrator.errors import Category
    from orchestrator.fuzzfile import Diagnostic

__all__ = [
    "EXIT_RUN_FAILED",
    "Format",
    "die",
    "err",
    "print_diagnostic",
    "print_json",
    "write_atomic",
]

# a run that ended FAILED or CANCELLED (not an error of the command: errors exit with their
# category's code, from the one table in orchestrator.errors)
EXIT_RUN_FAILED = 1

# emoji=False: `:name:` in a file's name or a quoted value is text, not an emoji code (and
# printing needs no table of emoji codes, a few ms of every command's start-up)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False)


class Format(StrEnum):
    """`-o` values: text for people, json for scripts."""

    text = "text"
    json = "json"


def print_json(data: Any) -> None:
    """Write `data` as indented JSON on stdout."""
    import json  # imported here: `squall --help` loads this module and needs no JSON

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


_STYLE = {"error": "bold red", "warning": "yellow"}


def print_diagnostic(d: Diagnostic, console: Console = err, indent: str = "") -> None:
    """One diagnostic, `file:line:col: severity: field: message`, then its hint."""
    where = (
        d.file + (f":{d.line}" if d.line else "") + (f":{d.column}" if d.line and d.column else "")
    )
    sev = d.severity.value
    console.print(
        f"{indent}[bold]{escape(where)}[/]: [{_STYLE[sev]}]{sev}[/]: "
        f"[cyan]{escape(d.field)}[/]: {escape(d.message)}"
    )
    if d.hint:
        console.print(f"{indent}    [dim]hint:[/] {escape(d.hint)}")


def die(message: str, category: Category | None = None) -> NoReturn:
    """Print `error: message` on stderr and exit with the code of `category` (by default
    USAGE: the command line is wrong, or a file cannot be read; Typer exits 2 for those too)."""
    from orchestrator.errors import Category, exit_code  # help imports none of Squall's own

    err.print(f"[bold red]error[/]: {escape(message)}")
    raise typer.Exit(exit_code(category or Category.USAGE))


def write_atomic(target: Path, text: str) -> None:
    """Write via a temporary file and rename, so that a crash never leaves half a file."""
    import tempfile

    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        if target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
