"""The `bwrap` runtime: an OCI image's root filesystem in bubblewrap namespaces.

As root, each task gets a copy-on-write root: an overlay of the cached image (read-only
lower) and a per-task upper directory, so tasks write freely and never change the cache.
Without root, the image is bound read-only with a tmpfs on /tmp. PID, IPC, UTS (and, when
asked, network) namespaces are private; capabilities are cut to Docker's default set.
Commands are executed inside a running task with nsenter into its namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Launch, RuntimeRefused, TaskSpec

if TYPE_CHECKING:
    from ..images import Image

__all__ = ["BwrapRuntime"]

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
    return {**env, "HOSTNAME": spec.name or "task", **spec.env, **(extra or {})}


class BwrapRuntime:
    name = "bwrap"
    needs_image = True

    def __init__(self) -> None:
        self.root_mode = os.geteuid() == 0

    @staticmethod
    def present() -> bool:
        return shutil.which("bwrap") is not None

    def launch(
        self, spec: TaskSpec, cpus: tuple[int, ...], task_dir: Path, image: Image | None
    ) -> Launch:
        if image is None:
            raise RuntimeRefused("the bwrap runtime runs images: give the task an image")
        argv = image_argv(spec, image)
        cwd = spec.cwd or image.workdir or "/"
        args = [
            "bwrap",
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            _hostname(spec.name),
        ]
        if spec.isolated_network:
            args.append("--unshare-net")
        if self.root_mode:
            root = self._overlay(image.rootfs, task_dir)
            for path in [*(m.destination for m in spec.mounts), cwd]:
                (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for f in spec.files:
                target = root / f.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.content)
                target.chmod(f.mode)
            args += ["--bind", str(root), "/"]
        else:
            if spec.files:
                raise RuntimeRefused("injecting files needs the agent to run as root")
            args += ["--ro-bind", str(image.rootfs), "/", "--tmpfs", "/tmp"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for m in spec.mounts:
            if not Path(m.source).exists():
                raise RuntimeRefused(f"mount source {m.source} does not exist on this node")
            args += ["--ro-bind" if m.read_only else "--bind", m.source, m.destination]
        args += ["--chdir", cwd, "--clearenv"]
        for key, value in image_env(spec, image).items():
            args += ["--setenv", key, value]
        args += ["--cap-drop", "ALL"]
        for cap in DEFAULT_CAPS:
            args += ["--cap-add", cap]
        return Launch(argv=[*args, "--", *argv], env={}, cwd=str(task_dir), cpus=cpus)

    def _overlay(self, lower: Path, task_dir: Path) -> Path:
        upper, work, merged = (task_dir / d for d in ("upper", "work", "rootfs"))
        for d in (upper, work, merged):
            d.mkdir(exist_ok=True)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeRefused(
                f"cannot mount the task's root filesystem: {result.stderr.strip()}"
            )
        return merged

    def exec_launch(
        self,
        spec: TaskSpec,
        task_pid: int,
        task_dir: Path,
        image: Image | None,
        command: list[str],
        env: dict[str, str],
    ) -> Launch:
        assert image is not None
        target = self.namespace_pid(task_pid)
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

    def namespace_pid(self, task_pid: int, wait: float = 5.0) -> int:
        """The task's command inside the sandbox: its namespaces and root are the task's.

        bwrap forks a sandbox init, which forks the command once the sandbox is set up
        (bwrap -> bwrap -> command); before that, the root is still being built. Right
        after a launch, wait a little for it.
        """
        deadline = time.monotonic() + wait
        while True:
            init = _children(task_pid)
            command = _children(init[0]) if init else []
            if command:
                return command[0]
            if not Path(f"/proc/{task_pid}").exists():
                raise RuntimeRefused(f"the task (process {task_pid}) has ended")
            if time.monotonic() > deadline:
                raise RuntimeRefused(f"the sandbox of process {task_pid} did not start")
            time.sleep(0.01)

    def release(self, task_dir: Path) -> None:
        merged = task_dir / "rootfs"
        if merged.is_dir() and os.path.ismount(merged):
            subprocess.run(["umount", "--lazy", str(merged)], capture_output=True, check=False)
        for d in ("upper", "work"):
            shutil.rmtree(task_dir / d, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _hostname(name: str) -> str:
    clean = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name.lower()).strip("-")
    return clean[:63] or "task"
