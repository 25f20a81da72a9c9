"""What people and scripts see of runs, as typed, frozen values: a run (`RunView`, with its
`JobView`s and `TransferView`s), a line of the run list (`RunListItem`) and an event
(`EventView`).

`orchestrator.views` reads them from the store. The server sends them as the control API's
messages (`to_message`) and the CLI's remote backend reads them back (`from_message`), so
that both backends hand the same values to the live view and to `-o json` (`to_json`).
Times are aware datetimes in UTC; in JSON and on the wire, ISO 8601 text.

Apart from the store on purpose: the CLI's remote commands use these without loading a
database library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar

from api.squall.v1 import control_pb2 as pb

__all__ = [
    "RUN_ENDED_STATES",
    "EventView",
    "FiringView",
    "JobView",
    "RunListItem",
    "RunUpdate",
    "RunView",
    "ScheduleView",
    "TransferView",
]

# The names of `store.RUN_ENDED` (nothing more happens to such a run), without loading the store.
RUN_ENDED_STATES = frozenset({"FINISHED", "FAILED", "CANCELLED"})


def _json(value: Any) -> Any:
    if isinstance(value, _View):
        return value.to_json()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    return value


class _View:
    """What the views share: their JSON form."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """As `-o json` prints it: the fields in their declared order, times in ISO 8601."""
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}


def _text(t: datetime | None) -> str:
    return t.isoformat() if t is not None else ""


def _time(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class JobView(_View):
    """A job of a run, and how its tasks stand (`task_states`: state name -> tasks)."""

    name: str
    kind: str  # job or service
    state: str
    reason: str
    tasks: int
    task_states: Mapping[str, int]
    attempts: int
    nodes: tuple[str, ...]
    started_at: datetime | None
    finished_at: datetime | None

    def to_message(self) -> pb.JobStatus:
        return pb.JobStatus(
            name=self.name,
            kind=self.kind,
            state=self.state,
            reason=self.reason,
            tasks=self.tasks,
            task_states=self.task_states,
            attempts=self.attempts,
            nodes=self.nodes,
            started_at=_text(self.started_at),
            finished_at=_text(self.finished_at),
        )

    @classmethod
    def from_message(cls, m: pb.JobStatus) -> JobView:
        return cls(
            name=m.name,
            kind=m.kind,
            state=m.state,
            reason=m.reason,
            tasks=m.tasks,
            task_states=dict(sorted(m.task_states.items())),
            attempts=m.attempts,
            nodes=tuple(m.nodes),
            started_at=_time(m.started_at),
            finished_at=_time(m.finished_at),
        )


@dataclass(frozen=True)
class TransferView(_View):
    """An ingress or egress of one of the run's volumes."""

    direction: str  # ingress or egress
    volume: str
    source: str
    destination: str
    state: str
    bytes_done: int
    error: str

    def to_message(self) -> pb.TransferStatus:
        return pb.TransferStatus(
            direction=self.direction,
            volume=self.volume,
            source=self.source,
            destination=self.destination,
            state=self.state,
            bytes_done=self.bytes_done,
            error=self.error,
        )

    @classmethod
    def from_message(cls, m: pb.TransferStatus) -> TransferView:
        return cls(
            direction=m.direction,
            volume=m.volume,
            source=m.source,
            destination=m.destination,
            state=m.state,
            bytes_done=m.bytes_done,
            error=m.error,
        )


@dataclass(frozen=True)
class RunView(_View):
    """A run: where it runs, how it stands, its jobs and transfers. `placement` is
    federation's record of the choice (None until placed)."""

    id: str
    name: str
    owner: str
    site: str
    state: str
    reason: str
    placement: Mapping[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    jobs: tuple[JobView, ...]
    transfers: tuple[TransferView, ...]
    cost_usd: float = 0.0  # spent so far
    budget_usd: float | None = None

    @property
    def ended(self) -> bool:
        """Whether nothing more will happen to the run."""
        return self.state in RUN_ENDED_STATES

    def to_message(self) -> pb.Workflow:
        # JSON text, not a Struct: a Struct would turn the record's whole numbers into floats
        placement = json.dumps(self.placement) if self.placement is not None else ""
        return pb.Workflow(
            id=self.id,
            name=self.name,
            owner=self.owner,
            site=self.site,
            state=self.state,
            reason=self.reason,
            placement_json=placement,
            created_at=_text(self.created_at),
            started_at=_text(self.started_at),
            finished_at=_text(self.finished_at),
            jobs=[j.to_message() for j in self.jobs],
            transfers=[t.to_message() for t in self.transfers],
            cost_usd=self.cost_usd,
            budget_usd=self.budget_usd,
        )

    @classmethod
    def from_message(cls, m: pb.Workflow) -> RunView:
        return cls(
            id=m.id,
            name=m.name,
            owner=m.owner,
            site=m.site,
            state=m.state,
            reason=m.reason,
            placement=json.loads(m.placement_json) if m.placement_json else None,
            created_at=datetime.fromisoformat(m.created_at),
            started_at=_time(m.started_at),
            finished_at=_time(m.finished_at),
            jobs=tuple(JobView.from_message(j) for j in m.jobs),
            transfers=tuple(TransferView.from_message(t) for t in m.transfers),
            cost_usd=m.cost_usd,
            budget_usd=m.budget_usd if m.HasField("budget_usd") else None,
        )


@dataclass(frozen=True)
class RunListItem(_View):
    """A run as `workflow list` shows it."""

    id: str
    name: str
    owner: str
    site: str
    state: str
    reason: str
    created_at: datetime
    cost_usd: float = 0.0
    budget_usd: float | None = None

    def to_message(self) -> pb.Workflow:
        """A `Workflow` message with these fields set (ListWorkflows answers with those)."""
        return pb.Workflow(
            id=self.id,
            name=self.name,
            owner=self.owner,
            site=self.site,
            state=self.state,
            reason=self.reason,
            created_at=_text(self.created_at),
            cost_usd=self.cost_usd,
            budget_usd=self.budget_usd,
        )

    @classmethod
    def from_message(cls, m: pb.Workflow) -> RunListItem:
        return cls(
            id=m.id,
            name=m.name,
            owner=m.owner,
            site=m.site,
            state=m.state,
            reason=m.reason,
            created_at=datetime.fromisoformat(m.created_at),
            cost_usd=m.cost_usd,
            budget_usd=m.budget_usd if m.HasField("budget_usd") else None,
        )


@dataclass(frozen=True)
class EventView(_View):
    """An entry of a run's history. `state`: the new state of the run, job or task, for an
    event that records a state change (None for the others)."""

    id: int
    at: datetime
    kind: str  # run, job, task, transfer, stack, ...
    subject: str
    message: str
    state: str | None = None

    def to_message(self) -> pb.Event:
        return pb.Event(
            id=self.id,
            at=self.at.isoformat(),
            kind=self.kind,
            subject=self.subject,
            message=self.message,
            state=self.state,
        )

    @classmethod
    def from_message(cls, m: pb.Event) -> EventView:
        return cls(
            id=m.id,
            at=datetime.fromisoformat(m.at),
            kind=m.kind,
            subject=m.subject,
            message=m.message,
            state=m.state if m.HasField("state") else None,
        )


# A run as it stands, and the events recorded since the previous update.
RunUpdate = tuple[RunView, tuple[EventView, ...]]


def _usd(m: Any, name: str) -> float | None:
    return getattr(m, name) if m.HasField(name) else None


@dataclass(frozen=True)
class FiringView(_View):
    """One cron moment of a schedule and what became of it."""

    due_at: datetime
    state: str  # WAITING, STARTED, SKIPPED, MISSED, FAILED
    start_at: datetime | None  # when it started, or (WAITING) when it plans to
    site: str
    estimate_usd: float | None
    run_name: str
    reason: str

    def to_message(self) -> pb.FiringStatus:
        return pb.FiringStatus(
            due_at=_text(self.due_at),
            state=self.state,
            start_at=_text(self.start_at),
            site=self.site,
            estimate_usd=self.estimate_usd,
            run_name=self.run_name,
            reason=self.reason,
        )

    @classmethod
    def from_message(cls, m: pb.FiringStatus) -> FiringView:
        return cls(
            due_at=datetime.fromisoformat(m.due_at),
            state=m.state,
            start_at=_time(m.start_at),
            site=m.site,
            estimate_usd=_usd(m, "estimate_usd"),
            run_name=m.run_name,
            reason=m.reason,
        )


@dataclass(frozen=True)
class ScheduleView(_View):
    """A schedule, and (when asked for one) its latest firings, newest first."""

    name: str
    owner: str
    cron: str
    cron_text: str  # the cron in words
    window_seconds: float
    budget_usd: float | None
    policy: str
    paused: bool
    next_at: datetime
    created_at: datetime
    firings: tuple[FiringView, ...] = ()

    def to_message(self) -> pb.ScheduleStatus:
        return pb.ScheduleStatus(
            name=self.name,
            owner=self.owner,
            cron=self.cron,
            cron_text=self.cron_text,
            window_seconds=self.window_seconds,
            budget_usd=self.budget_usd,
            policy=self.policy,
            paused=self.paused,
            next_at=_text(self.next_at),
            created_at=_text(self.created_at),
            firings=[f.to_message() for f in self.firings],
        )

    @classmethod
    def from_message(cls, m: pb.ScheduleStatus) -> ScheduleView:
        return cls(
            name=m.name,
            owner=m.owner,
            cron=m.cron,
            cron_text=m.cron_text,
            window_seconds=m.window_seconds,
            budget_usd=_usd(m, "budget_usd"),
            policy=m.policy,
            paused=m.paused,
            next_at=datetime.fromisoformat(m.next_at),
            created_at=datetime.fromisoformat(m.created_at),
            firings=tuple(FiringView.from_message(f) for f in m.firings),
        )
