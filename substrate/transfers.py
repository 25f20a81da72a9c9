"""The byte movers of ingress and egress: http(s), s3 and inline files, with retries, a time
limit, progress, resumed downloads, size checks and a cache of what was fetched.

They live in the agent because agents move the data, close to it; the orchestrator uses the
same functions for what it still moves itself (`orchestrator.data.transfers`).

- `https://`, `http://`: streamed with httpx; an interrupted download resumes with a Range
  request; the size is checked against Content-Length. Extra CA certificates come as a file
  or as PEM text (loaded from memory: nothing is written for them).
- `s3://BUCKET/KEY`: boto3; endpoint, region and keys come from the transfer's credentials
  (a resolved secret: accessKeyId, secretAccessKey, sessionToken, region, endpoint), used for
  that client alone, or, without them, from boto3's usual environment and files.
- `file://NAME` (ingress): an inline file, whose content the caller gives.
- egress to `s3://` or to a local path (`file:///abs/path`).

Fetched sources are cached by source and version (ETag, else Last-Modified and size), so a
later ingress of the same object reuses the copy on this machine. The source is asked for its
version first, with the caller's own credentials, so the cache never hands an object to a
caller who may not read it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHUNK",
    "Progress",
    "RemoteFacts",
    "TransferCache",
    "TransferError",
    "TransferPolicy",
    "describe",
    "fetch",
    "push",
    "split_s3",
]

Progress = Callable[[int, int | None], None]  # bytes done, total when known
CHUNK = 1 << 20


class TransferError(Exception):
    """A transfer that failed after its retries, or that cannot be tried (a scheme without a
    mover, a malformed address); the message names the source and the cause."""


@dataclass(frozen=True, slots=True)
class TransferPolicy:
    timeout: float | None = None  # seconds for the whole transfer, retries included
    attempts: int = 3  # tries in all
    backoff: float = 0.5  # seconds before the first retry, doubled after each


@dataclass(frozen=True, slots=True)
class _Remote:
    size: int | None
    version: str  # identifies the content: ETag, or Last-Modified with the size


class TransferCache:
    """Fetched files by (source, version), under `root` (private to the owner: it holds
    what credentials fetched). Agents of one machine may share one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for tmp in root.glob("*.tmp"):  # what writers that died left half-written
            pid = tmp.name.rsplit(".", 2)[-2].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                tmp.unlink(missing_ok=True)

    def path(self, source: str, version: str) -> Path:
        return self.root / hashlib.sha256(f"{source}\0{version}".encode()).hexdigest()

    def get(self, source: str, version: str) -> Path | None:
        path = self.path(source, version)
        return path if path.is_file() else None

    def put(
        self, source: str, version: str, file: Path, unchanged: Callable[[], bool] = lambda: True
    ) -> bool:
        """Keep a copy of `file` as (source, version), if `unchanged()` still holds once it
        is copied (a file in a volume that a job may write meanwhile); True if it was kept."""
        target = self.path(source, version)
        # a name of this writer's own: another agent may be putting the same object
        tmp = target.with_name(f"{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
        try:
            shutil.copyfile(file, tmp)
            if not unchanged():
                return False
            os.replace(tmp, target)
            return True
        finally:
            tmp.unlink(missing_ok=True)


def _retrying(what: str, policy: TransferPolicy, attempt: Callable[[float | None], Any]) -> Any:
    deadline = time.monotonic() + policy.timeout if policy.timeout else None
    delay = policy.backoff
    for number in range(1, max(policy.attempts, 1) + 1):
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left <= 0:
            raise TransferError(f"{what}: timed out after {policy.timeout:g}s")
        try:
            return attempt(deadline)
        except TransferError:
            raise
        except Exception as exc:  # network and storage errors: retried, then reported
            if number >= policy.attempts:
                raise TransferError(f"{what}: {_describe(exc)} (after {number} attempts)") from None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())) if deadline else delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"{what} took too long")


# ---- ingress -------------------------------------------------------------------------------


def fetch(
    source: str,
    dest: Path,
    *,
    files: Mapping[str, str | bytes] | None = None,
    credentials: Mapping[str, str] | None = None,
    policy: TransferPolicy | None = None,
    cache: TransferCache | None = None,
    ca_file: str | None = None,
    ca_pem: str | None = None,
    progress: Progress = lambda done, total: None,
    put_later: Callable[[str], None] | None = None,
) -> bool:
    """Copy `source` to the file `dest`; True when it came from the cache. An interrupted
    http(s) download resumes from `dest`'s `.part` file next to it. What was downloaded goes
    into `cache` before this returns or, with `put_later`, is left to the caller, which is
    given the source's version (to copy it in once `dest` is where it goes, off the path of
    the transfer)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.startswith("file://"):
        name = source.removeprefix("file://")
        if files is None or name not in files:
            raise TransferError(f"{source}: the workflow has no file {name!r} under `files:`")
        content = files[name]
        if isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            dest.write_text(content)
        progress(dest.stat().st_size, dest.stat().st_size)
        return False
    if source.startswith(("http://", "https://")):
        backend: _Backend = _Http(source, ca_file, ca_pem)
    elif source.startswith("s3://"):
        backend = _S3(source, credentials)
    else:
        raise TransferError(f"{source}: no ingress for this scheme (http, https, s3, file)")

    def attempt(deadline: float | None) -> bool:
        remote = backend.stat()
        if cache is not None:
            hit = cache.get(source, remote.version)
            if hit is not None:
                shutil.copyfile(hit, dest)
                progress(dest.stat().st_size, remote.size)
                return True
        backend.download(dest, remote, deadline, progress)
        if remote.size is not None and dest.stat().st_size != remote.size:
            raise OSError(f"got {dest.stat().st_size} bytes of {remote.size}")
        if put_later is not None:
            put_later(remote.version)
        elif cache is not None:
            cache.put(source, remote.version, dest)
        return False

    hit: bool = _retrying(source, policy or TransferPolicy(), attempt)
    return hit


class _Backend:
    def stat(self) -> _Remote:
        raise NotImplementedError

    def download(
        self, dest: Path, remote: _Remote, deadline: float | None, progress: Progress
    ) -> None:
        raise NotImplementedError


def _ssl_context(ca_file: str | None, ca_pem: str | None) -> ssl.SSLContext | bool:
    """The system's CAs, and the given ones besides (PEM text is loaded from memory)."""
    if not ca_file and not ca_pem:
        return True
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context


class _Http(_Backend):
    def __init__(self, url: str, ca_file: str | None, ca_pem: str | None = None) -> None:
        import httpx  # loaded only when an http(s) transfer runs

        self.url = url
        self.client = httpx.Client(
            verify=_ssl_context(ca_file, ca_pem),
            follow_redirects=True,
            timeout=httpx.Timeout(30.0),
        )

    def stat(self) -> _Remote:
        r = self.client.head(self.url)
        if r.status_code == 405:  # HEAD not allowed: the GET will tell
            return _Remote(None, "")
        r.raise_for_status()
        size = int(r.headers["content-length"]) if "content-length" in r.headers else None
        version = r.headers.get("etag") or f"{r.headers.get('last-modified', '')}/{size}"
        return _Remote(size, version)

    def download(
        self, dest: Path, remote: _Remote, deadline: float | None, progress: Progress
    ) -> None:
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and remote.version.startswith('"'):
            headers["If-Range"] = remote.version  # resume only if the object is unchanged
        with self.client.stream("GET", self.url, headers=headers) as r:
            if r.status_code == 416 and remote.size == have:  # already complete
                os.replace(part, dest)
                return
            r.raise_for_status()
            mode = "ab" if r.status_code == 206 else "wb"  # 200: the server starts over
            done = have if mode == "ab" else 0
            with open(part, mode) as out:
                for chunk in r.iter_bytes(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    progress(done, remote.size)
                    _check_deadline(deadline, self.url)
        os.replace(part, dest)


def _s3_client(credentials: Mapping[str, str] | None) -> Any:
    import boto3  # loaded only when an s3:// transfer runs

    creds = dict(credentials or {})
    # a session of its own: boto3's default session keeps the first credentials it found
    # for the life of the process, and a transfer must use its request's, or none
    return boto3.session.Session().client(
        "s3",
        endpoint_url=creds.get("endpoint") or None,
        region_name=creds.get("region") or None,
        aws_access_key_id=creds.get("accessKeyId") or None,
        aws_secret_access_key=creds.get("secretAccessKey") or None,
        aws_session_token=creds.get("sessionToken") or None,
    )


def split_s3(uri: str) -> tuple[str, str]:
    """The bucket and key of `s3://BUCKET/KEY`; TransferError when either is missing."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise TransferError(f"{uri}: write s3://BUCKET/KEY")
    return bucket, key


class _S3(_Backend):
    def __init__(self, uri: str, credentials: Mapping[str, str] | None) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.client = _s3_client(credentials)

    def stat(self) -> _Remote:
        head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        version = head.get("VersionId") or head.get("ETag", "")
        return _Remote(int(head["ContentLength"]), str(version))

    def download(
        self, dest: Path, remote: _Remote, deadline: float | None, progress: Progress
    ) -> None:
        done = 0

        def callback(n: int) -> None:
            nonlocal done
            done += n
            progress(done, remote.size)
            _check_deadline(deadline, self.uri)

        part = dest.with_name(dest.name + ".part")
        self.client.download_file(self.bucket, self.key, str(part), Callback=callback)
        os.replace(part, dest)


# ---- looking before moving -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteFacts:
    """What a source says about itself without being downloaded; None where it did not."""

    size: int | None
    region: str | None  # an s3 bucket's region


def describe(
    uri: str,
    *,
    credentials: Mapping[str, str] | None = None,
    ca_file: str | None = None,
    ca_pem: str | None = None,
) -> RemoteFacts:
    """HEAD an http(s) source, or an s3 object and its bucket. Raises TransferError when the
    source cannot be reached or does not say."""
    try:
        if uri.startswith(("http://", "https://")):
            return RemoteFacts(_Http(uri, ca_file, ca_pem).stat().size, None)
        if uri.startswith("s3://"):
            s3 = _S3(uri, credentials)
            size = s3.stat().size
            head = s3.client.head_bucket(Bucket=s3.bucket)
            region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region"
            ) or head.get("BucketRegion")
            return RemoteFacts(size, region)
    except Exception as exc:  # any client's error: the caller falls back to annotations
        raise TransferError(f"{uri}: {_describe(exc)}") from None
    raise TransferError(f"{uri}: nothing to look at for this scheme")


# ---- egress --------------------------------------------------------------------------------


def push(
    src: Path,
    destination: str,
    *,
    credentials: Mapping[str, str] | None = None,
    policy: TransferPolicy | None = None,
    progress: Progress = lambda done, total: None,
) -> None:
    """Copy the file `src` to `destination` (s3://BUCKET/KEY or file:///abs/path)."""
    if not src.is_file():
        raise TransferError(f"{destination}: the source {src} does not exist in the volume")
    size = src.stat().st_size
    if destination.startswith("s3://"):
        bucket, key = split_s3(destination)

        def upload(deadline: float | None) -> None:
            client = _s3_client(credentials)
            done = 0

            def callback(n: int) -> None:
                nonlocal done
                done += n
                progress(done, size)
                _check_deadline(deadline, destination)

            client.upload_file(str(src), bucket, key, Callback=callback)
            head = client.head_object(Bucket=bucket, Key=key)
            if int(head["ContentLength"]) != size:
                raise OSError(f"stored {head['ContentLength']} bytes of {size}")

        _retrying(destination, policy or TransferPolicy(), upload)
    elif destination.startswith("file:///"):
        target = Path(destination.removeprefix("file://"))

        def copy(deadline: float | None) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            progress(size, size)

        _retrying(destination, policy or TransferPolicy(), copy)
    else:
        raise TransferError(f"{destination}: egress goes to s3:// or a local file:/// path")
