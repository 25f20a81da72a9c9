"""`squall stack list|destroy|gc`: the ledger of cloud stacks, and taking them down."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from .output import Format, die, err, escape, out, print_json

if TYPE_CHECKING:
    from orchestrator.provision.stacks import StackDriver

__all__ = ["app"]

app = typer.Typer(
    help=(
        "The cloud stacks Squall made, one per run. A stack is recorded before it is "
        "brought up, and its entry closes only when a destroy succeeded, so nothing a crash "
        "leaves behind is forgotten: **squall stack gc** takes such stacks down."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _driver() -> StackDriver:
    from orchestrator.local_site import LocalSettings, stack_driver

    return stack_driver(LocalSettings())


def _say(line: str) -> None:
    err.print(f"  {escape(line)}", style="dim")


@app.command("list")
def list_(
    everything: bool = typer.Option(False, "--all", help="Also the destroyed ones."),
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """The open stacks (or all of them), with their run and expiry.

    **Examples**

        squall stack list
        squall stack list --all -o json
    """
    from rich.table import Table

    rows = _driver().ledger(everything=everything)
    if output is Format.json:
        print_json(rows)
        return
    if not rows:
        err.print("no open stacks" if not everything else "no stacks")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("STACK", "RUN", "SITE", "STATE", "EXPIRES", "ERROR"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["stack"],
            f"{r['run'] or '(not in this store)'} {r['run_state'] or ''}".strip(),
            r["site"],
            r["state"],
            (r["expires_at"] or "")[:16],
            r["error"],
        )
    out.print(table)


@app.command("destroy")
def destroy(
    run: str = typer.Argument(..., help="A run's name or id, or the stack's name."),
    force: bool = typer.Option(
        False, "--force", help="Destroy it even though its run has not ended."
    ),
) -> None:
    """Destroy one run's stack now and close its ledger entry.

    **Examples**

        squall stack destroy me/train-3
        squall stack destroy squall-0f8fad5b-d9cb-469f-a165-70867728950e
    """
    from orchestrator.errors import Category
    from orchestrator.provision import ProvisionError
    from orchestrator.view_types import RUN_ENDED_STATES

    driver = _driver()
    try:
        name = driver.name_of(run)
    except ProvisionError as exc:
        die(str(exc), exc.category)
    entry = next((r for r in driver.ledger(everything=True) if r["stack"] == name), None)
    if entry and entry["state"] == "DESTROYED":
        err.print(f"{escape(name)} was destroyed already")
        return
    if entry and entry["run_state"] not in (None, *RUN_ENDED_STATES) and not force:
        die(
            f"run {entry['run']} is {entry['run_state']}: cancel it first "
            "(squall workflow cancel), or pass --force",
            Category.CONFLICT,
        )
    try:
        driver.destroy(name, _say)
    except ProvisionError as exc:
        die(str(exc), exc.category)
    out.print(f"destroyed {escape(name)}")


@app.command("gc")
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; change nothing."),
    aws_region: list[str] = typer.Option(
        [],
        "--aws-region",
        help="Also look for Squall-tagged AWS resources here (default: the ledger's regions).",
    ),
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """Destroy every stack whose run has ended (or whose orchestrator died) or whose expiry
    has passed, then report cloud resources tagged with a Squall run that no open ledger
    entry explains (reported, never deleted).

    Runs whose orchestrator died are failed first, as `squall run` does at start.

    **Examples**

        squall stack gc --dry-run
        squall stack gc -o json
    """
    from orchestrator.errors import Category, exit_code
    from orchestrator.local_site import LocalSettings, stack_driver
    from orchestrator.provision import ProvisionError

    from .run_cmd import start_local_engine

    engine = start_local_engine(1, None, [], [])  # fails runs whose orchestrator died
    driver = stack_driver(LocalSettings(), engine.store)
    stale = driver.stale()
    destroyed, failed = [], []
    for name in stale:
        if dry_run:
            continue
        err.print(f"destroying {escape(name)}")
        try:
            driver.destroy(name, _say)
            destroyed.append(name)
        except ProvisionError as exc:
            failed.append({"stack": name, "error": str(exc)})
            err.print(f"[bold red]error[/]: {escape(str(exc))}")
    report = _orphans(driver, aws_region)
    result: dict[str, Any] = {
        "stale": stale,
        "destroyed": destroyed,
        "failed": failed,
        "dry_run": dry_run,
        **report,
    }
    if output is Format.json:
        print_json(result)
    else:
        verb = "would destroy" if dry_run else "destroyed"
        shown = stale if dry_run else destroyed
        out.print(f"{verb} {len(shown)} stack(s){': ' + ', '.join(shown) if shown else ''}")
        for o in report["orphans"]:
            out.print(
                f"[yellow]untracked[/] {o['cloud']}:{o['region']} {escape(o['resource'])} "
                f"(squall-run={o['run_id']})"
            )
        for line in report["not_checked"]:
            out.print(f"not checked: {escape(line)}")
    if failed:
        raise typer.Exit(exit_code(Category.PROVISION))  # a stack could not be destroyed


def _orphans(driver: StackDriver, regions: list[str]) -> dict[str, Any]:
    """Tagged resources no open entry explains, where Squall can look."""
    import os

    from orchestrator.provision.orphans import aws_orphans

    ledger = driver.ledger(everything=True)
    explained = {r["stack"].removeprefix("squall-") for r in ledger if r["state"] != "DESTROYED"}
    aws = set(regions) | {
        r["site"].split(":", 1)[1] for r in ledger if r["site"].startswith("aws:")
    }
    not_checked = []
    orphans: list[dict[str, str]] = []
    if aws:
        try:
            orphans = [
                {"cloud": o.cloud, "region": o.region, "resource": o.resource, "run_id": o.run_id}
                for o in aws_orphans(
                    aws, explained, endpoint_url=os.environ.get("SQUALL_AWS_ENDPOINT")
                )
            ]
        except Exception as exc:  # botocore: no credentials, access denied, no network
            not_checked.append(f"aws ({', '.join(sorted(aws))}): {type(exc).__name__}: {exc}")
    for cloud in ("gcp", "azure"):
        if any(r["site"].startswith(f"{cloud}:") for r in ledger):
            not_checked.append(f"{cloud}: Squall has no inventory client for it yet")
    return {"orphans": orphans, "not_checked": not_checked}
