"""A small client of the OCI distribution API (what registries serve under `/v2/`): a
manifest read once, a manifest checked (HEAD), a blob streamed; for `oras://` pulls and for
checking a caller's access to a cached image.

Written on httpx rather than the oras SDK, whose every request goes through a retry decorator
that sleeps 3+5+11+29+83 seconds, whose `pull` extracts tar layers with no filter, and whose
basic auth is set on a different object than its documentation says. Here:

- authentication follows the registry's `WWW-Authenticate` challenge: `Basic` (the login is
  sent as the header) or `Bearer realm=... service=... scope=...` (a token fetched from the
  realm, with the login as basic auth when there is one, anonymously when not). The login is
  kept in this object's memory only; httpx drops the header on a redirect to another host;
- every request but a blob's body is bounded: a few quick tries of a connection that fails
  or a 5xx/429 answer, each under a short timeout, all inside one deadline per request (25 s);
- a registry listed as insecure is reached over HTTPS without verifying its certificate,
  then over plain HTTP, as containers/image (skopeo) does; others over verified HTTPS with
  the system's CA store;
- names, tags and digests are checked before they become part of a URL, and the bodies of
  manifests and error answers are read up to a cap.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "DOCKER_MANIFESTS",
    "OCI_MANIFEST",
    "Manifest",
    "RegistryClient",
    "RegistryError",
    "Unauthorized",
    "valid_digest",
    "valid_host",
    "valid_name",
    "valid_reference",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFESTS = (
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_MANIFEST = 4 * 2**20  # bytes; registries refuse manifests over 4 MiB too
_ERROR_BODY = 64 * 2**10

# the distribution spec's grammar (the same as containers/image's reference package)
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_DOCKER_HUB = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


class RegistryError(Exception):
    """A request the registry did not answer as it must; the message is one line."""


class Unauthorized(RegistryError):
    """The registry asked for a login (401) or refused the one given (401, 403)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str  # as the registry's Content-Type says
    digest: str  # sha256 of `data`, computed here

    def json(self) -> Any:
        return json.loads(self.data)


def valid_host(host: str) -> bool:
    """HOST or HOST:PORT (a name, an IPv4 address, or an IPv6 one in brackets)."""
    return _HOST.fullmatch(host) is not None


def valid_name(repository: str) -> bool:
    return _NAME.fullmatch(repository) is not None and len(repository) <= 255


def valid_reference(reference: str) -> bool:
    """A tag or a sha256 digest."""
    return valid_digest(reference) or _TAG.fullmatch(reference) is not None


def valid_digest(digest: str) -> bool:
    return _DIGEST.fullmatch(digest) is not None


class RegistryClient:
    """Requests to one registry with one login (or none); use as a context manager."""

    def __init__(
        self,
        host: str,
        credentials: tuple[str, str] | None = None,
        *,
        insecure: bool = False,
        deadline_s: float = 25.0,
        attempts: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        blob_read_timeout_s: float = 60.0,
    ) -> None:
        if not valid_host(host):
            raise RegistryError(f"{host!r} is not a registry host")
        self.host = host
        self._netloc = _DOCKER_HUB.get(host, host)
        self._credentials = credentials
        self._insecure = insecure
        self._schemes = ["https", "http"] if insecure else ["https"]
        self._budget = deadline_s
        self._deadline = time.monotonic() + deadline_s
        self._attempts = max(1, attempts)
        self._connect = connect_timeout_s
        self._read = read_timeout_s
        self._blob_read = blob_read_timeout_s
        self._authorization: str | None = None
        verify: ssl.SSLContext | bool = False if insecure else ssl.create_default_context()
        self._http = httpx.Client(verify=verify, follow_redirects=True, max_redirects=5)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    # ---- the three requests ------------------------------------------------------------

    def manifest(self, repository: str, reference: str, accept: tuple[str, ...]) -> Manifest:
        """The manifest `repository:reference` (a tag or digest), read once; when
        `reference` is a digest, the bytes must have it."""
        path = self._path(repository, "manifests", reference)
        with self._send("GET", path, {"Accept": ", ".join(accept)}) as response:
            _raise_for(response, self.host, f"{repository}:{reference}")
            data = _read_capped(response, MAX_MANIFEST, "its manifest")
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if valid_digest(reference) and digest != reference:
            raise RegistryError(
                f"the manifest served for {repository}@{reference} has digest {digest}"
            )
        return Manifest(data, media_type, digest)

    def check(self, repository: str, reference: str, accept: tuple[str, ...]) -> None:
        """Returns when this login may read `repository:reference` (a manifest HEAD)."""
        path = self._path(repository, "manifests", reference)
        with self._send("HEAD", path, {"Accept": ", ".join(accept)}) as response:
            _raise_for(response, self.host, f"{repository}:{reference}")

    @contextmanager
    def blob(self, repository: str, digest: str) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        """The blob's declared length (None when not sent) and its bytes as they arrive;
        nothing here checks them against the digest: the caller does, as they stream."""
        if not valid_digest(digest):
            raise RegistryError(f"{digest!r} is not a sha256 digest")
        path = self._path(repository, "blobs", digest)
        with self._send("GET", path, {}, blob=True) as response:
            _raise_for(response, self.host, f"{repository}@{digest}")
            length = response.headers.get("content-length")
            declared = int(length) if length is not None and length.isdigit() else None

            def chunks() -> Iterator[bytes]:
                try:
                    yield from response.iter_bytes(2**20)
                except httpx.HTTPError as exc:
                    raise RegistryError(
                        f"registry {self.host} broke off sending {digest[:19]}: {_gist(exc)}"
                    ) from None

            yield declared, chunks()

    # ---- the machinery -----------------------------------------------------------------

    def _path(self, repository: str, kind: str, reference: str) -> str:
        if not valid_name(repository):
            raise RegistryError(f"{repository!r} is not a repository name")
        if not valid_reference(reference):
            raise RegistryError(f"{reference!r} is not a tag or sha256 digest")
        return f"/v2/{repository}/{kind}/{reference}"

    def _timeout(self, blob: bool) -> httpx.Timeout:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RegistryError(f"registry {self.host} did not answer in time")
        read = self._blob_read if blob else min(self._read, left)
        return httpx.Timeout(connect=min(self._connect, left), read=read, write=read, pool=read)

    @contextmanager
    def _send(
        self, method: str, path: str, headers: dict[str, str], *, blob: bool = False
    ) -> Iterator[httpx.Response]:
        """The response to `method path`, answering one authentication challenge; a
        connection that fails and a 5xx or 429 answer are tried again, a few times, quickly."""
        challenged = False
        tries = 0
        self._deadline = time.monotonic() + self._budget
        while True:
            tries += 1
            try:
                response = self._once(method, path, headers, blob)
            except RegistryError as exc:
                if tries >= self._attempts or not self._pause(tries):
                    count = f"{tries} {'try' if tries == 1 else 'tries'}"
                    raise RegistryError(f"{exc} ({count})") from None
                continue
            if response.status_code == 401 and not challenged:
                challenge = response.headers.get("www-authenticate", "")
                why = _why(_read_capped(response, _ERROR_BODY, "")) or "401 Unauthorized"
                response.close()
                challenged = True
                if self._answer(challenge):
                    continue
                raise Unauthorized(why)
            failed = response.status_code >= 500 or response.status_code == 429
            if failed and tries < self._attempts and self._pause(tries, response):
                continue
            try:
                yield response
            finally:
                response.close()
            return

    def _once(self, method: str, path: str, headers: dict[str, str], blob: bool) -> httpx.Response:
        """One request, over the first scheme that connects (HTTPS, then HTTP when the
        registry is insecure: the scheme that worked is kept)."""
        sent = dict(headers)
        if self._authorization is not None:
            sent["Authorization"] = self._authorization
        error: Exception | None = None
        for scheme in list(self._schemes):
            url = f"{scheme}://{self._netloc}{path}"
            try:
                request = self._http.build_request(
                    method, url, headers=sent, timeout=self._timeout(blob)
                )
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                error = exc
                continue
            self._schemes = [scheme]
            return response
        assert error is not None
        raise RegistryError(f"registry {self.host} cannot be reached: {_gist(error)}")

    def _pause(self, tries: int, response: httpx.Response | None = None) -> bool:
        """Sleep before the next try (0.5 s, then 1.5 s), done with `response`; False, and
        `response` left open, when the deadline is too near."""
        pause = 0.5 * 3 ** (tries - 1)
        if time.monotonic() + pause >= self._deadline:
            return False
        if response is not None:
            response.close()
        time.sleep(pause)
        return True

    def _answer(self, challenge: str) -> bool:
        """Set the Authorization header that answers `challenge`; False when there is none
        to give (no login for a Basic challenge, an unknown scheme)."""
        scheme, _, rest = challenge.strip().partition(" ")
        params = {m[0].lower(): m[1] if m[1] or not m[2] else m[2] for m in _PARAM.findall(rest)}
        basic = (
            "Basic " + base64.b64encode(":".join(self._credentials).encode()).decode()
            if self._credentials is not None
            else None
        )
        if scheme.lower() == "basic":
            self._authorization = basic
            return basic is not None
        if scheme.lower() != "bearer" or not params.get("realm"):
            return False
        token = self._token(params, basic)
        self._authorization = f"Bearer {token}"
        return True

    def _token(self, params: dict[str, str], basic: str | None) -> str:
        realm = httpx.URL(params["realm"])
        if realm.scheme not in ("https", "http"):
            raise RegistryError(f"registry {self.host} names a token realm that is not http(s)")
        if basic is not None and realm.scheme != "https" and not self._insecure:
            raise RegistryError(
                f"registry {self.host} asks for the login at a plain-HTTP token realm; refused"
            )
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        headers = {"Authorization": basic} if basic is not None else {}
        try:
            response = self._http.send(
                self._http.build_request(
                    "GET",
                    realm.copy_merge_params(query),
                    headers=headers,
                    timeout=self._timeout(False),
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            raise RegistryError(f"the token service of {self.host} failed: {_gist(exc)}") from None
        try:
            body = _read_capped(response, _ERROR_BODY, "its token")
        finally:
            response.close()
        if response.status_code in (401, 403):
            raise Unauthorized(f"the token service of {self.host} refused: {_why(body)}")
        if response.status_code != 200:
            raise RegistryError(f"the token service of {self.host} answered {response.status_code}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise RegistryError(f"the token service of {self.host} sent no token")
        return token


def _raise_for(response: httpx.Response, host: str, what: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    body = _read_capped(response, _ERROR_BODY, "") if response.request.method != "HEAD" else b""
    reason = _why(body) or f"{status} {response.reason_phrase}".strip()
    if status in (401, 403):
        raise Unauthorized(reason)
    if status == 404:
        raise RegistryError(f"{what} was not found at registry {host} ({reason})")
    raise RegistryError(f"registry {host} answered {status} for {what} ({reason})")


def _read_capped(response: httpx.Response, cap: int, what: str) -> bytes:
    out = bytearray()
    try:
        for chunk in response.iter_bytes(65536):
            out += chunk
            if len(out) > cap:
                if not what:
                    return bytes(out[:cap])
                raise RegistryError(f"{what} is larger than {cap} bytes")
    except httpx.HTTPError as exc:
        raise RegistryError(f"the registry broke off: {_gist(exc)}") from None
    return bytes(out)


def _why(body: bytes) -> str:
    """A registry's error answer (`{"errors": [{"code", "message"}]}`) in one line."""
    try:
        errors = json.loads(body).get("errors") or []
        parts = [
            f"{str(e.get('code', '')).lower()}: {e.get('message', '')}".strip(": ")
            for e in errors
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError):
        return ""
    return " ".join("; ".join(parts).split())[:300]


def _gist(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
