"""The `crun` runtime: OCI bundles (a generated config.json and an overlay root) run by crun.

Limits and OOM detection come from the task's cgroup, which the agent creates and crun is
started in (`--cgroup-manager=disabled`: crun leaves cgroups alone, so the container stays in
the agent's cgroup and the same code serves every runtime).

On hosts with hybrid cgroups (v1 controllers plus a cgroup2 mount that holds a controller),
crun refuses to run at all ("cgroups in hybrid mode not supported"). Each crun call then runs
in a private mount namespace in which the cgroup2 mount is hidden under a tmpfs; nothing
outside that namespace changes (measured and described in the project's runtime notes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Launch, RuntimeRefused, TaskSpec
from .rootfs import (
    DEFAULT_CAPS,
    EnterWithNsenter,
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

__all__ = ["CrunRuntime", "hybrid_cgroups"]

UNIFIED = Path("/sys/fs/cgroup/unified")


def hybrid_cgroups() -> bool:
    """True when cgroup v1 controllers sit beside a cgroup2 mount that holds controllers."""
    try:
        controllers = (UNIFIED / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return bool(controllers) and Path("/sys/fs/cgroup/memory/cgroup.procs").exists()


def _hide_cgroup2() -> list[str]:
    script = f'mount -t tmpfs -o size=4k squall-hide {UNIFIED} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


class CrunRuntime(EnterWithNsenter):
    name = "crun"
    needs_image = True

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.prefix = _hide_cgroup2() if hybrid_cgroups() else []

    @staticmethod
    def present() -> bool:
        return shutil.which("crun") is not None

    def _crun(self, *args: str) -> list[str]:
        return [
            *self.prefix,
            "crun",
            "--root",
            str(self.state_dir),
            "--cgroup-manager=disabled",
            *args,
        ]

    def launch(
        self, spec: TaskSpec, cpus: tuple[int, ...], task_dir: Path, image: Image | None
    ) -> Launch:
        image = oci_image(self.name, image)
        cwd = working_dir(spec, image)
        root = mount_overlay(image.rootfs, task_dir)
        populate(root, spec, cwd)
        bundle = task_dir / "bundle"
        bundle.mkdir(exist_ok=True)
        config = oci_config(spec, image, root, cwd)
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        argv = self._crun("run", "--bundle", str(bundle), _container_id(task_dir))
        return Launch(argv=argv, env={}, cwd=str(task_dir), cpus=cpus)

    def namespace_pid(self, task_pid: int, task_dir: Path, wait: float = 5.0) -> int:
        """The container's first process, as `crun state` reports it once it is running."""
        deadline = time.monotonic() + wait
        while True:
            result = subprocess.run(
                self._crun("state", _container_id(task_dir)),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                state = json.loads(result.stdout)
                if state.get("status") == "running" and state.get("pid"):
                    return int(state["pid"])
            if not Path(f"/proc/{task_pid}").exists():
                raise RuntimeRefused(f"the task (process {task_pid}) has ended")
            if time.monotonic() > deadline:
                raise RuntimeRefused(f"the container of process {task_pid} did not start")
            time.sleep(0.01)

    def release(self, task_dir: Path) -> None:
        # `crun run` removes its container when it exits; state is left only after a crash
        cid = _container_id(task_dir)
        if (self.state_dir / cid).exists():
            subprocess.run(self._crun("delete", "--force", cid), capture_output=True, check=False)
        unmount_overlay(task_dir)


def _container_id(task_dir: Path) -> str:
    return f"squall-{task_dir.name}"


def oci_config(spec: TaskSpec, image: Image, root: Path, cwd: str) -> dict[str, Any]:
    """The OCI runtime spec (v1.0.2) of a task: process, root, mounts and namespaces."""
    caps = list(DEFAULT_CAPS)
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    for m in spec.mounts:
        mode = "ro" if m.read_only else "rw"
        mounts.append(
            {
                "destination": m.destination,
                "type": "bind",
                "source": m.source,
                "options": ["rbind", mode],
            }
        )
    for node in spec.device_nodes:
        mounts.append(
            {"destination": node, "type": "bind", "source": node, "options": ["bind", "rw"]}
        )
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.isolated_network:
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": image_argv(spec, image),
            "env": [f"{k}={v}" for k, v in image_env(spec, image).items()],
            "cwd": cwd,
            "capabilities": dict.fromkeys(("bounding", "effective", "permitted"), caps),
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": False},
        "hostname": hostname(spec.name),
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
