"""The line-per-event view (stdout not a terminal): what a person needs, not every move. A
task's own start is said by its job's events; an array's tasks that went well are counted in
its progress line; failures and job moves are shown."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cli import live
from orchestrator.view_types import EventView, JobView, RunView

AT = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def job(name: str, tasks: int, state: str = "FINISHED") -> JobView:
    return JobView(name, "job", state, "", tasks, {state: tasks}, tasks, ("node-0",), AT, AT)


def test_the_line_view_shows_jobs_and_failures_and_hides_routine_task_moves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [
        EventView(1, AT, "job", "one", "running", "RUNNING"),
        EventView(2, AT, "task", "one[0]", "attempt 1 on node-0", "STARTING"),
        EventView(3, AT, "task", "one[0]", "running", "RUNNING"),
        EventView(4, AT, "task", "one[0]", "attempt 1: exited (exit 0)", "FINISHED"),
        EventView(5, AT, "task", "arr[1]", "attempt 1 on node-0", "STARTING"),
        EventView(6, AT, "task", "arr[1]", "attempt 1: exited (exit 0)", "FINISHED"),
        EventView(7, AT, "task", "arr[2]", "attempt 1: exited (exit 3)", "FAILED"),
        EventView(8, AT, "job", "arr", "task 2 failed (exit 3)", "FAILED"),
    ]
    run = RunView(
        "id", "me/run", "me", "local", "FAILED", "failed: arr[2]", None, AT, AT, AT,
        (job("one", 1), job("arr", 2, "FAILED")), (),
    )  # fmt: skip
    live.watch([(run, tuple(events))], live=False)
    shown = capsys.readouterr().err
    assert "one: running" in shown
    assert "one[0]: attempt 1: exited (exit 0)" in shown  # a job's one task: its outcome
    assert "arr[2]: attempt 1: exited (exit 3)" in shown
    assert "arr: task 2 failed (exit 3)" in shown
    for hidden in ("attempt 1 on node-0", "one[0]: running", "arr[1]"):
        assert hidden not in shown
