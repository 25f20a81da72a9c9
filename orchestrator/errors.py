"""The errors Squall raises on purpose, and what each category means to a caller.

    SquallError                 root: everything below carries a message meant for a person
    ├── InvalidInput            the input was read and is wrong (a Fuzzfile, a template)
    │   ├── NotFound            it names something that does not exist (a run, a job)
    │   └── Conflict            it clashes with what exists (a task not running)
    │       └── AlreadyExists   it names something new that exists already (a run's name)
    ├── UsageError              the request itself is malformed (a bad option value)
    ├── Unauthenticated         the caller's token is missing, unknown, expired or revoked
    ├── PermissionDenied        the caller is known, and no grant allows what it asked
    └── StoreError              the store failed, or stayed busy past its retries: nothing is
                                wrong with the input, and trying again later may work

and, where they are raised: ProvisionError (orchestrator.provision), TransferError
(orchestrator.data.transfers), PullError (orchestrator.engine) and ServerError (cli.backends:
the server could not be reached, or answered with a status that is not in the table).

Each class names its `Category`; `ERRORS` maps each category to the CLI's exit code and the
control API's gRPC status, once, for the CLI (`exit_code`), the server (`status_of`) and the
CLI's client side (`category_of`). gRPC has fewer status codes than Squall has categories, so
the server also sends the category's name in the `squall-category` trailer; a status without
it (another server, or gRPC's own: UNAVAILABLE for a server that cannot be reached) reads as
the first category listed with that status, and a status not in the table as SERVER.

Foreign errors (YAML, pydantic, the file system) are translated where they enter; database
errors are translated here (`StoreError.of`, `describe`), so that no SQL statement or
parameter ever reaches a run's reason, an event or an error shown to a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "CATEGORY_TRAILER",
    "ERRORS",
    "AlreadyExists",
    "Category",
    "Conflict",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "Rule",
    "SquallError",
    "StoreError",
    "Unauthenticated",
    "UsageError",
    "category_of",
    "describe",
    "error_for",
    "exit_code",
    "rpc_gist",
    "status_of",
]

CATEGORY_TRAILER = "squall-category"  # gRPC trailing metadata: the error's category name


class Category(StrEnum):
    """What kind of failure an error is, as a caller acts on it."""

    INVALID = "invalid"  # the input was read and is wrong
    NOT_FOUND = "not-found"  # it names something that does not exist
    CONFLICT = "conflict"  # it clashes with the current state
    ALREADY_EXISTS = "already-exists"  # it names something new that exists already
    USAGE = "usage"  # the request (command line) is malformed
    UNAUTHENTICATED = "unauthenticated"  # no valid token: who is calling is not known
    DENIED = "denied"  # the caller may not do this (the message names the permission)
    PROVISION = "provision"  # a cluster could not be brought up or taken down
    PULL = "pull"  # an image could not be pulled
    TRANSFER = "transfer"  # data could not be moved, after retries
    STORE = "store"  # the store failed or stayed busy: try again later
    SERVER = "server"  # the server cannot be reached, or refused the call (not for the input)
    INTERNAL = "internal"  # anything else: a fault of Squall's, logged where it happened


@dataclass(frozen=True, slots=True)
class Rule:
    exit_code: int  # what the CLI exits with
    status: str  # the gRPC status code's name (grpc is not imported here)


# The one table. Exit codes: 1 the input is wrong or the work failed, 2 the command line is
# wrong, 3 something that is not the input's failed (the server, the store), 4 access (who
# is calling is not known, or may not do that); a category
# listed first for its status is what that status reads as when no category came with it.
ERRORS: dict[Category, Rule] = {
    Category.INVALID: Rule(1, "INVALID_ARGUMENT"),
    Category.NOT_FOUND: Rule(1, "NOT_FOUND"),
    Category.CONFLICT: Rule(1, "FAILED_PRECONDITION"),
    Category.ALREADY_EXISTS: Rule(1, "ALREADY_EXISTS"),
    Category.USAGE: Rule(2, "INVALID_ARGUMENT"),
    Category.UNAUTHENTICATED: Rule(4, "UNAUTHENTICATED"),
    Category.DENIED: Rule(4, "PERMISSION_DENIED"),
    Category.PROVISION: Rule(1, "FAILED_PRECONDITION"),
    Category.PULL: Rule(1, "FAILED_PRECONDITION"),
    Category.SERVER: Rule(3, "UNAVAILABLE"),
    Category.TRANSFER: Rule(1, "UNAVAILABLE"),
    Category.STORE: Rule(3, "UNAVAILABLE"),
    Category.INTERNAL: Rule(3, "INTERNAL"),
}


class SquallError(Exception):
    """Root of Squall's errors. Each subclass names its category; an error made from a
    server's answer (`error_for`) carries the category that came with it."""

    category: Category = Category.INTERNAL

    @property
    def exit_code(self) -> int:
        """What the CLI exits with for this error."""
        return exit_code(self.category)


class InvalidInput(SquallError):
    """The input was read and is wrong; the message says where and how to fix it."""

    category = Category.INVALID


class NotFound(InvalidInput):
    """What the input names does not exist."""

    category = Category.NOT_FOUND


class Conflict(InvalidInput):
    """The input clashes with the current state: a task that is not running."""

    category = Category.CONFLICT


class AlreadyExists(Conflict):
    """The input names something new that exists already: a run's name in use."""

    category = Category.ALREADY_EXISTS


class UsageError(SquallError):
    """The request is malformed: an option value that cannot be used."""

    category = Category.USAGE


class Unauthenticated(SquallError):
    """The call carries no token the server knows (or it expired, was revoked, or its user
    is disabled)."""

    category = Category.UNAUTHENTICATED


class PermissionDenied(SquallError):
    """The caller is known and no grant of the policy allows the call; the message names
    the missing permission."""

    category = Category.DENIED


class StoreError(SquallError):
    """The store failed or stayed busy; the message is one line without SQL."""

    category = Category.STORE

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


def exit_code(category: Category) -> int:
    """What the CLI exits with for a failure of `category`."""
    return ERRORS[category].exit_code


def status_of(exc: BaseException) -> tuple[str, Category]:
    """The gRPC status (its name) and category the server answers `exc` with: any exception
    that is not Squall's is INTERNAL."""
    category = exc.category if isinstance(exc, SquallError) else Category.INTERNAL
    return ERRORS[category].status, category


def category_of(status: str, sent: str | None = None) -> Category:
    """The category of a failed call's status (its name), and of the category name `sent`
    with it when there was one: the sent one when it goes with the status, else the first
    category listed with the status, else SERVER."""
    with_status = [c for c, rule in ERRORS.items() if rule.status == status]
    if sent in with_status:
        return Category(sent)
    return with_status[0] if with_status else Category.SERVER


_CLASSES: dict[Category, type[SquallError]] = {
    Category.INVALID: InvalidInput,
    Category.NOT_FOUND: NotFound,
    Category.CONFLICT: Conflict,
    Category.ALREADY_EXISTS: AlreadyExists,
    Category.USAGE: UsageError,
    Category.UNAUTHENTICATED: Unauthenticated,
    Category.DENIED: PermissionDenied,
    Category.STORE: StoreError,
}


def error_for(category: Category, message: str) -> SquallError:
    """An error of `category` as another process (the server) reported it: the class of that
    category where it is defined here, else a SquallError that carries the category."""
    error = _CLASSES.get(category, SquallError)(message)
    error.category = category
    return error


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
