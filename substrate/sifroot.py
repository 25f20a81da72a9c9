"""A SIF image as a root file system that the OCI runtimes (crun) run, without Apptainer.

`unpack` finds the primary system partition (`sif.py`), sums the sizes of the files its
listing (`unsquashfs -lln`) names and refuses a root larger than the cap or the free space of
the file system it goes to (a few KiB of squashfs can hold terabytes of zeros), extracts the
squashfs with `unsquashfs` (squashfs-tools) straight from its offset in the file, and shifts
every owner into the jobs' user namespace (container uid N is host uid base+N), as
`umoci --uid-map` does for OCI images. The shift walks the fresh tree by descriptors opened
beneath its top with no link followed (`paths.open_in`, `BENEATH`), changes each entry itself
(never what a link points to), counts a hard-linked file once and restores the set-id bits
that chown clears.
unsquashfs itself refuses names that would lead outside its destination (squashfs-tools 4.5.1
and later fix CVE-2021-40153 and CVE-2021-41072; Debian 12 ships 4.5.1).

What Apptainer gives such an image by default, and Squall gives it too (`defaults`):
- the scripts of `/.singularity.d/env/*.sh` (the image's `%environment` and the `ENV` of the
  Docker image it was built from) are sourced by `/bin/sh` before the command runs; the job's
  own variables are set again after them, so they win, as Apptainer's `--env` does;
- with no command, the image's runscript (`/.singularity.d/runscript`) runs, with the args;
- `PATH` defaults to the usual list, and `APPTAINER_CONTAINER` / `SINGULARITY_CONTAINER`
  name the image.
Not given: Apptainer's bind of the user's home and of the host's /tmp (a job sees its own
volumes only), instances and overlays, and the `%startscript`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .confine import UserNamespace
from .paths import BENEATH, IN_ROOT, PathEscape, open_in, remove_tree
from .sif import SifError, primary_partition

__all__ = [
    "ENV_SCRIPTS",
    "MAX_ROOT_BYTES",
    "RUNSCRIPT",
    "SifDefaults",
    "defaults",
    "free_bytes",
    "root_size",
    "sourcing_argv",
    "unpack",
]

ENV_SCRIPTS = "/.singularity.d/env"
RUNSCRIPT = "/.singularity.d/runscript"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ROOT_BYTES = 64 * 2**30
# a line of `unsquashfs -lln`: mode, uid/gid, size (major,minor for devices), date, name
_LISTED = re.compile(r"([-dl])[-rwxsStT]{9} +\d+/\d+ +(\d+) ")


@dataclass(frozen=True, slots=True)
class SifDefaults:
    """What the image's own Apptainer metadata asks for (empty where it has none)."""

    entrypoint: tuple[str, ...] = ()
    env_scripts: str = ""


def unpack(
    sif: Path, target: Path, userns: UserNamespace | None, max_bytes: int = MAX_ROOT_BYTES
) -> None:
    """The SIF's root file system at `target`, owners shifted into `userns`; raises
    `SifError` with a one-line reason, and refuses, before writing it, a root that would be
    larger than `max_bytes` or than the free space where `target` goes. A tree made
    meanwhile by another pull is kept."""
    partition = primary_partition(sif)
    free = free_bytes(target.parent)
    limit = min(max_bytes, free)
    size = root_size(sif, partition.offset, limit)
    if size > limit:
        room = (
            f"the {_human(max_bytes)} one image may take on this node"
            if max_bytes <= free
            else f"the {_human(free)} free where images are kept"
        )
        raise SifError(f"its root file system would take {_human(size)}, more than {room}")
    staging = target.with_name(f".unsquash-{target.name}-{os.urandom(4).hex()}")
    command = [
        "unsquashfs",
        "-no-progress",
        "-quiet",
        "-no-xattrs",  # file capabilities mean nothing under no_new_privs
        "-offset",
        str(partition.offset),
        "-dest",
        str(staging),
        str(sif),
    ]
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise SifError("unsquashfs is not installed on this node (squashfs-tools)") from None
        if result.returncode != 0:
            lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines()]
            reason = next((ln for ln in reversed(lines) if ln), "no error output")
            raise SifError(f"its squashfs root file system cannot be extracted: {reason}")
        if userns is not None:
            shift_owners(staging, userns)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    except OSError as exc:
        raise SifError(f"its root file system cannot be prepared: {exc.strerror}") from None
    finally:
        remove_tree(staging)


def free_bytes(path: Path) -> int:
    """The space left to an unprivileged writer of `path`'s file system."""
    return shutil.disk_usage(path).free


def root_size(sif: Path, offset: int, limit: int) -> int:
    """The sum of the sizes of the files, folders and links the squashfs at `offset` holds
    (what unsquashfs would write: sparse and hard-linked files counted whole), reading its
    listing only until the sum passes `limit`."""
    command = ["unsquashfs", "-lln", "-offset", str(offset), str(sif)]
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, errors="replace"
            )
        except FileNotFoundError:
            raise SifError("unsquashfs is not installed on this node (squashfs-tools)") from None
        assert proc.stdout is not None
        total = 0
        with proc:
            for line in proc.stdout:
                listed = _LISTED.match(line)
                if listed is not None:
                    total += int(listed[2])
                    if total > limit:
                        proc.kill()
                        return total
            code = proc.wait()
        if code != 0:
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            reason = lines[-1] if lines else "no error output"
            raise SifError(f"its squashfs root file system cannot be listed: {reason}")
    return total


def _human(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def shift_owners(top: Path, userns: UserNamespace) -> None:
    """Add `userns.base` to the owner and group of every entry under `top`, links included
    (their own owner), without following any."""
    seen: set[tuple[int, int]] = set()  # hard-linked inodes already shifted
    st = os.lstat(top)
    os.chown(top, *_shifted(st, userns, "/"), follow_symlinks=False)
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            fd = open_in(top, rel or ".", os.O_RDONLY | os.O_DIRECTORY, BENEATH)
        except PathEscape as exc:
            raise SifError(f"its file {rel!r} cannot be prepared: {exc.strerror}") from None
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    path = f"{rel}/{entry.name}" if rel else entry.name
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    owner = _shifted(st, userns, path)
                    os.chown(entry.name, *owner, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                        os.chmod(entry.name, stat.S_IMODE(st.st_mode), dir_fd=fd)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(path)
        finally:
            os.close(fd)


def _shifted(st: os.stat_result, userns: UserNamespace, path: str) -> tuple[int, int]:
    if st.st_uid >= userns.size or st.st_gid >= userns.size:
        raise SifError(
            f"its file /{path.lstrip('/')} is owned by {st.st_uid}:{st.st_gid}, outside the "
            f"{userns.size} ids a job's user namespace maps"
        )
    return userns.base + st.st_uid, userns.base + st.st_gid


def defaults(root: Path) -> SifDefaults:
    """The runscript and environment scripts of an unpacked image, where it has them."""
    entrypoint = (RUNSCRIPT,) if _is_file(root, RUNSCRIPT) else ()
    scripts = ENV_SCRIPTS if _is_dir(root, ENV_SCRIPTS) and _is_file(root, "/bin/sh") else ""
    return SifDefaults(entrypoint, scripts)


def _is_file(root: Path, path: str) -> bool:
    """A regular file, found as the container would find it (links inside the root)."""
    try:
        fd = open_in(root, path, os.O_PATH, IN_ROOT)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _is_dir(root: Path, path: str) -> bool:
    try:
        os.close(open_in(root, path, os.O_PATH | os.O_DIRECTORY, IN_ROOT))
        return True
    except OSError:
        return False


def sourcing_argv(folder: str, keep: Iterable[str], argv: list[str]) -> list[str]:
    """`argv` run by `/bin/sh` after it sources `folder/*.sh`, with the variables named in
    `keep` set again afterwards to what they were (only names: values stay off the command
    line, which other users of the host can read)."""
    names = sorted({n for n in keep if _NAME.fullmatch(n)})
    saved = [f"__squall_{i}" for i in range(len(names))]
    save = "".join(f'{s}="${{{n}}}"; ' for s, n in zip(saved, names, strict=True))
    restore = "".join(f'export {n}="${s}"; ' for s, n in zip(saved, names, strict=True))
    script = (
        f'{save}for __squall_f in {folder}/*.sh; do if [ -f "$__squall_f" ]; then '
        f'. "$__squall_f"; fi; done; {restore}unset __squall_f {" ".join(saved)}; exec "$@"'
    )
    return ["/bin/sh", "-c", script, "sh", *argv]
