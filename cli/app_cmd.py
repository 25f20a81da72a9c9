"""`squall app ...`: render application catalog templates into Fuzzfiles."""

from __future__ import annotations

from pathlib import Path

import typer

from .output import die, err, escape, print_diagnostic, write_atomic

app = typer.Typer(
    help="Render application templates (Go-templated Fuzzfiles with a values.yaml).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@app.command()
def render(
    template: Path = typer.Argument(
        ...,
        help="template.yaml, or an application folder holding template.yaml and values.yaml.",
        show_default=False,
    ),
    values: Path | None = typer.Argument(
        None, help="values.yaml (default: beside the template).", show_default=False
    ),
    settings: list[str] = typer.Option(
        [], "--set", "-s", help="Override a value: NAME=VALUE (repeatable)."
    ),
    out_path: Path | None = typer.Option(None, "--out", help="Write the Fuzzfile here."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed randInt, for reproducible output (ports, names)."
    ),
    check: bool = typer.Option(
        True, "--validate/--no-validate", help="Validate the rendered Fuzzfile before writing it."
    ),
) -> None:
    """Render a catalog application into a Fuzzfile.

    Supports the Go template syntax and sprig functions the Fuzzball catalog uses (if/else,
    range, variables, printf, trim, splitList, default, fail, ...). When the template
    refuses its values with **fail**, its message is shown and nothing is written. The
    rendered Fuzzfile is validated unless --no-validate is given.

    **Examples**

        squall app render applications/jupyter
        squall app render template.yaml values.yaml --set Cores=8 --out jupyter.yaml
    """
    from orchestrator.errors import Category, SquallError
    from orchestrator.fuzzfile import load_text
    from orchestrator.fuzzfile.apps import render_app

    if template.is_dir():
        values = values or template / "values.yaml"
        template = template / "template.yaml"
    elif values is None and (template.parent / "values.yaml").exists():
        values = template.parent / "values.yaml"
    try:
        text = render_app(template, values, settings, seed=seed)
    except SquallError as exc:
        die(str(exc), exc.category)
    if check:
        result = load_text(text, f"{template} (rendered)")
        for d in result.diagnostics:
            print_diagnostic(d)
        if not result.ok:
            die(
                "the rendered Fuzzfile is invalid; nothing was written "
                "(--no-validate prints it anyway)",
                Category.INVALID,
            )
    if out_path is None:
        typer.echo(text, nl=False)
    else:
        write_atomic(out_path, text)
        err.print(f"wrote {escape(str(out_path))}")
