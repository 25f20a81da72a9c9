"""The `crun` runtime: OCI containers (a generated config and an overlay root) run by crun.

The confined runtime, and the default: each task runs in a user namespace (root in the
container is an unprivileged host uid), with a seccomp profile, a minimal capability set,
`no_new_privs`, the default devices only, volumes bind-mounted `nosuid,nodev` through an
idmapped mount, and its own network namespace (the node's pod network, or loopback alone for
an isolated network); see `confine.py`. The config, which holds the job's environment and so
its secrets, is handed to crun in memory (a memfd), never written to disk. Commands run in a
task with `crun exec`, under the same confinement.

Limits and OOM detection come from the task's cgroup, which the agent creates and crun is
started in (`--cgroup-manager=disabled`: crun leaves cgroups alone, so the container stays in
the agent's cgroup and the same code serves every runtime).

On hosts with hybrid cgroups (v1 controllers plus a cgroup2 mount that holds a controller),
crun refuses to run at all ("cgroups in hybrid mode not supported"). Each crun call then runs
in a private mount namespace in which the cgroup2 mount is hidden under a tmpfs; nothing
outside that namespace changes (measured and described in the project's runtime notes).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..confine import CAPABILITIES, UserNamespace, device_of, seccomp_bpf, seccomp_profile
from ..paths import remove_tree
from .base import Launch, RuntimeRefused, TaskSpec
from .rootfs import (
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


class CrunRuntime:
    name = "crun"
    needs_image = True

    def __init__(self, state_dir: Path, userns: UserNamespace, roots: Path) -> None:
        self.state_dir = state_dir
        self.userns = userns
        # crun sets up the root from inside the user namespace, where the agent's data
        # directory (mode 0700 ancestors) cannot be traversed: roots are mounted here
        self.roots = roots
        _private_to(roots, userns.root)
        self.prefix = _hide_cgroup2() if hybrid_cgroups() else []
        self.seccomp = seccomp_profile()  # fails now, at agent start, if there is none
        # compiled once here, instead of by crun at every start (see confine.py)
        self.seccomp_bpf = base64.b64encode(seccomp_bpf(self.seccomp)).decode()

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
        root = mount_overlay(image.rootfs, task_dir, self.userns.root, self.roots / task_dir.name)
        populate(root, spec, cwd, self.userns.root)
        config = oci_config(spec, image, root, cwd, self.userns, self.seccomp)
        config["annotations"] = {"run.oci.seccomp_bpf_data": self.seccomp_bpf}
        fd = _memfd("config.json", config)  # in memory only: it holds the job's secrets
        bundle = task_dir / "bundle"
        bundle.mkdir(exist_ok=True)
        argv = self._crun(
            "run",
            "--config",
            f"/proc/self/fd/{fd}",
            "--bundle",
            str(bundle),
            _container_id(task_dir),
        )
        return Launch(argv=argv, env={}, cwd=str(task_dir), cpus=cpus, pass_fds=(fd,))

    def exec_launch(
        self,
        spec: TaskSpec,
        task_pid: int,
        task_dir: Path,
        image: Image | None,
        command: list[str],
        env: dict[str, str],
    ) -> Launch:
        """`command` in the running container, with its capabilities, seccomp profile and
        user (`crun exec`), not as the agent."""
        assert image is not None
        self.namespace_pid(task_pid, task_dir)  # waits for the container to be running
        inner = container_argv(spec, image, command, env)
        process = _process(image_env(spec, image, env), inner, working_dir(spec, image))
        fd = _memfd("process.json", process)  # the environment stays off the command line
        argv = self._crun("exec", "--process", f"/proc/self/fd/{fd}", _container_id(task_dir))
        return Launch(argv=argv, env={}, cwd=str(task_dir), pass_fds=(fd,))

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
        unmount_overlay(task_dir, self.roots / task_dir.name)
        remove_tree(task_dir / "bundle")

    def remove_roots(self) -> None:
        """Remove the (empty) folders of this agent's mount points and crun state; call when
        it stops."""
        for folder in (self.roots, self.state_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _private_to(path: Path, owner: tuple[int, int]) -> None:
    """Make `path` a folder only `owner` (the jobs' root) may enter, under parents up to /run
    that anyone may pass through (0711) but not list: crun, inside the user namespace, can
    reach the roots mounted in it, and no other user of the host can."""
    path.mkdir(parents=True, exist_ok=True)
    for d in path.parents:
        if d == Path("/run") or d == d.parent:
            break
        if d.stat().st_mode & 0o777 != 0o711:
            d.chmod(0o711)
    st = path.stat()
    if (st.st_uid, st.st_gid) != owner or st.st_mode & 0o777 != 0o700:
        os.chown(path, *owner)
        path.chmod(0o700)


def _memfd(name: str, document: dict[str, Any]) -> int:
    """`document` as JSON in an anonymous in-memory file, for crun to read by its fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, json.dumps(document).encode())
    return fd


def _process(env: dict[str, str], args: list[str], cwd: str) -> dict[str, Any]:
    """The OCI `process` of a task or an exec: root of the container's user namespace, the
    confined capability set, no new privileges."""
    caps = list(CAPABILITIES)
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": dict.fromkeys(("bounding", "effective", "permitted"), caps),
        "noNewPrivileges": True,
    }


def _container_id(task_dir: Path) -> str:
    return f"squall-{task_dir.name}"


def oci_config(
    spec: TaskSpec,
    image: Image,
    root: Path,
    cwd: str,
    userns: UserNamespace,
    seccomp: dict[str, Any],
) -> dict[str, Any]:
    """The OCI runtime spec (v1.0.2) of a task: process, root, mounts, namespaces and
    confinement."""
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
        # sysfs cannot be mounted anew in a network namespace the container's user namespace
        # does not own (the pod network's); crun would then bind the host's read-write:
        # bind it read-only, all the way down, instead
        {
            "destination": "/sys",
            "type": "bind",
            "source": "/sys",
            "options": ["rbind", "nosuid", "noexec", "nodev", "rro"],
        },
    ]
    for m in spec.mounts:
        mode = "ro" if m.read_only else "rw"
        # idmap: the job's root writes as the host's root would, and reads what it owns
        options = ["rbind", mode, "nosuid", "nodev", "idmap"]
        mounts.append(
            {"destination": m.destination, "type": "bind", "source": m.source, "options": options}
        )
    devices = [  # the leased GPUs' device files
        {
            "path": d.path,
            "type": "c",
            "major": d.major,
            "minor": d.minor,
            "fileMode": d.mode,
            "uid": 0,
            "gid": 0,
        }
        for d in map(device_of, spec.device_nodes)
    ]
    namespaces: list[dict[str, str]] = [
        {"type": t} for t in ("pid", "ipc", "uts", "mount", "user", "cgroup")
    ]
    if spec.isolated_network or not spec.netns:
        namespaces.append({"type": "network"})  # loopback only
    else:
        namespaces.append({"type": "network", "path": spec.netns})
    return {
        "ociVersion": "1.0.2",
        "process": _process(
            image_env(spec, image), container_argv(spec, image, image_argv(spec, image)), cwd
        ),
        "root": {"path": str(root), "readonly": False},
        "hostname": hostname(spec.name),
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "uidMappings": userns.oci_mappings(),
            "gidMappings": userns.oci_mappings(),
            "devices": devices,
            "seccomp": seccomp,
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
