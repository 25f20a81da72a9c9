"""`squall workflow ...`: validate, upgrade and graph Fuzzfiles."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .output import (
    Format,
    die,
    err,
    escape,
    paint,
    print_diagnostic,
    print_json,
    write_atomic,
)

if TYPE_CHECKING:
    from orchestrator.fuzzfile import LoadResult

app = typer.Typer(
    help=(
        "Check Fuzzfiles (validate, upgrade, graph) and work with runs: start them on a "
        "server, watch, list, read logs, cancel, exec into jobs and forward ports to them."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

OUTPUT = typer.Option(Format.text, "--output", "-o", help="text for people, json for scripts.")


def _summary(result: LoadResult) -> str:
    wf = result.workflow
    assert wf is not None

    def count(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return (
        f"{result.version}, {count(len(wf.jobs), 'job')}, {count(len(wf.services), 'service')}, "
        f"{count(len(wf.volumes), 'volume')}"
    )


@app.command()
def validate(
    files: list[Path] = typer.Argument(
        ..., help="Fuzzfiles, or folders to search for *.yaml, *.yml and *.fz.", show_default=False
    ),
    output: Format = OUTPUT,
    strict: bool = typer.Option(False, "--strict", help="Fail on warnings too."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print warnings."),
) -> None:
    """Check Fuzzfiles and report every problem with its file, line and field.

    Exits 0 when every file is valid, 1 when any has an error (or, with --strict, a
    warning). Each problem names the field path (jobs.NAME.resource.memory.size) and says
    what would be right.

    **Examples**

        squall workflow validate hello.yaml
        squall workflow validate -o json workflows/*.yaml | jq '.files[] | select(.valid|not)'
    """
    from orchestrator.fuzzfile import load_file

    results = [load_file(f) for f in _expand(files)]
    failed = [r for r in results if not r.ok or (strict and r.warnings)]
    if output is Format.json:
        print_json(
            {
                "valid": not failed,
                "files": [
                    {
                        "file": r.file,
                        "valid": r not in failed,
                        "version": r.version,
                        "jobs": sorted(r.workflow.jobs) if r.workflow else None,
                        "services": sorted(r.workflow.services) if r.workflow else None,
                        "errors": [d.to_json() for d in r.errors],
                        "warnings": [d.to_json() for d in r.warnings],
                    }
                    for r in results
                ],
            }
        )
    else:
        for r in results:
            _print_result(r, quiet=quiet)
        if len(results) > 1:
            sys.stdout.write(
                f"{len(results)} files: {len(results) - len(failed)} valid, {len(failed)} invalid\n"
            )
    if failed:
        from orchestrator.errors import Category, exit_code

        raise typer.Exit(exit_code(Category.INVALID))


FUZZFILE_SUFFIXES = (".yaml", ".yml", ".fz")


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the Fuzzfiles under them, sorted."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in FUZZFILE_SUFFIXES)
            if not found:
                die(f"{path} holds no *.yaml, *.yml or *.fz files")
            out.extend(found)
        else:
            out.append(path)
    return out


def _print_result(r: LoadResult, *, quiet: bool) -> None:
    # written with `paint`, not rich: validate's start-up is a goal of its own (issue 13)
    shown = r.errors if quiet else r.diagnostics
    stdout = sys.stdout
    if r.ok:
        warn = (
            f", {len(r.warnings)} warning{'s' if len(r.warnings) != 1 else ''}"
            if r.warnings
            else ""
        )
        stdout.write(f"{paint(stdout, 'valid', 'green')}   {r.file} ({_summary(r)}){warn}\n")
    else:
        n = len(r.errors)
        stdout.write(
            f"{paint(stdout, 'invalid', 'bold red')} {r.file}: {n} error{'s' if n != 1 else ''}\n"
        )
    for d in shown:
        print_diagnostic(d, stdout, indent="  ")


def _load_valid(file: Path) -> LoadResult:
    from orchestrator.fuzzfile import load_file

    result = load_file(file)
    if not result.ok:
        for d in result.errors:
            print_diagnostic(d)
        from orchestrator.errors import Category

        die(f"{file} is not a valid Fuzzfile; fix the errors above first", Category.INVALID)
    return result


@app.command()
def upgrade(
    file: Path = typer.Argument(..., help="A v1 Fuzzfile.", show_default=False),
    out_path: Path | None = typer.Option(
        None, "--out", help="Write the v4 file here instead of to stdout."
    ),
    in_place: bool = typer.Option(False, "--in-place", "-i", help="Replace FILE with its v4 form."),
) -> None:
    """Rewrite a v1 Fuzzfile in v4 syntax, keeping comments and key order.

    Mounts are re-keyed by path, **requires** becomes **depends-on**, v1 volume
    **name** echoes are dropped and simple volume references become **use**. The
    result is checked to load to the same workflow as the input before anything is written.

    **Examples**

        squall workflow upgrade blast.yaml > blast.v4.yaml
        squall workflow upgrade --in-place blast.yaml
    """
    from orchestrator.fuzzfile import load_text
    from orchestrator.fuzzfile.upgrade import UpgradeError, upgrade_text

    if in_place and out_path is not None:
        die("use either --in-place or --out, not both")
    before = _load_valid(file)
    if before.version == "v4":
        err.print(f"{escape(str(file))} is already v4; nothing to do")
        if not in_place:
            typer.echo(file.read_text(encoding="utf-8"), nl=False)
        return
    try:
        text = upgrade_text(file.read_text(encoding="utf-8"))
    except UpgradeError as exc:
        die(f"{file}: {exc}", exc.category)
    after = load_text(text, f"{file} (upgraded)")
    if not after.ok or after.workflow != before.workflow:
        for d in after.errors:
            print_diagnostic(d)
        from orchestrator.errors import Category

        die(
            f"upgrading {file} changed its meaning; nothing was written (please report this)",
            Category.INTERNAL,
        )
    target = file if in_place else out_path
    if target is None:
        typer.echo(text, nl=False)
        return
    write_atomic(target, text)
    err.print(f"wrote {escape(str(target))} (v4)")


@app.command()
def graph(
    file: Path = typer.Argument(..., help="A Fuzzfile.", show_default=False),
    dot: bool = typer.Option(False, "--dot", help="Print Graphviz DOT (pipe to `dot -Tsvg`)."),
    output: Format = OUTPUT,
) -> None:
    """Show the order the jobs and services will run in.

    Stage 1 holds what depends on nothing; every later stage holds what waits only for
    earlier stages, so everything in one stage can run at the same time.

    **Examples**

        squall workflow graph blast.yaml
        squall workflow graph --dot blast.yaml | dot -Tsvg > blast.svg
    """
    from orchestrator.fuzzfile.graph import render_dot, render_text, stages

    result = _load_valid(file)
    wf = result.workflow
    assert wf is not None
    if dot and output is Format.json:
        die("use either --dot or -o json")
    if dot:
        typer.echo(render_dot(wf, title=file.stem), nl=False)
    elif output is Format.json:
        print_json(
            {
                "stages": stages(wf),
                "edges": [
                    {"from": d.name, "to": name, "status": d.status.value}
                    for name, c in wf.containers.items()
                    for d in c.depends_on
                ],
            }
        )
    else:
        typer.echo(render_text(wf), nl=False)


def _register_run_commands() -> None:
    from . import workflow_ops as ops

    app.command("start")(ops.start)
    app.command("status")(ops.status)
    app.command("list")(ops.list_)
    app.command("log")(ops.log)
    app.command("cancel")(ops.cancel)
    app.command("exec")(ops.exec_)
    app.command("port-forward")(ops.port_forward)
    app.command("egress")(ops.egress)


_register_run_commands()
