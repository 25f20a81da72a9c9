"""A run's volumes: made on its cluster's storage before the first job, filled by ingress,
emptied by egress after the last job. The bytes move between a node of the cluster (its data
agent, `DataAgent`) and the sources and destinations: this process sends the requests and,
for each transfer alone, its credentials, resolved from the run owner's secrets at that moment.

Where volumes live is the site's storage:
- On the local site, this machine's disk: ephemeral volumes under `DATA/runs/RUN/volumes/NAME`,
  persistent ones under `DATA/volumes/SCOPE/NAME` (they survive runs); the run's agents may
  use those two folders alone (`volume_roots`).
- On a cloud cluster, the cluster's own storage (`Cluster.volume_root`: node-local disk, an
  NFS export of the first node, or the cloud's managed NFS), mounted at the same path on every
  node; persistent volumes on the region's share of the team's own (`Cluster.persistent_root`,
  `SCOPE/NAME` beneath it, as on this machine), which outlives the stack. A region without
  one takes no persistent volume (federation says so).

An ephemeral volume goes away with the run unless an egress out of it failed: then it stays,
so the egress can be retried (`squall workflow egress NAME`) or let go (`--release`). A cloud
cluster's storage goes with its stack, so before that the files still owed are brought home
to `DATA/runs/RUN/volumes/NAME` (`bring_home`), from where the retry sends them.

Every transfer is a `Transfer` row, committed before it starts and after it ends, with its
progress and error.

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

from sqlalchemy import delete, select

from substrate.paths import BENEATH, open_regular, remove_tree
from substrate.volumes import place

from ..errors import InvalidInput
from ..fuzzfile.model import Transfer as TransferSpec
from ..fuzzfile.model import Volume as VolumeSpec
from ..fuzzfile.model import Workflow
from ..identity import groups_of
from ..secrets import SecretStore
from ..store import Run, Store, Transfer, TransferState, Volume
from .data_agent import DataAgent
from .transfers import TransferError, TransferPolicy, push

__all__ = ["Staging", "place", "reading", "volume_roots"]

Report = Callable[[str, str], None]  # (subject, message): the engine turns these into events


def volume_roots(data_dir: Path, run_id: str) -> tuple[Path, Path]:
    """The folders of this machine where the local site's run `run_id` keeps volumes: its
    ephemeral ones, and every persistent one (its agents may use these alone)."""
    return data_dir / "runs" / run_id / "volumes", data_dir / "volumes"


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


def _egress_home(
    agent: DataAgent,
    volume: str,
    rel: str,
    target: tuple[Path, str],
    progress: Callable[[int, int | None], None],
) -> None:
    """Stream the file `rel` of the volume from the agent's node into `target` (a folder of
    this machine and a path in it), placed there through no link once it is whole."""
    root, inside = target
    root.mkdir(parents=True, exist_ok=True)
    staged = root / f".squall-egress-{os.urandom(6).hex()}"
    try:
        agent.read_file(volume, rel, staged, progress)
        place(root, inside, staged)
    except OSError as exc:  # a link or a directory where the file goes: refused
        raise TransferError(f"file://{rel}: cannot write {inside}: {exc.strerror or exc}") from None
    finally:
        staged.unlink(missing_ok=True)


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
        self.ca_file = ca_file  # CA certificates the nodes trust for https ingress, besides theirs
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

    def path(
        self, run_id: str, volume: VolumeSpec, root: str = "", persistent_root: str = ""
    ) -> str:
        """Where a volume lives on the nodes: under the cluster's storage `root` (persistent
        ones under `persistent_root`, the share that keeps them), or ("") on this machine
        (HOST volumes are refused at validation)."""
        if volume.persistent:
            name = _one_name(volume.persistent_name or volume.name, "persistent volume")
            scope = _one_name(volume.scope, "volume scope")
            if persistent_root:
                return f"{persistent_root.rstrip('/')}/{scope}/{name}"
            if root:
                raise InvalidInput(
                    f"volume {volume.name!r} is persistent, and this cluster has no share "
                    "for persistent volumes (`persistent:` in the sites file)"
                )
            return str(self.data_dir / "volumes" / scope / name)
        if root:
            return f"{root.rstrip('/')}/{_one_name(volume.name, 'volume')}"
        ephemeral, _ = volume_roots(self.data_dir, run_id)
        return str(ephemeral / _one_name(volume.name, "volume"))

    def create(
        self,
        run_id: str,
        wf: Workflow,
        agent: DataAgent,
        root: str = "",
        persistent_root: str = "",
    ) -> dict[str, str]:
        """Make every volume's folder on the cluster's storage (`root`, `persistent_root`; "":
        this machine's), through `agent`, recorded first; returns name -> its path on the
        nodes."""
        paths = {
            name: self.path(run_id, v, root, persistent_root) for name, v in wf.volumes.items()
        }
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
        for name, v in wf.volumes.items():
            agent.make_volume(name, paths[name], v.size)
        self._set_volumes(run_id, "READY")
        return paths

    def release(self, run_id: str, *, force: bool = False) -> list[str]:
        """Delete the run's ephemeral volumes unless an egress out of them failed (or
        `force`); returns the names kept."""
        kept, doomed = [], []
        runs = (self.data_dir / "runs").resolve()
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
                # a persistent volume stays, but for what was brought home from its share
                home = vol.state == "KEPT" and Path(vol.path).is_relative_to(self.data_dir / "runs")
                if (vol.persistent_name is not None and not home) or vol.state == "DELETED":
                    continue
                if vol.name in failed and not force:
                    vol.state = "KEPT"
                    kept.append(vol.name)
                    continue
                doomed.append(vol.path)
                vol.state = "DELETED"
        for path in doomed:  # after the commit: the store is not held while files go
            # a path read back from the store: only ever a run's own folder is deleted
            if Path(path).resolve().is_relative_to(runs) and Path(path).resolve() != runs:
                remove_tree(path)
        return kept

    def start_over(self, run_id: str) -> None:
        """The run moves to another site: its ephemeral volumes here are deleted, and its
        volume and transfer records forgotten, to be made again there (persistent volumes
        keep their files)."""
        self.release(run_id, force=True)
        with self.store.session() as s:
            s.execute(delete(Transfer).where(Transfer.run_id == run_id))
            s.execute(delete(Volume).where(Volume.run_id == run_id))

    def _set_volumes(self, run_id: str, state: str) -> None:
        with self.store.session() as s:
            for vol in s.scalars(select(Volume).where(Volume.run_id == run_id)).all():
                vol.state = state

    # ---- transfers ----------------------------------------------------------------------

    def ingress(
        self,
        run_id: str,
        wf: Workflow,
        paths: dict[str, str],
        report: Report,
        agent: DataAgent,
    ) -> None:
        """Fill the volumes, each file fetched by `agent`'s node; the first transfer that
        fails after its retries raises."""
        ca_pem = Path(self.ca_file).read_text() if self.ca_file else ""
        for name, volume in wf.volumes.items():
            for spec in volume.ingress:
                rel = _volume_file(spec.destination.uri, f"volume {name} ingress")
                row = self._record(run_id, name, "ingress", spec)
                source = spec.source.uri
                content = b""
                if source.startswith("file://"):  # an inline file of the workflow
                    inline = source.removeprefix("file://")
                    if inline not in wf.files:
                        raise TransferError(
                            f"{source}: the workflow has no file {inline!r} under `files:`"
                        )
                    content = wf.files[inline].encode()
                copy = functools.partial(
                    agent.ingress,
                    source,
                    paths[name],
                    rel,
                    content=content,
                    credentials=self._credentials(run_id, spec.source.secret),
                    policy=_policy(spec),
                    ca_pem=ca_pem,
                    # a persistent volume may be written meanwhile by another run's jobs
                    private_volume=not volume.persistent,
                )
                self._transfer(row, source, report, copy)

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

    def egress(self, run_id: str, paths: dict[str, str], report: Report, agent: DataAgent) -> None:
        """Copy results out, each by `agent`'s node (`file:///` ones streamed back to this
        machine). Every transfer is tried; if any failed, raises naming them all."""
        errors = []
        for row in self._owed(run_id):
            rel = _volume_file(row.source, f"volume {row.volume} egress")
            policy = TransferPolicy(timeout=row.timeout or None, attempts=max(row.tries, 1))
            volume = paths[row.volume]
            copy: Callable[..., object]
            if row.destination.startswith("file://"):
                target = self._file_target(row.destination, f"volume {row.volume} egress")
                copy = functools.partial(_egress_home, agent, volume, rel, target)
            else:
                copy = functools.partial(
                    agent.egress,
                    volume,
                    rel,
                    row.destination,
                    credentials=self._credentials(run_id, row.secret or None),
                    policy=policy,
                )
            try:
                self._transfer(row, row.destination, report, copy)
            except TransferError as exc:
                errors.append(str(exc))
        if errors:
            raise TransferError("egress failed: " + "; ".join(errors))

    def bring_home(self, run_id: str, report: Report, agent: DataAgent) -> None:
        """Before a cluster's own storage goes with its stack: copy every file whose egress
        is still owed, out of a volume that is not on this machine, to this machine
        (`DATA/runs/RUN/volumes/NAME`), and record that the volume now lives there, so that
        `squall workflow egress` can send it later. Raises TransferError when one cannot."""
        home_root, _ = volume_roots(self.data_dir, run_id)
        with self.store.session() as s:
            paths = {
                v.name: v.path
                for v in s.scalars(select(Volume).where(Volume.run_id == run_id)).all()
                if not Path(v.path).is_relative_to(self.data_dir)  # on the cluster's storage
            }
        moved: set[str] = set()
        errors = []
        for row in self._owed(run_id):
            if row.volume not in paths:
                continue
            rel = _volume_file(row.source, f"volume {row.volume} egress")
            home = home_root / _one_name(row.volume, "volume")
            home.mkdir(parents=True, exist_ok=True)
            try:
                _egress_home(agent, paths[row.volume], rel, (home, rel), lambda d, t: None)
            except TransferError as exc:  # the others are still worth keeping
                errors.append(str(exc))
                continue
            moved.add(row.volume)
            report(f"egress {row.volume}", f"{row.source}: kept on this machine for the retry")
        with self.store.session() as s:
            for vol in s.scalars(select(Volume).where(Volume.run_id == run_id)).all():
                if vol.name in moved:
                    vol.path = str(home_root / vol.name)
                    vol.state = "KEPT"
        if errors:
            raise TransferError("; ".join(errors))

    def _owed(self, run_id: str) -> list[Transfer]:
        with self.store.session() as s:
            return list(
                s.scalars(
                    select(Transfer).where(
                        Transfer.run_id == run_id,
                        Transfer.direction == "egress",
                        Transfer.state != TransferState.DONE,
                    )
                ).all()
            )

    def _file_target(self, uri: str, what: str) -> tuple[Path, str]:
        """The folder and the path in it where `file:///PATH` egress goes on this machine."""
        target = self._local_target(uri, what)
        if target is not None:
            return target
        path = PurePosixPath(uri.removeprefix("file://"))
        if not path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
            raise InvalidInput(f"{what}: {uri!r} must be file:///ABSOLUTE/PATH without '..'")
        return Path(path.parent), path.name

    def retry_egress(self, run_id: str, paths: dict[str, Path], report: Report) -> None:
        """Run every egress of an ended run that has not succeeded yet, from this machine:
        its cluster is gone, and what is owed is here (the local site's disk, or brought
        home from a cloud cluster's storage)."""
        errors = []
        for row in self._owed(run_id):
            rel = _volume_file(row.source, f"volume {row.volume} egress")
            creds = self._credentials(run_id, row.secret or None)
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

    def _credentials(self, run_id: str, ref: str | None) -> dict[str, str] | None:
        """The credentials `ref` holds for the owner of run `run_id`, read now."""
        if not ref:
            return None
        with self.store.session() as s:
            owner = s.get_one(Run, run_id).owner
        return self.secrets.view(owner, groups_of(self.store, owner)).credentials(ref)

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
