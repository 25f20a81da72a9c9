"""A thread of the agent in a mount namespace of its own, where a runtime's mounts live.

`unshare(CLONE_NEWNS)` changes only the calling thread (a mount namespace comes with the
thread's own root and working directory), and a process inherits the namespace of the thread
that starts it. So one thread that unshared once, made its mounts, and then runs whatever must
see them (mounting and unmounting task roots, starting the runtime's processes) replaces a
chain of `unshare`, `sh` and `mount` processes at every start, and its mounts (which the rest
of the host never sees) go with the namespace when its last process ends: an agent that dies
leaves none of them behind.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["MountNamespace"]

T = TypeVar("T")
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    """mount(2), raising OSError."""
    _check(
        _libc.mount(
            source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode() or None
        ),
        f"mount {target}",
    )


class MountNamespace:
    """A thread in a private mount namespace, prepared by `setup` (run on it first), that
    runs the functions given to `call` one at a time."""

    def __init__(self, name: str, setup: Callable[[], None]) -> None:
        self._setup = setup
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._ready: Future[None] = Future()
        self._lock = threading.Lock()  # no job is queued after the stop
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._ready.result()  # raises what the setup met

    def _serve(self) -> None:
        try:
            _check(_libc.unshare(CLONE_NEWNS), "unshare")
            # nothing mounted here propagates back to the host (on a host whose mounts are
            # shared, as under systemd, it would)
            _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make-rprivate")
            self._setup()
        except BaseException as exc:  # handed to the constructor
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, result = job
            try:
                result.set_result(fn())
            except BaseException as exc:  # handed to the caller
                result.set_exception(exc)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, run in the namespace; its result, or what it raised."""
        result: Future[T] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the mount namespace's thread has stopped")
            self._jobs.put((lambda: fn(*args), result))
        return result.result()

    def stop(self) -> None:
        """End the thread (after the jobs already given): the namespace and its mounts go
        once no process started in it is left."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._jobs.put(None)
        self._thread.join()
