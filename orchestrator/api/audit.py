"""The audit log: every control-plane call, who made it, which verb on what, whether the
access policy allowed it, and how the call ended, appended to the store (`squall admin
audit` reads it).

A call's entry is written before it runs (a crash mid-call leaves it with no outcome) and
given its outcome when it ends: `ok`, the category of the error it failed with, or why a
stream was cut off. Calls without a valid token are written one by one up to
`UNAUTHENTICATED_PER_MINUTE` per client address and minute; past that they are only counted,
and the address's next entry says how many were not written, so that a flood of bad tokens
cannot fill the disk.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..store import AuditEntry, Store

__all__ = [
    "MAX_ENTRIES",
    "UNAUTHENTICATED_PER_MINUTE",
    "AuditRecord",
    "Throttle",
    "add_entry",
    "read_audit",
    "settle",
]

MAX_ENTRIES = 1000  # the most one read returns (the newest)
UNAUTHENTICATED_PER_MINUTE = 60  # per client address; the rest are counted


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
    outcome: str = ""  # "" while the call runs (or if the server stopped during it)


def add_entry(
    s: Session,
    *,
    user: str,
    method: str,
    verb: str,
    target: str = "",
    allowed: bool,
    detail: str = "",
    peer: str = "",
    outcome: str = "",
) -> AuditEntry:
    """Append an entry within the session `s`; its id is set (for `settle`)."""
    entry = AuditEntry(
        user=user[:64],
        method=method[:64],
        verb=verb[:32],
        target=target[:255],
        allowed=allowed,
        detail=detail[:2000],
        peer=peer[:255],
        outcome=outcome[:255],
    )
    s.add(entry)
    s.flush()
    return entry


def settle(store: Store, entry_id: int, outcome: str) -> None:
    """Write how the call of entry `entry_id` ended; the first outcome written stays."""
    with store.session() as s:
        s.execute(
            update(AuditEntry)
            .where(AuditEntry.id == entry_id, AuditEntry.outcome == "")
            .values(outcome=outcome[:255])
        )


class Throttle:
    """How many entries for calls without a valid token each client address may still write
    this minute; `admit` says whether this one is written, and how many were dropped before
    it (to be counted in it) when a new minute began."""

    def __init__(self, per_minute: int = UNAUTHENTICATED_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._minute = 0
        self._written: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def admit(self, address: str, now: float | None = None) -> tuple[bool, int]:
        minute = int((time.monotonic() if now is None else now) // 60)
        with self._lock:
            if minute != self._minute:
                self._minute, self._written = minute, {}
            written = self._written.get(address, 0)
            if written >= self.per_minute:
                self._dropped[address] = self._dropped.get(address, 0) + 1
                return False, 0
            self._written[address] = written + 1
            return True, self._dropped.pop(address, 0)


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
            AuditRecord(
                e.at, e.user, e.method, e.verb, e.target, e.allowed, e.detail, e.peer, e.outcome
            )
            for e in s.scalars(query)
        ]
    return rows[::-1]
