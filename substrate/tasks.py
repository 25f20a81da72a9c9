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
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import IO, Any

from .cgroups import Cgroups, TaskCgroup
from .images import Image
from .logstore import STDERR, STDOUT, LogStore, LogWriter
from .runtimes import Launch, Runtime, RuntimeRefused, TaskSpec
from .runtimes.base import FileSpec

__all__ = ["NoSuchTask", "Task", "TaskError", "TaskManager", "TaskState"]

DEFAULT_GRACE = 5.0
PIDS_MAX = 4096  # per task: a fork bomb stops here


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
    image: Image | None = None
    cgroup: TaskCgroup | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stop_reason: TaskState | None = None  # set when the agent ends it (cancel, timeout)


SCRIPT_PATH = "/.squall/script"


def _with_script(spec: TaskSpec, runtime: Runtime, task_dir: Path) -> TaskSpec:
    """A script task as a command: the script is written where the task can run it (into
    the container's filesystem, or the task directory for a host process)."""
    if not spec.script:
        return spec
    if spec.command:
        raise TaskError("give a task a command or a script, not both")
    if runtime.needs_image:
        script = FileSpec(SCRIPT_PATH, spec.script.encode(), 0o755)
        return replace(
            spec, command=(SCRIPT_PATH, *spec.args), args=(), files=(*spec.files, script)
        )
    path = task_dir / "script"
    path.write_text(spec.script)
    path.chmod(0o755)
    return replace(spec, command=(str(path), *spec.args), args=())


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class TaskManager:
    """Starts, watches, signals and cancels the tasks of one agent."""

    def __init__(
        self, data_dir: Path, logs: LogStore, runtimes: dict[str, Runtime], cgroups: Cgroups
    ) -> None:
        self.root = data_dir / "tasks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.runtimes = runtimes
        self.cgroups = cgroups
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

    def run(
        self,
        spec: TaskSpec,
        lease_id: str,
        cpus: tuple[int, ...],
        memory_bytes: int = 0,
        image: Image | None = None,
    ) -> Task:
        """Start `spec` on `cpus` with at most `memory_bytes` (0: no limit)."""
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            have = ", ".join(sorted(self.runtimes))
            raise TaskError(f"unknown runtime {spec.runtime!r}; this node has: {have}")
        task_id = uuid.uuid4().hex[:12]
        task_dir = self.root / task_id
        task_dir.mkdir(parents=True)
        spec = _with_script(spec, runtime, task_dir)
        task = Task(task_id, spec, lease_id, cpus, task_dir, image=image)
        try:
            launch = runtime.launch(spec, cpus, task.dir, image)
        except RuntimeRefused as exc:
            runtime.release(task.dir)
            raise TaskError(str(exc)) from None
        if self.cgroups.available:
            task.cgroup = self.cgroups.create(
                task_id, cpus=cpus, memory_bytes=memory_bytes, pids_max=PIDS_MAX
            )
        with self._lock:
            self._tasks[task_id] = task
        writer = self.logs.writer(task_id)
        try:
            task.proc = self.popen(task, launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            writer.close()
            self._clean_up(task)
            reason = f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}"
            self._finish(task, TaskState.FAILED, message=reason)
            return task
        task.pid = task.proc.pid
        task.started_at = time.time()
        self._save(task)
        pumps = [
            threading.Thread(target=self._pump, args=(stream, writer, which), daemon=True)
            for stream, which in ((task.proc.stdout, STDOUT), (task.proc.stderr, STDERR))
        ]
        for pump in pumps:
            pump.start()
        threading.Thread(target=self._watch, args=(task, pumps, writer), daemon=True).start()
        return task

    @staticmethod
    def popen(task: Task, launch: Launch, **streams: Any) -> subprocess.Popen[bytes]:
        """Start `launch` in the task's cgroup (pinned with taskset when there is none),
        in a process group of its own so that signals reach everything it starts."""
        argv = task.cgroup.join_argv(launch.argv) if task.cgroup else launch.pinned_argv()
        streams.setdefault("stdin", subprocess.DEVNULL)
        streams.setdefault("start_new_session", True)
        return subprocess.Popen(argv, env=launch.env, cwd=launch.cwd, **streams)

    @staticmethod
    def _pump(stream: IO[bytes] | None, writer: LogWriter, which: int) -> None:
        assert stream is not None
        for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
            writer.write(which, chunk)
        stream.close()

    def _watch(self, task: Task, pumps: list[threading.Thread], writer: LogWriter) -> None:
        assert task.proc is not None
        timeout = task.spec.timeout or None
        try:
            code = task.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            task.stop_reason = TaskState.TIMED_OUT
            self._kill_group(task, signal.SIGKILL)
            code = task.proc.wait()
        # A task ends with its main process: what it left running (a container's processes
        # that still hold its output pipes, daemons) ends with it.
        self._kill_leftovers(task)
        for pump in pumps:
            pump.join()
        writer.close()
        sig = -code if code < 0 else 0
        oom = task.cgroup is not None and task.cgroup.oom_killed()
        self._clean_up(task)
        if oom and task.stop_reason is None:
            why = "killed by the kernel: it used more memory than its lease allows"
            self._finish(task, TaskState.OOM_KILLED, code if code >= 0 else 128 + sig, sig, why)
        elif task.stop_reason is TaskState.TIMED_OUT:
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

    @staticmethod
    def _kill_leftovers(task: Task) -> None:
        if task.cgroup is None:
            return
        for _ in range(50):
            pids = task.cgroup.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def _clean_up(self, task: Task) -> None:
        """Remove the task's cgroup and release what its runtime prepared."""
        self._kill_leftovers(task)
        if task.cgroup is not None:
            task.cgroup.remove()
        self.runtimes[task.spec.runtime].release(task.dir)

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
            "runtime": task.spec.runtime,
            "pid": task.pid,
            "start_time": _start_time(task.pid) if task.pid else None,
            "state": task.state.value,
            "finished": task.done.is_set() or task.state is not TaskState.RUNNING,
        }
        tmp = task.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, task.dir / "state.json")

    def reap_orphans(self, log: Callable[[str], None] = lambda _: None) -> list[str]:
        """Kill and clean up the tasks that a previous agent on this data dir left behind."""
        killed = []
        for state_file in self.root.glob("*/state.json"):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            if state.get("finished"):
                continue
            pid = state.get("pid") or 0
            if pid and state.get("start_time") and _start_time(pid) == state["start_time"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                killed.append(state["id"])
                log(f"killed task {state['id']} (pid {pid}) left by a previous agent")
            runtime = self.runtimes.get(state.get("runtime", ""))
            if runtime is not None:
                runtime.release(state_file.parent)
            state.update(finished=True, state=TaskState.CANCELLED.value)
            state_file.write_text(json.dumps(state))
        for cgroup in self.cgroups.leftovers():
            for pid in cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            cgroup.remove()
        return killed
