"""Task output kept on the node: every chunk of stdout and stderr with its time, on disk.

One file per task, a sequence of records `[int64 time_ns][uint8 stream][uint32 length][data]`.
Readers can tail the last records and follow the file while its writer is open.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["STDERR", "STDOUT", "LogRecord", "LogStore", "LogWriter"]

STDOUT, STDERR = 1, 2
_HEADER = struct.Struct(">qBI")


@dataclass(frozen=True, slots=True)
class LogRecord:
    time_ns: int
    stream: int
    data: bytes


class LogWriter:
    """Appends records to one task's log; `close` tells followers that no more will come."""

    def __init__(self, store: LogStore, task_id: str) -> None:
        self._store = store
        self._task_id = task_id
        self._file = open(store.path(task_id), "ab", buffering=0)  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, stream: int, data: bytes) -> None:
        if not data:
            return
        record = _HEADER.pack(time.time_ns(), stream, len(data)) + data
        with self._lock:
            self._file.write(record)
        self._store.notify()

    def close(self) -> None:
        with self._lock:
            self._file.close()
        self._store.closed(self._task_id)


class LogStore:
    """The logs of every task of one agent, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._changed = threading.Condition()
        self._open: set[str] = set()

    def path(self, task_id: str) -> Path:
        return self.root / f"{task_id}.log"

    def writer(self, task_id: str) -> LogWriter:
        with self._changed:
            self._open.add(task_id)
        return LogWriter(self, task_id)

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def closed(self, task_id: str) -> None:
        with self._changed:
            self._open.discard(task_id)
            self._changed.notify_all()

    def read(
        self,
        task_id: str,
        *,
        tail: int = 0,
        follow: bool = False,
        active: Callable[[], bool] = lambda: True,
    ) -> Iterator[LogRecord]:
        """Records of a task: the last `tail` (0: all), then new ones while `follow`ing.

        Following ends when the writer closes or when `active()` turns false (a reader that
        went away).
        """
        path = self.path(task_id)
        if not path.exists():
            raise FileNotFoundError(f"no logs for task {task_id!r}")
        with open(path, "rb") as fh:
            backlog = self._records(fh)
            yield from (deque(backlog, maxlen=tail) if tail > 0 else backlog)
            while follow and active():
                with self._changed:
                    still_open = task_id in self._open
                    if still_open:
                        self._changed.wait(timeout=0.5)
                got_any = False
                for record in self._records(fh):
                    got_any = True
                    yield record
                if not still_open and not got_any:
                    return

    def output(self, task_id: str, limit: int) -> bytes | None:
        """A task's whole output (its records' data, in order) when the log is at most
        `limit` bytes of data; None when it is longer or there is none."""
        path = self.path(task_id)
        try:
            with open(path, "rb") as fh:
                # a record holds at least one byte of data: a longer file holds more than limit
                if path.stat().st_size > (_HEADER.size + 1) * limit:
                    return None
                data = b"".join(r.data for r in self._records(fh))
        except FileNotFoundError:
            return None
        return data if len(data) <= limit else None

    @staticmethod
    def _records(fh: BinaryIO) -> list[LogRecord]:
        """Every whole record from the file's position on; stops before a partial one."""
        out: list[LogRecord] = []
        while True:
            start = fh.tell()
            header = fh.read(_HEADER.size)
            if len(header) == _HEADER.size:
                time_ns, stream, length = _HEADER.unpack(header)
                data = fh.read(length)
                if len(data) == length:
                    out.append(LogRecord(time_ns, stream, data))
                    continue
            fh.seek(start)  # a record still being written: read it next time
            return out
