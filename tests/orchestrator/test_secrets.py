"""Secrets sealed in the store: nothing in the clear on disk, the key file private and
rotated safely, a wrong or exposed key file refused clearly, each scope resolved for the user
who asks, and the plaintext files of older versions imported and removed. Real SQLite store,
real key files; nothing is mocked."""

from __future__ import annotations

import getpass
import os
import stat
import textwrap
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.errors import InvalidInput
from orchestrator.identity import add_user, groups_of
from orchestrator.secrets import SecretNotSet, SecretStore
from orchestrator.store import SecretValue, Store

ME = getpass.getuser()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def store(data: Path) -> Store:
    return Store(f"sqlite:///{data / 'squall.db'}")


@pytest.fixture
def secrets(store: Store, data: Path) -> SecretStore:
    return SecretStore(store, data / "secrets.key", legacy_dir=data / "secrets")


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def sealed(store: Store) -> dict[tuple[str, str, str], bytes]:
    with store.session() as s:
        return {(r.scope, r.holder, r.name): r.sealed for r in s.scalars(select(SecretValue)).all()}


def test_no_value_is_kept_in_the_clear_and_the_key_file_is_private(
    secrets: SecretStore, store: Store, data: Path
) -> None:
    values = {
        ("secret://user/TOKEN", ME): b"user-value-8f3a1c",
        ("secret://group/SHARED", "lab"): b"group-value-77d2e0",
        (
            "secret://organization/S3",
            "",
        ): b'{"accessKeyId": "AKIA0042", "secretAccessKey": "sk-9c1"}',
    }
    for (ref, holder), value in values.items():
        secrets.put(ref, holder, value)
    me = secrets.view(ME, ["lab"])
    assert me.get("secret://user/TOKEN") == "user-value-8f3a1c"
    assert me.get("secret://group/SHARED") == "group-value-77d2e0"
    assert me.credentials("secret://organization/S3")["secretAccessKey"] == "sk-9c1"
    store.engine.dispose()  # everything written out of the connections' hands
    for value in (*values.values(), b"AKIA0042", b"sk-9c1"):
        assert files_holding(data, value) == [], value
    key_file = data / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes().split()) == 1
    assert [p.name for p in data.iterdir() if p.name.startswith(".secrets.key")] == []


def test_a_new_key_file_is_made_once_in_a_private_folder(store: Store, tmp_path: Path) -> None:
    key_file = tmp_path / "fresh" / "keys" / "secrets.key"
    first = SecretStore(store, key_file)
    first.put("secret://user/A", "alice", b"alpha-value")
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    made = key_file.read_bytes()
    # another store on the same file (another process) uses that key, and keeps the file
    second = SecretStore(store, key_file)
    assert second.view("alice", []).get("secret://user/A") == "alpha-value"
    second.put("secret://user/B", "alice", b"beta-value")
    assert key_file.read_bytes() == made


def test_rotating_the_key_drops_the_old_one_and_keeps_every_value(
    secrets: SecretStore, store: Store, data: Path
) -> None:
    secrets.put("secret://user/ONE", "alice", b"value-one")
    secrets.put("secret://group/TWO", "lab", b"value-two")
    secrets.put("secret://cluster/THREE", "", b"value-three")
    key_file = data / "secrets.key"
    old_key = key_file.read_bytes().strip()
    before = sealed(store)

    assert secrets.rotate_key() == 3

    lines = key_file.read_bytes().split()
    assert len(lines) == 1
    assert lines[0] != old_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    after = sealed(store)
    assert after.keys() == before.keys()
    for name, token in after.items():
        assert token != before[name]
        with pytest.raises(InvalidToken):
            Fernet(old_key).decrypt(token)
    alice = secrets.view("alice", ["lab"])
    assert alice.get("secret://user/ONE") == "value-one"
    assert alice.get("secret://group/TWO") == "value-two"
    assert alice.get("secret://cluster/THREE") == "value-three"
    assert secrets.rotate_key() == 3  # and again
    assert alice.get("secret://user/ONE") == "value-one"


def test_a_rotation_that_cannot_finish_loses_nothing(
    secrets: SecretStore, store: Store, data: Path
) -> None:
    """A row no key opens stops the rotation before anything is re-encrypted; the key file
    still holds the old key, after the new one, and every value still reads."""
    secrets.put("secret://user/ONE", "alice", b"value-one")
    before = sealed(store)
    with store.session() as s:
        s.add(
            SecretValue(
                scope="user", holder="bob", name="ALIEN", sealed=Fernet.generate_key() + b"x"
            )
        )
    with pytest.raises(InvalidInput, match=r"does not open secret://user/ALIEN of bob"):
        secrets.rotate_key()
    assert sealed(store)[("user", "alice", "ONE")] == before[("user", "alice", "ONE")]
    assert len((data / "secrets.key").read_bytes().split()) == 2  # [new, old]
    assert secrets.view("alice", []).get("secret://user/ONE") == "value-one"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(secrets: SecretStore, data: Path, mode: int) -> None:
    secrets.put("secret://user/ONE", "alice", b"value-one")
    key_file = data / "secrets.key"
    key_file.chmod(mode)
    with pytest.raises(InvalidInput, match=r"key file .*secrets\.key is open to others") as info:
        secrets.view("alice", []).get("secret://user/ONE")
    assert "chmod 600" in str(info.value)
    with pytest.raises(InvalidInput, match="open to others"):
        secrets.put("secret://user/TWO", "alice", b"value-two")


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", b"not-a-key\n", Fernet.generate_key() + b"\nshort\n"]
)
def test_a_malformed_key_file_is_refused(store: Store, tmp_path: Path, content: bytes) -> None:
    key_file = tmp_path / "secrets.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(InvalidInput, match=r"key file .*secrets\.key (is malformed|holds no key)"):
        SecretStore(store, key_file).put("secret://user/ONE", "alice", b"value-one")


def test_a_replaced_key_file_says_so(secrets: SecretStore, data: Path) -> None:
    secrets.put("secret://user/X", "alice", b"value-x")
    key_file = data / "secrets.key"
    key_file.write_bytes(Fernet.generate_key() + b"\n")  # another key in its place
    secrets.put("secret://user/Y", "alice", b"value-y")
    alice = secrets.view("alice", [])
    assert alice.get("secret://user/Y") == "value-y"
    with pytest.raises(
        InvalidInput,
        match=rf"the key file {key_file} does not open secret://user/X of alice: was it replaced",
    ):
        alice.get("secret://user/X")


def test_each_scope_resolves_for_the_user_who_asks(secrets: SecretStore, store: Store) -> None:
    add_user(store, "alice", ["lab", "ops"])
    add_user(store, "bob", ["ops"])
    assert groups_of(store, "alice") == ("lab", "ops")
    assert groups_of(store, "nobody") == ("nobody",)  # unknown: a group of its own
    secrets.put("secret://user/TOKEN", "alice", b"alice-token")
    secrets.put("secret://user/TOKEN", "bob", b"bob-token")
    secrets.put("secret://group/DB", "ops", b"ops-db")
    secrets.put("secret://account/DB", "lab", b"lab-db")  # `account` is `group`
    secrets.put("secret://organization/S3", "ignored", b"org-s3")

    alice, bob = secrets.view("alice", ["lab", "ops"]), secrets.view("bob", ["ops"])
    assert alice.get("secret://user/TOKEN") == "alice-token"
    assert bob.get("secret://user/TOKEN") == "bob-token"
    # groups in the order given: the first that holds the name
    assert alice.get("secret://group/DB") == "lab-db"
    assert secrets.view("alice", ["ops", "lab"]).get("secret://group/DB") == "ops-db"
    assert bob.get("secret://account/DB") == "ops-db"
    for who in (alice, bob, secrets.view("carol", ["carol"])):
        assert who.get("secret://organization/S3") == "org-s3"
    carol = secrets.view("carol", ["carol"])
    with pytest.raises(SecretNotSet, match=r"secret://user/TOKEN is not set for carol") as info:
        carol.get("secret://user/TOKEN")
    assert "squall secret set secret://user/TOKEN" in str(info.value)
    assert "stdin" in str(info.value)
    with pytest.raises(SecretNotSet, match=r"not set for any of carol's groups \(carol\)"):
        carol.get("secret://group/DB")
    # what each one may list: never another user's, never a value
    listed = {(e.ref, e.holder) for e in secrets.entries("bob", ["ops"])}
    assert listed == {
        ("secret://user/TOKEN", "bob"),
        ("secret://group/DB", "ops"),
        ("secret://organization/S3", ""),
    }
    assert len(secrets.entries("admin", [], everything=True)) == 5
    assert all(e.updated_at.tzinfo is not None for e in secrets.entries("bob", ["ops"]))
    assert secrets.remove("secret://user/TOKEN", "bob") is True
    assert secrets.remove("secret://user/TOKEN", "bob") is False
    assert alice.get("secret://user/TOKEN") == "alice-token"
    with pytest.raises(SecretNotSet):
        bob.get("secret://user/TOKEN")


def test_a_mapping_secret_gives_each_of_its_values_to_mask(secrets: SecretStore) -> None:
    secrets.put("secret://user/S3", "alice", b"accessKeyId: AKIA77\nsecretAccessKey: sk-42\n")
    secrets.put("secret://user/PLAIN", "alice", b"plain-value\n")
    found = secrets.view("alice", []).values(
        ["secret://user/S3", "secret://user/PLAIN", "secret://user/UNSET"]
    )
    assert "AKIA77" in found
    assert "sk-42" in found
    assert "plain-value\n" in found
    assert "plain-value" in found


def test_a_run_gets_its_owners_secrets_and_no_one_elses(store: Store, data: Path) -> None:
    engine = Engine(store, [], data_dir=data)  # submit only: nothing runs
    engine.secrets.put("secret://user/TOKEN", "alice", b"alice-token")
    text = "version: v4\n" + textwrap.dedent("""
        jobs:
          use:
            image: {uri: docker://busybox:1.36}
            command: [/bin/true]
            env: [TOKEN=secret://user/TOKEN]
    """)
    assert engine.submit("alice/ok", text, owner="alice")
    with pytest.raises(InvalidInput, match=r"not set: secret://user/TOKEN \(for bob\)"):
        engine.submit("bob/no", text, owner="bob")


def test_plaintext_files_of_older_versions_are_imported_and_removed(
    secrets: SecretStore, store: Store, data: Path
) -> None:
    legacy = data / "secrets"
    files = {
        "user/TOKEN": b"legacy-user-5a1",
        "group/SHARED": b"legacy-group-6b2",
        "organization/ORG": b"legacy-org-7c3",
        "user/KEPT": b"legacy-old-8d4",
        "user/.HALF.tmp": b"legacy-half-9e5",  # a write that never finished
    }
    for rel, value in files.items():
        path = legacy / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(value)
        path.chmod(0o600)
    # a value set since (or imported before a crash that left its file): the store's stays
    SecretStore(store, data / "secrets.key").put("secret://user/KEPT", ME, b"newer-value")

    me = secrets.view(ME, groups_of(store, ME))
    assert me.get("secret://user/TOKEN") == "legacy-user-5a1"
    assert me.get("secret://group/SHARED") == "legacy-group-6b2"
    assert me.get("secret://organization/ORG") == "legacy-org-7c3"
    assert me.get("secret://user/KEPT") == "newer-value"
    assert not legacy.exists()
    store.engine.dispose()
    for value in files.values():
        assert files_holding(data, value) == [], value
    # done once: a file that shows up later is not read
    later = legacy / "user" / "LATER"
    later.parent.mkdir(parents=True)
    later.write_bytes(b"later-value")
    with pytest.raises(SecretNotSet):
        me.get("secret://user/LATER")
    assert later.exists()


def test_a_lost_key_file_is_not_made_anew_over_sealed_secrets(
    secrets: SecretStore, store: Store, data: Path
) -> None:
    secrets.put("secret://user/A", ME, b"sealed-value")
    (data / "secrets.key").unlink()
    fresh = SecretStore(store, data / "secrets.key")
    with pytest.raises(InvalidInput, match="is missing, and the store holds 1 secret"):
        fresh.put("secret://user/B", ME, b"another")
    with pytest.raises(InvalidInput, match="restore it from a backup"):
        fresh.rotate_key()
    assert not (data / "secrets.key").exists()


def test_rotations_from_two_processes_take_turns(store: Store, data: Path) -> None:
    """Two stores over one key file (as the server and `squall admin rotate-key` are): each
    rotation holds the key file's lock, so none drops a key another one sealed with."""
    first = SecretStore(store, data / "secrets.key")
    second = SecretStore(store, data / "secrets.key")
    first.put("secret://user/A", ME, b"kept-through-it-all")
    errors: list[BaseException] = []

    def rotate(secrets: SecretStore) -> None:
        try:
            for _ in range(8):
                secrets.rotate_key()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert SecretStore(store, data / "secrets.key").view(ME, [ME]).get("secret://user/A") == (
        "kept-through-it-all"
    )
    assert len((data / "secrets.key").read_bytes().split()) == 1
