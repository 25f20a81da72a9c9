"""The `apptainer` runtime: SIF images (`oras://`) run by Apptainer, when it is installed and
chosen (a request's runtime, or the agent's `--sif-runtime`); crun runs them otherwise.

`apptainer exec --containall --cleanenv` gives the task its own PID and IPC namespaces, a
clean environment and no host home; binds carry the job's mounts and injected files, `--nv`
the leased NVIDIA GPUs, `--net --network none` an isolated network. Limits come from the
task's cgroup as for every runtime. `singularity` is accepted under its older name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Launch, RuntimeRefused, TaskSpec
from .rootfs import EnterWithNsenter, children, image_argv, image_env, working_dir

if TYPE_CHECKING:
    from ..images import Image

__all__ = ["ApptainerRuntime"]


def _apptainer_env() -> dict[str, str]:
    """What Apptainer itself sees of the agent's environment: PATH and its own settings
    (APPTAINER_*, SINGULARITY_*), nothing else (the agent's environment holds its token)."""
    keep = ("APPTAINER_", "SINGULARITY_")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) or k in ("PATH", "LANG")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def _binary() -> str | None:
    return shutil.which("apptainer") or shutil.which("singularity")


class ApptainerRuntime(EnterWithNsenter):
    name = "apptainer"
    needs_image = True

    @staticmethod
    def present() -> bool:
        return _binary() is not None

    def launch(
        self, spec: TaskSpec, cpus: tuple[int, ...], task_dir: Path, image: Image | None
    ) -> Launch:
        binary = _binary()
        if binary is None:
            raise RuntimeRefused("Apptainer is not installed on this node")
        if image is None or image.sif is None:
            raise RuntimeRefused(
                "the apptainer runtime runs SIF images (oras://); use crun for docker:// images"
            )
        # exec a command, or run the image's own runscript when the job gives none
        verb = "exec" if spec.command else "run"
        args = [binary, verb, "--containall", "--cleanenv", "--pwd", working_dir(spec, image)]
        if spec.isolated_network:
            args += ["--net", "--network", "none"]
        if any(node.startswith("/dev/nvidia") for node in spec.device_nodes):
            args.append("--nv")
        for m in spec.mounts:
            args += ["--bind", f"{m.source}:{m.destination}" + (":ro" if m.read_only else "")]
        files = task_dir / "files"
        for i, f in enumerate(spec.files):
            files.mkdir(exist_ok=True)
            source = files / str(i)
            source.write_bytes(f.content)
            source.chmod(f.mode)
            args += ["--bind", f"{source}:{f.path}:ro"]
        for key, value in image_env(spec, image).items():
            args += ["--env", f"{key}={value}"]
        argv = image_argv(spec, image) if spec.command else list(spec.args)
        return Launch(
            argv=[*args, str(image.sif), *argv], env=_apptainer_env(), cwd=str(task_dir), cpus=cpus
        )

    def namespace_pid(self, task_pid: int, task_dir: Path) -> int:
        """Apptainer's starter keeps a parent outside the container's PID namespace when it
        makes one; the container is its child."""
        kids = children(task_pid)
        return kids[0] if kids else task_pid

    def release(self, task_dir: Path) -> None:
        shutil.rmtree(task_dir / "files", ignore_errors=True)
