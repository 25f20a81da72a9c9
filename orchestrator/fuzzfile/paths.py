"""Paths and names from a Fuzzfile that Squall later joins onto a path of its own.

A container path (`files:` keys, `cwd`, mount paths) is joined onto the container's root
directory on the node, a `file://PATH` of a transfer onto the volume's directory, and the
names of volumes, jobs and services onto directories under Squall's data directory. A `..`
component, a `/` in a name or a NUL byte would reach outside those; nothing real needs them,
so validation refuses them. Each function says what is wrong (to follow the path or name
in a message: "'a/b' contains '/'"), or returns None.
"""

from __future__ import annotations

__all__ = [
    "container_path_problem",
    "mount_path_problem",
    "name_problem",
    "volume_file_problem",
]

# Mount points that belong to the kernel's file systems the runtime mounts itself: a volume
# over them would hide them (and a job must not see the host's). Below /dev only /dev/shm,
# a directory (tmpfs) in every runtime's layout, can take a volume; the rest of /dev is
# device nodes, links and the runtime's own pts and mqueue mounts.
_KERNEL_DIRS = ("proc", "sys")
_DEV_DIRECTORY = "shm"


def _segments(path: str) -> list[str]:
    """The components of a `/`-separated path, without empty ones and `.`."""
    return [p for p in path.split("/") if p not in ("", ".")]


def container_path_problem(path: str) -> str | None:
    """What is wrong with a path inside a container (already known to be absolute)."""
    if "\0" in path:
        return "contains a NUL character"
    if ".." in path.split("/"):
        return "has a '..' component; write the path without it"
    return None


def mount_path_problem(path: str) -> str | None:
    """What is wrong with the path a volume is mounted at inside a container."""
    problem = container_path_problem(path)
    if problem is not None:
        return problem
    parts = _segments(path)
    if not parts:
        return "is the container's root file system, which a volume cannot replace"
    top = parts[0]
    if top in _KERNEL_DIRS:
        return f"is /{top} or below it, where the kernel's /{top} file system is mounted"
    if top == "dev" and (len(parts) == 1 or parts[1] != _DEV_DIRECTORY):
        return "is /dev or below it, where the container's devices are (only /dev/shm may be)"
    return None


def volume_file_problem(path: str) -> str | None:
    """What is wrong with the PATH of `file://PATH` inside a volume."""
    if "\0" in path:
        return "contains a NUL character"
    if not _segments(path):
        return "names no file in the volume"
    if ".." in path.split("/"):
        return "has a '..' component; paths stay inside the volume"
    return None


def name_problem(name: str) -> str | None:
    """What keeps `name` from being one directory name (volumes, jobs, services)."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "names a directory (. or ..)"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains a NUL character"
    return None
