"""Tasks: processes started by a runtime in a lease, watched until they end.

Each task runs in its own process group, so a signal or a cancel reaches everything it
started. Its stdout and stderr go to the log store. Its pid and start time are written to
`<data>/tasks/<id>/state.json` before anything else happens, so that an agent that died
and starts again can find and kill what it left behind (`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from . import network
from .cgroups import Cgroups, TaskCgroup
from .confine import DEFAULT_DEVICES, device_of
from .images import Image
from .launcher import LAUNCH_DIR, prepare
from .logstore import STDERR, STDOUT, LogStore, LogWriter
from .network import POD_INTERFACE, HostNetwork, NetworkError, PodNetwork
from .runtimes import Launch, Runtime, RuntimeRefused, TaskSpec
from .runtimes.base import FileSpec, MountSpec
from .runtimes.rootfs import hostname

log = logging.getLogger("substrate")

__all__ = ["NoSuchTask", "Task", "TaskError", "TaskManager", "TaskState"]

DEFAULT_GRACE = 5.0
KILL_WAIT = 30.0  # after SIGKILL, how long a cancel waits for the task's end to be recorded
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
    address: str = ""  # on the node's pod network (empty: none, or an isolated network)
    interface: str = ""  # the name of its interface with `address`
    on_end: Callable[[Task], None] | None = None  # called as it ends, before `done` is set
    lease_released: bool = False  # on_end released its lease
    exec_grant: str = ""  # lets another member of its gang Exec in it (RunRequest.exec_grant)


SCRIPT_PATH = "/.squall/script"


def _with_own_host(spec: TaskSpec, address: str) -> TaskSpec:
    """/etc/hosts names the container's own hostname at its address (as Docker's and
    Kubernetes' do): MPI and other peers resolve their own name to where others reach them.
    Added to the /etc/hosts the task was given, or, for a gang's member, to a file of the
    loopback names (a plain task keeps its image's: nothing is written per start)."""
    line = f"{address} {hostname(spec.name)}\n".encode()
    files = list(spec.files)
    for i, f in enumerate(files):
        if f.path == "/etc/hosts":
            content = f.content if f.content.endswith(b"\n") or not f.content else f.content + b"\n"
            files[i] = replace(f, content=content + line)
            break
    else:
        files.append(FileSpec("/etc/hosts", _LOOPBACK_HOSTS + line, 0o644))
    return replace(spec, files=tuple(files))


_LOOPBACK_HOSTS = b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"


def _with_launcher(spec: TaskSpec, task: Task) -> TaskSpec:
    """The task's launch folder made and mounted at LAUNCH_DIR; MULTINODE_NODE_IP is its
    address and MULTINODE_NODE_INTERFACE the interface with it (known here alone)."""
    folder = task.dir / "launch"
    prepare(folder)
    mounts = (*spec.mounts, MountSpec(str(folder), LAUNCH_DIR, False))
    env = {**spec.env, "MULTINODE_NODE_IP": task.address}
    env["MULTINODE_NODE_INTERFACE"] = task.interface
    return replace(spec, mounts=mounts, env=env)


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
        self,
        data_dir: Path,
        logs: LogStore,
        runtimes: dict[str, Runtime],
        cgroups: Cgroups,
        network: PodNetwork | None = None,
        host_network: HostNetwork | None = None,
    ) -> None:
        self.root = data_dir / "tasks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.runtimes = runtimes
        self.cgroups = cgroups
        self.network = network
        self.host_network = host_network
        self._tasks: dict[str, Task] = {}
        self._by_lease: dict[str, list[Task]] = {}  # a lease's tasks, without a scan of all
        self._lock = threading.Lock()
        self._stopping = False  # set once: no task starts after it

    # ---- queries ------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        with self._lock:
            try:
                return self._tasks[task_id]
            except KeyError:
                raise NoSuchTask(f"no task {task_id!r} on this agent") from None

    def in_lease(self, lease_id: str) -> list[Task]:
        with self._lock:
            return list(self._by_lease.get(lease_id, ()))

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
        on_end: Callable[[Task], None] | None = None,
    ) -> Task:
        """Start `spec` on `cpus` with at most `memory_bytes` (0: no limit); `on_end` is
        called as it ends (after its clean-up, before a Wait learns of it)."""
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            have = ", ".join(sorted(self.runtimes))
            raise TaskError(f"unknown runtime {spec.runtime!r}; this node has: {have}")
        if self._is_stopping():
            raise TaskError("this agent is stopping: it starts no more tasks")
        task_id = uuid.uuid4().hex[:12]
        task_dir = self.root / task_id
        task_dir.mkdir(parents=True)
        spec = _with_script(spec, runtime, task_dir)
        task = Task(task_id, spec, lease_id, cpus, task_dir, image=image, on_end=on_end)
        try:  # whatever fails while it is prepared, nothing of it is left behind
            if spec.host_network:
                host = self.host_network_for(runtime)
                # the agent's own namespace, as every task thread of it sees it
                spec = task.spec = replace(spec, netns="/proc/self/ns/net")
                task.address, task.interface = host.address, host.interface
            elif self.network is not None and runtime.needs_image and not spec.isolated_network:
                attached = self.network.attach(task_id)
                spec = task.spec = replace(spec, netns=attached.netns)
                task.address, task.interface = attached.address, POD_INTERFACE
            if task.address and (spec.launcher or any(f.path == "/etc/hosts" for f in spec.files)):
                spec = task.spec = _with_own_host(spec, task.address)
            if spec.launcher:
                spec = task.spec = _with_launcher(spec, task)
            launch = runtime.launch(spec, cpus, task.dir, image)
            if self.cgroups.available:
                devices = [*DEFAULT_DEVICES, *(device_of(n) for n in spec.device_nodes)]
                task.cgroup = self.cgroups.create(
                    task_id,
                    cpus=cpus,
                    memory_bytes=memory_bytes,
                    pids_max=PIDS_MAX,
                    devices=devices,
                )
        except BaseException as exc:
            self._clean_up(task)
            if isinstance(exc, (RuntimeRefused, NetworkError)):
                raise TaskError(str(exc)) from None
            raise
        if not self._register(task):  # the agent began to stop while it was prepared
            self._clean_up(task)
            raise TaskError("this agent is stopping: it starts no more tasks")
        writer = self.logs.writer(task_id)
        try:
            task.proc = self.popen(task, launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            writer.close()
            self._clean_up(task)
            reason = f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}"
            self._finish(task, TaskState.FAILED, message=reason)
            return task
        with self._lock:
            task.pid = task.proc.pid
            stopped_before_start = task.stop_reason is not None
        if stopped_before_start:  # cancelled (or the agent stopped) while it was starting
            self._kill_group(task, signal.SIGKILL)
        task.started_at = time.time()
        self._save(task)
        threading.Thread(target=self._watch, args=(task, writer), daemon=True).start()
        return task

    def host_network_for(self, runtime: Runtime) -> HostNetwork:
        """The node's network, for a task that asks for it: only where the agent was told
        to give it, its firewall is in place, and the runtime confines the task in a user
        namespace (crun), whose ids that firewall knows."""
        host = self.host_network
        if host is None or not host.ready:
            raise TaskError(
                "this node gives no host network (its agent runs without --host-network): "
                "a multi-node job's containers need it on this site"
            )
        if runtime.name != "crun":
            raise TaskError(f"the host network needs the crun runtime, not {runtime.name}")
        return host

    def _is_stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def _register(self, task: Task) -> bool:
        """Record a prepared task, unless the agent is stopping (then False)."""
        with self._lock:
            if self._stopping:
                return False
            self._tasks[task.id] = task
            self._by_lease.setdefault(task.lease_id, []).append(task)
            return True

    @staticmethod
    def popen(task: Task, launch: Launch, **streams: Any) -> subprocess.Popen[bytes]:
        """Start `launch` in the task's cgroup (pinned with taskset when there is none),
        in a process group of its own so that signals reach everything it starts."""
        argv = task.cgroup.join_argv(launch.argv) if task.cgroup else launch.pinned_argv()
        # a pipe, never /dev/null: a runtime may chown the container's stdio to its root
        closed_stdin = "stdin" not in streams
        streams.setdefault("stdin", subprocess.PIPE)
        streams.setdefault("start_new_session", True)

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv, env=launch.env, cwd=launch.cwd, pass_fds=launch.pass_fds, **streams
            )

        try:  # a process starts in the mount namespace of the thread that starts it
            proc = launch.namespace.call(start) if launch.namespace is not None else start()
        finally:
            for fd in launch.pass_fds:
                os.close(fd)
        if closed_stdin and proc.stdin is not None:
            proc.stdin.close()
        return proc

    def _watch(self, task: Task, writer: LogWriter) -> None:
        """One thread per task: copy its output to the log until both pipes close, and learn
        from a pidfd when its main process has ended (or kill it at its timeout)."""
        proc = task.proc
        assert proc is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        deadline = time.monotonic() + task.spec.timeout if task.spec.timeout else None
        pipes = {proc.stdout.fileno(): STDOUT, proc.stderr.fileno(): STDERR}
        pidfd = os.pidfd_open(proc.pid)
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            for fd in pipes:
                selector.register(fd, selectors.EVENT_READ)
            running = True
            while running or pipes:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = selector.select(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    task.stop_reason = TaskState.TIMED_OUT
                    self._kill_group(task, signal.SIGKILL)
                    deadline = None
                for key, _ in events:
                    fd = key.fd
                    if fd == pidfd:
                        running, deadline = False, None
                        selector.unregister(pidfd)
                        # A task ends with its main process: what it left running (a
                        # container's processes that still hold its output pipes, daemons)
                        # ends with it.
                        self._kill_leftovers(task)
                    elif chunk := os.read(fd, 65536):
                        writer.write(pipes[fd], chunk)
                    else:
                        selector.unregister(fd)
                        del pipes[fd]
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        code = proc.wait()
        writer.close()
        sig = -code if code < 0 else 0
        oom = task.cgroup is not None and task.cgroup.oom_killed()
        try:
            self._clean_up(task)
        except Exception as exc:  # the task has ended whatever its clean-up met
            log.error("task %s: clean-up failed: %s", task.id, exc)
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
        if task.cgroup is not None:
            task.cgroup.kill()

    def _clean_up(self, task: Task) -> None:
        """Remove the task's cgroup and release what its runtime and network prepared."""
        try:
            self._kill_leftovers(task)
            if task.cgroup is not None:
                task.cgroup.remove()
        finally:
            self._release(task)

    def _release(self, task: Task) -> None:
        try:
            self.runtimes[task.spec.runtime].release(task.dir)
        finally:
            if self.network is not None:
                self.network.detach(task.id)

    def _finish(
        self, task: Task, state: TaskState, code: int = 0, sig: int = 0, message: str = ""
    ) -> None:
        task.state, task.exit_code, task.signal = state, code, sig
        task.message = message
        task.finished_at = time.time()
        self._save(task)
        if task.on_end is not None:
            try:
                task.on_end(task)
            except Exception as exc:  # the task has ended whatever its hook met
                log.error("task %s: %s", task.id, exc)
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
        with self._lock:
            task.stop_reason = TaskState.CANCELLED
            task.message = reason or "cancelled"
            starting = not task.pid  # still starting: `run` kills it as soon as it has a pid
        if starting:
            task.done.wait(KILL_WAIT)
            return task
        self._kill_group(task, signal.SIGTERM)
        if not task.done.wait(grace):
            self._kill_group(task, signal.SIGKILL)
            if not task.done.wait(KILL_WAIT):
                log.error("task %s did not end %gs after SIGKILL", task.id, KILL_WAIT)
        return task

    def cancel_lease(self, lease_id: str, reason: str, grace: float = DEFAULT_GRACE) -> list[str]:
        """Cancel every running task of a lease; their ids."""
        running = [t for t in self.in_lease(lease_id) if not t.done.is_set()]
        self._cancel_all(running, grace, reason)
        return [t.id for t in running]

    def _cancel_all(self, tasks: list[Task], grace: float, reason: str) -> None:
        """Cancel `tasks` at once (each has its grace), and return when all have ended."""
        threads = [threading.Thread(target=self.cancel, args=(t.id, grace, reason)) for t in tasks]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def shutdown(self, grace: float = 2.0) -> None:
        """Refuse new tasks, cancel the running ones (in parallel), then kill whatever is
        still in a task cgroup of this agent: nothing a task started outlives the agent."""
        with self._lock:
            self._stopping = True
            running = [t for t in self._tasks.values() if not t.done.is_set()]
        self._cancel_all(running, grace, "the agent stopped")
        self.cgroups.kill_all()

    @staticmethod
    def _kill_group(task: Task, sig: int) -> None:
        if task.pid <= 0:  # not started: killpg(0) would signal the agent's own group
            return
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
        # rewritten in place, not through a new file renamed over it: every file made is an
        # inode allocated, which costs more than the rest of the save on a busy file system.
        # A torn write (the agent died in it) reads as a task that died while it started,
        # whose clean-up is the same and does nothing twice.
        data = json.dumps(state).encode()
        fd = os.open(task.dir / "state.json", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def reap_orphans(self, log: Callable[[str], None] = lambda _: None) -> list[str]:
        """Kill and clean up what a previous agent on this data dir left behind: its tasks'
        processes (by pid, then everything in its task cgroups), root filesystems, crun
        state and network namespaces, including tasks that died while starting."""
        killed = []
        states = []
        for task_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                state = json.loads((task_dir / "state.json").read_text())
            except (OSError, ValueError):
                state = {"id": task_dir.name}  # died before it was recorded
            if state.get("finished"):
                continue
            pid = state.get("pid") or 0
            if pid and state.get("start_time") and _start_time(pid) == state["start_time"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                killed.append(state["id"])
                log(f"killed task {state['id']} (pid {pid}) left by a previous agent")
            states.append((task_dir, state))
        self.cgroups.kill_all()  # before the mounts go: nothing may still use them
        for task_dir, state in states:
            named = self.runtimes.get(state.get("runtime", ""))
            for runtime in [named] if named is not None else list(self.runtimes.values()):
                runtime.release(task_dir)
            network.remove(task_dir.name)
            state.update(finished=True, state=TaskState.CANCELLED.value)
            (task_dir / "state.json").write_text(json.dumps(state))
        return killed
