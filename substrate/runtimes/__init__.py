"""Container runtimes: each turns a task spec into the command that starts it.

`process` runs on the host with no image, for development only; it is used only when a
request names it, never as a fallback. `crun` runs OCI bundles (preferred); `bwrap` runs the
same images in bubblewrap namespaces where crun is missing or the agent is not root;
`apptainer` runs SIF images (`oras://`) where Apptainer is installed.
"""

import os
from pathlib import Path

from .apptainer import ApptainerRuntime
from .base import Launch, Runtime, RuntimeRefused, TaskSpec
from .bwrap import BwrapRuntime
from .crun import CrunRuntime
from .process import ProcessRuntime

__all__ = [
    "ApptainerRuntime",
    "BwrapRuntime",
    "CrunRuntime",
    "Launch",
    "ProcessRuntime",
    "Runtime",
    "RuntimeRefused",
    "TaskSpec",
    "available",
]


def available(data_dir: Path) -> dict[str, Runtime]:
    """The runtimes this node can use, by name (crun keeps its state under data_dir)."""
    found: dict[str, Runtime] = {"process": ProcessRuntime()}
    if CrunRuntime.present() and os.geteuid() == 0:
        found["crun"] = CrunRuntime(data_dir / "crun")
    if BwrapRuntime.present():
        found["bwrap"] = BwrapRuntime()
    if ApptainerRuntime.present():
        found["apptainer"] = ApptainerRuntime()
    return found
