"""The RUNNING phase of one run: start what the scheduler says is ready, apply what ended,
probe services, obey a cancel, until nothing is left to do.

Every task holds a lease on an agent (renewed in the background) and a thread that waits for
its end; services that have a readiness probe get a thread that probes them. Those threads
only post messages to one inbox; the loop applies them one at a time, committing each state
change to the store before it acts on it. Task phases are mirrored in memory, so the
scheduler is asked about the whole workflow without reading it back from the database.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import func, select, update

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect

from .fuzzfile.endpoints import endpoint_env
from .fuzzfile.model import Affinity, Job, Service, Workflow
from .fuzzfile.variables import expand, secret_references
from .probes import check
from .provision import Cluster
from .scheduler import ENDED, Phase, TaskKey, decide, job_phase
from .secrets import SecretStore
from .store import Attempt, Event, Run, RunState, Store, Task, TaskState
from .store import Job as JobRow

__all__ = ["RunLoop", "log_path"]

LEASE_TTL = 30.0
POLL = 0.25  # seconds between looks at the cancel flag when nothing happens

_AFFINITY = {
    Affinity.CORE: pb.AFFINITY_CORE,
    Affinity.SOCKET: pb.AFFINITY_SOCKET,
    Affinity.NUMA: pb.AFFINITY_NUMA,
}
_PHASE = {
    TaskState.PENDING: Phase.PENDING,
    TaskState.STARTING: Phase.STARTING,
    TaskState.RUNNING: Phase.RUNNING,
    TaskState.READY: Phase.READY,
    TaskState.FINISHED: Phase.FINISHED,
    TaskState.FAILED: Phase.FAILED,
    TaskState.CANCELLED: Phase.CANCELLED,
    TaskState.SKIPPED: Phase.SKIPPED,
}
_STATE = {phase: state for state, phase in _PHASE.items()}


def log_path(data_dir: Path, run_id: str, key: TaskKey, attempt: int) -> Path:
    """Where the output of one attempt is kept once it ended."""
    return data_dir / "runs" / run_id / "logs" / key.name / f"{key.index}.{attempt}.log"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Active:
    key: TaskKey
    task_db_id: int
    attempt_id: int
    attempt: int
    node: int  # index into the cluster's agents
    lease_id: str
    agent_task_id: str = ""
    address: str = ""  # on its node's pod network (where a service is reached)
    stopping: bool = False  # a service we stopped, or a task we cancelled


@dataclass(frozen=True, slots=True)
class _Ended:
    active: _Active
    status: Any  # pb.TaskStatus, or the grpc.RpcError that lost it


@dataclass(frozen=True, slots=True)
class _Ready:
    key: TaskKey


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
        self.inbox: queue.Queue[_Ended | _Ready] = queue.Queue()
        self.active: dict[TaskKey, _Active] = {}
        self.phase: dict[TaskKey, Phase] = {}
        self.service_host: dict[str, str] = {}
        self.unplaceable: dict[str, str] = {}  # job -> why the last node refused it
        self.refused: defaultdict[str, set[int]] = defaultdict(set)  # job -> nodes now full
        self.too_small: defaultdict[str, set[int]] = defaultdict(set)  # job -> nodes never
        self.ids: dict[TaskKey, tuple[int, int]] = {}  # task row id, job row id
        self.attempts: dict[TaskKey, int] = {}  # attempts made so far
        self.keys: defaultdict[str, list[TaskKey]] = defaultdict(list)  # tasks of each job
        self.jobs_started: set[str] = set()
        self.jobs_ended: set[str] = set()
        self.stop = threading.Event()
        self.cancel_checked = -POLL  # when the cancel flag was last read (monotonic)

    # ---- the loop -----------------------------------------------------------------------

    def drive(self) -> tuple[RunState, str]:
        renewer = threading.Thread(target=self._renew_leases, daemon=True)
        renewer.start()
        self._load_phases()
        try:
            while True:
                if self._cancel_requested():
                    self._cancel_everything("cancelled by request")
                    return RunState.CANCELLED, "cancelled by request"
                decision = decide(self.wf, self.phase)
                self._skip(decision.skip)
                for name in decision.stop:
                    self._stop_service(name)
                started = self._start_all(decision.start)
                if self._fail_never_fits(decision.start):
                    continue  # decide again: what depends on it is skipped
                if decision.done and not self.active:
                    break
                if not self.active and not started and not decision.skip:
                    self._fail_unplaceable(decision.start)
                    continue
                try:
                    message = self.inbox.get(timeout=POLL)
                except queue.Empty:
                    continue
                if isinstance(message, _Ready):
                    self._ready(message.key)
                else:
                    self._finish(message.active, message.status)
            failed = sorted(
                {k.name for k, p in self.phase.items() if p in (Phase.FAILED, Phase.SKIPPED)}
            )
            if failed:
                return RunState.FAILED, "failed: " + ", ".join(map(self._with_tasks, failed))
            return RunState.FINISHED, ""
        finally:
            self.stop.set()
            for channel in self.channels:
                channel.close()

    def _with_tasks(self, name: str) -> str:
        """A failed job's name, and for an array the indexes that failed: `count[3, 7-9]`."""
        c = self.wf.containers[name]
        failed = [k.index for k in self.keys[name] if self.phase[k] is Phase.FAILED]
        if not failed or not isinstance(c, Job) or c.task_array is None:
            return name
        return f"{name}[{_ranges(failed)}]"

    def _cancel_requested(self) -> bool:
        """Read the run's cancel flag at most every POLL seconds: the loop turns once per
        ended task, and a thousand-task array need not read the run row a thousand times."""
        now = time.monotonic()
        if now - self.cancel_checked < POLL:
            return False
        self.cancel_checked = now
        with self.store.session() as s:
            return bool(s.get_one(Run, self.run_id).cancel_requested)

    def _cancel_everything(self, why: str) -> None:
        """Cancel running tasks, wait for them to end, and mark what never ran."""
        for active in self.active.values():
            active.stopping = True
            with contextlib.suppress(grpc.RpcError):
                self.stubs[active.node].Cancel(pb.CancelRequest(task_id=active.agent_task_id))
        while self.active:
            message = self.inbox.get()
            if isinstance(message, _Ended):
                self._finish(message.active, message.status)
        with self.store.session() as s:
            for task in s.scalars(
                select(Task).join(Task.job).where(JobRow.run_id == self.run_id)
            ).all():
                if not task.state.ended:
                    task.state = TaskState.CANCELLED
                    self.phase[TaskKey(task.job.name, task.index)] = Phase.CANCELLED
            for job in s.scalars(select(JobRow).where(JobRow.run_id == self.run_id)).all():
                if not job.state.ended:
                    job.state, job.reason = TaskState.CANCELLED, why

    # ---- state ----------------------------------------------------------------------------

    def _load_phases(self) -> None:
        """Task states, row ids and attempt counts, read once; kept in step from here on."""
        with self.store.session() as s:
            rows = s.execute(
                select(JobRow.name, Task.index, Task.state, Task.id, JobRow.id, JobRow.state)
                .join(Task.job)
                .where(JobRow.run_id == self.run_id)
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
        for name, index, state, task_id, job_id, job_state in rows:
            key = TaskKey(name, index)
            self.phase[key] = _PHASE[state]
            self.ids[key] = (task_id, job_id)
            self.attempts[key] = counts.get(task_id, 0)
            self.keys[name].append(key)
            if job_state is not TaskState.PENDING:
                self.jobs_started.add(name)
            if job_state.ended:
                self.jobs_ended.add(name)

    def _task_row(self, s: Any, key: TaskKey) -> Task:
        task: Task = s.scalars(
            select(Task)
            .join(Task.job)
            .where(JobRow.run_id == self.run_id, JobRow.name == key.name, Task.index == key.index)
        ).one()
        return task

    def _job_row(self, s: Any, name: str) -> JobRow:
        job: JobRow = s.scalars(
            select(JobRow).where(JobRow.run_id == self.run_id, JobRow.name == name)
        ).one()
        return job

    def _skip(self, skipped: dict[str, str]) -> None:
        if not skipped:
            return
        with self.store.session() as s:
            for name, why in skipped.items():
                job = self._job_row(s, name)
                job.state, job.reason = TaskState.SKIPPED, why
                for task in job.tasks:
                    task.state = TaskState.SKIPPED
                    self.phase[TaskKey(name, task.index)] = Phase.SKIPPED
                s.add(Event(run_id=self.run_id, kind="job", subject=name, message=why))

    def _fail_unplaceable(self, keys: list[TaskKey]) -> None:
        """Nothing runs and nothing could start: what is ready cannot fit on any node."""
        if not keys:
            raise RuntimeError("the scheduler is stuck: nothing runs and nothing is ready")
        with self.store.session() as s:
            for name in sorted({k.name for k in keys}):
                why = self.unplaceable.get(name, "no node can hold it")
                job = self._job_row(s, name)
                job.state, job.reason = TaskState.FAILED, f"cannot be placed: {why}"
                for task in job.tasks:
                    if not task.state.ended:
                        task.state = TaskState.FAILED
                        self.phase[TaskKey(name, task.index)] = Phase.FAILED
                s.add(Event(run_id=self.run_id, kind="job", subject=name, message=job.reason))

    def _fail_never_fits(self, keys: list[TaskKey]) -> bool:
        """Fail at once, with the reason, the jobs that every node refused as too large for
        it (not for lack of room now, which waits); whether there were any."""
        names = sorted(
            {k.name for k in keys if len(self.too_small[k.name]) == len(self.stubs)}
            - self.jobs_ended
        )
        if names:
            self._fail_unplaceable([k for k in keys if k.name in names])
        return bool(names)

    # ---- starting -------------------------------------------------------------------------

    def _start_all(self, keys: list[TaskKey]) -> int:
        """Start what fits. A node that refused a job's lease is not asked again for that
        job until a task ends there: a 1,000-task array costs a refusal or two per task
        that ends, not one per pending task and node."""
        started = 0
        for key in keys:
            if len(self.refused[key.name]) < len(self.stubs) and self._start(key):
                started += 1
        return started

    def _start(self, key: TaskKey) -> bool:
        container = self.wf.containers[key.name]
        r = container.resource
        lease_request = pb.AcquireLeaseRequest(
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
        for node, stub in enumerate(self.stubs):
            if node in self.refused[key.name]:
                continue
            try:
                lease = stub.AcquireLease(lease_request)
            except grpc.RpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    self.unplaceable[key.name] = exc.details() or exc.code().name
                    self.refused[key.name].add(node)
                    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.too_small[key.name].add(node)  # never fits there: not asked again
                    continue  # full, or too small: try the next node, or later
                raise
            self._launch(key, container, node, lease.id)
            return True
        return False

    def _launch(self, key: TaskKey, container: Job | Service, node: int, lease_id: str) -> None:
        number = self.attempts[key] + 1
        now = _now()
        with self.store.session() as s:  # recorded before the task is started
            task_id, job_id = self.ids[key]
            s.execute(update(Task).where(Task.id == task_id).values(state=TaskState.STARTING))
            attempt = Attempt(
                task_id=task_id,
                number=number,
                node=f"node-{node}",
                lease_id=lease_id,
                started_at=now,
            )
            s.add(attempt)
            if key.name not in self.jobs_started:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(started_at=now, state=TaskState.RUNNING)
                )
            s.flush()
            active = _Active(key, task_id, attempt.id, number, node, lease_id)
        self.attempts[key] = number
        self.jobs_started.add(key.name)
        self.phase[key] = Phase.STARTING
        try:
            reply = self.stubs[node].Run(self._run_request(container, key, lease_id))
        except grpc.RpcError as exc:
            self.inbox.put(_Ended(active, exc))
            self.active[key] = active
            return
        active.agent_task_id = reply.task_id
        active.address = reply.address or self.hosts[node]
        probe = isinstance(container, Service) and container.readiness_probe is not None
        state = TaskState.RUNNING if probe or isinstance(container, Job) else TaskState.READY
        with self.store.session() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == active.attempt_id)
                .values(agent_task_id=reply.task_id)
            )
            s.execute(update(Task).where(Task.id == active.task_db_id).values(state=state))
            if state is TaskState.READY:
                self._job_row(s, key.name).state = TaskState.READY
        self.phase[key] = _PHASE[state]
        self.active[key] = active
        if isinstance(container, Service):
            self.service_host[key.name] = active.address
            if probe:
                threading.Thread(target=self._probe, args=(container, active), daemon=True).start()
        threading.Thread(target=self._await, args=(active,), daemon=True).start()

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
        if key not in self.active:
            return  # it ended meanwhile
        with self.store.session() as s:
            self._task_row(s, key).state = TaskState.READY
            self._job_row(s, key.name).state = TaskState.READY
            s.add(Event(run_id=self.run_id, kind="job", subject=key.name, message="ready"))
        self.phase[key] = Phase.READY

    def _stop_service(self, name: str) -> None:
        active = self.active.get(TaskKey(name, 0))
        if active is None or active.stopping:
            return
        active.stopping = True
        self.report("service", name, "stopping: nothing needs it any more")
        with contextlib.suppress(grpc.RpcError):
            self.stubs[active.node].Cancel(pb.CancelRequest(task_id=active.agent_task_id))

    # ---- ending ---------------------------------------------------------------------------

    def _await(self, active: _Active) -> None:
        try:
            status: Any = self.stubs[active.node].Wait(pb.WaitRequest(task_id=active.agent_task_id))
        except grpc.RpcError as exc:
            status = exc
        self._keep_log(active)
        self.inbox.put(_Ended(active, status))

    def _keep_log(self, active: _Active) -> None:
        """Copy the attempt's output off the agent before its lease (and node) goes."""
        path = log_path(self.data_dir, self.run_id, active.key, active.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(grpc.RpcError), open(path, "wb") as out:
            for chunk in self.stubs[active.node].Logs(pb.LogsRequest(task_id=active.agent_task_id)):
                out.write(chunk.data)

    def _finish(self, active: _Active, status: Any) -> None:
        del self.active[active.key]
        for name, nodes in self.refused.items():
            if active.node not in self.too_small[name]:
                nodes.discard(active.node)  # it has room again
        with contextlib.suppress(grpc.RpcError):  # expired, or gone with the agent
            self.stubs[active.node].ReleaseLease(pb.ReleaseLeaseRequest(lease_id=active.lease_id))
        ok, code, message = _outcome(status)
        container = self.wf.containers[active.key.name]
        if active.stopping and isinstance(container, Service):
            ok, message = True, "stopped"
        if ok:
            attempt_state = TaskState.FINISHED
        else:
            attempt_state = TaskState.CANCELLED if active.stopping else TaskState.FAILED
        retries = container.policy.retries if isinstance(container, Job) else 0
        if ok:
            task_state = TaskState.FINISHED
        elif active.stopping:
            task_state = TaskState.CANCELLED
        elif (retries or 0) + 1 - active.attempt > 0:
            task_state = TaskState.PENDING  # another attempt
        else:
            task_state = TaskState.FAILED
        now = _now()
        self.phase[active.key] = _PHASE[task_state]
        name = active.key.name
        phase = job_phase(self.keys[name], self.phase)
        with self.store.session() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == active.attempt_id)
                .values(state=attempt_state, exit_code=code, message=message, finished_at=now)
            )
            s.execute(update(Task).where(Task.id == active.task_db_id).values(state=task_state))
            job_id = self.ids[active.key][1]
            if phase in ENDED and name not in self.jobs_ended:  # its last task: the whole array
                reason = self._failed_tasks(s, name, job_id) if phase is Phase.FAILED else ""
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(state=_STATE[phase], reason=reason, finished_at=now)
                )
                self.jobs_ended.add(name)
            s.add(
                Event(
                    run_id=self.run_id,
                    kind="task",
                    subject=f"{name}[{active.key.index}]",
                    message=f"attempt {active.attempt}: {message}",
                )
            )

    def _failed_tasks(self, s: Any, name: str, job_id: int) -> str:
        """Why a job failed: how its task ended, or for an array which tasks failed and how
        (read from the store, so that a run taken over by another process says the same)."""
        rows = s.execute(
            select(Task.index, Attempt.message)
            .join(Attempt.task)
            .where(Task.job_id == job_id, Task.state == TaskState.FAILED)
            .order_by(Task.index, Attempt.number)
        ).all()
        last: dict[int, str] = dict(rows)  # each task's last attempt (ordered by number)
        container = self.wf.containers[name]
        if not isinstance(container, Job) or container.task_array is None:
            return next(iter(last.values()), "failed")
        return failed_tasks(last)

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
