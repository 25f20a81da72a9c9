"""The live view of a run: a table of its jobs redrawn in place on a terminal, or one line
per event when stdout is not one (CI logs, pipes). Fed by a function that returns the run's
summary and its new events, so the same view serves `squall run` (reading the store) and
`squall workflow status --watch` (reading a server)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from .output import err

if TYPE_CHECKING:
    from rich.console import Group

__all__ = ["TERMINAL", "render", "watch"]

TERMINAL = ("FINISHED", "FAILED", "CANCELLED")
Fetch = Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]

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


def _elapsed(summary: dict[str, Any]) -> str:
    start = summary.get("started_at") or summary.get("created_at")
    if not start:
        return ""
    begin = datetime.fromisoformat(start)
    end = datetime.fromisoformat(summary["finished_at"]) if summary.get("finished_at") else None
    seconds = ((end or datetime.now(UTC)) - begin).total_seconds()
    return f"{seconds:.1f}s"


def _tasks(job: dict[str, Any]) -> str:
    if job["tasks"] == 1:
        return ""
    done = job["task_states"].get("FINISHED", 0)
    running = sum(job["task_states"].get(s, 0) for s in ("RUNNING", "STARTING", "READY"))
    return f"{done}/{job['tasks']} done, {running} running"


def render(summary: dict[str, Any], recent: list[dict[str, Any]]) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = summary["state"]
    head = Text.from_markup(
        f"[bold]{escape(summary['name'])}[/]  [{_COLOUR.get(state, 'bold')}]{state}[/]"
        f"  on {escape(summary['site'] or '?')}  {_elapsed(summary)}"
    )
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("JOB", "STATE", "TASKS", "ATTEMPTS", "REASON"):
        table.add_column(column, overflow="fold")
    for job in summary["jobs"]:
        name = job["name"] + (" (service)" if job["kind"] == "service" else "")
        table.add_row(
            escape(name),
            f"[{_COLOUR.get(job['state'], '')}]{job['state']}[/]",
            _tasks(job),
            str(job["attempts"]),
            escape(job["reason"]),
        )
    lines = [
        Text(
            f"  {e['kind']:<8} {e['subject'] + ': ' if e['subject'] else ''}{e['message']}",
            style="dim",
        )
        for e in recent
    ]
    parts: list[Any] = [head, table, *lines]
    if state in TERMINAL and summary["reason"]:
        parts.append(Text.from_markup(f"[bold]reason[/]: {escape(summary['reason'])}"))
    return Group(*parts)


def _routine(event: dict[str, Any], arrays: set[str]) -> bool:
    """A task of an array that went well: counted in the progress line, not shown."""
    job = event["subject"].partition("[")[0]
    return event["kind"] == "task" and job in arrays and event["message"].endswith("(exit 0)")


def _line(event: dict[str, Any]) -> str:
    at = event["at"][11:19] if event.get("at") else ""
    subject = f"{event['subject']}: " if event["subject"] else ""
    return f"{at} {event['kind']:<8} {subject}{event['message']}"


def watch(fetch: Fetch, *, live: bool, interval: float = 0.25) -> dict[str, Any]:
    """Show the run until it ends; its last summary."""
    recent: deque[dict[str, Any]] = deque(maxlen=6)
    if not live:
        shown: dict[str, str] = {}
        while True:
            summary, new = fetch()
            arrays = {j["name"] for j in summary["jobs"] if j["tasks"] > 1}
            for event in new:
                if _routine(event, arrays):
                    continue
                err.print(escape(_line(event)))
            for job in summary["jobs"]:  # arrays: one progress line when it moved
                progress = _tasks(job)
                if job["name"] in arrays and progress != shown.get(job["name"]):
                    shown[job["name"]] = progress
                    err.print(escape(f"         {'tasks':<8} {job['name']}: {progress}"))
            if summary["state"] in TERMINAL:
                return summary
            time.sleep(max(interval, 1.0))
    from rich.live import Live

    summary, new = fetch()
    recent.extend(new)
    with Live(render(summary, list(recent)), console=err, refresh_per_second=8) as view:
        while summary["state"] not in TERMINAL:
            time.sleep(interval)
            summary, new = fetch()
            recent.extend(new)
            view.update(render(summary, list(recent)))
    return summary
