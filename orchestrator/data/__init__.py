"""Data: ingress into volumes before the first job, egress out of them after the last."""

from .transfers import (
    RemoteFacts,
    TransferCache,
    TransferError,
    TransferPolicy,
    describe,
    fetch,
    push,
)

__all__ = [
    "RemoteFacts",
    "TransferCache",
    "TransferError",
    "TransferPolicy",
    "describe",
    "fetch",
    "push",
]
