"""A namespaced node: the agent of one node of a local cluster joins the network namespace
its orchestrator made for the node and takes a hostname of its own, so that it is reached at
the node's address alone and looks like a machine of its own to the jobs and MPI."""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

__all__ = ["NodeError", "enter"]

CLONE_NEWNET, CLONE_NEWUTS = 0x40000000, 0x04000000
_libc = ctypes.CDLL(None, use_errno=True)


class NodeError(Exception):
    """The node's namespaces cannot be entered; says why."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NodeError(f"{what}: {os.strerror(err)}")


def enter(netns: Path, hostname: str) -> None:
    """Join the network namespace pinned at `netns` and a new UTS namespace named
    `hostname`. Call before any thread starts: namespaces are the calling thread's, and the
    threads started after it inherit them."""
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        message = f"cannot open the node's network namespace {netns}: {exc.strerror}"
        raise NodeError(message) from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"cannot join the network namespace {netns}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWUTS), "cannot make a UTS namespace")
    try:
        socket.sethostname(hostname)
    except OSError as exc:
        raise NodeError(f"cannot set the hostname {hostname!r}: {exc.strerror}") from None
