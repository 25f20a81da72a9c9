"""The RUNNING phase of one run: start what the scheduler says is ready where it fits, apply
what ended, probe services, obey a cancel, until nothing is left to do.

One thread turns the loop; nothing else changes a state. The agents' answers arrive as gRPC
futures whose callbacks only post a message to the inbox (no thread waits for a task); a few
pooled threads copy the output of each ended attempt off its node, and a service with a
readiness probe has a thread that probes it. Each turn drains the inbox, applies every
message, decides, acquires leases where the capacity count says a task fits, and writes all
of it in one commit before it asks an agent to start anything: the store always knows an
attempt before its container exists.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import func, select

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect

from .capacity import Capacity, NodeTotal, Shape
from .fuzzfile.endpoints import endpoint_env
from .fuzzfile.model import Affinity, Job, Service, Workflow
from .fuzzfile.variables import expand, secret_references
from .probes import check
from .provision import Cluster
from .scheduler import Scheduler, TaskKey
from .secrets import SecretStore
from .states import Moves
from .store import Attempt, Run, RunState, Store, Task, TaskState
from .store import Job as JobRow

__all__ = ["RunLoop", "log_path"]

LEASE_TTL = 30.0
POLL = 0.25  # seconds between looks at the cancel flag when nothing happens
LOG_COPIERS = 4  # threads that copy ended attempts' output off their nodes

_S = TaskState
_AFFINITY = {
    Affinity.CORE: pb.AFFINITY_CORE,
    Affinity.SOCKET: pb.AFFINITY_SOCKET,
    Affinity.NUMA: pb.AFFINITY_NUMA,
}


def log_path(data_dir: Path, run_id: str, key: TaskKey, attempt: int) -> Path:
    """Where the output of one attempt is kept once it ended."""
    return data_dir / "runs" / run_id / "logs" / key.name / f"{key.index}.{attempt}.log"


def _now() -> datetime:
    return datetime.now(UTC)


def _subject(key: TaskKey) -> str:
    return f"{key.name}[{key.index}]"


@dataclass(slots=True)
class _Active:
    key: TaskKey
    attempt: int
    node: int  # index into the cluster's agents
    lease_id: str
    shape: Shape
    agent_task_id: str = ""
    address: str = ""  # on its node's pod network (where a service is reached)
    stopping: bool = False  # a service we stopped, or a task we cancelled


@dataclass(frozen=True, slots=True)
class _Launched:
    active: _Active
    reply: Any  # pb.RunResponse, or the grpc.RpcError that refused it


@dataclass(frozen=True, slots=True)
class _Ended:
    active: _Active
    status: Any  # pb.TaskStatus, or the grpc.RpcError that lost it


@dataclass(frozen=True, slots=True)
class _Ready:
    key: TaskKey


_Message = _Launched | _Ended | _Ready


class RunLoop:
    """Drives one run's DAG on `cluster`; `mounts` maps volume names to host paths."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        wf: Workflow,
        cluster: Cluster,
        *,
        mounts: Mapping[str, Path],
        secrets: SecretStore,
        data_dir: Path,
        report: Callable[[str, str, str], None],
    ) -> None:
        self.store, self.run_id, self.wf = store, run_id, wf
        self.mounts, self.secrets, self.data_dir, self.report = mounts, secrets, data_dir, report
        self.hosts = [a.address.rsplit(":", 1)[0] for a in cluster.agents]
        self.channels, self.stubs = [], []
        for agent in cluster.agents:
            channel, stub = connect(agent.address, agent.token)
            self.channels.append(channel)
            self.stubs.append(stub)
        self.inbox: queue.Queue[_Message] = queue.Queue()
        self.calls: set[grpc.Future] = set()  # futures in flight (a dropped one is cancelled)
        self.copiers = ThreadPoolExecutor(LOG_COPIERS, thread_name_prefix="log-copy")
        self.moves = Moves(run_id)
        self.active: dict[TaskKey, _Active] = {}
        self.service_host: dict[str, str] = {}
        self.shapes = {name: Shape.of(c.resource) for name, c in wf.containers.items()}
        self.unplaceable: dict[str, str] = {}  # job -> why no node can hold it
        self.ids: dict[TaskKey, tuple[int, int]] = {}  # task row id, job row id
        self.attempts: dict[TaskKey, int] = {}  # attempts made so far
        self.last: dict[TaskKey, str] = {}  # how each task's last attempt ended
        self.job_rows: dict[str, TaskState] = {}  # each job's row, as written
        self.keys: defaultdict[str, list[TaskKey]] = defaultdict(list)  # tasks of each job
        self.stop = threading.Event()
        self.cancel_checked = -POLL  # when the cancel flag was last read (monotonic)
        self.sched = Scheduler(wf, self._load())
        self.capacity = Capacity(
            [NodeTotal.of(stub.Inventory(pb.InventoryRequest())) for stub in self.stubs]
        )

    # ---- the loop -----------------------------------------------------------------------

    def drive(self) -> tuple[RunState, str]:
        renewer = threading.Thread(target=self._renew_leases, daemon=True)
        renewer.start()
        try:
            while True:
                if self._cancel_requested():
                    self._cancel_everything("cancelled by request")
                    return RunState.CANCELLED, "cancelled by request"
                started = self._turn()
                if not self.active and self.sched.done():
                    break
                if not self.active and not started:
                    self._fail_unplaceable()
                    continue
                for message in self._messages():
                    self._apply(message)
            failed = sorted(
                name
                for name in self.wf.containers
                if self.sched.job(name) in (_S.FAILED, _S.SKIPPED)
            )
            if failed:
                return RunState.FAILED, "failed: " + ", ".join(map(self._with_tasks, failed))
            return RunState.FINISHED, ""
        finally:
            self.stop.set()
            self.copiers.shutdown(wait=True)
            for channel in self.channels:
                channel.close()

    def _turn(self) -> int:
        """Skip, stop and start what the scheduler says, write every move of this turn in one
        commit, then ask the agents to run what was started; how many tasks started."""
        decision = self.sched.decide()
        while decision.skip:
            self._skip(decision.skip)
            decision.skip = self.sched.decide().skip
        for name in decision.stop:
            self._stop_service(name)
        launches = self._place(self.sched.decide().ready)
        self._write()
        for active in launches:
            self._launch(active)
        return len(launches)

    def _messages(self) -> list[_Message]:
        """Every message waiting; at least one, unless POLL passed with none."""
        try:
            messages = [self.inbox.get(timeout=POLL)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                messages.append(self.inbox.get_nowait())
        return messages

    def _apply(self, message: _Message) -> None:
        if isinstance(message, _Launched):
            self._launched(message.active, message.reply)
        elif isinstance(message, _Ended):
            self._finish(message.active, message.status)
        else:
            self._ready(message.key)

    def _write(self) -> None:
        if self.moves:
            with self.store.session() as s:
                self.moves.write(s)

    def _with_tasks(self, name: str) -> str:
        """A failed job's name, and for an array the indexes that failed: `count[3, 7-9]`."""
        c = self.wf.containers[name]
        failed = [k.index for k in self.keys[name] if self.sched.state(k) is _S.FAILED]
        if not failed or not isinstance(c, Job) or c.task_array is None:
            return name
        return f"{name}[{_ranges(failed)}]"

    def _cancel_requested(self) -> bool:
        """Read the run's cancel flag at most every POLL seconds: the loop turns once per
        batch of ended tasks, and need not read the run row each time."""
        now = time.monotonic()
        if now - self.cancel_checked < POLL:
            return False
        self.cancel_checked = now
        with self.store.session() as s:
            return bool(s.get_one(Run, self.run_id).cancel_requested)

    def _cancel_everything(self, why: str) -> None:
        """Cancel running tasks, wait for them to end, and mark what never ran."""
        for active in self.active.values():
            self._cancel(active)
        while self.active:
            for message in self._messages():
                self._apply(message)
        for name, keys in self.keys.items():
            for key in keys:
                if not self.sched.state(key).ended:
                    self._move(key, _S.CANCELLED, why)
            if not self.job_rows[name].ended:
                self._move_job(name, _S.CANCELLED, why)
        self._write()

    def _cancel(self, active: _Active) -> None:
        """Stop a task: at once if it runs, as soon as the agent says it started if not."""
        active.stopping = True
        if active.agent_task_id:
            with contextlib.suppress(grpc.RpcError):
                self.stubs[active.node].Cancel(pb.CancelRequest(task_id=active.agent_task_id))

    # ---- state ----------------------------------------------------------------------------

    def _load(self) -> dict[TaskKey, TaskState]:
        """Task states, row ids and attempt counts, read once; kept in step from here on."""
        with self.store.session() as s:
            rows = s.execute(
                select(JobRow.name, Task.index, Task.state, Task.id, JobRow.id, JobRow.state)
                .join(Task.job)
                .where(JobRow.run_id == self.run_id)
                .order_by(JobRow.id, Task.index)
            ).all()
            counts = dict(
                s.execute(
                    select(Attempt.task_id, func.count())
                    .join(Attempt.task)
                    .join(Task.job)
                    .where(JobRow.run_id == self.run_id)
                    .group_by(Attempt.task_id)
                ).all()
            )
        states = {}
        for name, index, state, task_id, job_id, job_state in rows:
            key = TaskKey(name, index)
            states[key] = state
            self.ids[key] = (task_id, job_id)
            self.attempts[key] = counts.get(task_id, 0)
            self.keys[name].append(key)
            self.job_rows[name] = job_state
        return states

    def _move(self, key: TaskKey, to: TaskState, message: str = "") -> None:
        """Move a task (checked, with its event, written at the end of the turn), and its
        job's row when the job's state follows."""
        self.moves.task(self.ids[key][0], _subject(key), self.sched.state(key), to, message)
        self.sched.moved(key, to)
        job = self.sched.job(key.name)
        if job is not self.job_rows[key.name] and job is not _S.PENDING:
            # (a job whose tasks all wait for another attempt stays as it was)
            self._move_job(key.name, job, self._failed_tasks(key.name) if job is _S.FAILED else "")

    def _move_job(self, name: str, to: TaskState, reason: str = "") -> None:
        times = {}
        if self.job_rows[name] is _S.PENDING and to in (_S.RUNNING, _S.READY):
            times["started_at"] = _now()
        if to.ended:
            times["finished_at"] = _now()
        job_id = self.ids[self.keys[name][0]][1]
        self.moves.job(job_id, name, self.job_rows[name], to, reason, **times)
        self.job_rows[name] = to

    def _skip(self, skipped: dict[str, str]) -> None:
        for name, why in skipped.items():
            self._move_job(name, _S.SKIPPED, why)
            for key in self.keys[name]:
                if self.sched.state(key) is _S.PENDING:
                    self.moves.task(self.ids[key][0], _subject(key), _S.PENDING, _S.SKIPPED, why)
                    self.sched.moved(key, _S.SKIPPED)

    def _fail_unplaceable(self) -> None:
        """Nothing runs and nothing could start: what is ready cannot fit on any node."""
        ready = self.sched.decide().ready
        if not ready:
            raise RuntimeError("the scheduler is stuck: nothing runs and nothing is ready")
        self._fail_jobs(ready)

    def _fail_jobs(self, names: list[str]) -> None:
        for name in names:
            why = f"cannot be placed: {self.unplaceable.get(name, 'no node can hold it')}"
            self._move_job(name, _S.FAILED, why)
            for key in self.keys[name]:
                if self.sched.state(key) is _S.PENDING:
                    self.moves.task(self.ids[key][0], _subject(key), _S.PENDING, _S.FAILED, why)
                    self.sched.moved(key, _S.FAILED)
        self._write()

    # ---- starting -------------------------------------------------------------------------

    def _place(self, ready: list[str]) -> list[_Active]:
        """Lease a node for each task that may start and fits somewhere now; a shape that
        fits nowhere is not tried again this turn, and a job that no node could ever hold
        fails at once."""
        launches: list[_Active] = []
        full: set[Shape] = set()
        never: list[str] = []
        for name in ready:
            shape = self.shapes[name]
            if shape in full:
                continue
            if self.capacity.never_fits(shape):
                never.append(name)
                continue
            for key in self.sched.startable(name):
                active = self._lease(key, shape)
                if active is None:
                    if name in self.unplaceable:
                        never.append(name)
                    else:
                        full.add(shape)
                    break
                launches.append(active)
        if never:
            for name in never:
                self.unplaceable.setdefault(name, self._never_fits(self.shapes[name]))
            self._fail_jobs(never)
        return launches

    def _lease(self, key: TaskKey, shape: Shape) -> _Active | None:
        """A lease for `key` on a node where the count says it fits, recorded as its next
        attempt; None when no node has room (or none ever will: `unplaceable` says why)."""
        request = self._lease_request(self.wf.containers[key.name])
        while (node := self.capacity.take(shape)) is not None:
            try:
                lease = self.stubs[node].AcquireLease(request)
            except grpc.RpcError as exc:
                self.capacity.refused(node, shape)
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    continue  # the agent counts otherwise: try the next node
                if exc.code() in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    self.unplaceable[key.name] = exc.details() or exc.code().name
                    return None
                raise
            number = self.attempts[key] + 1
            self.attempts[key] = number
            self._move(key, _S.STARTING, f"attempt {number} on node-{node}")
            self.moves.attempt_started(self.ids[key][0], number, f"node-{node}", lease.id)
            active = _Active(key, number, node, lease.id, shape)
            self.active[key] = active
            return active
        return None

    def _never_fits(self, shape: Shape) -> str:
        """Why no node can hold `shape`, in the agent's words (it is asked once)."""
        request = pb.AcquireLeaseRequest(
            holder=f"run/{self.run_id}",
            cores=shape.cores,
            memory_bytes=shape.memory,
            devices=dict(shape.devices),
            exclusive=shape.exclusive,
            ttl_seconds=1,
        )
        try:
            lease = self.stubs[0].AcquireLease(request)
        except grpc.RpcError as exc:
            return str(exc.details() or exc.code().name)
        with contextlib.suppress(grpc.RpcError):
            self.stubs[0].ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.id))
        return "no node can hold it"

    def _lease_request(self, c: Job | Service) -> pb.AcquireLeaseRequest:
        r = c.resource
        return pb.AcquireLeaseRequest(
            holder=f"run/{self.run_id}",
            cores=r.cores,
            affinity=_AFFINITY[r.affinity],
            threads=r.threads,
            memory_bytes=r.memory or 0,
            memory_by_core=r.memory_by_core,
            devices={k: v for k, v in r.devices.items() if v},
            exclusive=r.exclusive,
            ttl_seconds=LEASE_TTL,
        )

    def _call(self, future: grpc.Future, then: Callable[[Any], None]) -> None:
        """Keep `future` until it is done, then hand its result (or error) to `then`, in
        gRPC's thread: `then` only posts a message or hands work to a pool."""
        self.calls.add(future)

        def done(f: grpc.Future) -> None:
            self.calls.discard(f)
            try:
                result: Any = f.result()
            except grpc.RpcError as exc:
                result = exc
            except grpc.FutureCancelledError:
                return
            then(result)

        future.add_done_callback(done)

    def _launch(self, active: _Active) -> None:
        container = self.wf.containers[active.key.name]
        request = self._run_request(container, active.key, active.lease_id)
        self._call(
            self.stubs[active.node].Run.future(request),
            lambda reply: self.inbox.put(_Launched(active, reply)),
        )

    def _launched(self, active: _Active, reply: Any) -> None:
        """The agent answered a Run: the task runs (or could not start)."""
        if isinstance(reply, grpc.RpcError):
            self._finish(active, reply)
            return
        key = active.key
        container = self.wf.containers[key.name]
        active.agent_task_id = reply.task_id
        active.address = reply.address or self.hosts[active.node]
        probe = isinstance(container, Service) and container.readiness_probe is not None
        state = _S.RUNNING if probe or isinstance(container, Job) else _S.READY
        self.moves.attempt(self.ids[key][0], active.attempt, agent_task_id=reply.task_id)
        self._move(key, state, "ready" if state is _S.READY else "running")
        if isinstance(container, Service):
            self.service_host[key.name] = active.address
            if probe:
                threading.Thread(target=self._probe, args=(container, active), daemon=True).start()
        self._call(
            self.stubs[active.node].Wait.future(pb.WaitRequest(task_id=reply.task_id)),
            lambda status: self._copy_log(active, status),
        )
        if active.stopping:
            self._cancel(active)

    def _run_request(self, c: Job | Service, key: TaskKey, lease_id: str) -> pb.RunRequest:
        env = {k: self._env_value(v) for k, v in c.env.items()}
        env["FB_WORKFLOW_ID"] = self.run_id
        if isinstance(c, Job) and c.task_array is not None:
            env["FB_TASK_ID"] = str(key.index)
        env.update(endpoint_env(self.wf, c))
        files = {}
        if self.service_host or isinstance(c, Service):
            files["/etc/hosts"] = self._hosts(c)
        for path, content in c.files.items():
            if content.startswith("file://"):
                content = self.wf.files[content.removeprefix("file://")]
            files[path] = content.encode()
        isolated = isinstance(c, Job) and c.isolated_network
        timeout = c.policy.timeout  # a service's too: it fails when its time is up
        # $VAR in command and args, from this env less its secrets (fuzzfile/variables.py)
        plain = {k: v for k, v in env.items() if not secret_references(c.env.get(k, ""))}
        return pb.RunRequest(
            lease_id=lease_id,
            name=c.name,
            image=c.image.uri,
            command=[expand(item, plain) for item in c.command or ()],
            script=c.script or "",
            args=[expand(item, plain) for item in c.args],
            env=env,
            cwd=c.cwd or "",
            mounts=[
                pb.Mount(source=str(self.mounts[m.volume]), destination=m.path) for m in c.mounts
            ],
            files=[pb.File(path=p, content=data) for p, data in files.items()],
            network=pb.NETWORK_ISOLATED if isolated else pb.NETWORK_POD,
            timeout_seconds=timeout or 0,
        )

    def _hosts(self, c: Job | Service) -> bytes:
        """/etc/hosts: the run's services by name (NAME.svc), a service itself included (at
        loopback: its own address is known only once it runs)."""
        hosts = [
            "127.0.0.1 localhost" + (f" {c.name}.svc {c.name}" if isinstance(c, Service) else "")
        ]
        hosts += [
            f"{h} {name}.svc {name}"
            for name, h in sorted(self.service_host.items())
            if name != c.name
        ]
        return ("\n".join(hosts) + "\n").encode()

    def _env_value(self, value: str) -> str:
        return self.secrets.fill(value)

    # ---- services -------------------------------------------------------------------------

    def _probe(self, service: Service, active: _Active) -> None:
        probe = service.readiness_probe
        assert probe is not None
        ports = {p.name: p.port for p in service.ports}
        stub, host = self.stubs[active.node], active.address

        def run_exec(command: list[str], timeout: float) -> int:
            return _exec_exit_code(stub, active.agent_task_id, command, timeout)

        if self.stop.wait(probe.initial_delay):
            return
        passes = failures = 0
        while active.key in self.active and not active.stopping:
            ok, why = check(probe, host, ports, run_exec)
            passes, failures = (passes + 1, 0) if ok else (0, failures + 1)
            if passes >= probe.success_threshold:
                self.inbox.put(_Ready(active.key))
                return
            if not ok:
                self.report("service", active.key.name, f"not ready ({failures}x): {why}")
            if self.stop.wait(probe.period):
                return

    def _ready(self, key: TaskKey) -> None:
        if key not in self.active or self.sched.state(key) is not _S.RUNNING:
            return  # it ended meanwhile
        self._move(key, _S.READY, "ready")

    def _stop_service(self, name: str) -> None:
        active = self.active.get(TaskKey(name, 0))
        if active is None or active.stopping:
            return
        self.report("service", name, "stopping: nothing needs it any more")
        self._cancel(active)

    # ---- ending ---------------------------------------------------------------------------

    def _copy_log(self, active: _Active, status: Any) -> None:
        self.copiers.submit(self._keep_log_then_post, active, status)

    def _keep_log_then_post(self, active: _Active, status: Any) -> None:
        """Copy the attempt's output off the agent before its end is recorded (and before
        its node goes), then post the end; runs in a pooled thread."""
        path = log_path(self.data_dir, self.run_id, active.key, active.attempt)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(grpc.RpcError), open(path, "wb") as out:
                logs = self.stubs[active.node].Logs(pb.LogsRequest(task_id=active.agent_task_id))
                for chunk in logs:
                    out.write(chunk.data)
        finally:
            self.inbox.put(_Ended(active, status))

    def _finish(self, active: _Active, status: Any) -> None:
        del self.active[active.key]
        with contextlib.suppress(grpc.RpcError):  # expired, or gone with the agent
            self.stubs[active.node].ReleaseLease(pb.ReleaseLeaseRequest(lease_id=active.lease_id))
        self.capacity.give_back(active.node, active.shape)
        ok, code, message = _outcome(status)
        container = self.wf.containers[active.key.name]
        if active.stopping and isinstance(container, Service):
            ok, message = True, "stopped"
        retries = (container.policy.retries or 0) if isinstance(container, Job) else 0
        if ok:
            to = _S.FINISHED
        elif active.stopping:
            to = _S.CANCELLED
        elif retries + 1 - active.attempt > 0:
            to = _S.PENDING  # another attempt
        else:
            to = _S.FAILED
        self.moves.attempt(
            self.ids[active.key][0],
            active.attempt,
            state=_S.FAILED if to is _S.PENDING else to,
            exit_code=code,
            message=message,
        )
        self.last[active.key] = message
        again = "; another attempt follows" if to is _S.PENDING else ""
        self._move(active.key, to, f"attempt {active.attempt}: {message}{again}")

    def _failed_tasks(self, name: str) -> str:
        """Why a job failed: how its task ended, or for an array which tasks failed and how."""
        last = {k.index: self.last.get(k, "failed") for k in self.keys[name]}
        failed = {i: m for i, m in last.items() if self.sched.state(TaskKey(name, i)) is _S.FAILED}
        container = self.wf.containers[name]
        if not isinstance(container, Job) or container.task_array is None:
            return next(iter(failed.values()), "failed")
        return failed_tasks(failed)

    def _renew_leases(self) -> None:
        while not self.stop.wait(LEASE_TTL / 3):
            for active in list(self.active.values()):
                try:
                    self.stubs[active.node].RenewLease(
                        pb.RenewLeaseRequest(lease_id=active.lease_id)
                    )
                except grpc.RpcError:
                    continue  # ended meanwhile; its result is on the way


def failed_tasks(messages: Mapping[int, str]) -> str:
    """`tasks 3, 7-9 failed (exit 1); task 12 failed (timed out)`: failed indexes by how
    they failed, consecutive ones as ranges, at most _SHOWN ranges per way."""
    by_how: defaultdict[str, list[int]] = defaultdict(list)
    for index, message in sorted(messages.items()):
        exited = message.startswith("exited (exit ")  # `exit 1`, not `exited (exit 1)`
        how = message.removeprefix("exited (").removesuffix(")") if exited else message
        by_how[how or "failed"].append(index)
    parts = []
    for how, indexes in by_how.items():
        noun = "task" if len(indexes) == 1 else "tasks"
        parts.append(f"{noun} {_ranges(indexes)} failed ({how})")
    return "; ".join(parts)


_SHOWN = 10


def _ranges(indexes: list[int]) -> str:
    """Sorted indexes as `1-3, 7`, the first _SHOWN ranges and how many more indexes."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = [f"{a}-{b}" if b > a else str(a) for a, b in runs[:_SHOWN]]
    rest = sum(b - a + 1 for a, b in runs[_SHOWN:])
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _outcome(status: Any) -> tuple[bool, int | None, str]:
    """(succeeded, exit code, what happened) of an agent's TaskStatus or a lost call."""
    if isinstance(status, grpc.RpcError):
        return False, None, f"lost the task: {status.details()}"
    ok = status.state == pb.TASK_STATE_EXITED and status.exit_code == 0
    state = pb.TaskState.Name(status.state).removeprefix("TASK_STATE_").lower()
    exited = f" (exit {status.exit_code})" if status.state == pb.TASK_STATE_EXITED else ""
    return ok, status.exit_code, status.message or state + exited


def _exec_exit_code(stub: Any, task_id: str, command: list[str], timeout: float) -> int:
    """Run `command` in a task through the agent's Exec stream; its exit status."""

    def requests() -> Any:
        yield pb.ExecInput(start=pb.ExecStart(task_id=task_id, command=command))
        yield pb.ExecInput(close_stdin=True)

    deadline = time.monotonic() + timeout
    code = -1
    for out in stub.Exec(requests(), timeout=max(0.1, deadline - time.monotonic())):
        if out.WhichOneof("output") == "exit_code":
            code = out.exit_code
    return code
