"""Open the store: SQLite in the user's data directory by default, PostgreSQL (or any
SQLAlchemy URL) by configuration; the schema is brought up to date with Alembic on open."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Store", "default_url"]

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x5C0A11  # PostgreSQL advisory lock for migrations


def default_url() -> str:
    """SQLite under $XDG_DATA_HOME/squall (~/.local/share/squall)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'squall' / 'squall.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite enforces them only when asked
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the engine's writes
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


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
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.upgrade()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self, revision: str = "head") -> None:
        """Apply the Alembic migrations up to `revision`, one process at a time: every
        `squall` process opens the store, and two must not migrate a new database at once."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.engine.begin() as connection:
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
        """A session that commits when the block ends and rolls back if it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
