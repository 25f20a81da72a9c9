"""Secrets that Fuzzfiles name as `secret://SCOPE/NAME`: kept encrypted in the store, read for
a run's owner when a container starts, an image is pulled or a transfer runs, and never
written to a log, an event or a record in the clear.

A secret is one value (env values) or a mapping of credentials, JSON or YAML (transfers:
accessKeyId, secretAccessKey, sessionToken, region, endpoint; images: username, password).
Each belongs to a holder, by its scope: a `user` secret to one user, a `group` secret to one
group (`account` is read as `group`, as Fuzzball does), an `organization` or `cluster` secret
to everyone (holder ""). For a run, `secret://user/X` is its owner's X, `secret://group/X`
the X of the first of the owner's groups that holds one, `secret://organization/X` the one X.
Env values and an image's legacy `secrets:` map may also hold `${{ secret "NAME" }}`
placeholders, which stand for `secret://user/NAME`.

Values are sealed with Fernet (AES-128-CBC and HMAC-SHA256) under the keys of a key file
(`DATA/secrets.key` by default, 0600, one urlsafe key a line, the newest first): a copy of the
database alone opens nothing. `rotate_key` puts a new key first and re-encrypts every value.
Older versions kept plaintext files under `DATA/secrets/SCOPE/NAME`: they are imported on
first use, and deleted once their value is in the store.
"""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import getpass
import os
import re
import secrets as random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from .errors import InvalidInput
from .fuzzfile.model import Workflow
from .fuzzfile.variables import fill_legacy_secrets, legacy_secret_references, secret_references
from .store import SecretValue, Store

__all__ = [
    "SecretEntry",
    "SecretNotSet",
    "SecretStore",
    "SecretView",
    "parse_reference",
    "referenced_secrets",
]

_REF = re.compile(r"^secret://(user|group|account|organization|cluster)/([A-Za-z0-9_.-]{1,128})$")
_EVERYONE = ("organization", "cluster")  # scopes whose secrets have no holder


def parse_reference(ref: str) -> tuple[str, str]:
    """(scope, name) of `secret://SCOPE/NAME`."""
    m = _REF.match(ref)
    if not m:
        raise InvalidInput(
            f"{ref!r} is not a secret reference; write secret://user/NAME or secret://group/NAME"
        )
    scope, name = m.groups()
    if name in (".", ".."):  # a file name of the legacy folders, never the folder itself
        raise InvalidInput(f"{ref!r}: a secret's name cannot be {name!r}")
    return ("group" if scope == "account" else scope), name


class SecretNotSet(InvalidInput):
    """The secret a reference names is not set for whoever asked."""


@dataclass(frozen=True, slots=True)
class SecretEntry:
    """A secret as listed: whose it is and when it was set, never its value."""

    ref: str
    scope: str
    holder: str  # the user or group it belongs to; "" for the organization's (and cluster's)
    updated_at: datetime


class SecretStore:
    """Secret values in `store`'s `secrets` table, sealed with the keys of `key_file` (made
    on first use). `legacy_dir`: the plaintext files of older versions, imported on first
    use and then deleted."""

    def __init__(self, store: Store, key_file: Path, legacy_dir: Path | None = None) -> None:
        self.store = store
        self.key_file = key_file
        self.legacy_dir = legacy_dir
        self._lock = threading.Lock()  # the legacy import; a rotation
        self._imported = legacy_dir is None

    # ---- writing ---------------------------------------------------------------------------

    def put(self, ref: str, holder: str, value: bytes) -> None:
        """Set `ref` of `holder` (a user name for `user`, a group name for `group`; ignored,
        "", for `organization` and `cluster`) to `value`."""
        scope, name = parse_reference(ref)
        self._ready()
        self._put(scope, _holder(scope, holder), name, value)

    def remove(self, ref: str, holder: str) -> bool:
        """Delete `ref` of `holder`; False when it was not set."""
        scope, name = parse_reference(ref)
        self._ready()
        with self.store.session() as s:
            gone = s.execute(
                delete(SecretValue).where(
                    SecretValue.scope == scope,
                    SecretValue.holder == _holder(scope, holder),
                    SecretValue.name == name,
                )
            )
            return bool(getattr(gone, "rowcount", 0))

    def entries(
        self, user: str, groups: Sequence[str], everything: bool = False
    ) -> list[SecretEntry]:
        """The secrets `user` can use: its own, its groups', the organization's and the
        cluster's; with `everything`, every holder's (for admins). Never their values."""
        self._ready()
        with self.store.session() as s:
            rows = s.execute(
                select(
                    SecretValue.scope, SecretValue.holder, SecretValue.name, SecretValue.updated_at
                )
            ).all()
        mine = {("user", user), *(("group", g) for g in groups)}
        return sorted(
            (
                SecretEntry(f"secret://{scope}/{name}", scope, holder, _utc(at))
                for scope, holder, name, at in rows
                if everything or scope in _EVERYONE or (scope, holder) in mine
            ),
            key=lambda e: (e.ref, e.holder),
        )

    def rotate_key(self) -> int:
        """Put a new key in the key file and re-encrypt every secret with it; how many were.

        Safe if it stops anywhere: the key file first holds the new key and the old ones
        (whatever the rows are sealed with opens), then every row is re-encrypted in one
        transaction, and only then are the old keys dropped from the file."""
        self._ready()
        with self._lock, self._rotating():
            old = self._keys()
            new = Fernet.generate_key()
            self._write_keys([new, *old])
            both = MultiFernet([Fernet(k) for k in (new, *old)])
            with self.store.session() as s:
                rows = s.scalars(select(SecretValue)).all()
                for row in rows:
                    try:
                        row.sealed = both.rotate(row.sealed)
                    except InvalidToken:
                        raise InvalidInput(
                            f"the key file {self.key_file} does not open "
                            f"secret://{row.scope}/{row.name}"
                            + (f" of {row.holder}" if row.holder else "")
                            + ": was it replaced? Nothing was re-encrypted"
                        ) from None
            self._write_keys([new])
            return len(rows)

    # ---- reading ---------------------------------------------------------------------------

    def view(self, owner: str, groups: Sequence[str]) -> SecretView:
        """The secrets as `owner`, in `groups` (in this order), sees them."""
        return SecretView(self, owner, tuple(groups))

    def _resolve(self, ref: str, owner: str, groups: Sequence[str]) -> str:
        scope, name = parse_reference(ref)
        self._ready()
        holders = [owner] if scope == "user" else list(groups) if scope == "group" else [""]
        for tries in (1, 2):
            with self.store.session() as s:
                rows = s.execute(
                    select(SecretValue.holder, SecretValue.sealed).where(
                        SecretValue.scope == scope,
                        SecretValue.name == name,
                        SecretValue.holder.in_(holders),
                    )
                ).all()
                keys = self._fernet() if rows else None
            sealed = dict(rows)
            holder = next((h for h in holders if h in sealed), None)
            if holder is None or keys is None:
                raise SecretNotSet(_not_set(ref, scope, owner, groups))
            try:
                value = keys.decrypt(sealed[holder])
            except InvalidToken:
                if tries == 1:
                    continue  # a rotation may have ended in between: once more, afresh
                raise InvalidInput(
                    f"the key file {self.key_file} does not open {ref}"
                    + (f" of {holder}" if holder else "")
                    + ": was it replaced?"
                ) from None
            try:
                return value.decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"{ref} does not hold UTF-8 text") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- the key file ----------------------------------------------------------------------

    def _fernet(self) -> MultiFernet:
        return MultiFernet([Fernet(k) for k in self._keys()])

    def _keys(self) -> list[bytes]:
        """The keys of the key file, the newest first; made (with one key) when missing.
        Refuses a key file others may read, or one that does not hold keys."""
        path = self.key_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return self._make_keys()
        except OSError as exc:
            raise InvalidInput(f"cannot read the secrets' key file {path}: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise InvalidInput(
                    f"the secrets' key file {path} is open to others (mode {mode & 0o777:04o}); "
                    f"it must be private to its owner: chmod 600 {path}"
                )
            text = f.read()
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        if not keys:
            raise InvalidInput(f"the secrets' key file {path} holds no key")
        for number, key in enumerate(keys, 1):
            try:
                Fernet(key)
            except (ValueError, binascii.Error):
                raise InvalidInput(
                    f"the secrets' key file {path} is malformed: line {number} is not a Fernet "
                    "key (32 url-safe base64-encoded bytes)"
                ) from None
        return keys

    @contextlib.contextmanager
    def _rotating(self) -> Iterator[None]:
        """Hold the key file's lock (a file beside it): one rotation at a time, across
        processes (the server's, and `squall admin rotate-key` on the store's machine)."""
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.key_file.with_name(f".{self.key_file.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _make_keys(self) -> list[bytes]:
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Fernet.generate_key()
        try:
            self._write_keys([key], exclusive=True)
        except FileExistsError:  # another process made it meanwhile
            return self._keys()
        return [key]

    def _write_keys(self, keys: list[bytes], *, exclusive: bool = False) -> None:
        """Write the key file whole or not at all (a private file beside it, synced, then
        renamed over it; linked, with `exclusive`, so that an existing file stays)."""
        path = self.key_file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(b"".join(k + b"\n" for k in keys))
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)
            else:
                os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- rows ------------------------------------------------------------------------------

    def _put(self, scope: str, holder: str, name: str, value: bytes, keep: bool = False) -> None:
        """Seal and store one value (`keep`: not over one already set)."""
        for tries in (1, 2):
            try:
                with self.store.session() as s:
                    # the key file is read inside the transaction: a rotation's rows are
                    # written in one transaction, before its old keys leave the file
                    row = s.scalars(
                        select(SecretValue).where(
                            SecretValue.scope == scope,
                            SecretValue.holder == holder,
                            SecretValue.name == name,
                        )
                    ).first()
                    if row is not None and keep:
                        return
                    sealed = self._fernet().encrypt(value)
                    if row is None:
                        s.add(
                            SecretValue(
                                scope=scope,
                                holder=holder,
                                name=name,
                                sealed=sealed,
                                updated_at=datetime.now(UTC),
                            )
                        )
                    else:
                        row.sealed, row.updated_at = sealed, datetime.now(UTC)
                return
            except IntegrityError:  # set by another process at the same moment
                if tries == 2:
                    raise

    def _ready(self) -> None:
        """Refuse to go on without the key file when the store holds secrets sealed with it
        (a new key would not open them); import the legacy plaintext files, once."""
        if not self.key_file.exists():
            with self.store.session() as s:
                sealed = s.scalar(select(func.count()).select_from(SecretValue))
            if sealed:
                raise InvalidInput(
                    f"the secrets' key file {self.key_file} is missing, and the store holds "
                    f"{sealed} secret(s) sealed with it: restore it from a backup (a new key "
                    "would not open them)"
                )
        if self._imported:
            return
        with self._lock:
            if not self._imported:
                self._import_legacy()
                self._imported = True

    def _import_legacy(self) -> None:
        """Each `legacy_dir/SCOPE/NAME` into the store (as this machine's user's, for `user`
        and `group`: such a user is in a group of its own name), then the file deleted: a
        value is in the store before its file goes, so a crash loses none. A secret already
        in the store is newer than its file and stays."""
        root = self.legacy_dir
        if root is None or not root.is_dir():
            return
        me = getpass.getuser()
        for folder in sorted(root.iterdir()):
            if folder.is_symlink() or not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_symlink() or not path.is_file():
                    continue
                if path.name.startswith("."):  # a write the older version did not finish
                    if path.name.endswith(".tmp"):
                        path.unlink(missing_ok=True)
                    continue
                try:
                    scope, name = parse_reference(f"secret://{folder.name}/{path.name}")
                except InvalidInput:
                    continue  # not a secret of Squall's: left where it is
                try:
                    value = path.read_bytes()
                except FileNotFoundError:  # imported by another process meanwhile
                    continue
                self._put(scope, "" if scope in _EVERYONE else me, name, value, keep=True)
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


class SecretView:
    """The secrets as one user (`owner`, in `groups`) sees them: what a run of theirs uses."""

    def __init__(self, secrets: SecretStore, owner: str, groups: tuple[str, ...]) -> None:
        self.secrets = secrets
        self.owner = owner
        self.groups = groups

    def get(self, ref: str) -> str:
        """The value of `ref` for this user; SecretNotSet, saying how to set it, if none."""
        return self.secrets._resolve(ref, self.owner, self.groups)

    def credentials(self, ref: str) -> dict[str, str]:
        """A secret holding a mapping (JSON or YAML), as strings."""
        try:
            data = yaml.safe_load(self.get(ref))
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            raise InvalidInput(
                f"{ref} must hold a mapping such as "
                '{"accessKeyId": ..., "secretAccessKey": ..., "endpoint": ...}'
            )
        return {str(k): str(v) for k, v in data.items() if v is not None}

    def fill(self, value: str) -> str:
        """An env value (or a legacy image credential) with its secrets in: the value of a
        `secret://...` reference, or the text with each placeholder replaced."""
        if value.startswith("secret://"):
            return self.get(value)
        return fill_legacy_secrets(value, self.get)

    def login(self, ref: str) -> tuple[str, str]:
        """The registry username and password kept in the image secret `ref`."""
        self.get(ref)  # says so when it is not set
        try:
            data = self.credentials(ref)
        except InvalidInput:
            data = {}
        if not data.get("username") or not data.get("password"):
            raise InvalidInput(
                f"{ref} is an image secret and must hold a mapping with a username and a "
                'password, such as {"username": "robot", "password": "..."}'
            )
        return data["username"], data["password"]

    def values(self, refs: Sequence[str]) -> list[str]:
        """Every value `refs` resolve to that is set (what redaction masks): each whole text
        (and without its surrounding blanks), and each value of a mapping secret."""
        found: list[str] = []
        for ref in refs:
            try:
                text = self.get(ref)
            except SecretNotSet:
                continue
            found.append(text)
            if text.strip() != text:
                found.append(text.strip())
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(data, dict):
                found.extend(
                    str(v)
                    for v in data.values()
                    if isinstance(v, str | int | float) and not isinstance(v, bool)
                )
        return found


def _holder(scope: str, holder: str) -> str:
    if scope in _EVERYONE:
        return ""
    if not holder:
        raise InvalidInput(f"a {scope} secret belongs to a {scope}: name it")
    return holder


def _not_set(ref: str, scope: str, owner: str, groups: Sequence[str]) -> str:
    if scope == "user":
        return (
            f"{ref} is not set for {owner}; set it with `squall secret set {ref}` (value on stdin)"
        )
    if scope == "group":
        where = f"{owner}'s groups ({', '.join(groups)})" if groups else f"the groups of {owner}"
        return (
            f"{ref} is not set for any of {where}; set it with "
            f"`squall secret set {ref} --group GROUP` (value on stdin)"
        )
    return f"{ref} is not set; an admin sets it with `squall secret set {ref}` (value on stdin)"


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def referenced_secrets(wf: Workflow) -> list[str]:
    """Every secret `wf` names, sorted: env values (`secret://` and legacy placeholders),
    image credentials (`image.secret` and the legacy `secrets:` map) and transfers."""
    refs: set[str] = set()
    for c in wf.containers.values():
        for value in c.env.values():
            refs.update(secret_references(value))
        if c.image.secret:
            refs.add(c.image.secret)
        for value in (c.image.legacy_secrets or {}).values():
            refs.update(legacy_secret_references(value))
    for volume in wf.volumes.values():
        for t in (*volume.ingress, *volume.egress):
            refs.update(x for x in (t.source.secret, t.destination.secret) if x)
    return sorted(refs)
