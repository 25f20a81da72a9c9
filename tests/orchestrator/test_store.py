"""The store on SQLite and on a real PostgreSQL server: migrations, records, constraints."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, StatementError

from orchestrator.store import (
    Attempt,
    Base,
    Event,
    Job,
    Run,
    RunState,
    Stack,
    StackState,
    Store,
    Task,
    TaskState,
)


def new_run(**kw: object) -> Run:
    rid = str(uuid.uuid4())
    fields = {"id": rid, "name": f"user/run-{rid[:8]}", "owner": "user", "fuzzfile": "version: v4"}
    return Run(**{**fields, **kw})


def test_migrations_match_the_models(store_url: str) -> None:
    store = Store(store_url)
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    store.close()
    assert diff == [], "write a migration: the models changed"


def test_a_run_with_jobs_tasks_attempts_and_events_survives_reopening(store_url: str) -> None:
    store = Store(store_url)
    run = new_run()
    job = Job(name="count", tasks=[Task(index=i) for i in range(3)])
    job.tasks[1].attempts.append(
        Attempt(number=1, node="node-0", exit_code=3, state=TaskState.FAILED, message="exit 3")
    )
    run.jobs.append(job)
    run.events.append(Event(kind="run", message="submitted"))
    with store.session() as s:
        s.add(run)
    store.close()

    again = Store(store_url)  # a new process would see the same
    with again.session() as s:
        loaded = s.get(Run, run.id)
        assert loaded is not None
        assert loaded.state is RunState.PENDING
        assert [t.index for t in loaded.jobs[0].tasks] == [0, 1, 2]
        assert loaded.jobs[0].tasks[1].attempts[0].exit_code == 3
        assert [e.message for e in loaded.events] == ["submitted"]
        loaded.state = RunState.RUNNING
    with again.session() as s:
        assert s.scalar(select(Run.state).where(Run.id == run.id)) is RunState.RUNNING
        s.delete(s.get(Run, run.id))  # cascades to jobs, tasks, attempts, events
    with again.session() as s:
        assert s.scalar(select(Job).where(Job.run_id == run.id)) is None
        assert s.scalar(select(Event).where(Event.run_id == run.id)) is None
    again.close()


def test_times_come_back_aware_and_in_utc_and_naive_ones_are_refused(store_url: str) -> None:
    """One column type for every timestamp: SQLite keeps no zone, PostgreSQL does; either
    way a time reads back aware, in UTC, equal to what was written; a naive time (whose zone
    nobody knows) is refused rather than stored as if it were UTC."""
    store = Store(store_url)
    paris = datetime(2026, 12, 3, 9, 30, tzinfo=timezone(timedelta(hours=1)))
    run = new_run(heartbeat_at=paris)
    with store.session() as s:
        s.add(run)
    with store.session() as s:
        loaded = s.get_one(Run, run.id)
        assert loaded.heartbeat_at == paris
        assert loaded.heartbeat_at.tzinfo is UTC
        assert loaded.heartbeat_at.hour == 8
        assert loaded.created_at.tzinfo is UTC
    naive = datetime(2026, 12, 3, 9, 30)
    with (
        pytest.raises(StatementError, match="a naive datetime cannot be stored"),
        store.session() as s,
    ):
        s.add(new_run(heartbeat_at=naive))
    store.close()


def test_constraints_hold(store_url: str) -> None:
    store = Store(store_url)
    first = new_run()
    with store.session() as s:
        s.add(first)
    with pytest.raises(IntegrityError), store.session() as s:  # run names are unique
        s.add(new_run(name=first.name))
    with pytest.raises(IntegrityError), store.session() as s:  # a job needs its run
        s.add(Job(run_id="no-such-run", name="x"))
    with pytest.raises(IntegrityError), store.session() as s:  # one task per array index
        s.add(Job(run_id=first.id, name="dup", tasks=[Task(index=0), Task(index=0)]))
    store.close()


def test_the_stack_ledger_outlives_its_run(store_url: str) -> None:
    store = Store(store_url)
    run = new_run()
    with store.session() as s:
        s.add(run)
        s.add(Stack(run_id=run.id, name=f"squall-{run.id}", site="aws:us-west-2"))
    with store.session() as s:
        s.delete(s.get(Run, run.id))
    with store.session() as s:
        stack = s.scalar(select(Stack).where(Stack.run_id == run.id))
        assert stack is not None
        assert stack.state is StackState.CREATING
    store.close()


def test_the_default_database_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    Store().close()
    db = tmp_path / "squall" / "squall.db"
    assert db.exists()
    assert db.stat().st_mode & 0o777 == 0o600


def test_processes_opening_a_new_store_at_once_do_not_trip_over_the_migration(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from orchestrator.store import Store; Store({url!r}).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors


def _downgrade(store: Store, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from orchestrator.store.store import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.session() as s:
        config.attributes["connection"] = s.connection()
        command.downgrade(config, revision)


def test_going_back_past_the_secrets_table_refuses_to_drop_secrets(store_url: str) -> None:
    from orchestrator.store import SecretValue

    store = Store(store_url)
    with store.session() as s:
        s.add(SecretValue(scope="user", holder="alice", name="KEY", sealed=b"sealed"))
    with pytest.raises(RuntimeError, match="holds 1 secret"):
        _downgrade(store, "0005")
    with store.session() as s:  # nothing changed
        assert [v.name for v in s.scalars(select(SecretValue))] == ["KEY"]
        s.query(SecretValue).delete()
    _downgrade(store, "0005")  # with none left, it goes back, and forward again
    store.upgrade()
    store.close()
