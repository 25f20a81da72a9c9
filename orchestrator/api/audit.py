"""The audit log: every control-plane call, who made it, which verb on what, and whether the
access policy allowed it, appended to the store (`squall admin audit` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from ..store import AuditEntry, Store

__all__ = ["MAX_ENTRIES", "AuditRecord", "read_audit", "record"]

MAX_ENTRIES = 1000  # the most one read returns (the newest)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at: datetime
    user: str
    method: str
    verb: str
    target: str
    allowed: bool
    detail: str
    peer: str


def record(
    store: Store,
    *,
    user: str,
    method: str,
    verb: str,
    target: str = "",
    allowed: bool,
    detail: str = "",
    peer: str = "",
) -> None:
    with store.session() as s:
        s.add(
            AuditEntry(
                user=user[:64],
                method=method[:64],
                verb=verb[:32],
                target=target[:255],
                allowed=allowed,
                detail=detail[:2000],
                peer=peer[:255],
            )
        )


def read_audit(
    store: Store,
    *,
    user: str = "",
    since: datetime | None = None,
    limit: int = MAX_ENTRIES,
    denied: bool = False,
) -> list[AuditRecord]:
    """The newest `limit` entries (of `user`, from `since`, only denied ones with `denied`),
    oldest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(min(limit, MAX_ENTRIES))
    if user:
        query = query.where(AuditEntry.user == user)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if denied:
        query = query.where(AuditEntry.allowed.is_(False))
    with store.session() as s:
        rows = [
            AuditRecord(e.at, e.user, e.method, e.verb, e.target, e.allowed, e.detail, e.peer)
            for e in s.scalars(query)
        ]
    return rows[::-1]
