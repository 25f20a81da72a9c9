"""Container runtimes: each turns a task spec into the command that starts it.

`crun` runs OCI images confined (user namespace, seccomp, minimal capabilities, device
allow-list, a network namespace of its own): the default, and the only OCI runtime an agent
offers unless it is told to accept weaker ones. It runs SIF images (`oras://`) too, from the
squashfs root the image cache extracts (`sifroot.py`). `apptainer` runs SIF images where
Apptainer is installed and a request (or the agent's `--sif-runtime`) names it. Weaker,
opt-in (`weak=True`, the agent's `--weak-runtimes`):
`bwrap` (the same images in bubblewrap namespaces: no user namespace or seccomp profile, so
root in the job is root on the host's files it can see) and `process` (the host itself, no
image, for developing the agent; used only when a request names it).
"""

import hashlib
import os
from pathlib import Path

from ..confine import UserNamespace
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


# crun's task roots are mounted, and its state (which holds a running container's config, and
# so its environment) kept, in memory under /run, never on the agent's disk; see crun.py
ROOTS = Path("/run/squall/roots")
STATE = Path("/run/squall/crun")


def available(data_dir: Path, userns: UserNamespace, *, weak: bool = False) -> dict[str, Runtime]:
    """The runtimes this node can use, by name; the weak ones only when asked for."""
    found: dict[str, Runtime] = {}
    if CrunRuntime.present() and os.geteuid() == 0:
        node = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
        found["crun"] = CrunRuntime(STATE / node, userns, ROOTS / node)
    if ApptainerRuntime.present():
        found["apptainer"] = ApptainerRuntime()
    if weak:
        found["process"] = ProcessRuntime()
        if BwrapRuntime.present():
            found["bwrap"] = BwrapRuntime()
    return found
