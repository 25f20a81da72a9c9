"""The states of a run, its jobs and their tasks, the moves allowed between them, and the one
way to make a move: it checks the move, sets the row's state and writes the event that
records it, in the same unit of work. Nothing else in Squall assigns a state.

    run   PENDING > PLACING > PROVISIONING > STAGING > RUNNING > EGRESS > TEARDOWN > FINISHED
          every state before TEARDOWN may go to TEARDOWN, FAILED or CANCELLED; PROVISIONING,
          STAGING and RUNNING back to PLACING (a run that lost its nodes moves: `restart`)
    task  PENDING > STARTING > RUNNING > READY (a service whose probe passed) > FINISHED
          STARTING and RUNNING may go back to PENDING (another attempt); any state that has
          not ended may go to FAILED or CANCELLED; PENDING to SKIPPED
    job   follows its tasks: PENDING > RUNNING or READY > an ended state

A move the table does not allow raises `ForbiddenMove`: it is a defect in Squall, never the
user's doing. Every move's event carries the new state (`Event.state`), so a run's history
can be replayed from its events.

The run loop moves thousands of tasks a second; it collects its moves in a `Moves` and
writes them in one unit of work (one commit per turn of the loop, however many tasks moved).

Every reason and event message written here has the values of the run's secrets masked
(`orchestrator.redaction.scrub`), for the runs this process drives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from .redaction import scrub
from .store import Attempt, Event, Job, Run, RunState, Task, TaskState

__all__ = [
    "JOB_MOVES",
    "RUN_MOVES",
    "TASK_MOVES",
    "ForbiddenMove",
    "Moves",
    "check",
    "move_run",
    "restart",
]

_R, _T = RunState, TaskState
_ENDED_RUN = frozenset({_R.FINISHED, _R.FAILED, _R.CANCELLED})
_STOP = frozenset({_R.TEARDOWN, _R.FAILED, _R.CANCELLED})

RUN_MOVES: Mapping[RunState, frozenset[RunState]] = {
    _R.PENDING: _STOP | {_R.PLACING},
    _R.PLACING: _STOP | {_R.PROVISIONING},
    _R.PROVISIONING: _STOP | {_R.STAGING, _R.PLACING},
    _R.STAGING: _STOP | {_R.RUNNING, _R.PLACING},
    _R.RUNNING: _STOP | {_R.EGRESS, _R.FINISHED, _R.PLACING},
    _R.EGRESS: _STOP | {_R.FINISHED},
    _R.TEARDOWN: _ENDED_RUN,
    _R.FINISHED: frozenset(),
    _R.FAILED: frozenset(),
    _R.CANCELLED: frozenset(),
}

_GIVE_UP = frozenset({_T.FAILED, _T.CANCELLED})
TASK_MOVES: Mapping[TaskState, frozenset[TaskState]] = {
    _T.PENDING: _GIVE_UP | {_T.STARTING, _T.SKIPPED},
    _T.STARTING: _GIVE_UP | {_T.RUNNING, _T.READY, _T.PENDING},
    _T.RUNNING: _GIVE_UP | {_T.READY, _T.FINISHED, _T.PENDING},
    _T.READY: _GIVE_UP | {_T.FINISHED},
    _T.FINISHED: frozenset(),
    _T.FAILED: frozenset(),
    _T.CANCELLED: frozenset(),
    _T.SKIPPED: frozenset(),
}

_JOB_ENDED = frozenset({_T.FINISHED, _T.FAILED, _T.CANCELLED, _T.SKIPPED})
JOB_MOVES: Mapping[TaskState, frozenset[TaskState]] = {
    _T.PENDING: _JOB_ENDED | {_T.RUNNING, _T.READY},
    _T.RUNNING: _JOB_ENDED | {_T.READY},
    _T.READY: _JOB_ENDED,
    _T.STARTING: frozenset(),  # a job is never STARTING: its first task is
    _T.FINISHED: frozenset(),
    _T.FAILED: frozenset(),
    _T.CANCELLED: frozenset(),
    _T.SKIPPED: frozenset(),
}


class ForbiddenMove(RuntimeError):
    """A state change the state machine does not allow: a defect, never the user's doing."""


S = TypeVar("S", RunState, TaskState)


def check(moves: Mapping[S, frozenset[S]], what: str, was: S, to: S) -> None:
    """Raise ForbiddenMove unless `moves` lets `what` go from `was` to `to`."""
    if to not in moves[was]:
        raise ForbiddenMove(f"{what} cannot go from {was.value} to {to.value}")


def _now() -> datetime:
    return datetime.now(UTC)


def move_run(s: Session, run: Run, to: RunState, reason: str = "") -> None:
    """Move `run` (a row of session `s`) to `to`, with its times, reason and event."""
    check(RUN_MOVES, f"run {run.name}", run.state, to)
    reason = scrub(run.id, reason)
    run.state, run.reason = to, reason or run.reason
    if to is RunState.RUNNING and run.started_at is None:
        run.started_at = _now()
    if to in _ENDED_RUN:
        run.finished_at = _now()
    message = to.value + (f": {reason}" if reason else "")
    s.add(Event(run_id=run.id, kind="run", state=to.value, message=message))


def restart(s: Session, run: Run, why: str) -> None:
    """Run `run` moves to another site and starts its DAG over there (what finished here
    may have left its results on the cluster it lost): back to PLACING, and every job and
    task back to PENDING, whatever state it had, with the event that says why. The one way
    a job or task leaves an ended state; their attempts stay, as history."""
    why = scrub(run.id, why)
    move_run(s, run, RunState.PLACING, f"moving: {why}")
    run.reason = ""
    jobs = select(Job.id).where(Job.run_id == run.id).scalar_subquery()
    s.execute(update(Task).where(Task.job_id.in_(jobs)).values(state=TaskState.PENDING))
    s.execute(
        update(Job)
        .where(Job.run_id == run.id)
        .values(state=TaskState.PENDING, reason="", started_at=None, finished_at=None)
    )
    s.add(Event(run_id=run.id, kind="run", message=f"every job starts over: {why}"))


@dataclass(slots=True)
class Moves:
    """Moves of one run's jobs, tasks and attempts, checked as they are made and written by
    `write` in one unit of work: each row's new state, with an event per move. Rows are
    named by id; the caller knows where each one was (the run loop mirrors them)."""

    run_id: str
    tasks: dict[int, TaskState] = field(default_factory=dict)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    new_attempts: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.jobs or self.new_attempts or self.attempts or self.events)

    def task(
        self, task_id: int, subject: str, was: TaskState, to: TaskState, message: str = ""
    ) -> None:
        check(TASK_MOVES, f"task {subject}", was, to)
        self.tasks[task_id] = to
        self.event("task", subject, message or to.value.lower(), to)

    def job(
        self,
        job_id: int,
        name: str,
        was: TaskState,
        to: TaskState,
        reason: str = "",
        **times: datetime,
    ) -> None:
        """Move a job; `times` sets started_at and finished_at."""
        check(JOB_MOVES, f"job {name}", was, to)
        row = self.jobs.setdefault(job_id, {"id": job_id})
        row.update(state=to, **times)
        reason = scrub(self.run_id, reason)
        if reason:
            row["reason"] = reason
        self.event("job", name, reason or to.value.lower(), to)

    def attempt_started(self, task_id: int, number: int, node: str, lease_id: str) -> None:
        self.new_attempts.append(
            {
                "task_id": task_id,
                "number": number,
                "node": node,
                "lease_id": lease_id,
                "state": TaskState.STARTING,
                "started_at": _now(),
            }
        )

    def attempt(self, task_id: int, number: int, **values: Any) -> None:
        """Set columns of an attempt (its agent task id once it runs; how it ended)."""
        if "state" in values or "exit_code" in values:
            values.setdefault("finished_at", _now())
        if values.get("message"):
            values["message"] = scrub(self.run_id, values["message"])
        self.attempts.append({"b_task": task_id, "b_number": number, **values})

    def event(self, kind: str, subject: str, message: str, to: TaskState | None = None) -> None:
        self.events.append(
            {
                "run_id": self.run_id,
                "at": _now(),
                "kind": kind,
                "subject": subject,
                "state": to.value if to else None,
                "message": scrub(self.run_id, message),
            }
        )

    def write(self, s: Session) -> None:
        """Write every move into session `s` (its unit of work commits them together) and
        start afresh."""
        if self.new_attempts:
            s.execute(insert(Attempt), self.new_attempts)
        for columns, rows in _by_keys(self.attempts).items():
            s.connection().execute(
                update(Attempt)
                .where(
                    Attempt.task_id == bindparam("b_task"),
                    Attempt.number == bindparam("b_number"),
                )
                .values({c: bindparam(c) for c in sorted(columns - {"b_task", "b_number"})}),
                rows,
            )
        if self.tasks:
            s.execute(update(Task), [{"id": i, "state": st} for i, st in self.tasks.items()])
        if self.jobs:
            for rows in _by_keys(self.jobs.values()).values():
                s.execute(update(Job), rows)
        if self.events:
            s.execute(insert(Event), self.events)
        self.tasks, self.jobs = {}, {}
        self.new_attempts, self.attempts, self.events = [], [], []


def _by_keys(rows: Any) -> dict[frozenset[str], list[dict[str, Any]]]:
    """Rows grouped by the columns they set: a bulk UPDATE sets the same columns in each."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    return groups
