"""The errors Squall raises on purpose, and what each category means to a caller.

    SquallError                 root: everything below carries a message meant for a person
    ├── InvalidInput            the input was read and is wrong (a Fuzzfile, a template)
    │   ├── NotFound            it names something that does not exist (a run, a job)
    │   └── Conflict            it clashes with what exists (a name taken, a task not running)
    ├── UsageError              the request itself is malformed (a bad option value)
    └── StoreError              the store failed, or stayed busy past its retries: nothing is
                                wrong with the input, and trying again later may work

The CLI exits with `exit_code`; the gRPC API will map the same categories to status codes.
Foreign errors (YAML, pydantic, the file system) are translated where they enter; database
errors are translated here (`StoreError.of`, `describe`), so that no SQL statement or
parameter ever reaches a run's reason, an event or an error shown to a person.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "InvalidInput",
    "NotFound",
    "SquallError",
    "StoreError",
    "UsageError",
    "describe",
    "rpc_gist",
]


class SquallError(Exception):
    """Root of Squall's errors."""

    exit_code = 1


class InvalidInput(SquallError):
    """The input was read and is wrong; the message says where and how to fix it."""

    exit_code = 1


class NotFound(InvalidInput):
    """What the input names does not exist."""


class Conflict(InvalidInput):
    """The input clashes with the current state: a name in use, a task that is not running."""


class UsageError(SquallError):
    """The request is malformed: an option value that cannot be used."""

    exit_code = 2


class StoreError(SquallError):
    """The store failed or stayed busy; the message is one line without SQL."""

    @classmethod
    def of(cls, exc: BaseException, where: str, *, busy: bool, tries: int = 1) -> StoreError:
        """`exc`, a database error met at the store `where`, as a person should read it.
        `busy`: another transaction held what it needed (a lock, a deadlock); `tries`: how
        many times the store tried before giving up."""
        gist = _database_gist(exc)
        if not busy:
            return cls(f"the store at {where} failed: {gist}")
        retried = f"; retried {tries - 1} times" if tries > 1 else ""
        return cls(f"the store at {where} is busy ({gist}){retried}")


def describe(exc: BaseException) -> str:
    """An exception as a run's reason, an event or an API error shows it, in one line:
    Squall's own errors as they are written; a failed gRPC call (an agent's) as its status
    and details, not the call object; a database error as what the database said, without
    SQL; any other as its kind and its message."""
    if _is_rpc_error(exc):
        return rpc_gist(exc)
    if isinstance(exc, SquallError):  # written for people already
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {_database_gist(exc)}"


def _is_rpc_error(exc: BaseException) -> bool:
    # by module, as for the database: this module is imported where grpc is not needed
    return type(exc).__module__.startswith("grpc") and callable(getattr(exc, "details", None))


def rpc_gist(exc: BaseException) -> str:
    """A failed gRPC call as one line: `STATUS: details`."""
    code = getattr(exc, "code", lambda: None)()
    details = " ".join(str(getattr(exc, "details", lambda: "")() or "").split())
    name = getattr(code, "name", "") or "RPC failed"
    return f"{name}: {details}" if details else name


def _database_gist(exc: BaseException) -> str:
    """What the database said, in one line. SQLAlchemy's errors carry the DB-API error
    (`orig`) and append the SQL statement, its parameters and a link on lines of their own;
    other errors are returned whole."""
    if not type(exc).__module__.startswith("sqlalchemy"):
        return str(exc)
    said = getattr(exc, "orig", None)
    text = str(said if isinstance(said, BaseException) else exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split(" (Background on this error at:")[0]
