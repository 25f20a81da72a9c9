"""The orchestrator's records: runs and what they are made of, events, and the stack ledger.

SQLAlchemy 2 typed models. Times are UTC. State columns hold the names of the enums below;
the engine commits every state change before it acts on it.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from substrate.tls import ClientTLS

__all__ = [
    "RUN_ENDED",
    "Agent",
    "Attempt",
    "AuditEntry",
    "Base",
    "Event",
    "Firing",
    "FiringState",
    "Job",
    "Run",
    "RunState",
    "Schedule",
    "SecretValue",
    "Stack",
    "StackState",
    "Task",
    "TaskState",
    "Token",
    "Transfer",
    "TransferState",
    "User",
    "Volume",
]


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class RunState(enum.Enum):
    PENDING = "PENDING"
    PLACING = "PLACING"
    PROVISIONING = "PROVISIONING"
    STAGING = "STAGING"
    RUNNING = "RUNNING"
    EGRESS = "EGRESS"
    TEARDOWN = "TEARDOWN"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class TaskState(enum.Enum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    READY = "READY"  # a service whose readiness probe passed (or that has none)
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"  # a dependency failed

    @property
    def ended(self) -> bool:
        """Whether nothing more will happen to a task, job or attempt in this state."""
        return self in (
            TaskState.FINISHED,
            TaskState.FAILED,
            TaskState.CANCELLED,
            TaskState.SKIPPED,
        )


class TransferState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


RUN_ENDED = (RunState.FINISHED, RunState.FAILED, RunState.CANCELLED)  # nothing more happens


class StackState(enum.Enum):
    CREATING = "CREATING"  # written before `up` starts
    UP = "UP"
    DESTROYING = "DESTROYING"
    DESTROYED = "DESTROYED"  # the only state that closes a ledger entry
    FAILED = "FAILED"  # destroy failed: `squall stack gc` retries


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, validate_strings=True)


class UTCDateTime(TypeDecorator[datetime]):
    """A moment in time, always aware and in UTC on both sides: PostgreSQL keeps the zone,
    SQLite keeps none and hands back naive values, read here as the UTC they were written in.
    A naive value is refused on the way in, so that no local time is ever stored as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored: {value.isoformat()}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_TS = UTCDateTime()


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # e.g. user/gromacs-1
    owner: Mapped[str] = mapped_column(String(255))
    state: Mapped[RunState] = mapped_column(_enum(RunState), default=RunState.PENDING)
    reason: Mapped[str] = mapped_column(Text, default="")
    fuzzfile: Mapped[str] = mapped_column(Text)  # the text as submitted
    site: Mapped[str] = mapped_column(String(255), default="")
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    orchestrator: Mapped[str] = mapped_column(String(255), default="")  # the owning process
    heartbeat_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )  # set by `cancel` from any process; the owning engine acts on it
    # why the cancel was asked for ("": by a user); the run ends CANCELLED with it
    cancel_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(_TS, default=now)
    started_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    # money: the team whose monthly budget the run counts against, the policy file that
    # placed it (a schedule's), the run's own budget
    # (None: none), what it has spent so far (the meter writes it while the run holds its
    # cluster), and when it began and stopped holding one
    team: Mapped[str] = mapped_column(String(255), default="", server_default="")
    policy: Mapped[str] = mapped_column(Text, default="", server_default="")  # "": the default
    budget_usd: Mapped[float | None] = mapped_column(Float, default=None)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # what it spent at sites it moved away from (their rates, their hours, their bytes)
    carried_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    held_from: Mapped[datetime | None] = mapped_column(_TS, default=None)
    held_until: Mapped[datetime | None] = mapped_column(_TS, default=None)

    jobs: Mapped[list[Job]] = relationship(back_populates="run", cascade="all, delete-orphan")
    events: Mapped[list[Event]] = relationship(cascade="all, delete-orphan", order_by="Event.id")


class Job(Base):
    """A job or a service of a run."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16), default="job")  # job or service
    state: Mapped[TaskState] = mapped_column(_enum(TaskState), default=TaskState.PENDING)
    reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(_TS, default=None)

    run: Mapped[Run] = relationship(back_populates="jobs")
    tasks: Mapped[list[Task]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Task.index"
    )


class Task(Base):
    """One task of a job: the job itself, or one index of its task array."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer, default=0)  # FB_TASK_ID for arrays
    state: Mapped[TaskState] = mapped_column(_enum(TaskState), default=TaskState.PENDING)

    job: Mapped[Job] = relationship(back_populates="tasks")
    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="task", cascade="all, delete-orphan", order_by="Attempt.number"
    )


class Attempt(Base):
    """One try of a task on a node (retries make more)."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("task_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(255), default="")
    agent_task_id: Mapped[str] = mapped_column(String(64), default="")
    lease_id: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[TaskState] = mapped_column(_enum(TaskState), default=TaskState.STARTING)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(_TS, default=None)

    task: Mapped[Task] = relationship(back_populates="attempts")


class Event(Base):
    """Append-only history of a run, for `status --watch` and post-mortems."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(_TS, default=now)
    kind: Mapped[str] = mapped_column(String(32))  # run, job, task, transfer, stack, ...
    subject: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str | None] = mapped_column(String(16), default=None)  # a move's new state
    message: Mapped[str] = mapped_column(Text, default="")


class Agent(Base):
    """A node of a run's cluster, as the provisioner reported it."""

    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    address: Mapped[str] = mapped_column(String(255))
    token: Mapped[str] = mapped_column(String(255))  # the store's file/DB must be private
    pid: Mapped[int] = mapped_column(Integer, default=0)
    # mutual TLS (PEM): the run CA, and the orchestrator's client certificate and key; all
    # empty for an agent that serves plaintext
    tls_ca: Mapped[str] = mapped_column(Text, default="", server_default="")
    tls_certificate: Mapped[str] = mapped_column(Text, default="", server_default="")
    tls_key: Mapped[str] = mapped_column(Text, default="", server_default="")

    @property
    def endpoint_tls(self) -> ClientTLS | None:
        """What to connect to this agent with (None: it serves plaintext)."""
        if not self.tls_ca:
            return None
        return ClientTLS(
            ca=self.tls_ca.encode(),
            certificate=self.tls_certificate.encode(),
            key=self.tls_key.encode(),
        )


class Volume(Base):
    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(255))
    persistent_name: Mapped[str | None] = mapped_column(String(255), default=None)
    path: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="PENDING")


class Transfer(Base):
    """An ingress or egress copy; a failed egress keeps its data until retried or released."""

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    volume: Mapped[str] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(8))  # ingress or egress
    source: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(Text)
    state: Mapped[TransferState] = mapped_column(
        _enum(TransferState), default=TransferState.PENDING
    )
    secret: Mapped[str] = mapped_column(String(255), default="")  # a reference, never a value
    timeout: Mapped[float] = mapped_column(Float, default=0.0)  # seconds; 0: none
    tries: Mapped[int] = mapped_column(Integer, default=3)  # per attempt of the transfer
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")


class Stack(Base):
    """The ledger of cloud stacks: written before `up`, closed only by a successful destroy."""

    __tablename__ = "stacks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), index=True)  # outlives its run on purpose
    name: Mapped[str] = mapped_column(String(255), unique=True)  # squall-<run id>
    site: Mapped[str] = mapped_column(String(255))
    backend: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[StackState] = mapped_column(_enum(StackState), default=StackState.CREATING)
    created_at: Mapped[datetime] = mapped_column(_TS, default=now)
    expires_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    destroyed_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    error: Mapped[str] = mapped_column(Text, default="")


class Schedule(Base):
    """A workflow run on a cron: each firing is placed at the cheapest site, and may wait
    within `window_s` for a cheaper moment (see `orchestrator.schedules`)."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    owner: Mapped[str] = mapped_column(String(255))
    fuzzfile: Mapped[str] = mapped_column(Text)  # the text as created
    cron: Mapped[str] = mapped_column(String(255))  # five fields, UTC
    window_s: Mapped[float] = mapped_column(Float, default=0.0)
    budget_usd: Mapped[float | None] = mapped_column(Float, default=None)  # per firing
    policy: Mapped[str] = mapped_column(Text, default="")  # a policy file; "": the default
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(_TS, default=now)
    next_at: Mapped[datetime] = mapped_column(_TS)  # the next cron moment not yet handled

    firings: Mapped[list[Firing]] = relationship(
        cascade="all, delete-orphan", order_by="Firing.due_at"
    )


class FiringState(enum.Enum):
    WAITING = "WAITING"  # due, waiting within its window for a cheaper moment
    STARTED = "STARTED"  # its run was submitted
    SKIPPED = "SKIPPED"  # the concurrency rule, or its budget: no run
    MISSED = "MISSED"  # its moment passed while no scheduler ran
    FAILED = "FAILED"  # it could not be placed or submitted


class Firing(Base):
    """One cron moment of a schedule. (schedule, due_at) is unique: a moment fires once,
    whatever crashes and however many schedulers run."""

    __tablename__ = "firings"
    __table_args__ = (UniqueConstraint("schedule_id", "due_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE"), index=True
    )
    due_at: Mapped[datetime] = mapped_column(_TS)
    state: Mapped[FiringState] = mapped_column(_enum(FiringState), default=FiringState.WAITING)
    start_at: Mapped[datetime | None] = mapped_column(_TS, default=None)  # chosen moment
    site: Mapped[str] = mapped_column(String(255), default="")
    estimate_usd: Mapped[float | None] = mapped_column(Float, default=None)
    run_name: Mapped[str] = mapped_column(String(255), default="")
    reason: Mapped[str] = mapped_column(Text, default="")  # why this time and site, or none


class User(Base):
    """Someone the control plane knows (`orchestrator.identity`): a name, the groups it is in
    (what policies and group secrets go by), and whether it may administer."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(_TS, default=now)


class Token(Base):
    """A user's API token, kept as the SHA-256 of its text (shown once, when made)."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # shown in lists
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    note: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(_TS, default=now)
    expires_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    used_at: Mapped[datetime | None] = mapped_column(_TS, default=None)


class AuditEntry(Base):
    """One control-plane call: who, which verb on what, allowed or denied and why, and how it
    ended (`orchestrator.api.audit`)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(_TS, default=now, index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)  # "" when not authenticated
    method: Mapped[str] = mapped_column(String(64))
    verb: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255), default="")  # a run, schedule, secret...
    allowed: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")  # why denied; what an admin call did
    peer: Mapped[str] = mapped_column(String(255), default="")
    # ok, the error category it failed with, or why a stream was cut; "" while it runs
    outcome: Mapped[str] = mapped_column(String(255), default="", server_default="")


class SecretValue(Base):
    """A secret's value, encrypted (`orchestrator.secrets`): scope user, group or organization;
    `holder` is the user or group it belongs to ("" for the organization)."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("scope", "holder", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    holder: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)  # Fernet token of the value
    updated_at: Mapped[datetime] = mapped_column(_TS, default=now)
