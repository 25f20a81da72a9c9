"""Users and tokens in the store (`orchestrator.identity`): what a token opens, and the
server's token file as the root of trust, whatever was done to its admin through the API."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from orchestrator import identity
from orchestrator.errors import AlreadyExists, InvalidInput, Unauthenticated
from orchestrator.store import Store

FILE_TOKEN = "the-server-token-file-" + "f" * 20


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'squall.db'}")


def test_a_token_opens_its_user_until_revoked_expired_or_disabled(store: Store) -> None:
    identity.add_user(store, "alice", ["chem", "bio"])
    text, token = identity.issue_token(store, "alice", ttl=timedelta(hours=1))
    who = identity.authenticate(store, text)
    assert (who.name, who.groups, who.admin, who.token_id) == (
        "alice",
        ("bio", "chem"),
        False,
        token.id,
    )
    identity.set_disabled(store, "alice")
    with pytest.raises(Unauthenticated, match="alice is disabled"):
        identity.authenticate(store, text)
    identity.set_disabled(store, "alice", False)
    identity.revoke_token(store, token.id)
    with pytest.raises(Unauthenticated, match=f"token {token.id} was revoked"):
        identity.authenticate(store, text)
    with pytest.raises(Unauthenticated, match="unknown token"):
        identity.authenticate(store, text + "x")
    with pytest.raises(AlreadyExists):
        identity.add_user(store, "alice")
    for bad in ("Alice", "a b", "", "x" * 65, "../x"):
        with pytest.raises(InvalidInput):
            identity.add_user(store, bad)


def test_the_token_file_is_the_root_of_trust(store: Store) -> None:
    identity.bootstrap(store, FILE_TOKEN)
    admin = identity.authenticate(store, FILE_TOKEN)
    assert (admin.name, admin.admin) == ("admin", True)
    # locked out through the API (another admin disabled it, revoked the file's token)...
    identity.set_disabled(store, "admin")
    identity.revoke_token(store, admin.token_id)
    with pytest.raises(Unauthenticated):
        identity.authenticate(store, FILE_TOKEN)
    identity.bootstrap(store, FILE_TOKEN)  # ...the next start lets it in again
    assert identity.authenticate(store, FILE_TOKEN).admin
    # a new token file retires the old one's token
    identity.bootstrap(store, "another-token-file-" + "g" * 20)
    with pytest.raises(Unauthenticated, match="revoked"):
        identity.authenticate(store, FILE_TOKEN)
    assert identity.authenticate(store, "another-token-file-" + "g" * 20).name == "admin"
    # a user's own token cannot become the server's
    identity.add_user(store, "bob")
    bobs, _ = identity.issue_token(store, "bob")
    with pytest.raises(ValueError, match="another user's"):
        identity.bootstrap(store, bobs)
    with pytest.raises(ValueError, match="16 characters"):
        identity.bootstrap(store, "short")
    assert FILE_TOKEN.encode() not in Path(store.location).read_bytes()
