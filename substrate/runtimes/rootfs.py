"""What OCI runtimes share: the task's root filesystem, and OCI rules for argv and env.

As root, each task gets a copy-on-write root: an overlay of the cached image (read-only
lower) and a per-task upper directory, so tasks write freely and never change the cache.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Launch, RuntimeRefused, TaskSpec

if TYPE_CHECKING:
    from ..images import Image

__all__ = [
    "DEFAULT_CAPS",
    "EnterWithNsenter",
    "children",
    "hostname",
    "image_argv",
    "image_env",
    "mount_overlay",
    "oci_image",
    "populate",
    "unmount_overlay",
    "working_dir",
]

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2  # umount2 flag: detach now, clean up when no longer busy

# Docker's default capability set (moby's oci/caps/defaults.go).
DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)


def oci_image(runtime: str, image: Image | None) -> Image:
    """The task's image, which an OCI runtime needs and which must not be a SIF file."""
    if image is None:
        raise RuntimeRefused(f"the {runtime} runtime runs images: give the task an image")
    if image.sif is not None:
        raise RuntimeRefused(
            f"{image.reference} is a SIF image, which needs the apptainer runtime; "
            "this node has no Apptainer"
        )
    return image


def image_argv(spec: TaskSpec, image: Image) -> list[str]:
    """What to run, by OCI rules: the job's command, else the image's entrypoint and cmd."""
    if spec.command:
        return [*spec.command, *spec.args]
    argv = [*image.entrypoint, *(spec.args or image.cmd)]
    if not argv:
        raise RuntimeRefused(f"{image.reference} has no entrypoint or cmd; give a command")
    return argv


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


def mount_overlay(lower: Path, task_dir: Path) -> Path:
    """Mount the task's copy-on-write root at task_dir/rootfs and return it."""
    upper, work, merged = (task_dir / d for d in ("upper", "work", "rootfs"))
    for d in (upper, work, merged):
        d.mkdir(exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    # mount(2) directly: a `mount` process per task costs milliseconds of launch time
    if _libc.mount(b"overlay", str(merged).encode(), b"overlay", 0, options) != 0:
        err = ctypes.get_errno()
        raise RuntimeRefused(f"cannot mount the task's root filesystem: {os.strerror(err)}")
    return merged


def populate(root: Path, spec: TaskSpec, cwd: str) -> None:
    """Create mount points and the working directory, and write the injected files."""
    for path in [*(m.destination for m in spec.mounts), cwd]:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for f in spec.files:
        target = root / f.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.content)
        target.chmod(f.mode)
    for m in spec.mounts:
        if not Path(m.source).exists():
            raise RuntimeRefused(f"mount source {m.source} does not exist on this node")


def unmount_overlay(task_dir: Path) -> None:
    merged = task_dir / "rootfs"
    if merged.is_dir() and os.path.ismount(merged):
        _libc.umount2(str(merged).encode(), MNT_DETACH)
    for d in ("upper", "work"):
        shutil.rmtree(task_dir / d, ignore_errors=True)


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
            *command,
        ]
        return Launch(argv=argv, env=image_env(spec, image, env), cwd="/")
