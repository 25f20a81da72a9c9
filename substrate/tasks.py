"""Tasks: processes started by a runtime in a lease, watched until they end.

Each task runs in its own process group, so a signal or a cancel reaches everything it
started. Its stdout and stderr go to the log store. Its pid and start time are written to
`<data>/tasks/<id>/state.json` before anything else happens, so that an agent that died
and starts again can find and kill what it left behind (`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from .logstore import STDERR, STDOUT, LogStore
from .runtimes import Launch, Runtime, RuntimeRefused, TaskSpec

__all__ = ["NoSuchTask", "Task", "TaskError", "TaskManager", "TaskState"]

DEFAULT_GRACE = 5.0


class TaskError(Exception):
    """A task request that cannot be carried out."""


class NoSuchTask(TaskError):
    pass


class TaskState(Enum):
    RUNNING = "RUNNING"
    EXITED = "EXITED"
    OOM_KILLED = "OOM_KILLED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


@dataclass(slots=True)
class Task:
    id: str
    spec: TaskSpec
    lease_id: str
    cpus: tuple[int, ...]
    dir: Path
    state: TaskState = TaskState.RUNNING
    pid: int = 0
    exit_code: int = 0
    signal: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    message: str = ""
    proc: subprocess.Popen[bytes] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stop_reason: TaskState | None = None  # set when the agent ends it (cancel, timeout)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class TaskManager:
    """Starts, watches, signals and cancels the tasks of one agent."""

    def __init__(self, data_dir: Path, logs: LogStore, runtimes: dict[str, Runtime]) -> None:
        self.root = data_dir / "tasks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.runtimes = runtimes
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()

    # ---- queries ------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        with self._lock:
            try:
                return self._tasks[task_id]
            except KeyError:
                raise NoSuchTask(f"no task {task_id!r} on this agent") from None

    def in_lease(self, lease_id: str) -> list[Task]:
        with self._lock:
            return [t for t in self._tasks.values() if t.lease_id == lease_id]

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        task = self.get(task_id)
        task.done.wait(timeout)
        return task

    # ---- starting ------------------------------------------------------------------

    def run(self, spec: TaskSpec, lease_id: str, cpus: tuple[int, ...]) -> Task:
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            have = ", ".join(sorted(self.runtimes))
            raise TaskError(f"unknown runtime {spec.runtime!r}; this node has: {have}")
        task_id = uuid.uuid4().hex[:12]
        task = Task(task_id, spec, lease_id, cpus, self.root / task_id)
        task.dir.mkdir(parents=True)
        try:
            launch = runtime.launch(spec, cpus, task.dir)
        except RuntimeRefused as exc:
            raise TaskError(str(exc)) from None
        with self._lock:
            self._tasks[task_id] = task
        writer = self.logs.writer(task_id)
        try:
            task.proc = self._popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            writer.close()
            self._finish(
                task,
                TaskState.FAILED,
                message=f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}",
            )
            return task
        task.pid = task.proc.pid
        task.started_at = time.time()
        self._save(task)
        pumps = [
            threading.Thread(
                target=self._pump, args=(task.proc.stdout, writer, STDOUT), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(task.proc.stderr, writer, STDERR), daemon=True
            ),
        ]
        for pump in pumps:
            pump.start()
        threading.Thread(target=self._watch, args=(task, pumps, writer), daemon=True).start()
        return task

    @staticmethod
    def _popen(launch: Launch, **streams: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            launch.pinned_argv(),
            env=launch.env,
            cwd=launch.cwd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: signals reach all it starts
            **streams,
        )

    @staticmethod
    def _pump(stream: IO[bytes] | None, writer: object, which: int) -> None:
        assert stream is not None
        for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
            writer.write(which, chunk)  # type: ignore[attr-defined]
        stream.close()

    def _watch(self, task: Task, pumps: list[threading.Thread], writer: object) -> None:
        assert task.proc is not None
        timeout = task.spec.timeout or None
        try:
            code = task.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            task.stop_reason = TaskState.TIMED_OUT
            self._kill_group(task, signal.SIGKILL)
            code = task.proc.wait()
        for pump in pumps:
            pump.join()
        writer.close()  # type: ignore[attr-defined]
        sig = -code if code < 0 else 0
        if task.stop_reason is TaskState.TIMED_OUT:
            self._finish(
                task,
                TaskState.TIMED_OUT,
                code,
                sig,
                f"killed after its timeout of {task.spec.timeout:g}s",
            )
        elif task.stop_reason is TaskState.CANCELLED:
            self._finish(task, TaskState.CANCELLED, code, sig, task.message or "cancelled")
        else:
            self._finish(task, TaskState.EXITED, code if code >= 0 else 128 + sig, sig)

    def _finish(
        self, task: Task, state: TaskState, code: int = 0, sig: int = 0, message: str = ""
    ) -> None:
        task.state, task.exit_code, task.signal = state, code, sig
        task.message = message
        task.finished_at = time.time()
        self._save(task)
        task.done.set()

    # ---- stopping ------------------------------------------------------------------

    def signal(self, task_id: str, sig: int) -> None:
        task = self.get(task_id)
        if task.done.is_set():
            raise TaskError(f"task {task_id!r} has already ended ({task.state.value})")
        self._kill_group(task, sig)

    def cancel(self, task_id: str, grace: float = DEFAULT_GRACE, reason: str = "") -> Task:
        """TERM the task's process group, then KILL it after `grace` seconds."""
        task = self.get(task_id)
        if task.done.is_set():
            return task
        task.stop_reason = TaskState.CANCELLED
        task.message = reason or "cancelled"
        self._kill_group(task, signal.SIGTERM)
        if not task.done.wait(grace):
            self._kill_group(task, signal.SIGKILL)
            task.done.wait()
        return task

    def cancel_lease(self, lease_id: str, reason: str, grace: float = DEFAULT_GRACE) -> list[str]:
        """Cancel every running task of a lease; their ids."""
        running = [t for t in self.in_lease(lease_id) if not t.done.is_set()]
        threads = [
            threading.Thread(target=self.cancel, args=(t.id, grace, reason)) for t in running
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return [t.id for t in running]

    def shutdown(self, grace: float = 2.0) -> None:
        with self._lock:
            running = [t for t in self._tasks.values() if not t.done.is_set()]
        for task in running:
            self.cancel(task.id, grace, "the agent stopped")

    @staticmethod
    def _kill_group(task: Task, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(task.pid, sig)

    # ---- state on disk ------------------------------------------------------------

    def _save(self, task: Task) -> None:
        state = {
            "id": task.id,
            "name": task.spec.name,
            "lease_id": task.lease_id,
            "pid": task.pid,
            "start_time": _start_time(task.pid) if task.pid else None,
            "state": task.state.value,
            "finished": task.done.is_set() or task.state is not TaskState.RUNNING,
        }
        tmp = task.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, task.dir / "state.json")

    def reap_orphans(self, log: Callable[[str], None] = lambda _: None) -> list[str]:
        """Kill the process groups of tasks that a previous agent left running."""
        killed = []
        for state_file in self.root.glob("*/state.json"):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            pid = state.get("pid") or 0
            if state.get("finished") or not pid:
                continue
            if state.get("start_time") and _start_time(pid) == state["start_time"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                killed.append(state["id"])
                log(f"killed task {state['id']} (pid {pid}) left by a previous agent")
            state.update(finished=True, state=TaskState.CANCELLED.value)
            state_file.write_text(json.dumps(state))
        return killed
