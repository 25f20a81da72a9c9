"""A run's volumes on a site whose nodes share this machine's filesystem (the local site):
directories made before the first job, filled by ingress, emptied by egress after the last job.

- Ephemeral volumes live under `DATA/runs/RUN/volumes/NAME` and go away with the run, unless
  an egress out of them failed: then they stay, so the egress can be retried
  (`squall workflow egress NAME`) or let go (`--release`).
- Persistent volumes live under `DATA/volumes/SCOPE/NAME` and survive runs.

Every transfer is a `Transfer` row, committed before it starts and after it ends, with its
progress and error; secrets are resolved only here, at the moment of the copy.

A volume is a tree that jobs write: any name in it may be a link planted by a job (of this
run, or of an earlier run of a persistent volume). Ingress downloads into a private staging
file and then places it into the volume, and egress reads from the volume, both through
`substrate.paths` with no link followed: a link, a device or a FIFO in a volume is refused
with its name, never read or written through.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select

from substrate.paths import BENEATH, open_regular, remove_tree
from substrate.volumes import place, room

from ..errors import InvalidInput
from ..fuzzfile.model import Transfer as TransferSpec
from ..fuzzfile.model import Volume as VolumeSpec
from ..fuzzfile.model import Workflow
from ..fuzzfile.units import format_size
from ..secrets import SecretStore
from ..store import Store, Transfer, TransferState, Volume
from .transfers import TransferCache, TransferError, TransferPolicy, fetch, push

__all__ = ["Staging", "place", "reading"]

Report = Callable[[str, str], None]  # (subject, message): the engine turns these into events


def _check_room(name: str, path: Path, size: int) -> None:
    """A volume's `size` is the capacity it asks for: the free space of the storage it is on
    and what it holds already (a persistent volume), counted only when the free space alone
    falls short (`substrate.volumes.room`, as an agent checks it). A volume that cannot have
    it fails the run at STAGING, before any job."""
    have = room(path, size)
    if have < size:
        raise InvalidInput(
            f"volume {name!r} asks for {format_size(size)} (size), and the site's volume "
            f"storage has {format_size(have)} for it"
        )


def _volume_file(uri: str, what: str) -> str:
    """The path inside a volume that `file://PATH` names (relative, without '..')."""
    if not uri.startswith("file://"):
        raise InvalidInput(f"{what}: {uri!r} must be file://PATH inside the volume")
    rel = PurePosixPath(uri.removeprefix("file://").lstrip("/"))
    if not rel.parts or ".." in rel.parts:
        raise InvalidInput(f"{what}: {uri!r} must name a file inside the volume, without '..'")
    return str(rel)


def _one_name(name: str, what: str) -> str:
    """A single path component (a persistent volume's name, its scope)."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidInput(f"{what} {name!r} must be one name, without '/' or '..'")
    return name


@contextlib.contextmanager
def reading(volume: Path, rel: str) -> Iterator[Path]:
    """A path that reads the regular file `rel` of `volume` as it is now (an open descriptor
    of it, reached through no link); links, devices and FIFOs are refused."""
    fd = open_regular(volume, rel, BENEATH)
    try:
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _ingress(source: str, staged: Path, volume: Path, rel: str, **fetch_args: Any) -> bool:
    """Fetch `source` into the private file `staged`, then place it in the volume; True
    when it came from the cache."""
    hit: bool = fetch(source, staged, **fetch_args)
    try:
        place(volume, rel, staged)
    except OSError as exc:  # a link, or a directory where the file goes: refused
        raise TransferError(
            f"{source}: cannot write {rel} in the volume: {exc.strerror or exc}"
        ) from None
    return hit


def _egress(
    volume: Path,
    rel: str,
    source: str,
    destination: str,
    target: tuple[Path, str] | None = None,
    **push_args: Any,
) -> None:
    """Push the regular file `rel` of the volume, reached through no link; to `target` (an
    egress folder and a path in it) through no link either, when one is given."""
    try:
        with reading(volume, rel) as src:
            if target is None:
                push(src, destination, **push_args)
                return
            root, inside = target
            root.mkdir(parents=True, exist_ok=True)
            staged = root / f".squall-egress-{os.urandom(6).hex()}"
            try:
                shutil.copyfile(src, staged)
                place(root, inside, staged)
            finally:
                staged.unlink(missing_ok=True)
            progress = push_args.get("progress")
            if progress is not None:
                size = os.stat(src).st_size
                progress(size, size)
    except FileNotFoundError:
        raise TransferError(
            f"{destination}: the source {source} does not exist in the volume"
        ) from None
    except OSError as exc:  # a link, a device, a FIFO: refused, never followed
        raise TransferError(f"{destination}: refused: {exc.strerror or exc}") from None


def _policy(spec: TransferSpec) -> TransferPolicy:
    attempts = spec.policy.retries + 1 if spec.policy.retries is not None else 3
    return TransferPolicy(timeout=spec.policy.timeout, attempts=attempts)


class Staging:
    """Volumes, ingress and egress of runs; `data_dir` is Squall's data directory."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        secrets: SecretStore,
        *,
        ca_file: str | None = None,
        egress_dirs: Sequence[Path] | None = None,
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.secrets = secrets
        self.cache = TransferCache(data_dir / "cache" / "ingress")
        self.ca_file = ca_file
        # where `file:///` egress may write on this machine (None: wherever this process
        # may, as for `squall run`; a server writes only under the folders it was given)
        self.egress_dirs = None if egress_dirs is None else tuple(egress_dirs)

    def check_egress(self, wf: Workflow) -> None:
        """Refuse, before anything starts, a `file:///` egress this orchestrator may not
        write."""
        for name, volume in wf.volumes.items():
            for spec in volume.egress:
                if spec.destination.uri.startswith("file://"):
                    self._local_target(spec.destination.uri, f"volume {name} egress")

    def _local_target(self, uri: str, what: str) -> tuple[Path, str] | None:
        """For a restricted orchestrator, the egress folder and the path inside it that
        `file:///PATH` names; None when local files may go anywhere."""
        if self.egress_dirs is None:
            return None
        path = PurePosixPath(uri.removeprefix("file://"))
        if not path.is_absolute() or ".." in path.parts:
            raise InvalidInput(f"{what}: {uri!r} must be file:///ABSOLUTE/PATH without '..'")
        for root in self.egress_dirs:
            if path.is_relative_to(root) and path != PurePosixPath(root):
                return root, str(path.relative_to(root))
        allowed = ", ".join(map(str, self.egress_dirs)) or "none: give `--egress-dir DIR`"
        raise InvalidInput(
            f"{what}: {uri} is outside the folders this server writes local files to "
            f"({allowed}); egress to s3:// instead, or ask for the folder to be allowed"
        )

    # ---- volumes ------------------------------------------------------------------------

    def path(self, run_id: str, volume: VolumeSpec) -> Path:
        """Where a volume lives (HOST volumes are refused at validation)."""
        if volume.persistent:
            name = _one_name(volume.persistent_name or volume.name, "persistent volume")
            return self.data_dir / "volumes" / _one_name(volume.scope, "volume scope") / name
        return self.data_dir / "runs" / run_id / "volumes" / _one_name(volume.name, "volume")

    def create(self, run_id: str, wf: Workflow) -> dict[str, Path]:
        """Make every volume's directory (recorded first); returns name -> host path."""
        paths = {name: self.path(run_id, v) for name, v in wf.volumes.items()}
        with self.store.session() as s:
            for name, v in wf.volumes.items():
                s.add(
                    Volume(
                        run_id=run_id,
                        name=name,
                        persistent_name=(v.persistent_name or name) if v.persistent else None,
                        path=str(paths[name]),
                        state="CREATING",
                    )
                )
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        for name, v in wf.volumes.items():
            if v.size is not None:
                _check_room(name, paths[name], v.size)
        self._set_volumes(run_id, "READY")
        return paths

    def release(self, run_id: str, *, force: bool = False) -> list[str]:
        """Delete the run's ephemeral volumes unless an egress out of them failed (or
        `force`); returns the names kept."""
        kept, doomed = [], []
        with self.store.session() as s:
            failed = set(
                s.scalars(
                    select(Transfer.volume).where(
                        Transfer.run_id == run_id,
                        Transfer.direction == "egress",
                        Transfer.state != TransferState.DONE,
                    )
                ).all()
            )
            for vol in s.scalars(select(Volume).where(Volume.run_id == run_id)).all():
                if vol.persistent_name is not None or vol.state == "DELETED":
                    continue
                if vol.name in failed and not force:
                    vol.state = "KEPT"
                    kept.append(vol.name)
                    continue
                doomed.append(vol.path)
                vol.state = "DELETED"
        runs = (self.data_dir / "runs").resolve()
        for path in doomed:  # after the commit: the store is not held while files go
            # a path read back from the store: only ever a run's own folder is deleted
            if Path(path).resolve().is_relative_to(runs) and Path(path).resolve() != runs:
                remove_tree(path)
        return kept

    def _set_volumes(self, run_id: str, state: str) -> None:
        with self.store.session() as s:
            for vol in s.scalars(select(Volume).where(Volume.run_id == run_id)).all():
                vol.state = state

    # ---- transfers ----------------------------------------------------------------------

    def ingress(self, run_id: str, wf: Workflow, paths: dict[str, Path], report: Report) -> None:
        """Fill the volumes; the first transfer that fails after its retries raises."""
        staging = self.data_dir / "runs" / run_id / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        for name, volume in wf.volumes.items():
            for spec in volume.ingress:
                rel = _volume_file(spec.destination.uri, f"volume {name} ingress")
                row = self._record(run_id, name, "ingress", spec)
                creds = self._credentials(spec.source.secret)
                staged = staging / f"ingress-{row.id}"

                copy = functools.partial(
                    _ingress,
                    spec.source.uri,
                    staged,
                    paths[name],
                    rel,
                    files=wf.files,
                    credentials=creds,
                    policy=_policy(spec),
                    cache=self.cache,
                    ca_file=self.ca_file,
                )
                self._transfer(row, spec.source.uri, report, copy)
        remove_tree(staging)

    def plan_egress(self, run_id: str, wf: Workflow) -> None:
        """Record the run's egress as owed, before any job runs: if the orchestrator dies
        from here on, the volumes holding results are kept rather than deleted."""
        for name, volume in wf.volumes.items():
            for spec in volume.egress:
                self._record(run_id, name, "egress", spec)

    def skip_egress(self, run_id: str) -> None:
        """The run did not finish: nothing is owed, and its volumes may go."""
        with self.store.session() as s:
            for row in s.scalars(
                select(Transfer).where(
                    Transfer.run_id == run_id,
                    Transfer.direction == "egress",
                    Transfer.state == TransferState.PENDING,
                )
            ).all():
                s.delete(row)

    def egress(self, run_id: str, paths: dict[str, Path], report: Report) -> None:
        """Copy results out. Every transfer is tried; if any failed, raises naming them all."""
        self.retry_egress(run_id, paths, report)

    def retry_egress(self, run_id: str, paths: dict[str, Path], report: Report) -> None:
        """Run every egress of the run that has not succeeded yet."""
        with self.store.session() as s:
            rows = s.scalars(
                select(Transfer).where(
                    Transfer.run_id == run_id,
                    Transfer.direction == "egress",
                    Transfer.state != TransferState.DONE,
                )
            ).all()
        errors = []
        for row in rows:
            rel = _volume_file(row.source, f"volume {row.volume} egress")
            creds = self._credentials(row.secret or None)
            policy = TransferPolicy(timeout=row.timeout or None, attempts=max(row.tries, 1))

            target = (
                self._local_target(row.destination, f"volume {row.volume} egress")
                if row.destination.startswith("file://")
                else None
            )
            copy = functools.partial(
                _egress,
                paths[row.volume],
                rel,
                row.source,
                row.destination,
                target=target,
                credentials=creds,
                policy=policy,
            )
            try:
                self._transfer(row, row.destination, report, copy)
            except TransferError as exc:
                errors.append(str(exc))
        if errors:
            raise TransferError("egress failed: " + "; ".join(errors))

    def _credentials(self, ref: str | None) -> dict[str, str] | None:
        return self.secrets.credentials(ref) if ref else None

    def _record(self, run_id: str, volume: str, direction: str, spec: TransferSpec) -> Transfer:
        policy = _policy(spec)
        secret = (spec.source if direction == "ingress" else spec.destination).secret
        with self.store.session() as s:
            row = Transfer(
                run_id=run_id,
                volume=volume,
                direction=direction,
                source=spec.source.uri,
                destination=spec.destination.uri,
                secret=secret or "",
                timeout=policy.timeout or 0.0,
                tries=policy.attempts,
            )
            s.add(row)
        return row

    def _transfer(
        self,
        row: Transfer,
        what: str,
        report: Report,
        copy: Callable[..., object],  # called with progress=
    ) -> None:
        subject = f"{row.direction} {row.volume}"
        last = [0.0]

        def progress(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] < 1.0 and done != total:
                return
            last[0] = now
            with self.store.session() as s:
                s.get_one(Transfer, row.id).bytes_done = done
            of = f" of {total}" if total is not None else ""
            report(subject, f"{what}: {done}{of} bytes")

        self._set(row.id, TransferState.RUNNING)
        report(subject, f"{what}: started")
        try:
            hit = copy(progress=progress)
        except (TransferError, InvalidInput) as exc:
            self._set(row.id, TransferState.FAILED, str(exc))
            report(subject, f"{what}: FAILED: {exc}")
            raise TransferError(str(exc)) from None
        self._set(row.id, TransferState.DONE)
        report(subject, f"{what}: done" + (" (from the cache)" if hit is True else ""))

    def _set(self, row_id: int, state: TransferState, error: str = "") -> None:
        with self.store.session() as s:
            row = s.get_one(Transfer, row_id)
            row.state, row.error = state, error
            row.attempts += 1
