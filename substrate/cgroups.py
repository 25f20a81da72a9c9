"""Per-task cgroups: CPU pinning, memory and process-count limits, the device allow-list,
and OOM-kill detection.

The agent owns `squall/<agent id>/` in every hierarchy and makes one child per task. Works on
cgroup v1 (one directory per controller: cpuset, memory, pids, devices; the hybrid layout of
this project's VMs) and on v2 (one unified directory; device rules there are eBPF programs,
which this agent does not load: see `confine.py` for what keeps devices out on v2). A task
joins its cgroup through a tiny shell wrapper that writes its own pid to `cgroup.procs` and
then execs the task, so nothing runs between fork and exec in the (threaded) agent.

Without root or a writable cgroup tree, `Cgroups.available` is false and tasks run without
limits (CPU pinning then falls back to `taskset`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .confine import Device

__all__ = ["Cgroups", "TaskCgroup"]

V1_CONTROLLERS = ("cpuset", "memory", "pids", "devices")


@dataclass(frozen=True, slots=True)
class TaskCgroup:
    """The cgroup directories of one task (one per controller on v1, one on v2)."""

    dirs: tuple[Path, ...]
    version: int

    def join_argv(self, argv: list[str]) -> list[str]:
        """`argv` behind a shell that first moves itself into this cgroup."""
        moves = "".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))} && " for d in self.dirs)
        return ["/bin/sh", "-c", moves + 'exec "$@"', "sh", *argv]

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed anything in this cgroup."""
        for d in self.dirs:
            name = "memory.events" if self.version == 2 else "memory.oom_control"
            try:
                text = (d / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return sorted(found)

    def kill(self, rounds: int = 50) -> None:
        """SIGKILL everything in this cgroup until it is empty (or `rounds` have passed)."""
        for _ in range(rounds):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self, attempts: int = 20) -> None:
        """rmdir every directory; the kernel may report EBUSY briefly after the last exit."""
        for d in self.dirs:
            for _ in range(attempts):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


class Cgroups:
    """Creates and removes task cgroups under `squall/<agent_id>`."""

    def __init__(self, agent_id: str, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root
        self.parent = Path("squall") / agent_id
        self.version = self._detect()
        # tasks start concurrently: the first ones must not race to make (and fill) the
        # agent's own cgroup directories
        self._creating = threading.Lock()

    def _detect(self) -> int:
        if os.geteuid() != 0:
            return 0
        if all((self.root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
            return 1
        if (self.root / "cgroup.controllers").exists():
            return 2
        return 0

    @property
    def available(self) -> bool:
        return self.version != 0

    def remove_parent(self) -> None:
        """rmdir this agent's own directories (they must be empty: call after its tasks)."""
        dirs = (
            [self.root / c / self.parent for c in V1_CONTROLLERS]
            if self.version == 1
            else ([self.root / self.parent] if self.version == 2 else [])
        )
        TaskCgroup(tuple(dirs), self.version).remove(attempts=5)

    def kill_all(self, rounds: int = 100) -> None:
        """SIGKILL every process in every task cgroup of this agent, until none is left,
        and remove those cgroups (a process that escaped its task's process group, such as
        a container started in a session of its own, is still in its cgroup)."""
        for cgroup in self.leftovers():
            cgroup.kill(rounds)
            cgroup.remove()

    def leftovers(self) -> list[TaskCgroup]:
        """Task cgroups that exist under this agent's parent (from an agent that died)."""
        if self.version == 1:
            base = self.root / V1_CONTROLLERS[0] / self.parent
            names = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            return [
                TaskCgroup(tuple(self.root / c / self.parent / n for c in V1_CONTROLLERS), 1)
                for n in names
            ]
        if self.version == 2:
            base = self.root / self.parent
            dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            return [TaskCgroup((d,), 2) for d in dirs]
        return []

    def create(
        self,
        task_id: str,
        *,
        cpus: tuple[int, ...],
        memory_bytes: int = 0,
        pids_max: int = 0,
        devices: Sequence[Device] | None = None,
    ) -> TaskCgroup:
        """A task's cgroup; `devices` (None: any) are the only devices it may open."""
        if self.version == 1:
            with self._creating:
                group = self._create_v1(task_id, cpus, memory_bytes, pids_max)
            if devices is not None:
                allow_devices_v1(group.dirs[3], devices)
            return group
        if self.version == 2:
            with self._creating:
                return self._create_v2(task_id, cpus, memory_bytes, pids_max)
        raise OSError("cgroups are not available to this agent (not root, or no cgroupfs)")

    def _create_v1(
        self, task_id: str, cpus: tuple[int, ...], memory_bytes: int, pids_max: int
    ) -> TaskCgroup:
        dirs = []
        for controller in V1_CONTROLLERS:
            base = self.root / controller
            path = base
            for part in (*self.parent.parts, task_id):
                parent, path = path, path / part
                if not path.exists():
                    path.mkdir()
                    if controller == "cpuset":  # a new cpuset starts empty: inherit, then narrow
                        for f in ("cpuset.cpus", "cpuset.mems"):
                            (path / f).write_text((parent / f).read_text())
            dirs.append(path)
        cpuset, memory, pids, _ = dirs
        if cpus:
            (cpuset / "cpuset.cpus").write_text(",".join(map(str, cpus)))
        if memory_bytes:
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no swap beyond the limit, so the limit is the limit
                swap.write_text(str(memory_bytes))
        if pids_max:
            (pids / "pids.max").write_text(str(pids_max))
        return TaskCgroup(tuple(dirs), 1)

    def _create_v2(
        self, task_id: str, cpus: tuple[int, ...], memory_bytes: int, pids_max: int
    ) -> TaskCgroup:
        path = self.root
        for part in self.parent.parts:
            control = path / "cgroup.subtree_control"
            path = path / part
            path.mkdir(exist_ok=True)
            control.write_text("+cpuset +memory +pids")
        (path / "cgroup.subtree_control").write_text("+cpuset +memory +pids")
        task = path / task_id
        task.mkdir(exist_ok=True)
        if cpus:
            (task / "cpuset.cpus").write_text(",".join(map(str, cpus)))
        if memory_bytes:
            (task / "memory.max").write_text(str(memory_bytes))
            (task / "memory.swap.max").write_text("0")
        if pids_max:
            (task / "pids.max").write_text(str(pids_max))
        return TaskCgroup((task,), 2)


def allow_devices_v1(cgroup: Path, devices: Sequence[Device]) -> None:
    """Deny every device, then allow `devices` (read, write, mknod as the rules say)."""
    (cgroup / "devices.deny").write_text("a")
    for device in devices:
        (cgroup / "devices.allow").write_text(device.cgroup_rule())
