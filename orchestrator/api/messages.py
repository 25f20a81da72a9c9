"""Identity, audit and secret records as the control API's messages (the server sends them;
the CLI's local mode makes the same ones, so that each command prints them one way)."""

from __future__ import annotations

from datetime import datetime

from api.squall.v1 import control_pb2 as pb

from ..identity import Principal, TokenInfo, UserInfo
from ..secrets import SecretEntry
from .audit import AuditRecord

__all__ = [
    "audit_message",
    "identity_message",
    "iso",
    "secret_message",
    "token_message",
    "user_message",
]


def iso(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at is not None else ""


def identity_message(who: Principal) -> pb.Identity:
    return pb.Identity(
        name=who.name, groups=list(who.groups), admin=who.admin, token_id=who.token_id
    )


def user_message(u: UserInfo) -> pb.UserInfo:
    return pb.UserInfo(
        name=u.name,
        groups=list(u.groups),
        admin=u.admin,
        disabled=u.disabled,
        created_at=iso(u.created_at),
    )


def token_message(t: TokenInfo) -> pb.TokenInfo:
    return pb.TokenInfo(
        id=t.id,
        user=t.user,
        note=t.note,
        created_at=iso(t.created_at),
        expires_at=iso(t.expires_at),
        revoked_at=iso(t.revoked_at),
        used_at=iso(t.used_at),
        state=t.state(),
    )


def audit_message(a: AuditRecord) -> pb.AuditEntry:
    return pb.AuditEntry(
        at=a.at.isoformat(timespec="milliseconds"),
        user=a.user,
        method=a.method,
        verb=a.verb,
        target=a.target,
        allowed=a.allowed,
        detail=a.detail,
        peer=a.peer,
        outcome=a.outcome,
    )


def secret_message(e: SecretEntry) -> pb.SecretInfo:
    return pb.SecretInfo(ref=e.ref, scope=e.scope, holder=e.holder, updated_at=iso(e.updated_at))
