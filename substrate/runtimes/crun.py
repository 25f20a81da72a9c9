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

Everything crun needs mounted lives in a mount namespace of the runtime's own, held by one
thread of the agent (`mountns.py`) that mounts the tasks' roots and starts every crun process:
crun's state is a tmpfs there (a running container's config, which holds its environment, stays
in memory), and the rest of the host never sees a task's root. On hosts with hybrid cgroups (v1
controllers plus a cgroup2 mount that holds a controller), crun refuses to run at all ("cgroups
in hybrid mode not supported"): the cgroup2 mount is hidden under a tmpfs in that namespace;
nothing outside it changes (measured and described in the project's runtime notes). The
namespace holds the host's mounts as they were when it was made: a task whose volume the host
has mounted (or unmounted) something on since gets a new one, and the old one ends with its
last task.

crun protects its own binary from a container (CVE-2019-5736) by copying or re-mounting
itself and executing that copy at every start, unless it already runs from a sealed in-memory
file (runc's and crun's `is_self_cloned`). The runtime makes that sealed copy once and starts
crun from it: the same protection, without a second start of crun and a file in /tmp each time.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..confine import CAPABILITIES, UserNamespace, device_of, seccomp_bpf, seccomp_profile
from .base import Launch, RuntimeRefused, TaskSpec
from .mountns import MountNamespace, mount
from .rootfs import (
    container_argv,
    hostname,
    image_argv,
    image_env,
    mount_overlay,
    oci_image,
    populate,
    remove_layers,
    unmount_root,
    working_dir,
)

if TYPE_CHECKING:
    from ..images import Image

__all__ = ["CrunRuntime", "hybrid_cgroups"]

UNIFIED = Path("/sys/fs/cgroup/unified")
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def hybrid_cgroups() -> bool:
    """True when cgroup v1 controllers sit beside a cgroup2 mount that holds controllers."""
    try:
        controllers = (UNIFIED / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return bool(controllers) and Path("/sys/fs/cgroup/memory/cgroup.procs").exists()


def sealed_copy(path: str) -> str:
    """A path to run the executable at `path` from: a sealed in-memory copy of it, which
    nothing can change; `path` itself where the host forbids running such a copy."""
    try:
        fd = os.memfd_create(Path(path).name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:  # vm.memfd_noexec=2 refuses an executable one
        return path
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                os.write(fd, chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        runnable = os.fstat(fd).st_mode & 0o111 != 0  # vm.memfd_noexec=1 makes none
    except OSError:
        runnable = False
    if not runnable:
        os.close(fd)
        return path
    return f"/proc/{os.getpid()}/fd/{fd}"  # this process keeps it open; its children run it


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
        self.seccomp = seccomp_profile()  # fails now, at agent start, if there is none
        # compiled once here, instead of by crun at every start (see confine.py)
        self.seccomp_bpf = base64.b64encode(seccomp_bpf(self.seccomp)).decode()
        self._binary = ""
        self._mounts: MountNamespace | None = None
        self._tasks: dict[str, MountNamespace] = {}  # each task's, by its folder's name
        self._lock = threading.Lock()

    @staticmethod
    def present() -> bool:
        return shutil.which("crun") is not None

    def namespace(self, task_dir: Path | None = None) -> MountNamespace:
        """The mount namespace crun runs in (made at first use), or the one the task in
        `task_dir` was started in."""
        with self._lock:
            if task_dir is not None and (known := self._tasks.get(task_dir.name)) is not None:
                return known
            if self._mounts is None:
                self._binary = self._binary or sealed_copy(shutil.which("crun") or "crun")
                try:
                    self._mounts = MountNamespace(f"crun-{self.roots.name}", self._prepare)
                except OSError as exc:
                    raise RuntimeRefused(f"cannot prepare crun's mount namespace: {exc}") from None
            return self._mounts

    def _namespace_seeing(self, sources: list[str]) -> MountNamespace:
        """A namespace that sees `sources` (a task's volumes) as the host does now: the
        namespace copied the host's mounts when it was made, so a mount the host made since
        (or took away) on a volume's path is seen only by a new one."""
        mounts = self.namespace()
        if not sources or mounts.call(_identities, sources) == _identities(sources):
            return mounts
        with self._lock:
            old, self._mounts = self._mounts, None
            idle = old is not None and old not in self._tasks.values()
        if idle:
            assert old is not None
            old.stop()
        return self.namespace()

    def _prepare(self) -> None:
        """In the new namespace: hide cgroup2 where crun would refuse it; crun's state, and
        the folders the roots are mounted on, in memory (the roots' private to the jobs'
        root, as the folder under them is)."""
        if hybrid_cgroups():
            mount("squall-hide", str(UNIFIED), "tmpfs", 0, "size=4k")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount("squall-crun", str(self.state_dir), "tmpfs", flags, "mode=0700")
        uid, gid = self.userns.root
        owner = f"mode=0700,uid={uid},gid={gid},size=1m"
        mount("squall-roots", str(self.roots), "tmpfs", flags, owner)

    def _crun(self, *args: str) -> list[str]:
        return [
            self._binary or "crun",
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
        mounts = self._namespace_seeing([m.source for m in spec.mounts])
        with self._lock:
            self._tasks[task_dir.name] = mounts
        root = mounts.call(self._root, spec, image, task_dir, cwd)
        fds: tuple[int, ...] = ()
        if spec.netns and not spec.isolated_network:
            # the pod network's namespace is pinned where the agent sees it, not in crun's
            # mount namespace: crun gets it by descriptor
            try:
                fds = (os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC),)
            except OSError as exc:
                raise RuntimeRefused(f"cannot open the task's network namespace: {exc}") from None
            spec = replace(spec, netns=f"/proc/self/fd/{fds[0]}")
        config = oci_config(spec, image, root, cwd, self.userns, self.seccomp)
        config["annotations"] = {"run.oci.seccomp_bpf_data": self.seccomp_bpf}
        fd = _memfd("config.json", config)  # in memory only: it holds the job's secrets
        # the task's folder is the bundle: crun reads its config from the descriptor
        argv = self._crun(
            "run",
            "--config",
            f"/proc/self/fd/{fd}",
            "--bundle",
            str(task_dir),
            _container_id(task_dir),
        )
        return Launch(
            argv=argv, env={}, cwd=str(task_dir), cpus=cpus, pass_fds=(fd, *fds), namespace=mounts
        )

    def _root(self, spec: TaskSpec, image: Image, task_dir: Path, cwd: str) -> Path:
        """Mount and fill the task's root (in the namespace)."""
        root = mount_overlay(image.rootfs, task_dir, self.userns.root, self.roots / task_dir.name)
        populate(root, spec, cwd, self.userns.root)
        return root

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
        return Launch(
            argv=argv,
            env={},
            cwd=str(task_dir),
            pass_fds=(fd,),
            namespace=self.namespace(task_dir),
        )

    def namespace_pid(self, task_pid: int, task_dir: Path, wait: float = 5.0) -> int:
        """The container's first process, as `crun state` reports it once it is running."""
        deadline = time.monotonic() + wait
        state = functools.partial(
            subprocess.run,
            self._crun("state", _container_id(task_dir)),
            capture_output=True,
            text=True,
            check=False,
        )
        while True:
            result = self.namespace(task_dir).call(state)
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
        mounts = self.namespace(task_dir)
        mounts.call(self._unmount, task_dir)
        with self._lock:
            self._tasks.pop(task_dir.name, None)
            idle = mounts is not self._mounts and mounts not in self._tasks.values()
        if idle:  # a namespace replaced by a newer one, whose last task has ended
            mounts.stop()
        # not on the namespace's thread: a job may leave a tree that takes long to delete
        remove_layers(task_dir)

    def _unmount(self, task_dir: Path) -> None:
        # `crun run` removes its container when it exits; state is left only after a crash
        cid = _container_id(task_dir)
        if (self.state_dir / cid).exists():
            subprocess.run(self._crun("delete", "--force", cid), capture_output=True, check=False)
        unmount_root(task_dir, self.roots / task_dir.name)

    def remove_roots(self) -> None:
        """End the namespace (and so crun's state) and remove the (empty) folders of this
        agent's mount points and crun state; call when it stops."""
        with self._lock:
            every = {id(m): m for m in (self._mounts, *self._tasks.values()) if m is not None}
            self._mounts = None
            self._tasks.clear()
        for mounts in every.values():
            mounts.stop()
        for folder in (self.roots, self.state_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _identities(paths: list[str]) -> list[tuple[int, int] | None]:
    """Which file each path names (device and inode), None where there is none."""
    found: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino))
    return found


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
        # idmap: the job's root writes as the host's root would, and reads what it owns (a
        # share takes no idmapped mount: its volumes are the job's root's own)
        options = ["rbind", mode, "nosuid", "nodev", *(["idmap"] if m.idmap else [])]
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
