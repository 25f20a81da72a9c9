"""The live view of a run: a table of its jobs redrawn in place on a terminal, or one line
per event when stdout is not one (CI logs, pipes). Fed by the updates of one watch loop
(`orchestrator.views.watch`: the run and its new events, until it ends), read from the store
(`squall run`, local `status --watch`) or streamed by a server."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .output import err, escape

if TYPE_CHECKING:
    from rich.console import Group

    from orchestrator.view_types import EventView, JobView, RunListItem, RunUpdate, RunView

__all__ = ["money", "render", "watch"]

PROGRESS_EVERY = 1.0  # seconds: the line view's progress lines of task arrays, at most

_COLOUR = {
    "FINISHED": "green",
    "READY": "cyan",
    "RUNNING": "cyan",
    "STARTING": "cyan",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
    "SKIPPED": "yellow",
    "PENDING": "dim",
}


def _elapsed(run: RunView) -> str:
    begin = run.started_at or run.created_at
    seconds = ((run.finished_at or datetime.now(UTC)) - begin).total_seconds()
    return f"{seconds:.1f}s"


def _tasks(job: JobView) -> str:
    if job.tasks == 1:
        return ""
    done = job.task_states.get("FINISHED", 0)
    running = sum(job.task_states.get(s, 0) for s in ("RUNNING", "STARTING", "READY"))
    return f"{done}/{job.tasks} done, {running} running"


def money(run: RunView | RunListItem) -> str:
    """What the run has spent, against its budget and (placed) its estimate: `$0.42 of
    $1.00 (est. $0.80)`."""
    from federate.spend import usd

    text = usd(run.cost_usd)
    if run.budget_usd is not None:
        text += f" of {usd(run.budget_usd)}"
    estimate = ((getattr(run, "placement", None) or {}).get("estimate") or {}).get("total_usd")
    if estimate is not None:
        text += f" (est. {usd(estimate)})"
    return text


def render(run: RunView, recent: Sequence[EventView]) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = run.state
    head = Text.from_markup(
        f"[bold]{escape(run.name)}[/]  [{_COLOUR.get(state, 'bold')}]{state}[/]"
        f"  on {escape(run.site or '?')}  {_elapsed(run)}  {escape(money(run))}"
    )
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("JOB", "STATE", "TASKS", "ATTEMPTS", "REASON"):
        table.add_column(column, overflow="fold")
    for job in run.jobs:
        name = job.name + (" (service)" if job.kind == "service" else "")
        table.add_row(
            escape(name),
            f"[{_COLOUR.get(job.state, '')}]{job.state}[/]",
            _tasks(job),
            str(job.attempts),
            escape(job.reason),
        )
    lines = [
        Text(f"  {e.kind:<8} {e.subject + ': ' if e.subject else ''}{e.message}", style="dim")
        for e in recent
    ]
    parts: list[Any] = [head, table, *lines]
    if run.ended and run.reason:
        parts.append(Text.from_markup(f"[bold]reason[/]: {escape(run.reason)}"))
    return Group(*parts)


def _routine(event: EventView, arrays: set[str]) -> bool:
    """Not shown line by line: a task starting or running (its job's own events say so),
    and a task of an array that went well (counted in the progress line)."""
    if event.kind != "task":
        return False
    if event.state in ("STARTING", "RUNNING"):
        return True
    return event.state == "FINISHED" and event.subject.partition("[")[0] in arrays


def _line(event: EventView) -> str:
    subject = f"{event.subject}: " if event.subject else ""
    return f"{event.at:%H:%M:%S} {event.kind:<8} {subject}{event.message}"


def watch(updates: Iterable[RunUpdate], *, live: bool) -> RunView:
    """Show the run as `updates` come, until they end; the run as last seen."""
    if live:
        return _live(iter(updates))
    shown: dict[str, str] = {}
    progressed = 0.0
    last: RunView | None = None
    for last, new in updates:
        arrays = {j.name for j in last.jobs if j.tasks > 1}
        for event in new:
            if not _routine(event, arrays):
                err.print(escape(_line(event)))
        if time.monotonic() - progressed < PROGRESS_EVERY and not last.ended:
            continue
        progressed = time.monotonic()
        for job in last.jobs:  # arrays: one progress line when it moved
            progress = _tasks(job)
            if job.name in arrays and progress != shown.get(job.name):
                shown[job.name] = progress
                err.print(escape(f"         {'tasks':<8} {job.name}: {progress}"))
    if last is None:
        raise RuntimeError("the watch ended before its first update")
    return last


def _live(updates: Iterator[RunUpdate]) -> RunView:
    from rich.live import Live

    recent: deque[EventView] = deque(maxlen=6)
    first = next(updates, None)
    if first is None:
        raise RuntimeError("the watch ended before its first update")
    run, new = first
    recent.extend(new)
    with Live(render(run, recent), console=err.console, refresh_per_second=8) as view:
        for run, new in updates:
            recent.extend(new)
            view.update(render(run, recent))
    return run
