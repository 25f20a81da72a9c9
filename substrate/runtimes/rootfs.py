"""What OCI runtimes share: the task's root filesystem, and OCI rules for argv and env.

As root, each task gets a copy-on-write root: an overlay of the cached image (read-only
lower) and a per-task upper directory, so tasks write freely and never change the cache.
Every name written into that root (injected files, mount points, the working directory) is
resolved inside it (`substrate.paths`): an image or a job that plants a link cannot make the
agent write outside the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..paths import IN_ROOT, PathEscape, make_dirs, remove_tree, write_file
from ..sifroot import sourcing_argv
from .base import Launch, RuntimeRefused, TaskSpec

if TYPE_CHECKING:
    from ..images import Image

__all__ = [
    "EnterWithNsenter",
    "children",
    "container_argv",
    "hostname",
    "image_argv",
    "image_env",
    "mount_overlay",
    "oci_image",
    "populate",
    "remove_layers",
    "unmount_overlay",
    "unmount_root",
    "working_dir",
]

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2  # umount2 flag: detach now, clean up when no longer busy
MS_NOSUID, MS_NODEV = 0x2, 0x4


def oci_image(runtime: str, image: Image | None) -> Image:
    """The task's image, which an OCI runtime needs (a SIF image too: its root file system
    was extracted when it was pulled)."""
    if image is None:
        raise RuntimeRefused(f"the {runtime} runtime runs images: give the task an image")
    return image


def image_argv(spec: TaskSpec, image: Image) -> list[str]:
    """What to run, by OCI rules: the job's command, else the image's entrypoint and cmd."""
    if spec.command:
        return [*spec.command, *spec.args]
    argv = [*image.entrypoint, *(spec.args or image.cmd)]
    if not argv:
        raise RuntimeRefused(f"{image.reference} has no entrypoint or cmd; give a command")
    return argv


def container_argv(
    spec: TaskSpec, image: Image, argv: list[str], extra: dict[str, str] | None = None
) -> list[str]:
    """`argv` as an OCI runtime starts it: behind the sourcing of the image's environment
    scripts when it has them (a SIF image, as Apptainer does), the job's variables winning."""
    if not image.env_scripts:
        return argv
    keep = [*spec.env, "HOSTNAME", *(extra or {})]
    return sourcing_argv(image.env_scripts, keep, argv)


def image_env(spec: TaskSpec, image: Image, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The image's environment, then the job's (the job wins), then `extra`."""
    env = dict(entry.partition("=")[::2] for entry in image.env)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return {**env, "HOSTNAME": hostname(spec.name), **spec.env, **(extra or {})}


def working_dir(spec: TaskSpec, image: Image) -> str:
    return spec.cwd or image.workdir or "/"


def hostname(name: str) -> str:
    """The task name as a host name (a DNS label)."""
    clean = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name.lower()).strip("-")
    return clean[:63] or "task"


def mount_overlay(
    lower: Path, task_dir: Path, owner: tuple[int, int] | None = None, at: Path | None = None
) -> Path:
    """Mount the task's copy-on-write root at `at` (default task_dir/rootfs) and return it;
    `owner` owns its top (the container's root, in a user namespace)."""
    upper, work = task_dir / "upper", task_dir / "work"
    merged = at or task_dir / "rootfs"
    for d in (upper, work, merged):
        d.mkdir(exist_ok=True)
        if owner is not None:
            os.chown(d, *owner)
    if owner is not None:  # the root directory's mode comes from the upper one
        upper.chmod(lower.stat().st_mode & 0o7777)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    # mount(2) directly: a `mount` process per task costs milliseconds of launch time
    # nosuid: setuid files of the image or the job are nothing on the host (and, with
    # no_new_privs, nothing in the container); nodev: no device node in an image opens
    if _libc.mount(b"overlay", str(merged).encode(), b"overlay", MS_NOSUID | MS_NODEV, options):
        err = ctypes.get_errno()
        raise RuntimeRefused(f"cannot mount the task's root filesystem: {os.strerror(err)}")
    return merged


def populate(root: Path, spec: TaskSpec, cwd: str, owner: tuple[int, int] | None = None) -> None:
    """Create mount points and the working directory, and write the injected files, all
    inside `root` (links in the image are followed as the container would, never out)."""
    try:
        for path in [*(m.destination for m in spec.mounts), cwd]:
            make_dirs(root, path, IN_ROOT, owner)
        for f in spec.files:
            write_file(root, f.path, f.content, f.mode, IN_ROOT, owner)
    except PathEscape as exc:
        raise RuntimeRefused(f"cannot prepare the task's root: {exc.strerror}") from None
    for m in spec.mounts:
        if not Path(m.source).exists():
            raise RuntimeRefused(f"mount source {m.source} does not exist on this node")


def unmount_overlay(task_dir: Path, at: Path | None = None) -> None:
    unmount_root(task_dir, at)
    remove_layers(task_dir)


def unmount_root(task_dir: Path, at: Path | None = None) -> None:
    """Detach the task's root (and remove its mount point, when it is `at`)."""
    merged = at or task_dir / "rootfs"
    if merged.is_dir() and os.path.ismount(merged):
        _libc.umount2(str(merged).encode(), MNT_DETACH)
    if at is not None:
        with contextlib.suppress(OSError):
            at.rmdir()


def remove_layers(task_dir: Path) -> None:
    """Delete what the task wrote (its upper layer) and the overlay's work folder."""
    for d in ("upper", "work"):
        remove_tree(task_dir / d)


def children(pid: int) -> list[int]:
    """The pids of a process's children (of its main thread)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class EnterWithNsenter:
    """`exec_launch` for runtimes whose tasks live in namespaces: nsenter into those of the
    process that `namespace_pid` names (the runtime defines it)."""

    def namespace_pid(self, task_pid: int, task_dir: Path) -> int:
        raise NotImplementedError

    def exec_launch(
        self,
        spec: TaskSpec,
        task_pid: int,
        task_dir: Path,
        image: Image | None,
        command: list[str],
        env: dict[str, str],
    ) -> Launch:
        """`command` inside the namespaces and root of the task."""
        assert image is not None
        target = self.namespace_pid(task_pid, task_dir)
        argv = [
            "nsenter",
            "--target",
            str(target),
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--net",
            "--root",
            "--wd",
            "--",
            *container_argv(spec, image, command, env),
        ]
        return Launch(argv=argv, env=image_env(spec, image, env), cwd="/")
