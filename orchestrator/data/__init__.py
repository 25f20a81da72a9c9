"""Data: ingress into volumes before the first job, egress out of them after the last."""

from .transfers import TransferCache, TransferError, TransferPolicy, fetch, push

__all__ = ["TransferCache", "TransferError", "TransferPolicy", "fetch", "push"]
