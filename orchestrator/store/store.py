"""Open the store: SQLite in the user's data directory by default, PostgreSQL (or any
SQLAlchemy URL) by configuration; the schema is brought up to date with Alembic on open.

Every unit of work is one `Store.session()`; the runs of a server, its API and the CLI in
other processes write concurrently, and they meet only where a unit's transaction begins:

- SQLite: sqlite3's own transaction handling begins a transaction only before the first
  write, so a unit's reads ran outside it and its writes could rest on stale reads; and a
  transaction that reads before it writes gets "database is locked" at once, whatever the
  busy timeout, when another writer committed in between. So sqlite3's BEGIN is switched
  off and SQLAlchemy's begin hook emits BEGIN IMMEDIATE: a unit takes the write lock when
  it begins, waits for it there (the busy timeout), and meets no lock afterwards. WAL lets
  readers in other processes go on meanwhile.
- PostgreSQL: READ COMMITTED, its default, where serialization failures do not happen;
  the units that run at the same time take at most one contended row lock each (their
  run's row), so they do not deadlock. If one ever did, the unit fails as a busy store.

A BEGIN still refused after the busy timeout is tried again after a growing pause, up to
TRIES times. Nothing of the block has run then, so a retry is always safe and call sites
stay plain `with` blocks. A database error that ends a unit of work leaves as a StoreError
that says where and why in one line, never the SQL or its parameters; IntegrityError stays
itself, for the callers that turn it into a Conflict.
"""

from __future__ import annotations

import fcntl
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StoreError

__all__ = ["Store", "default_url"]

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x5C0A11  # PostgreSQL advisory lock for migrations
BUSY_TIMEOUT = 10.0  # seconds SQLite waits for the write lock at each BEGIN
TRIES = 5  # BEGINs before a busy store fails the unit of work
BACKOFF = 0.1  # seconds before the second try, doubled for each further one (with jitter)
BACKOFF_MAX = 2.0
_SQLITE_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}  # primary codes
_POSTGRES_BUSY = {"40001", "40P01", "55P03"}  # serialization, deadlock, lock not available


def default_url() -> str:
    """SQLite under $XDG_DATA_HOME/squall (~/.local/share/squall)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'squall' / 'squall.db'}"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN: _sqlite_begin does
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite enforces them only when asked
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the engine's writes
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _busy(exc: DBAPIError | PoolTimeout) -> bool:
    """Whether others were in the way (a lock, a deadlock, every pooled connection in use):
    trying again may succeed."""
    if isinstance(exc, PoolTimeout):
        return True
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY
    return getattr(exc.orig, "sqlstate", None) in _POSTGRES_BUSY


def _pause(tries: int) -> float:
    """Seconds to wait after `tries` refused BEGINs: growing, jittered, bounded."""
    return random.uniform(0.5, 1.0) * min(BACKOFF * 2.0 ** (tries - 1), BACKOFF_MAX)


class Store:
    """A database with Squall's schema at the newest revision."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)  # it holds agent tokens
        self.engine: Engine = create_engine(self.url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.upgrade()

    @property
    def location(self) -> str:
        """Where the store is, as a person reads it: the SQLite file, or the URL without
        its password."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite":
            return url.database or ":memory:"
        return url.render_as_string(hide_password=True)

    def upgrade(self, revision: str = "head") -> None:
        """Apply the Alembic migrations up to `revision`, one process at a time: every
        `squall` process opens the store, and two must not migrate a new database at once."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.session() as s:
            connection = s.connection()
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """For SQLite, an flock on a file beside the database (PostgreSQL: an advisory lock
        taken in the migration's own transaction)."""
        if not self.url.startswith("sqlite:///"):
            yield
            return
        lock = Path(self.url.removeprefix("sqlite:///") + ".migrate-lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: it commits when the block ends and rolls back if it raises. Its
        transaction has begun (on SQLite, holding the write lock) before the block runs."""
        session = self._begin()
        try:
            yield session
            session.commit()
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise StoreError.of(exc, self.location, busy=_busy(exc)) from exc
        finally:
            session.close()  # rolls back what did not commit

    def _begin(self) -> Session:
        """A session whose transaction has begun; a BEGIN refused because the store is busy
        is tried again after a pause, up to TRIES times."""
        tries = 1
        while True:
            session = self._sessions()
            try:
                session.begin()
                session.connection()  # BEGIN now, not at the block's first statement
                return session
            except (DBAPIError, PoolTimeout) as exc:
                session.close()
                if not _busy(exc) or tries >= TRIES:
                    raise StoreError.of(exc, self.location, busy=_busy(exc), tries=tries) from exc
            except BaseException:  # an interrupt: never leave the write lock taken
                session.close()
                raise
            time.sleep(_pause(tries))
            tries += 1

    def close(self) -> None:
        self.engine.dispose()
