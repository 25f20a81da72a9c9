"""The `bwrap` runtime: an OCI image's root filesystem in bubblewrap namespaces.

As root the root filesystem is a per-task overlay (see rootfs.py); without root the image is
bound read-only with a tmpfs on /tmp. PID, IPC, UTS (and, when asked, network) namespaces are
private; capabilities are cut to Docker's default set. Commands run inside a running task
through nsenter into its namespaces.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..confine import CAPABILITIES
from .base import Launch, RuntimeRefused, TaskSpec
from .rootfs import (
    EnterWithNsenter,
    children,
    container_argv,
    hostname,
    image_argv,
    image_env,
    mount_overlay,
    oci_image,
    populate,
    unmount_overlay,
    working_dir,
)

if TYPE_CHECKING:
    from ..images import Image

__all__ = ["BwrapRuntime"]


class BwrapRuntime(EnterWithNsenter):
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
        image = oci_image(self.name, image)
        argv = container_argv(spec, image, image_argv(spec, image))
        cwd = working_dir(spec, image)
        args = [
            "bwrap",
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            hostname(spec.name),
        ]
        if spec.isolated_network:
            args.append("--unshare-net")
        if self.root_mode:
            root = mount_overlay(image.rootfs, task_dir)
            populate(root, spec, cwd)
            args += ["--bind", str(root), "/"]
        else:
            if spec.files:
                raise RuntimeRefused("injecting files needs the agent to run as root")
            args += ["--ro-bind", str(image.rootfs), "/", "--tmpfs", "/tmp"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for m in spec.mounts:
            args += ["--ro-bind" if m.read_only else "--bind", m.source, m.destination]
        for node in spec.device_nodes:
            args += ["--dev-bind", node, node]
        args += ["--chdir", cwd, "--clearenv"]
        for key, value in image_env(spec, image).items():
            args += ["--setenv", key, value]
        args += ["--cap-drop", "ALL"]
        for cap in CAPABILITIES:
            args += ["--cap-add", cap]
        if spec.netns and not spec.isolated_network:  # join the node's pod network first
            args = ["nsenter", f"--net={spec.netns}", "--", *args]
        return Launch(argv=[*args, "--", *argv], env={}, cwd=str(task_dir), cpus=cpus)

    def namespace_pid(self, task_pid: int, task_dir: Path, wait: float = 5.0) -> int:
        """The task's command inside the sandbox: its namespaces and root are the task's.

        bwrap forks a sandbox init, which forks the command once the sandbox is set up
        (bwrap -> bwrap -> command); before that the root is still being built. Right
        after a launch, wait a little for it.
        """
        deadline = time.monotonic() + wait
        while True:
            init = children(task_pid)
            command = children(init[0]) if init else []
            if command:
                return command[0]
            if not Path(f"/proc/{task_pid}").exists():
                raise RuntimeRefused(f"the task (process {task_pid}) has ended")
            if time.monotonic() > deadline:
                raise RuntimeRefused(f"the sandbox of process {task_pid} did not start")
            time.sleep(0.01)

    def release(self, task_dir: Path) -> None:
        unmount_overlay(task_dir)
