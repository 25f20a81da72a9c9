"""Container runtimes: each turns a task spec into the command that starts it.

`process` runs on the host with no image, for development only; it is used only when a
request names it, never as a fallback. OCI runtimes (crun, bwrap) arrive with image support.
"""

from .base import Launch, Runtime, RuntimeRefused, TaskSpec
from .process import ProcessRuntime

__all__ = ["Launch", "ProcessRuntime", "Runtime", "RuntimeRefused", "TaskSpec", "available"]


def available() -> dict[str, Runtime]:
    """The runtimes this node can use, by name."""
    return {"process": ProcessRuntime()}
