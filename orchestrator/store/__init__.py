"""The orchestrator's state: SQLAlchemy models, SQLite or PostgreSQL, Alembic migrations."""

from .models import (
    RUN_ENDED,
    Agent,
    Attempt,
    Base,
    Event,
    Job,
    Run,
    RunState,
    Stack,
    StackState,
    Task,
    TaskState,
    Transfer,
    TransferState,
    Volume,
)
from .store import Store, default_url

__all__ = [
    "RUN_ENDED",
    "Agent",
    "Attempt",
    "Base",
    "Event",
    "Job",
    "Run",
    "RunState",
    "Stack",
    "StackState",
    "Store",
    "Task",
    "TaskState",
    "Transfer",
    "TransferState",
    "Volume",
    "default_url",
]
