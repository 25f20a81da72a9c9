"""`squall schedule ...`: workflows on a cron, each firing at the cheapest site and moment;
and `squall scheduler`, which fires them where no server runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .output import Format, die, err, escape, out, print_json
from .workflow_ops import CONTEXT, OUTPUT, _backend, _guard, read_fuzzfile

if TYPE_CHECKING:
    from orchestrator.view_types import ScheduleView

__all__ = ["app", "scheduler"]

app = typer.Typer(
    help=(
        "Run a workflow on a cron, each firing at the cheapest site and moment. "
        "A firing may wait within its **--window** for a cheaper moment (spot prices by "
        "hour of day, this machine busy until its runs end), runs under the schedule's "
        "**--budget** and **--policy**, and records why it chose its moment and site. "
        "Moments missed while no scheduler ran: only the latest still starts, and only "
        "inside its window. A firing never starts while the schedule's previous run is live. "
        "Schedules are fired by `squall server`, or by `squall scheduler` where none runs."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _duration(text: str) -> float:
    from orchestrator.fuzzfile.units import parse_duration

    try:
        return parse_duration(text)
    except (ValueError, TypeError) as exc:
        die(f"--window {text!r}: {exc}")


def _show(view: ScheduleView) -> None:
    from federate.spend import usd

    state = "[yellow]paused[/]" if view.paused else f"next {view.next_at:%Y-%m-%d %H:%M} UTC"
    out.print(f"[bold]{escape(view.name)}[/]  {escape(view.cron)} ({escape(view.cron_text)}, UTC)")
    out.print(f"  {state}; owner {escape(view.owner)}")
    details = [f"window {_window(view.window_seconds)}"]
    if view.budget_usd is not None:
        details.append(f"budget {usd(view.budget_usd)} a run")
    if view.policy:
        details.append("a policy of its own (`-o json` shows it)")
    out.print("  " + ", ".join(details))
    if view.firings:
        out.print("  firings, newest first:")
    for f in view.firings:
        start = f" at {f.start_at:%H:%M}" if f.start_at else ""
        where = f" on {escape(f.site)}" if f.site else ""
        cost = f", est. {usd(f.estimate_usd)}" if f.estimate_usd is not None else ""
        run = f"  {escape(f.run_name)}" if f.run_name else ""
        out.print(f"  {f.due_at:%Y-%m-%d %H:%M}  [bold]{f.state}[/]{start}{where}{cost}{run}")
        out.print(f"      {escape(f.reason)}", style="dim")


def _window(seconds: float) -> str:
    if not seconds:
        return "none"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m"


@app.command("create")
def create(
    name: str = typer.Argument(
        ...,
        help="A unique name (letters, digits, . _ / -; at most 128), e.g. me/nightly; its "
        "runs are NAME-YYYYMMDD-HHMM.",
    ),
    file: Path = typer.Argument(..., help="The Fuzzfile.", show_default=False),
    cron: str = typer.Option(
        ..., "--cron", help="Five fields, minute hour day month weekday, in UTC: '0 2 * * *'."
    ),
    window: str = typer.Option(
        "0",
        "--window",
        metavar="DURATION",
        help="How long after its moment a firing may start, waiting for a cheaper one "
        "(e.g. 6h, 90m; at most 7 days). Default: none, start at the moment.",
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        min=0.01,
        metavar="USD",
        help="Each run's budget: dearer sites are not chosen, and a run is stopped when it "
        "has spent it.",
    ),
    policy: Path | None = typer.Option(
        None,
        "--policy",
        help="A policy file (allowed sites, residency, spot, budgets) for its runs. It is "
        "sent with the schedule and can only narrow the policy of the machine that fires it "
        "($SQUALL_POLICY there): allow-lists intersect, budgets take the smaller.",
    ),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Create a schedule; it first fires at the next moment of its cron.

    **Examples**

        squall schedule create me/nightly examples/pipeline.yaml --cron '0 2 * * *'

        squall schedule create me/cheap examples/pipeline.yaml --cron '0 1 * * *' --window 5h

        squall schedule create me/capped examples/pipeline.yaml --cron '30 6 * * 1-5' --budget 20
    """
    from api.squall.v1 import control_pb2 as pb

    text = read_fuzzfile(file)
    try:
        rules = policy.read_text() if policy else ""
    except (OSError, UnicodeDecodeError) as exc:
        die(f"--policy {policy}: {exc}")
    request = pb.CreateScheduleRequest(
        name=name,
        fuzzfile=text,
        cron=cron,
        window_seconds=_duration(window),
        budget_usd=budget,
        policy=rules,
    )
    backend = _backend(context)
    view = _guard(lambda: backend.create_schedule(request))
    if output is Format.json:
        print_json(view.to_json())
    else:
        _show(view)


@app.command("list")
def list_(output: Format = OUTPUT, context: str | None = CONTEXT) -> None:
    """The schedules, with their next moment."""
    from rich.table import Table

    from federate.spend import usd

    backend = _backend(context)
    views = _guard(backend.schedules)
    if output is Format.json:
        print_json([v.to_json() for v in views])
        return
    if not views:
        err.print("no schedules: `squall schedule create --help` makes one")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "CRON (UTC)", "NEXT", "WINDOW", "BUDGET", "OWNER"):
        table.add_column(column, overflow="fold")
    for v in views:
        table.add_row(
            escape(v.name),
            escape(v.cron),
            "paused" if v.paused else f"{v.next_at:%Y-%m-%d %H:%M}",
            _window(v.window_seconds),
            usd(v.budget_usd) if v.budget_usd is not None else "",
            escape(v.owner),
        )
    out.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="The schedule's name."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """A schedule and its latest firings: when each started, where, for what estimate, and
    why (or why it did not)."""
    backend = _backend(context)
    view = _guard(lambda: backend.schedule(name))
    if output is Format.json:
        print_json(view.to_json())
    else:
        _show(view)


def _pause(name: str, paused: bool, output: Format, context: str | None) -> None:
    backend = _backend(context)
    view = _guard(lambda: backend.pause_schedule(name, paused))
    if output is Format.json:
        print_json(view.to_json())
    else:
        _show(view)


@app.command("pause")
def pause(
    name: str = typer.Argument(..., help="The schedule's name."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Stop firing; a firing waiting for its moment is skipped."""
    _pause(name, True, output, context)


@app.command("resume")
def resume(
    name: str = typer.Argument(..., help="The schedule's name."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Fire again, from the next moment on (the moments while paused are not made up)."""
    _pause(name, False, output, context)


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The schedule's name."), context: str | None = CONTEXT
) -> None:
    """Forget a schedule and its firings; the runs it started stay."""
    backend = _backend(context)
    _guard(lambda: backend.delete_schedule(name))
    err.print(f"deleted schedule {escape(name)}")


def scheduler(
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes per local cluster, as `run`."),
    every: float = typer.Option(
        30.0, "--every", min=1.0, metavar="SECONDS", help="How often to look at the schedules."
    ),
) -> None:
    """Fire this machine's schedules (for a machine without `squall server`), until Ctrl-C.

    Runs the firings' workflows in this process, as `squall run` would; on SIGTERM or
    Ctrl-C, the runs it started are cancelled and their clusters taken down before it
    exits. Settings as `squall run` ($SQUALL_POLICY, $SQUALL_SITES, $SQUALL_CATALOG) and
    $SQUALL_SPOT_HISTORY (observed spot prices, CSV: cloud,region,instance,at,usd_per_hour).
    """
    import logging
    import signal
    import threading

    from orchestrator.errors import SquallError
    from orchestrator.local_site import local_scheduler
    from orchestrator.run_threads import RunThreads

    from .run_cmd import start_local_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        engine = start_local_engine(nodes, None, [], [])
        runs = RunThreads(engine)
        fires = local_scheduler(engine, runs, nodes)
    except SquallError as exc:
        die(str(exc), exc.category)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"firing the schedules of {escape(str(engine.data_dir))} every {every:g} s")
    fires.run(stop, every)
    err.print("stopping: cancelling the runs this scheduler started...")
    runs.shutdown()
