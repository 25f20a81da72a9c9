"""Volumes on a node: where they may be, their room, and files placed into them with no link
followed.

An agent serves volumes only beneath the roots it was given (`AgentConfig.volume_roots`); a
volume is named by its absolute path, and reached from its root with no link followed
(`substrate.paths.BENEATH`), then held open, so everything done in it happens in the directory
that was checked. A volume is a tree that jobs write: any name in it may be a link a job
planted, so files are placed into it and read from it through `substrate.paths` too.

A root may be kept elsewhere on the node (`AgentConfig.shared_roots`): the orchestrator names
the cluster's volumes beneath one path on every node, and this node has them on a share
mounted at another (the local site's namespaced nodes, which share one mount table). A share
is a FUSE file system, which takes no idmapped mount: its volumes belong to the jobs' root
(`owner`), and what the agent puts there is given to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from .paths import BENEATH, PathEscape, make_dirs, open_dir, relative_parts

__all__ = [
    "BadPath",
    "NoRoom",
    "NoVolumeRoot",
    "VolumeRoots",
    "bytes_in",
    "check_target",
    "file_path",
    "place",
    "room",
]


class BadPath(ValueError):
    """A path that cannot name a volume or a file in one (relative, '..', outside the
    roots)."""


class NoVolumeRoot(Exception):
    """This agent was given no volume root: it serves no volume."""


class NoRoom(Exception):
    """A volume asks for more room than its storage has."""


class VolumeRoots:
    """The folders beneath which this agent makes and serves volumes; `shared`: the roots
    among them that this node keeps on a share, with where it is mounted."""

    def __init__(
        self, roots: Sequence[Path], shared: Mapping[Path, Path] | None = None, owner: int = 0
    ) -> None:
        self.roots = tuple(PurePosixPath(os.path.normpath(r)) for r in roots)
        self.shared = {
            PurePosixPath(os.path.normpath(r)): PurePosixPath(os.path.normpath(at))
            for r, at in (shared or {}).items()
        }
        self.roots += tuple(r for r in self.shared if r not in self.roots)
        self.owner = owner  # the host uid and gid of the jobs' root: a share's volumes are its

    def where(self, path: str) -> tuple[str, bool]:
        """Where the path `path` (a volume, or a file in one) is on this node, and whether it
        is on a share; a path beneath no shared root is itself."""
        if path.startswith("/"):
            pure = PurePosixPath(os.path.normpath(path))
            for root, at in self.shared.items():
                if pure.is_relative_to(root):
                    return str(at / pure.relative_to(root)), True
        return path, False

    def give(self, volume: Path, rel: str) -> None:
        """On a share: give the file `rel` of `volume`, and the folders on its way, to the
        jobs' root, through no link."""
        parts = rel.split("/")
        owner = self.owner
        for i in range(len(parts)):
            with open_dir(volume, "/".join(parts[:i]), BENEATH) as fd:
                os.chown(f"/proc/self/fd/{fd}", owner, owner)  # the folder held open
                os.chown(parts[i], owner, owner, dir_fd=fd, follow_symlinks=False)

    def on_share(self, volume: str) -> bool:
        return self.where(volume)[1]

    def split(self, volume: str) -> tuple[PurePosixPath, str]:
        """The root that holds the absolute path `volume` (where this node keeps it), and the
        path below it."""
        if not self.roots:
            raise NoVolumeRoot("this agent has no volume root")
        path = PurePosixPath(volume)
        if not path.is_absolute() or ".." in path.parts or "\0" in volume:
            raise BadPath(f"volume {volume!r} must be an absolute path without '..'")
        path = PurePosixPath(os.path.normpath(path))
        inside = [r for r in self.roots if path.is_relative_to(r) and path != r]
        if not inside:
            roots = ", ".join(map(str, self.roots))
            raise BadPath(f"volume {volume} is not beneath this agent's volume roots ({roots})")
        root = max(inside, key=lambda r: len(r.parts))  # the innermost
        return self.shared.get(root, root), str(path.relative_to(root))

    def make(self, volume: str) -> bool:
        """Make the directory `volume` and its parents (0755, as the local site makes them:
        a job's root writes to it through its idmapped mount, or owns it on a share); True
        when it was new."""
        root, rel = self.split(volume)
        try:
            with open_dir(root, rel, BENEATH):
                return False
        except FileNotFoundError:
            owner = (self.owner, self.owner) if self.on_share(volume) else None
            make_dirs(root, rel, BENEATH, owner)
            return True

    def remove_empty(self, volume: str) -> None:
        """Remove the directory `volume` if it is empty (one MakeVolume made, then refused)."""
        root, rel = self.split(volume)
        parent, _, name = rel.rpartition("/")
        with contextlib.suppress(OSError), open_dir(root, parent, BENEATH) as parent_fd:
            os.rmdir(name, dir_fd=parent_fd)

    @contextlib.contextmanager
    def open(self, volume: str) -> Iterator[Path]:
        """The existing volume `volume`, reached from its root with no link followed, as a
        path that names the directory held open (`/proc/self/fd/N`) for as long as this
        lasts: a link put in its place meanwhile changes nothing."""
        root, rel = self.split(volume)
        try:
            with open_dir(root, rel, BENEATH) as fd:
                yield Path(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no volume {volume} on this node") from None


def file_path(path: str) -> str:
    """A file's path inside a volume, checked: relative, not empty, without '..'."""
    if PurePosixPath(path).is_absolute():
        raise BadPath(f"{path!r} must be a path inside the volume, relative")
    try:
        parts = relative_parts(path)
    except PathEscape as exc:
        raise BadPath(exc.strerror) from None
    if not parts:
        raise BadPath(f"{path!r} names no file inside the volume")
    return "/".join(parts)


def room(path: Path, size: int) -> int:
    """The bytes a volume at `path` can have, to compare with the `size` it asks for: the
    free space of the storage it is on and what it holds already (a persistent volume),
    counted only when the free space alone falls short."""
    free = shutil.disk_usage(path).free
    if free >= size:
        return free
    return free + bytes_in(path)


def bytes_in(path: Path) -> int:
    """Bytes that the files under `path` occupy (no link followed)."""
    total, todo = 0, [path]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def check_target(volume: Path, rel: str) -> None:
    """Refuse, before anything is fetched, a file `rel` that could not be placed in
    `volume`: a folder on its way that is a link or no folder, or a folder at its name."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        try:
            with open_dir(volume, "/".join(parts[:i]), BENEATH):
                if i == len(parts):
                    raise PathEscape(errno.EISDIR, f"{rel!r} in the volume is a directory")
        except FileNotFoundError:
            return
        except PathEscape as exc:
            if i == len(parts) and exc.errno == errno.ENOTDIR:
                return  # a file (or a link) at the name: replaced, never written through
            if i == len(parts) and exc.errno == errno.ELOOP:
                return
            raise


def place(volume: Path, rel: str, staged: Path) -> None:
    """Move the staged file `staged` to `rel` inside `volume`, making its folders, through
    no link: whatever is at `rel` (a file, a link a job left) is replaced."""
    parent, _, name = rel.rpartition("/")
    make_dirs(volume, parent, BENEATH)
    with open_dir(volume, parent, BENEATH) as dir_fd:
        try:
            os.rename(staged, name, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            raise PathEscape(errno.EISDIR, f"{rel!r} in the volume is a directory") from None
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = f".{name}.squall-{os.urandom(4).hex()}"
            with open(staged, "rb") as src:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            staged.unlink()
