"""The `process` runtime: the command runs on the host, pinned to the leased CPUs.

For development and tests of the agent itself. It has no image, no private filesystem and
no network namespace, so it refuses specs that need them rather than pretend.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Launch, RuntimeRefused, TaskSpec

if TYPE_CHECKING:
    from ..images import Image

__all__ = ["ProcessRuntime"]

# The task sees these from the agent's environment, and nothing else of it (the agent's own
# environment may hold its token or cloud credentials).
_PASSED = ("PATH", "LANG", "LC_ALL", "TZ")


class ProcessRuntime:
    name = "process"
    needs_image = False

    def launch(
        self, spec: TaskSpec, cpus: tuple[int, ...], task_dir: Path, image: Image | None
    ) -> Launch:
        unsupported = [
            what
            for what, asked in (
                ("an image", bool(spec.image)),
                ("mounts", bool(spec.mounts)),
                ("injected files", bool(spec.files)),
                ("an isolated network", spec.isolated_network),
            )
            if asked
        ]
        if unsupported:
            raise RuntimeRefused(
                f"the process runtime cannot provide {', '.join(unsupported)}; "
                "use an OCI runtime (crun or bwrap)"
            )
        if not spec.command:
            raise RuntimeRefused("the process runtime needs a command (it has no image)")
        env = self._env(spec.env, task_dir)
        if shutil.which(spec.command[0], path=env["PATH"]) is None:
            raise RuntimeRefused(f"no program {spec.command[0]!r} on this node's PATH")
        return Launch(
            argv=[*spec.command, *spec.args],
            env=env,
            cwd=spec.cwd or str(task_dir),
            cpus=cpus,
        )

    def exec_launch(
        self,
        spec: TaskSpec,
        task_pid: int,
        task_dir: Path,
        image: Image | None,
        command: list[str],
        env: dict[str, str],
    ) -> Launch:
        return Launch(
            argv=command,
            env=self._env({**spec.env, **env}, task_dir),
            cwd=spec.cwd or str(task_dir),
            cpus=tuple(sorted(os.sched_getaffinity(task_pid))),
        )

    def namespace_pid(self, task_pid: int, task_dir: Path) -> int:
        return task_pid

    def release(self, task_dir: Path) -> None:
        return None

    @staticmethod
    def _env(env: dict[str, str], task_dir: Path) -> dict[str, str]:
        base = {k: os.environ[k] for k in _PASSED if k in os.environ}
        base.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        base["HOME"] = str(task_dir)
        return {**base, **env}
