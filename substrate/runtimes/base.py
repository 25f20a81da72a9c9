"""What every runtime is given and gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..images import Image
    from .mountns import MountNamespace

__all__ = ["FileSpec", "Launch", "MountSpec", "Runtime", "RuntimeRefused", "TaskSpec"]


class RuntimeRefused(Exception):
    """The runtime cannot run this spec; the message says why and what to use instead."""


@dataclass(frozen=True, slots=True)
class MountSpec:
    source: str
    destination: str
    read_only: bool = False
    idmap: bool = True  # False: on a share, whose files the jobs' root owns (no idmapped mount)


@dataclass(frozen=True, slots=True)
class FileSpec:
    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task as the agent's API describes it, runtime-neutral."""

    name: str
    runtime: str
    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    image: str = ""
    mounts: tuple[MountSpec, ...] = ()
    files: tuple[FileSpec, ...] = ()
    isolated_network: bool = False
    host_network: bool = False  # the node's own network (a multi-node job's, crun only)
    timeout: float = 0.0
    device_nodes: tuple[str, ...] = ()  # host device files the task may use (leased GPUs)
    script: str = ""  # instead of command: a #! script run with `args`
    netns: str = ""  # set by the agent: the network namespace to join (its pod network)
    launcher: bool = False  # a gang's launcher (substrate/launcher.py) in the container


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start a process: argv, environment, working directory, CPUs to pin it to."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    cpus: tuple[int, ...] = ()
    pass_fds: tuple[int, ...] = ()  # descriptors the process inherits (closed after the start)
    namespace: MountNamespace | None = None  # the mount namespace it starts in (None: ours)

    def pinned_argv(self) -> list[str]:
        """argv behind `taskset`, which pins the process to `cpus` before it starts.

        A wrapper rather than a `preexec_fn`: the agent is a threaded gRPC server, and a
        Python hook between fork and exec can deadlock or abort there (grpc's fork handlers).
        """
        if not self.cpus:
            return list(self.argv)
        return ["taskset", "--cpu-list", ",".join(map(str, self.cpus)), *self.argv]


class Runtime(Protocol):
    """Turns a spec into a `Launch` for the task, and for commands executed inside it."""

    name: str
    needs_image: bool

    def launch(
        self, spec: TaskSpec, cpus: tuple[int, ...], task_dir: Path, image: Image | None
    ) -> Launch:
        """Prepare the task (root filesystem, files) and say how to start it."""
        ...

    def exec_launch(
        self,
        spec: TaskSpec,
        task_pid: int,
        task_dir: Path,
        image: Image | None,
        command: list[str],
        env: dict[str, str],
    ) -> Launch:
        """How to start `command` inside the running task whose process is `task_pid`."""
        ...

    def namespace_pid(self, task_pid: int, task_dir: Path) -> int:
        """A process whose namespaces (network, mount) are the task's."""
        ...

    def release(self, task_dir: Path) -> None:
        """Undo what `launch` prepared, once the task has ended."""
        ...
