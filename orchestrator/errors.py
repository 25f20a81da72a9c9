"""The errors Squall raises on purpose, and what each category means to a caller.

    SquallError                 root: everything below carries a message meant for a person
    ├── InvalidInput            the input was read and is wrong (a Fuzzfile, a template)
    └── UsageError              the request itself is malformed (a bad option value)

The CLI exits with `exit_code`; the gRPC API will map the same categories to status codes.
Foreign errors (YAML, pydantic, the file system) are translated where they enter.
"""

from __future__ import annotations

__all__ = ["InvalidInput", "SquallError", "UsageError"]


class SquallError(Exception):
    """Root of Squall's errors."""

    exit_code = 1


class InvalidInput(SquallError):
    """The input was read and is wrong; the message says where and how to fix it."""

    exit_code = 1


class UsageError(SquallError):
    """The request is malformed: an option value that cannot be used."""

    exit_code = 2
