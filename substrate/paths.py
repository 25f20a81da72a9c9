"""Paths that come from a workflow or from inside a container, resolved without escaping.

A job's root filesystem and a volume are trees that a job (or the image it runs) controls: any
name in them may be a symbolic link to `/etc` or `../../..`. Joining such a name onto a host
path and opening it follows those links out onto the host. Everything here opens through
`openat2(2)` instead, so the kernel resolves the name inside the tree:

- `IN_ROOT` (a container's root filesystem): links are followed as the container would see
  them, with `/` meaning the tree's root (`RESOLVE_IN_ROOT`), so an image's `/lib -> usr/lib`
  still works and `/etc -> /` stays inside;
- `BENEATH` (a volume, from the host's side): no link is followed at all
  (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`); a link is refused with the name it was found at.

Both refuse `..` above the top, magic links (`/proc/self/fd/N`) and mount crossings are
allowed only inside the tree. Files are written to a temporary name and renamed into place,
so a link planted at the target is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "BENEATH",
    "IN_ROOT",
    "PathEscape",
    "Resolve",
    "make_dirs",
    "open_dir",
    "open_in",
    "open_regular",
    "relative_parts",
    "remove_tree",
    "write_file",
]

_libc = ctypes.CDLL(None, use_errno=True)
SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after 5.x unified)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class PathEscape(OSError):
    """A path that would leave its tree, go through a link, or name something that is not
    what it must be (a directory, a regular file); the message says which and where."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


@dataclass(frozen=True, slots=True)
class Resolve:
    """How names are resolved inside a tree: `flags` for openat2's `resolve`."""

    flags: int
    what: str  # for messages: "the container's root", "the volume"


IN_ROOT = Resolve(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, "the container's root")
BENEATH = Resolve(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, "the volume")


def relative_parts(path: str) -> tuple[str, ...]:
    """The components of `path` below its tree's top (`/a/b`, `a/b` -> ('a', 'b')).

    `..` is refused outright: no path Squall is given needs it, and refusing it keeps the
    meaning of a path independent of the links in the tree.
    """
    parts = tuple(p for p in PurePosixPath("/" + path).parts[1:] if p not in ("", "."))
    if ".." in parts:
        raise PathEscape(errno.EPERM, f"{path!r} has a '..' component")
    if "\0" in path:
        raise PathEscape(errno.EINVAL, f"{path!r} holds a NUL byte")
    return parts


def _openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: Resolve) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve.flags)
    fd: int = _libc.syscall(
        SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ELOOP, errno.EXDEV):
            raise PathEscape(err, f"{path!r} goes through a link or out of {resolve.what}")
        raise OSError(err, f"{path!r} in {resolve.what}: {os.strerror(err)}")
    return fd


@contextlib.contextmanager
def open_dir(top: str | os.PathLike[str], path: str, resolve: Resolve) -> Iterator[int]:
    """An O_PATH descriptor of the directory `path` inside `top`, for `*at` calls."""
    top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rel = "/".join(relative_parts(path)) or "."
        try:
            fd = _openat2(top_fd, rel, os.O_PATH | os.O_DIRECTORY, 0, resolve)
        except NotADirectoryError:
            raise PathEscape(
                errno.ENOTDIR, f"{path!r} in {resolve.what} is not a directory"
            ) from None
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(top_fd)


def make_dirs(
    top: str | os.PathLike[str], path: str, resolve: Resolve, owner: tuple[int, int] | None = None
) -> None:
    """`mkdir -p` of `path` inside `top`; new directories get mode 0755 and `owner`."""
    parts = relative_parts(path)
    top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i in range(len(parts)):
            here = "/".join(parts[: i + 1])
            try:
                os.close(_openat2(top_fd, here, os.O_PATH | os.O_DIRECTORY, 0, resolve))
                continue
            except NotADirectoryError:
                raise PathEscape(
                    errno.ENOTDIR, f"{here!r} in {resolve.what} is not a directory"
                ) from None
            except FileNotFoundError:
                pass
            parent = "/".join(parts[:i]) or "."
            parent_fd = _openat2(top_fd, parent, os.O_PATH | os.O_DIRECTORY, 0, resolve)
            try:
                with contextlib.suppress(FileExistsError):  # made meanwhile: checked next round
                    os.mkdir(parts[i], 0o755, dir_fd=parent_fd)
                    if owner is not None:
                        os.chown(parts[i], *owner, dir_fd=parent_fd, follow_symlinks=False)
            finally:
                os.close(parent_fd)
            # what is there now must be a directory reached without leaving the tree
            os.close(_openat2(top_fd, here, os.O_PATH | os.O_DIRECTORY, 0, resolve))
    finally:
        os.close(top_fd)


def write_file(
    top: str | os.PathLike[str],
    path: str,
    content: bytes,
    mode: int,
    resolve: Resolve,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write `content` to the file `path` inside `top`, making its directories.

    The file is written under a temporary name in its directory and renamed over the
    target, so whatever was at the target (a link, a file) is replaced, not followed.
    """
    parts = relative_parts(path)
    if not parts:
        raise PathEscape(errno.EISDIR, f"{path!r} names the top of {resolve.what}")
    parent = "/".join(parts[:-1])
    make_dirs(top, parent, resolve, owner)
    with open_dir(top, parent, resolve) as dir_fd:
        tmp = f".{parts[-1]}.squall-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                out.write(content)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode & 0o7777)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        try:
            os.rename(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            os.unlink(tmp, dir_fd=dir_fd)
            raise PathEscape(errno.EISDIR, f"{path!r} in {resolve.what} is a directory") from None
        except OSError:
            os.unlink(tmp, dir_fd=dir_fd)
            raise


def open_regular(top: str | os.PathLike[str], path: str, resolve: Resolve) -> int:
    """A read-only descriptor of the regular file `path` inside `top`.

    Links, devices, FIFOs and sockets are refused: reading a FIFO would block and a device
    or a link would hand out what is not the job's to give.
    """
    rel = "/".join(relative_parts(path))
    if not rel:
        raise PathEscape(errno.EISDIR, f"{path!r} names the top of {resolve.what}")
    top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # O_PATH first: opening a FIFO for reading would block before we could look at it
        probe = _openat2(top_fd, rel, os.O_PATH | os.O_NOFOLLOW, 0, resolve)
        try:
            st = os.fstat(probe)
            if stat.S_ISLNK(st.st_mode):
                raise PathEscape(errno.ELOOP, f"{path!r} in {resolve.what} is a link")
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise PathEscape(errno.EPERM, f"{path!r} in {resolve.what} is {kind}")
            return os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(probe)
    finally:
        os.close(top_fd)


def open_in(top: str | os.PathLike[str], path: str, flags: int, resolve: Resolve) -> int:
    """A descriptor of `path` inside `top`, opened with `flags` (a device, say)."""
    rel = "/".join(relative_parts(path)) or "."
    top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _openat2(top_fd, rel, flags, 0, resolve)
    finally:
        os.close(top_fd)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a tree that a job may have made as deep as it liked: Python's `rmtree` recurses
    (and raises RecursionError, whatever `ignore_errors` says) past about a thousand levels;
    GNU rm does not. Links are removed, never followed; other file systems are not entered."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", os.fspath(path)],
            capture_output=True,
            check=False,
        )
