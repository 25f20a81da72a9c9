"""How the CLI prints: one stdout for data, one stderr console for people, fixed exit codes."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator.errors import Category
    from orchestrator.fuzzfile import Diagnostic

__all__ = [
    "EXIT_RUN_FAILED",
    "Format",
    "LazyConsole",
    "die",
    "err",
    "escape",
    "out",
    "paint",
    "print_diagnostic",
    "print_json",
    "write_atomic",
]

# a run that ended FAILED or CANCELLED (not an error of the command: errors exit with their
# category's code, from the one table in orchestrator.errors)
EXIT_RUN_FAILED = 1


class LazyConsole:
    """A rich Console made when something is first printed through it: a command that
    prints only with `paint` (`squall workflow validate`) never imports rich, about 15 ms
    of its start-up."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # emoji=False: `:name:` in a file's name or a quoted value is text, not an
            # emoji code (and printing needs no table of emoji codes)
            self._console = Console(
                stderr=self._stderr, highlight=False, soft_wrap=True, emoji=False
            )
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        """rich's `Console.print`: markup (`[bold]...[/]`) and renderables."""
        self.console.print(*objects, **options)


err = LazyConsole(stderr=True)
out = LazyConsole(stderr=False)


def escape(text: str) -> str:
    """`text` with rich's markup characters escaped, to print literally through `err`/`out`."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# ANSI select graphic rendition codes of the styles `paint` knows
_SGR = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


def paint(stream: TextIO, text: str, style: str) -> str:
    """`text` in `style` (words of _SGR: "bold red") where `stream` is a terminal that
    takes colour (not under NO_COLOR or TERM=dumb, as rich decides), else `text` alone."""
    if (
        os.environ.get("NO_COLOR")
        or os.environ.get("TERM") == "dumb"
        or not (stream.isatty() or os.environ.get("FORCE_COLOR"))
    ):
        return text
    codes = ";".join(_SGR[word] for word in style.split())
    return f"\x1b[{codes}m{text}\x1b[0m"


class Format(StrEnum):
    """`-o` values: text for people, json for scripts."""

    text = "text"
    json = "json"


def print_json(data: Any) -> None:
    """Write `data` as indented JSON on stdout."""
    import json  # imported here: `squall --help` loads this module and needs no JSON

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


_STYLE = {"error": "bold red", "warning": "yellow"}


def print_diagnostic(d: Diagnostic, stream: TextIO | None = None, indent: str = "") -> None:
    """One diagnostic, `file:line:col: severity: field: message`, then its hint (on stderr
    unless `stream` is given)."""
    stream = stream or sys.stderr
    where = (
        d.file + (f":{d.line}" if d.line else "") + (f":{d.column}" if d.line and d.column else "")
    )
    sev = d.severity.value
    line = (
        f"{indent}{paint(stream, where, 'bold')}: {paint(stream, sev, _STYLE[sev])}: "
        f"{paint(stream, d.field, 'cyan')}: {d.message}\n"
    )
    if d.hint:
        line += f"{indent}    {paint(stream, 'hint:', 'dim')} {d.hint}\n"
    stream.write(line)


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
