"""What people and scripts see of runs, read from the store as the typed views of
`orchestrator.view_types` (re-exported here), shared by `squall run`'s live view, `squall
workflow status/list` and the server's API; and `watch`, the one loop that follows a run."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import NotFound
from .store import Attempt, Event, Job, Run, RunState, Store, Task, Transfer
from .view_types import (
    RUN_ENDED_STATES,
    EventView,
    JobView,
    RunListItem,
    RunUpdate,
    RunView,
    TransferView,
)

__all__ = [
    "RUN_ENDED_STATES",
    "EventView",
    "JobView",
    "RunListItem",
    "RunUpdate",
    "RunView",
    "TransferView",
    "find_run",
    "run_events",
    "run_list",
    "run_named",
    "run_summary",
    "watch",
]

WATCH_POLL = 0.25  # seconds between two looks at the store while a run is followed
EVENTS_PER_UPDATE = 1000  # at most, so that an update stays a small message


def run_named(s: Session, name: str) -> Run:
    """The run with the id `name`, else the run called `name`, in session `s` (an id wins: a
    name cannot stand in for another run's id)."""
    run = s.get(Run, name) or s.scalars(select(Run).where(Run.name == name)).first()
    if run is None:
        raise NotFound(f"no run named {name!r}; `squall workflow list` shows them")
    return run


def find_run(store: Store, name: str) -> str:
    """The id of the run called `name` (or with that id)."""
    with store.session() as s:
        return run_named(s, name).id


def run_summary(store: Store, run_id: str) -> RunView:
    """The run with id `run_id`, its jobs and its transfers, as they stand."""
    with store.session() as s:
        run = s.get_one(Run, run_id)
        # counted by the database, not loaded: the live view asks several times a second,
        # while the engine writes, and a job may have thousands of tasks
        states: defaultdict[int, dict[str, int]] = defaultdict(dict)
        for job_id, state, count in s.execute(
            select(Task.job_id, Task.state, func.count())
            .join(Task.job)
            .where(Job.run_id == run_id)
            .group_by(Task.job_id, Task.state)
        ):
            states[job_id][state.value] = count
        attempts: Counter[int] = Counter()
        nodes: defaultdict[int, set[str]] = defaultdict(set)
        for job_id, node, count in s.execute(
            select(Task.job_id, Attempt.node, func.count())
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == run_id)
            .group_by(Task.job_id, Attempt.node)
        ):
            attempts[job_id] += count
            nodes[job_id].add(node)
        jobs = tuple(
            JobView(
                name=job.name,
                kind=job.kind,
                state=job.state.value,
                reason=job.reason,
                tasks=sum(states[job.id].values()),
                task_states=dict(sorted(states[job.id].items())),
                attempts=attempts[job.id],
                nodes=tuple(sorted(nodes[job.id])),
                started_at=job.started_at,
                finished_at=job.finished_at,
            )
            for job in s.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id))
        )
        transfers = tuple(
            TransferView(
                direction=t.direction,
                volume=t.volume,
                source=t.source,
                destination=t.destination,
                state=t.state.value,
                bytes_done=t.bytes_done,
                error=t.error,
            )
            for t in s.scalars(
                select(Transfer).where(Transfer.run_id == run_id).order_by(Transfer.id)
            )
        )
        return RunView(
            id=run.id,
            name=run.name,
            owner=run.owner,
            site=run.site,
            state=run.state.value,
            reason=run.reason,
            placement=run.placement,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            jobs=jobs,
            transfers=transfers,
            cost_usd=run.cost_usd,
            budget_usd=run.budget_usd,
        )


def run_events(
    store: Store, run_id: str, after: int = 0, limit: int = 1000
) -> tuple[EventView, ...]:
    """Events of a run with ids above `after`, oldest first."""
    with store.session() as s:
        rows = s.scalars(
            select(Event)
            .where(Event.run_id == run_id, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        ).all()
        return tuple(
            EventView(
                id=e.id, at=e.at, kind=e.kind, subject=e.subject, message=e.message, state=e.state
            )
            for e in rows
        )


def run_list(store: Store, pattern: str = "*") -> list[RunListItem]:
    """Runs whose name matches the glob `pattern`, newest first."""
    with store.session() as s:
        rows = s.execute(
            select(
                Run.id,
                Run.name,
                Run.owner,
                Run.site,
                Run.state,
                Run.reason,
                Run.created_at,
                Run.cost_usd,
                Run.budget_usd,
            ).order_by(Run.created_at.desc())
        ).all()
    return [
        RunListItem(
            id=r.id,
            name=r.name,
            owner=r.owner,
            site=r.site,
            state=r.state.value,
            reason=r.reason,
            created_at=r.created_at,
            cost_usd=r.cost_usd,
            budget_usd=r.budget_usd,
        )
        for r in rows
        if fnmatch.fnmatchcase(r.name, pattern)
    ]


def watch(
    store: Store,
    run_id: str,
    *,
    owner_done: Callable[[], bool] | None = None,
    interval: float = WATCH_POLL,
) -> Iterator[RunUpdate]:
    """Follow run `run_id`: the run and its new events (from the first), every `interval`
    seconds (at once while events are behind), until the run is over and every event has
    been given; the last update is the run as it ended.

    `owner_done`: for a caller that owns the run in this process (`squall run`): the run is
    over when this says so (its engine has returned, the cluster is down), not when the
    store says it ended; until then a run that has ended in the store is shown as TEARDOWN."""
    after = 0
    while True:
        owner_returned = owner_done() if owner_done is not None else False
        run = run_summary(store, run_id)  # read after the owner returned: its last word
        events = run_events(store, run_id, after, EVENTS_PER_UPDATE)
        if events:
            after = events[-1].id
        over = owner_returned if owner_done is not None else run.ended
        if run.ended and not over:
            run = dataclasses.replace(run, state=RunState.TEARDOWN.value)
        yield run, events
        behind = len(events) == EVENTS_PER_UPDATE
        if over and not behind:
            return
        if not behind:
            time.sleep(interval)
