"""Who calls the control plane: users, the groups they are in, and their API tokens.

A token is shown once, when it is made (`sqt_<id>_<secret>`, 32 random bytes); the store
keeps its SHA-256 only, so a copy of the database opens nothing. A token expires (90 days
unless told otherwise), can be revoked by its id, and stops working when its user is
disabled. The server's first token (its `server-token` file) belongs to the admin user
`admin` (`bootstrap`), so that a new server is administered the way it was reached before.

A user that the store does not know (the account running `squall run` on this machine) is in
one group named after itself (`groups_of`): its group secrets are its own.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .errors import AlreadyExists, InvalidInput, NotFound, Unauthenticated
from .store import Store, Token, User

__all__ = [
    "ADMIN",
    "DEFAULT_TOKEN_TTL",
    "MAX_TOKEN_TTL",
    "Principal",
    "TokenInfo",
    "UserInfo",
    "add_user",
    "authenticate",
    "authenticate_in",
    "bootstrap",
    "check_name",
    "groups_of",
    "is_disabled",
    "issue_token",
    "list_tokens",
    "list_users",
    "revoke_token",
    "set_disabled",
    "token_ttl",
]

ADMIN = "admin"  # the user the server's first token belongs to
DEFAULT_TOKEN_TTL = timedelta(days=90)
MAX_TOKEN_TTL = timedelta(days=3650)  # the longest lifetime anyone may ask for
_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,63}$")
_PREFIX = "sqt_"
_FILE_NOTE = "the server's token file"


def check_name(name: str, what: str = "user") -> str:
    """`name` if it can name a user or a group (as Unix names go: lower case, digits, `._-`)."""
    if not _NAME.match(name):
        raise InvalidInput(
            f"{name!r} cannot name a {what}: use lower-case letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or '_')"
        )
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    groups: tuple[str, ...] = ()
    admin: bool = False
    token_id: str = ""


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    groups: tuple[str, ...]
    admin: bool
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    user: str
    note: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    used_at: datetime | None

    def state(self, now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _user_info(u: User) -> UserInfo:
    return UserInfo(u.name, tuple(u.groups or ()), u.admin, u.disabled, u.created_at)


def _token_info(t: Token) -> TokenInfo:
    return TokenInfo(t.id, t.user, t.note, t.created_at, t.expires_at, t.revoked_at, t.used_at)


def add_user(
    store: Store, name: str, groups: Sequence[str] = (), *, admin: bool = False
) -> UserInfo:
    check_name(name)
    for group in groups:
        check_name(group, "group")
    with store.session() as s:
        if s.get(User, name) is not None:
            raise AlreadyExists(f"user {name} exists (`squall admin user list`)")
        user = User(name=name, groups=sorted(set(groups)), admin=admin, disabled=False)
        s.add(user)
        s.flush()
        return _user_info(user)


def list_users(store: Store) -> list[UserInfo]:
    with store.session() as s:
        return [_user_info(u) for u in s.scalars(select(User).order_by(User.name))]


def set_disabled(store: Store, name: str, disabled: bool = True) -> UserInfo:
    """Disable a user (its tokens stop working at once; its runs go on) or enable it again."""
    with store.session() as s:
        user = s.get(User, name)
        if user is None:
            raise NotFound(f"no user {name!r} (`squall admin user list`)")
        user.disabled = disabled
        s.flush()
        return _user_info(user)


def is_disabled(store: Store, name: str) -> bool:
    """Whether `name` is a user the store knows and has disabled."""
    with store.session() as s:
        user = s.get(User, name)
        return user is not None and user.disabled


def groups_of(store: Store, name: str) -> tuple[str, ...]:
    """The groups `name` is in: its own listed groups, or, for a user the store does not
    know (the local account running `squall run`), one group named after itself."""
    with store.session() as s:
        user = s.get(User, name)
        return tuple(user.groups or ()) if user is not None else (name,)


def token_ttl(seconds: float | None) -> timedelta | None:
    """A token lifetime asked for in seconds: None, the default; 0, never expires."""
    if seconds is None:
        return DEFAULT_TOKEN_TTL
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TOKEN_TTL.total_seconds():
        raise InvalidInput(
            f"a token lifetime is a number of seconds up to {MAX_TOKEN_TTL.days} days, "
            f"0 for never: not {seconds}"
        )
    return timedelta(seconds=seconds) if seconds else None


def issue_token(
    store: Store, user: str, *, ttl: timedelta | None = DEFAULT_TOKEN_TTL, note: str = ""
) -> tuple[str, TokenInfo]:
    """A new token for `user`: its text (shown once, kept nowhere) and its record.
    `ttl` None: it never expires."""
    if ttl is not None and ttl <= timedelta(0):
        raise InvalidInput("a token's lifetime must be positive")
    token_id = secrets.token_hex(4)
    text = f"{_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    return text, _keep_token(store, user, text, token_id, ttl, note)


def _keep_token(
    store: Store, user: str, text: str, token_id: str, ttl: timedelta | None, note: str
) -> TokenInfo:
    created = datetime.now(UTC)
    with store.session() as s:
        found = s.get(User, user)
        if found is None:
            raise NotFound(f"no user {user!r} (`squall admin user add {user}` makes one)")
        token = Token(
            id=token_id,
            user=user,
            digest=_digest(text),
            note=note[:255],
            created_at=created,
            expires_at=created + ttl if ttl is not None else None,
        )
        s.add(token)
        s.flush()
        return _token_info(token)


def list_tokens(store: Store, user: str | None = None) -> list[TokenInfo]:
    with store.session() as s:
        query = select(Token).order_by(Token.user, Token.created_at)
        if user is not None:
            query = query.where(Token.user == user)
        return [_token_info(t) for t in s.scalars(query)]


def revoke_token(store: Store, token_id: str) -> TokenInfo:
    with store.session() as s:
        token = s.get(Token, token_id)
        if token is None:
            raise NotFound(f"no token {token_id!r} (`squall admin token list`)")
        if token.revoked_at is None:
            token.revoked_at = datetime.now(UTC)
        s.flush()
        return _token_info(token)


def authenticate(store: Store, text: str) -> Principal:
    """The user whose token `text` is; Unauthenticated, saying which of missing, unknown,
    expired, revoked or disabled, otherwise (never echoing the token)."""
    with store.session() as s:
        return authenticate_in(s, text)


def authenticate_in(s: Session, text: str) -> Principal:
    """`authenticate` within the session `s` (the gate's one unit of work per call)."""
    if not text:
        raise Unauthenticated("no token: send `authorization: Bearer <token>`")
    now = datetime.now(UTC)
    row = s.execute(
        select(Token, User).join(User, Token.user == User.name).where(Token.digest == _digest(text))
    ).first()
    if row is None:
        raise Unauthenticated("unknown token")
    token, user = row
    if token.revoked_at is not None:
        raise Unauthenticated(f"token {token.id} was revoked")
    if token.expires_at is not None and token.expires_at <= now:
        raise Unauthenticated(f"token {token.id} expired at {token.expires_at:%Y-%m-%d %H:%M}Z")
    if user.disabled:
        raise Unauthenticated(f"user {user.name} is disabled")
    if token.used_at is None or now - token.used_at > timedelta(minutes=1):
        s.execute(update(Token).where(Token.id == token.id).values(used_at=now))
    return Principal(user.name, tuple(user.groups or ()), user.admin, token.id)


def bootstrap(store: Store, text: str) -> None:
    """Make `text` (the server's token file) the token of the admin user `admin`: the root
    of trust of a server. On each start, `admin` is made (or enabled and made admin again,
    whatever was done to it through the API), the file's token works (made, or its revocation
    undone), and an earlier token file's token is revoked: replacing the file retires it."""
    if len(text) < 16:
        raise ValueError("the server token must be at least 16 characters")
    now = datetime.now(UTC)
    with store.session() as s:
        user = s.get(User, ADMIN)
        if user is None:
            s.add(User(name=ADMIN, groups=[], admin=True, disabled=False))
        else:
            user.admin, user.disabled = True, False
        s.execute(
            update(Token)
            .where(
                Token.user == ADMIN,
                Token.note == _FILE_NOTE,
                Token.digest != _digest(text),
                Token.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )
        mine = s.scalars(select(Token).where(Token.digest == _digest(text))).first()
        if mine is not None:
            if mine.user != ADMIN:
                raise ValueError("the server token is another user's token: make a new one")
            mine.revoked_at, mine.expires_at = None, None
            return
    _keep_token(store, ADMIN, text, secrets.token_hex(4), None, _FILE_NOTE)
