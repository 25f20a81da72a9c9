"""The store under contention: many writers on one SQLite file lose nothing and fail
nothing, a writer that holds the store for long only delays the others, and a store that
stays busy (or a deadlock on PostgreSQL, or a server that cannot be reached) fails a unit of
work with one line that says where and why, never the SQL."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from orchestrator.engine import Engine
from orchestrator.errors import StoreError, describe
from orchestrator.provision import Cluster, NodeSlice, Plan, Report, local_plan
from orchestrator.store import Event, Run, RunState, Store, Transfer
from orchestrator.store import store as store_module
from tests.substrate.registry import free_port

PROCESSES, THREADS, UNITS = 4, 6, 25

# One writer process: THREADS threads, each doing UNITS units of work shaped like the
# engine's own (a read-modify-write of a transfer's attempts, the run's heartbeat, an event).
WRITER = """
import json, sys, threading
from datetime import UTC, datetime
from orchestrator.store import Event, Run, Store, Transfer

url, run_id, transfer_id, threads, units = sys.argv[1:]
store = Store(url)
errors = []

def work():
    for _ in range(int(units)):
        try:
            with store.session() as s:
                s.get_one(Transfer, int(transfer_id)).attempts += 1
                s.get_one(Run, run_id).heartbeat_at = datetime.now(UTC)
                s.add(Event(run_id=run_id, kind="test", message="a unit of work"))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

workers = [threading.Thread(target=work) for _ in range(int(threads))]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps(errors))
"""


def new_run() -> Run:
    rid = str(uuid.uuid4())
    return Run(id=rid, name=f"user/run-{rid[:8]}", owner="user", fuzzfile="version: v4")


def sqlite_store(tmp_path: Path) -> tuple[Store, Path]:
    path = tmp_path / "squall.db"
    return Store(f"sqlite:///{path}"), path


def hold_the_write_lock(path: Path) -> sqlite3.Connection:
    """Another process's writer, in the middle of a transaction; ROLLBACK lets go."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.fixture
def impatient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores opened from here on wait 50 ms for the lock at each try, not seconds: their
    tries (with the pauses between them) end within a second or so."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.05)


def test_writers_in_many_processes_and_threads_neither_fail_nor_lose_an_update(
    tmp_path: Path,
) -> None:
    store, _ = sqlite_store(tmp_path)
    run = new_run()
    transfer = Transfer(run_id=run.id, volume="v", direction="ingress", source="s", destination="d")
    with store.session() as s:
        s.add_all([run, transfer])
    argv = [store.url, run.id, str(transfer.id), str(THREADS), str(UNITS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * PROCESSES, [err for _, err in outputs]
    assert [e for out, _ in outputs for e in json.loads(out)] == []
    units = PROCESSES * THREADS * UNITS
    with store.session() as s:
        # each unit read the count and wrote it back plus one: none worked from a stale read
        assert s.get_one(Transfer, transfer.id).attempts == units
        assert s.scalar(select(func.count()).select_from(Event)) == units
    store.close()


def test_a_busy_store_delays_a_unit_past_its_busy_timeout_and_fails_it_only_after_its_tries(
    tmp_path: Path, impatient: None
) -> None:
    store, path = sqlite_store(tmp_path)
    run = new_run()
    with store.session() as s:
        s.add(run)
    holder = hold_the_write_lock(path)  # for six busy timeouts; the tries take longer
    threading.Timer(0.3, holder.execute, args=("ROLLBACK",)).start()
    began = time.monotonic()
    with store.session() as s:
        s.add(Event(run_id=run.id, kind="test", message="after the wait"))
    assert time.monotonic() - began >= 0.3
    holder.execute("BEGIN IMMEDIATE")  # and now for longer than all the tries
    try:
        with pytest.raises(StoreError) as caught, store.session() as s:
            s.add(Event(run_id=run.id, kind="test", message="never"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert str(caught.value) == f"the store at {path} is busy (database is locked); retried 4 times"
    with store.session() as s:  # the first unit was written, nothing of the second
        assert s.scalars(select(Event.message)).all() == ["after the wait"]
    store.close()


class _BusyStoreProvisioner:
    """Brings no cluster up: while it tries, another writer holds the store throughout."""

    site = "local"
    cannot: Mapping[str, str] = {}

    def __init__(self, store: Store, path: Path) -> None:
        self.store, self.path = store, path

    def serves(self, site: str) -> bool:
        return site == self.site

    def plan(self, run_id: str, owner: str, wf: object, placement: object) -> Plan[Any]:
        return local_plan(run_id, [NodeSlice(cpus=(0,), memory_bytes=2**30)])

    def up(self, plan: Plan[Any], report: Report) -> Cluster:
        holder = hold_the_write_lock(self.path)
        try:
            with self.store.session() as s:
                s.add(Event(run_id=plan.run_id, kind="provision", message="booting"))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return Cluster(run_id=plan.run_id, site=self.site, agents=())

    def down(self, cluster: Cluster, report: Report) -> None:
        pass


def test_a_run_failed_by_a_busy_store_says_so_without_sql(tmp_path: Path, impatient: None) -> None:
    store, path = sqlite_store(tmp_path)
    engine = Engine(store, [_BusyStoreProvisioner(store, path)], data_dir=tmp_path / "data")
    run_id = engine.submit(
        "user/busy", "version: v4\njobs:\n  x:\n    image: {uri: docker://busybox:1.36}\n"
    )
    with pytest.raises(StoreError):
        engine.execute(run_id)
    with store.session() as s:
        run = s.get_one(Run, run_id)
        assert run.state is RunState.FAILED
        assert run.reason == (f"the store at {path} is busy (database is locked); retried 4 times")


def test_a_database_error_reads_as_one_line_without_its_statement_or_parameters(
    tmp_path: Path,
) -> None:
    store, _ = sqlite_store(tmp_path)
    with pytest.raises(DBAPIError) as caught, store.engine.connect() as connection:
        connection.execute(text("SELECT id FROM agents WHERE token = :t AND nope"), {"t": "s3cr3t"})
    assert "s3cr3t" in str(caught.value)  # what SQLAlchemy's own message would have shown
    assert describe(caught.value) == "OperationalError: no such column: nope"
    store.close()


def test_a_deadlock_on_postgresql_fails_one_unit_in_one_line_and_the_other_commits(
    postgres_url: str,
) -> None:
    store = Store(postgres_url)
    a, b = new_run(), new_run()
    with store.session() as s:
        s.add_all([a, b])
    both_locked = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def unit(first: str, then: str) -> None:
        """Lock one run's row, then ask for the other's: two of these deadlock."""
        try:
            with store.session() as s:
                s.get_one(Run, first).reason = "first"
                s.flush()
                both_locked.wait(timeout=30)
                s.get_one(Run, then).reason = "then"
                s.flush()
            outcomes[first] = "committed"
        except StoreError as exc:
            outcomes[first] = str(exc)

    threads = [threading.Thread(target=unit, args=pair) for pair in ((a.id, b.id), (b.id, a.id))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes.values()) == [
        "committed",
        f"the store at {store.location} is busy (deadlock detected)",
    ]
    assert store.location == postgres_url  # it has no password to hide
    store.close()


def test_a_postgresql_server_that_cannot_be_reached_is_named_without_its_password() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://squall:hunter2@127.0.0.1:{port}/postgres"
    with pytest.raises(StoreError) as caught:
        Store(url)
    message = str(caught.value)
    assert message.startswith(f"the store at postgresql+psycopg://squall:***@127.0.0.1:{port}/")
    assert "failed: " in message
    assert "hunter2" not in message
    assert "\n" not in message
