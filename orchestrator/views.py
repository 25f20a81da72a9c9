"""What people and scripts see of runs: plain, JSON-ready dictionaries read from the store,
shared by `squall run`'s live view, `squall workflow status/list` and the server's API."""

from __future__ import annotations

import fnmatch
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import NotFound
from .store import Attempt, Event, Job, Run, Store, Task, Transfer

__all__ = ["find_run", "run_events", "run_list", "run_named", "run_summary"]


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def run_named(s: Session, name: str) -> Run:
    """The run called `name` (or with that id), in session `s`."""
    run = s.scalars(select(Run).where((Run.name == name) | (Run.id == name))).first()
    if run is None:
        raise NotFound(f"no run named {name!r}; `squall workflow list` shows them")
    return run


def find_run(store: Store, name: str) -> str:
    """The id of the run called `name` (or with that id)."""
    with store.session() as s:
        return run_named(s, name).id


def run_summary(store: Store, run_id: str) -> dict[str, Any]:
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
        jobs = [
            {
                "name": job.name,
                "kind": job.kind,
                "state": job.state.value,
                "reason": job.reason,
                "tasks": sum(states[job.id].values()),
                "task_states": dict(sorted(states[job.id].items())),
                "attempts": attempts[job.id],
                "nodes": sorted(nodes[job.id]),
                "started_at": _iso(job.started_at),
                "finished_at": _iso(job.finished_at),
            }
            for job in s.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id))
        ]
        transfers = [
            {
                "direction": t.direction,
                "volume": t.volume,
                "source": t.source,
                "destination": t.destination,
                "state": t.state.value,
                "bytes_done": t.bytes_done,
                "error": t.error,
            }
            for t in s.scalars(
                select(Transfer).where(Transfer.run_id == run_id).order_by(Transfer.id)
            )
        ]
        return {
            "id": run.id,
            "name": run.name,
            "owner": run.owner,
            "site": run.site,
            "state": run.state.value,
            "reason": run.reason,
            "placement": run.placement,
            "created_at": _iso(run.created_at),
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "jobs": jobs,
            "transfers": transfers,
        }


def run_events(
    store: Store, run_id: str, after: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    """Events of a run with ids above `after`, oldest first."""
    with store.session() as s:
        rows = s.scalars(
            select(Event)
            .where(Event.run_id == run_id, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        ).all()
        return [
            {
                "id": e.id,
                "at": _iso(e.at),
                "kind": e.kind,
                "subject": e.subject,
                "message": e.message,
            }
            for e in rows
        ]


def run_list(store: Store, pattern: str = "*") -> list[dict[str, Any]]:
    """Runs whose name matches the glob `pattern`, newest first."""
    with store.session() as s:
        rows = s.execute(
            select(
                Run.id, Run.name, Run.owner, Run.site, Run.state, Run.reason, Run.created_at
            ).order_by(Run.created_at.desc())
        ).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "owner": r.owner,
            "site": r.site,
            "state": r.state.value,
            "reason": r.reason,
            "created_at": _iso(r.created_at),
        }
        for r in rows
        if fnmatch.fnmatchcase(r.name, pattern)
    ]
