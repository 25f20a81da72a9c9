"""The errors Squall raises on purpose, and what each category means to a caller.

    SquallError                 root: everything below carries a message meant for a person
    ├── InvalidInput            the input was read and is wrong (a Fuzzfile, a template)
    │   ├── NotFound            it names something that does not exist (a run, a job)
    │   └── Conflict            it clashes with what exists (a name taken, a task not running)
    └── UsageError              the request itself is malformed (a bad option value)

The CLI exits with `exit_code`; the gRPC API will map the same categories to status codes.
Foreign errors (YAML, pydantic, the file system) are translated where they enter.
"""

from __future__ import annotations

__all__ = ["Conflict", "InvalidInput", "NotFound", "SquallError", "UsageError"]


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
