"""A run's volumes on a site whose nodes share this machine's filesystem (the local site):
directories made before the first job, filled by ingress, emptied by egress after the last job.

- Ephemeral volumes live under `DATA/runs/RUN/volumes/NAME` and go away with the run, unless
  an egress out of them failed: then they stay, so the egress can be retried
  (`squall workflow egress NAME`) or let go (`--release`).
- Persistent volumes live under `DATA/volumes/SCOPE/NAME` and survive runs.

Every transfer is a `Transfer` row, committed before it starts and after it ends, with its
progress and error; secrets are resolved only here, at the moment of the copy.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from sqlalchemy import select

from ..errors import InvalidInput
from ..fuzzfile.model import Transfer as TransferSpec
from ..fuzzfile.model import Volume as VolumeSpec
from ..fuzzfile.model import Workflow
from ..secrets import SecretStore
from ..store import Store, Transfer, TransferState, Volume
from .transfers import TransferCache, TransferError, TransferPolicy, fetch, push

__all__ = ["Staging", "volume_path_in"]

Report = Callable[[str, str], None]  # (subject, message): the engine turns these into events


def volume_path_in(root: Path, uri: str, what: str) -> Path:
    """The file that `file://PATH` names inside the volume at `root`; never outside it."""
    if not uri.startswith("file://"):
        raise InvalidInput(f"{what}: {uri!r} must be file://PATH inside the volume")
    rel = PurePosixPath(uri.removeprefix("file://").lstrip("/"))
    if not rel.parts or ".." in rel.parts:
        raise InvalidInput(f"{what}: {uri!r} must name a file inside the volume, without '..'")
    return root.joinpath(*rel.parts)


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
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.secrets = secrets
        self.cache = TransferCache(data_dir / "cache" / "ingress")
        self.ca_file = ca_file

    # ---- volumes ------------------------------------------------------------------------

    def path(self, run_id: str, volume: VolumeSpec) -> Path:
        """Where a volume lives (HOST volumes were refused when the run was submitted)."""
        if volume.persistent:
            name = volume.persistent_name or volume.name
            return self.data_dir / "volumes" / volume.scope / name
        return self.data_dir / "runs" / run_id / "volumes" / volume.name

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
        self._set_volumes(run_id, "READY")
        return paths

    def release(self, run_id: str, *, force: bool = False) -> list[str]:
        """Delete the run's ephemeral volumes unless an egress out of them failed (or
        `force`); returns the names kept."""
        kept = []
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
                shutil.rmtree(vol.path, ignore_errors=True)
                vol.state = "DELETED"
        return kept

    def _set_volumes(self, run_id: str, state: str) -> None:
        with self.store.session() as s:
            for vol in s.scalars(select(Volume).where(Volume.run_id == run_id)).all():
                vol.state = state

    # ---- transfers ----------------------------------------------------------------------

    def ingress(self, run_id: str, wf: Workflow, paths: dict[str, Path], report: Report) -> None:
        """Fill the volumes; the first transfer that fails after its retries raises."""
        for name, volume in wf.volumes.items():
            for spec in volume.ingress:
                dest = volume_path_in(paths[name], spec.destination.uri, f"volume {name} ingress")
                row = self._record(run_id, name, "ingress", spec)
                creds = self._credentials(spec.source.secret)
                copy = functools.partial(
                    fetch,
                    spec.source.uri,
                    dest,
                    files=wf.files,
                    credentials=creds,
                    policy=_policy(spec),
                    cache=self.cache,
                    ca_file=self.ca_file,
                )
                self._transfer(row, spec.source.uri, report, copy)

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
            src = volume_path_in(paths[row.volume], row.source, f"volume {row.volume} egress")
            creds = self._credentials(row.secret or None)
            try:
                copy = functools.partial(
                    push,
                    src,
                    row.destination,
                    credentials=creds,
                    policy=TransferPolicy(timeout=row.timeout or None, attempts=max(row.tries, 1)),
                )
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
