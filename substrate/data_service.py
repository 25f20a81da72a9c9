"""The agent's data calls: volumes, ingress and egress, run on the node, close to the data.

The orchestrator sends requests and, for each transfer, the credentials it needs, resolved
just then: they are used for that transfer's client alone, kept in memory, never written to
disk or logged (URIs are logged without their user info and query, where a presigned URL
keeps its signature).

Ingress downloads into a private staging file in the agent's data directory (an interrupted
download resumes from it within the transfer's attempts), then places it into the volume
through no link; the node's ingress cache (`AgentConfig.cache_dir`, which agents of one
machine may share) answers a source it holds at the same version. Egress reads the volume's
file through no link. Errors end the stream with a status whose details name the source and
the cause, in the words the orchestrator used when it moved the bytes itself.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import grpc

from api.substrate.v1 import agent_pb2 as pb

from .paths import BENEATH, PathEscape, open_regular
from .status import translating
from .transfers import (
    CHUNK,
    Progress,
    TransferCache,
    TransferError,
    TransferPolicy,
    fetch,
    push,
    split_s3,
)
from .volumes import (
    BadPath,
    NoRoom,
    NoVolumeRoot,
    VolumeRoots,
    check_target,
    file_path,
    place,
    room,
)

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["DataServicer"]

log = logging.getLogger("substrate")
INGRESS_SCHEMES = ("https://", "http://", "s3://", "file://")
EGRESS_SCHEMES = ("s3://",)
DEFAULT_ATTEMPTS = 3
PROGRESS_EVERY = 0.25  # seconds: progress messages come no more often


class Missing(Exception):
    """A volume, or a file to egress, that does not exist."""


class Refused(Exception):
    """A volume's file that may not be written or read: a link, a directory, a device."""


def _abort(context: Any, exc: Exception) -> None:
    """The data calls' errors as status codes, as the agent's other calls' (`server._abort`):
    the message as the status's details, without an errno."""
    if isinstance(exc, NoVolumeRoot | Refused | PathEscape):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, _message(exc))
    if isinstance(exc, ValueError):  # BadPath
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(exc))
    if isinstance(exc, Missing | FileNotFoundError):
        context.abort(grpc.StatusCode.NOT_FOUND, _message(exc))
    if isinstance(exc, NoRoom):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _message(exc))
    if isinstance(exc, TransferError):
        context.abort(grpc.StatusCode.UNAVAILABLE, _message(exc))
    raise exc


_data_status = translating(_abort)


def _message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def redacted(uri: str) -> str:
    """`uri` as it may be logged: no user info, no query (a presigned URL's signature)."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def format_size(n_bytes: int) -> str:
    """A byte count in the largest binary unit that divides it exactly (as Fuzzfiles say)."""
    for power, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB")):
        if n_bytes and n_bytes % (1 << power) == 0:
            return f"{n_bytes >> power}{unit}"
    if n_bytes and n_bytes % 1024 == 0:
        return f"{n_bytes >> 10}KiB"
    return f"{n_bytes}B"


class DataServicer:
    """MakeVolume, Transfer and ReadFile, for `AgentServicer` (which holds `agent`)."""

    agent: Agent

    @functools.cached_property
    def _volumes(self) -> VolumeRoots:
        config = self.agent.config
        return VolumeRoots(config.volume_roots, config.shared_roots, config.userns.base)

    @functools.cached_property
    def _ingress_cache(self) -> TransferCache:
        config = self.agent.config
        return TransferCache(config.cache_dir or config.data_dir / "cache" / "ingress")

    @functools.cached_property
    def _staging(self) -> Path:
        """Private to the agent: what is downloaded waits here before it is placed."""
        path = self.agent.config.data_dir / "transfers"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    # ---- volumes ------------------------------------------------------------------------

    @_data_status
    def MakeVolume(self, request: pb.MakeVolumeRequest, context: Any) -> pb.MakeVolumeResponse:
        new = self._volumes.make(request.path)
        with self._volumes.open(request.path) as volume:
            free = shutil.disk_usage(volume).free
            size = request.size_bytes
            have = room(volume, size) if size else free
        if size and have < size:
            if new:
                self._volumes.remove_empty(request.path)
            raise NoRoom(
                f"volume {request.path} asks for {format_size(size)}, and the volume storage "
                f"of this node has {format_size(have)} for it"
            )
        log.info("volume %s ready (%s free)", request.path, format_size(free))
        return pb.MakeVolumeResponse(free_bytes=free)

    # ---- transfers ----------------------------------------------------------------------

    @_data_status
    def Transfer(self, request: pb.TransferRequest, context: Any) -> Iterator[pb.TransferProgress]:
        uri = request.uri
        self._volumes.split(request.volume)  # refused before anything starts
        rel = file_path(request.path)
        if request.direction == pb.DIRECTION_INGRESS:
            if not uri.startswith(INGRESS_SCHEMES):
                raise BadPath(f"{uri}: no ingress for this scheme (http, https, s3, file)")
            move: Callable[[Progress], bool] = functools.partial(self._ingress, request, rel)
        elif request.direction == pb.DIRECTION_EGRESS:
            if not uri.startswith(EGRESS_SCHEMES):
                raise BadPath(
                    f"{uri}: an agent egresses to s3:// (a file for the orchestrator's own "
                    "machine is read with ReadFile)"
                )
            move = functools.partial(self._egress, request, rel)
        else:
            raise BadPath("a transfer is INGRESS or EGRESS")
        if uri.startswith("s3://"):
            try:
                split_s3(uri)
            except TransferError as exc:
                raise BadPath(str(exc)) from None
        what = f"{'ingress' if request.direction == pb.DIRECTION_INGRESS else 'egress'}"
        shown = f"{redacted(uri)} {'->' if what == 'ingress' else '<-'} {request.volume}:{rel}"
        log.info("%s %s", what, shown)
        try:
            cached = yield from _relayed(move, context)
        except Exception as exc:
            log.warning("%s %s failed: %s", what, shown, _message(exc).replace(uri, redacted(uri)))
            raise
        log.info("%s %s: done%s", what, shown, " (from the cache)" if cached else "")

    def _policy(self, request: pb.TransferRequest) -> TransferPolicy:
        return TransferPolicy(
            timeout=request.timeout_seconds or None, attempts=request.attempts or DEFAULT_ATTEMPTS
        )

    def _ingress(self, request: pb.TransferRequest, rel: str, progress: Progress) -> bool:
        uri = request.uri
        with self._volumes.open(request.volume) as volume:
            try:
                check_target(volume, rel)  # before a byte is fetched
            except PathEscape as exc:
                raise Refused(f"{uri}: cannot write {rel} in the volume: {exc.strerror}") from None
            staged = self._staging / f"ingress-{os.urandom(8).hex()}"
            versions: list[str] = []  # of what was downloaded, for the cache
            try:
                hit = fetch(
                    uri,
                    staged,
                    files={uri.removeprefix("file://"): request.content},
                    credentials=dict(request.credentials) or None,
                    policy=self._policy(request),
                    cache=self._ingress_cache,
                    ca_pem=request.ca_pem or None,
                    progress=progress,
                    # into the cache after the transfer, from the placed file, only when no
                    # job can write it before the stamp below is taken; else from the private
                    # download, before it is placed
                    put_later=versions.append if request.private_volume else None,
                )
                try:
                    place(volume, rel, staged)
                    if self._volumes.on_share(request.volume):
                        self._volumes.give(volume, rel)
                except OSError as exc:  # a link, or a directory where the file goes
                    raise Refused(
                        f"{uri}: cannot write {rel} in the volume: {exc.strerror or exc}"
                    ) from None
                if versions:
                    fd = _open_file(volume, rel, uri)
                    try:
                        stamp = _stamp(os.fstat(fd))
                    finally:
                        os.close(fd)
                    self._cache_copies.put(
                        functools.partial(
                            self._keep_in_cache, request.volume, rel, uri, versions[0], stamp
                        )
                    )
            finally:
                staged.unlink(missing_ok=True)
                staged.with_name(staged.name + ".part").unlink(missing_ok=True)
        return hit

    @functools.cached_property
    def _cache_copies(self) -> queue.SimpleQueue[Callable[[], None]]:
        """Copies into the ingress cache waiting their turn, made one at a time by a thread
        that does not hold the agent up when it stops (a copy cut short leaves a `.tmp` file,
        which the cache removes when it is next opened)."""
        work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

        def copy_each() -> None:
            while True:
                work.get()()

        threading.Thread(target=copy_each, name="ingress-cache", daemon=True).start()
        return work

    def _keep_in_cache(
        self, volume_path: str, rel: str, uri: str, version: str, stamp: tuple[int, ...]
    ) -> None:
        """Copy the file an ingress placed into a volume no job could write yet (a private
        one) into the ingress cache, after the transfer has ended (the copy costs as much
        again as the download: off the run's path). The run's jobs may start writing it
        meanwhile: the copy is kept only if the file is the one placed, unchanged (its inode,
        size, and modification and change times, stamped before any job could run) when the
        copy is done."""
        try:
            with self._volumes.open(volume_path) as volume:
                fd = _open_file(volume, rel, uri)
                try:

                    def unchanged() -> bool:
                        return _stamp(os.fstat(fd)) == stamp

                    if not unchanged() or not self._ingress_cache.put(
                        uri, version, Path(f"/proc/self/fd/{fd}"), unchanged
                    ):
                        log.info("ingress cache: %s not kept: changed in the volume", uri)
                finally:
                    os.close(fd)
        except Exception as exc:  # the run's volume gone, a full disk: nothing to keep
            log.warning("ingress cache: %s not kept: %s", uri, exc)

    def _egress(self, request: pb.TransferRequest, rel: str, progress: Progress) -> bool:
        uri = request.uri
        with self._volumes.open(request.volume) as volume:
            fd = _open_file(volume, rel, uri)
            try:
                progress(0, os.fstat(fd).st_size)
                push(
                    Path(f"/proc/self/fd/{fd}"),
                    uri,
                    credentials=dict(request.credentials) or None,
                    policy=self._policy(request),
                    progress=progress,
                )
            finally:
                os.close(fd)
        return False

    # ---- reading ------------------------------------------------------------------------

    @_data_status
    def ReadFile(self, request: pb.ReadFileRequest, context: Any) -> Iterator[pb.FileChunk]:
        self._volumes.split(request.volume)
        rel = file_path(request.path)
        with self._volumes.open(request.volume) as volume:
            fd = _open_file(volume, rel, f"{request.volume}:{rel}")
            try:
                size = os.fstat(fd).st_size
                first = True
                while data := os.read(fd, CHUNK):
                    yield pb.FileChunk(size=size if first else 0, data=data)
                    first = False
                if first:  # empty
                    yield pb.FileChunk(size=size)
            finally:
                os.close(fd)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written, truncated or replaced (a write sets the change
    time, which no caller can set back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_file(volume: Path, rel: str, what: str) -> int:
    """A read-only descriptor of the volume's regular file `rel`, reached through no link."""
    try:
        return open_regular(volume, rel, BENEATH)
    except FileNotFoundError:
        raise Missing(f"{what}: the source file://{rel} does not exist in the volume") from None
    except OSError as exc:  # a link, a device, a FIFO: refused, never followed
        raise Refused(f"{what}: refused: {exc.strerror or exc}") from None


def _relayed(
    move: Callable[[Progress], bool], context: Any
) -> Generator[pb.TransferProgress, None, bool]:
    """Run `move` on a thread of its own and stream its progress (its first report, then the
    latest at most every PROGRESS_EVERY seconds) and then its end; returns whether it came
    from the cache. A caller that hangs up stops the transfer at its next progress."""
    events: queue.Queue[tuple[int, int | None] | None] = queue.Queue()
    outcome: list[Any] = []
    gone = threading.Event()
    done, total = 0, -1

    def progress(done: int, total: int | None) -> None:
        if gone.is_set():
            raise TransferError("the caller hung up")
        events.put((done, total))

    def work() -> None:
        try:
            outcome.append(move(progress))
        except BaseException as exc:  # handed to the RPC's thread below
            outcome.append(exc)
        finally:
            events.put(None)

    threading.Thread(target=work, name="transfer", daemon=True).start()
    sent_at: float | None = None  # the first report is always sent, then one a PROGRESS_EVERY
    pending = False
    try:
        while True:
            try:
                item = events.get(timeout=PROGRESS_EVERY)
            except queue.Empty:
                if not context.is_active():
                    raise TransferError("the caller hung up") from None
                if pending:  # a report held back, and nothing newer since
                    sent_at, pending = time.monotonic(), False
                    yield pb.TransferProgress(bytes_done=done, bytes_total=total)
                continue
            if item is None:
                break
            done, total = item[0], -1 if item[1] is None else item[1]
            now = time.monotonic()
            pending = sent_at is not None and now - sent_at < PROGRESS_EVERY
            if not pending:
                sent_at = now
                yield pb.TransferProgress(bytes_done=done, bytes_total=total)
    finally:
        gone.set()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    cached = bool(result)
    yield pb.TransferProgress(bytes_done=done, bytes_total=total, done=True, cached=cached)
    return cached
