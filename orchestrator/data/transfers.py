"""Ingress and egress that the orchestrator runs itself: the byte movers are the agent's
(`substrate.transfers`: http(s), s3 and inline files, retries, resumed downloads, size checks,
the cache), and their failures are raised here as Squall's `TransferError`, of the transfer
category (exit code 1, gRPC UNAVAILABLE), with the same message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from substrate import transfers as movers
from substrate.transfers import RemoteFacts, TransferCache, TransferPolicy

from ..errors import Category, SquallError

__all__ = [
    "RemoteFacts",
    "TransferCache",
    "TransferError",
    "TransferPolicy",
    "describe",
    "fetch",
    "push",
]

P = ParamSpec("P")
R = TypeVar("R")


class TransferError(SquallError):
    """A transfer that failed after its retries; the message names the source and the cause."""

    category = Category.TRANSFER


def _ours(mover: Callable[P, R]) -> Callable[P, R]:
    """`mover`, raising Squall's TransferError where the agent's code raises its own."""

    @functools.wraps(mover)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return mover(*args, **kwargs)
        except movers.TransferError as exc:
            raise TransferError(str(exc)) from None

    return call


fetch = _ours(movers.fetch)
push = _ours(movers.push)
describe = _ours(movers.describe)
