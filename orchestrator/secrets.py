"""Secrets that Fuzzfiles name as `secret://SCOPE/NAME`: kept in private files, read when a
container starts or a transfer runs, and never written to a log, an event or the store.

A secret is one value (env values) or a mapping of credentials, JSON or YAML (transfers:
accessKeyId, secretAccessKey, sessionToken, region, endpoint; images: username, password).
Scopes are `user` and `group` (`account` is read as `group`, as Fuzzball does); `organization`
and `cluster` are kept apart. Env values and an image's legacy `secrets:` map may also hold
`${{ secret "NAME" }}` placeholders, which stand for `secret://user/NAME`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .errors import InvalidInput
from .fuzzfile.model import Workflow
from .fuzzfile.variables import fill_legacy_secrets, legacy_secret_references, secret_references

__all__ = ["SecretStore", "parse_reference", "referenced_secrets"]

_REF = re.compile(r"^secret://(user|group|account|organization|cluster)/([A-Za-z0-9_.-]{1,128})$")


def parse_reference(ref: str) -> tuple[str, str]:
    """(scope, name) of `secret://SCOPE/NAME`."""
    m = _REF.match(ref)
    if not m:
        raise InvalidInput(
            f"{ref!r} is not a secret reference; write secret://user/NAME or secret://group/NAME"
        )
    scope, name = m.groups()
    if name in (".", ".."):  # a file name under the scope's folder, never the folder itself
        raise InvalidInput(f"{ref!r}: a secret's name cannot be {name!r}")
    return ("group" if scope == "account" else scope), name


class SecretStore:
    """Secret values under `root/SCOPE/NAME`, each file 0600 in 0700 directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, ref: str) -> Path:
        scope, name = parse_reference(ref)
        return self.root / scope / name

    def set(self, ref: str, value: bytes) -> None:
        path = self._path(ref)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, path)

    def get(self, ref: str) -> str:
        path = self._path(ref)
        try:
            return path.read_text()
        except FileNotFoundError:
            raise InvalidInput(
                f"{ref} is not set; set it with `squall secret set {ref}` (value on stdin)"
            ) from None

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

    def delete(self, ref: str) -> bool:
        try:
            self._path(ref).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            f"secret://{p.parent.name}/{p.name}"
            for p in self.root.glob("*/*")
            if p.is_file() and not p.name.startswith(".")
        )


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
