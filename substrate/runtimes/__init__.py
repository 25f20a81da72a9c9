"""Container runtimes: each turns a task spec into the command that starts it.

`process` runs on the host with no image, for development only; it is used only when a
request names it, never as a fallback. `bwrap` runs OCI images in bubblewrap namespaces.
"""

from .base import Launch, Runtime, RuntimeRefused, TaskSpec
from .bwrap import BwrapRuntime
from .process import ProcessRuntime

__all__ = [
    "BwrapRuntime",
    "Launch",
    "ProcessRuntime",
    "Runtime",
    "RuntimeRefused",
    "TaskSpec",
    "available",
]


def available() -> dict[str, Runtime]:
    """The runtimes this node can use, by name."""
    found: dict[str, Runtime] = {"process": ProcessRuntime()}
    if BwrapRuntime.present():
        found["bwrap"] = BwrapRuntime()
    return found
