"""The engine: one run of a workflow, from records to a cluster, through its DAG, and back.

This first slice runs the jobs of a workflow (task arrays, dependencies, retries, time
limits) on a provisioned cluster; services, volumes, ingress and egress come next and are
refused with a clear error until then. Every state change is committed to the store before
the engine acts on it, and the cluster is taken down in a `finally`.

Each started task holds a lease on an agent (renewed in the background) and a thread that
waits for its end; the main loop applies results one at a time and asks the scheduler what
to start next.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from sqlalchemy import select

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect

from .errors import InvalidInput
from .fuzzfile import Job as JobSpec
from .fuzzfile import Workflow, load_text
from .fuzzfile.model import Affinity
from .provision import Cluster, NodeSlice, Provisioner
from .scheduler import Phase, TaskKey, decide, tasks_of
from .store import Agent, Attempt, Event, Job, Run, RunState, Store, Task, TaskState

__all__ = ["Engine", "RunOutcome"]

LEASE_TTL = 30.0
_AFFINITY = {
    Affinity.CORE: pb.AFFINITY_CORE,
    Affinity.SOCKET: pb.AFFINITY_SOCKET,
    Affinity.NUMA: pb.AFFINITY_NUMA,
}
_PHASE = {
    TaskState.PENDING: Phase.PENDING,
    TaskState.STARTING: Phase.STARTING,
    TaskState.RUNNING: Phase.RUNNING,
    TaskState.FINISHED: Phase.FINISHED,
    TaskState.FAILED: Phase.FAILED,
    TaskState.CANCELLED: Phase.CANCELLED,
    TaskState.SKIPPED: Phase.SKIPPED,
}


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: str
    state: RunState
    reason: str


@dataclass(slots=True)
class _Active:
    key: TaskKey
    task_db_id: int
    attempt_id: int
    node: int  # index into the cluster's agents
    lease_id: str
    agent_task_id: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Runs workflows on clusters from `provisioner`, recording everything in `store`."""

    def __init__(
        self, store: Store, provisioner: Provisioner, nodes: Callable[[Workflow], list[NodeSlice]]
    ) -> None:
        self.store = store
        self.provisioner = provisioner
        self.nodes = nodes  # how large a cluster a workflow gets

    # ---- the run ----------------------------------------------------------------------

    def run(self, name: str, text: str, owner: str = os.environ.get("USER", "user")) -> RunOutcome:
        workflow = load_text(text, name).unwrap()
        _supported(workflow)
        run_id = str(uuid.uuid4())
        with self.store.session() as s:
            run = Run(
                id=run_id,
                name=name,
                owner=owner,
                fuzzfile=text,
                site=self.provisioner.site,
                orchestrator=f"pid:{os.getpid()}",
            )
            for job_name, job in workflow.jobs.items():
                run.jobs.append(
                    Job(name=job_name, tasks=[Task(index=k.index) for k in tasks_of(job)])
                )
            run.events.append(Event(kind="run", message="submitted"))
            s.add(run)
        cluster: Cluster | None = None
        state, reason = RunState.FAILED, "the orchestrator stopped"
        try:
            self._set_run(run_id, RunState.PROVISIONING)
            cluster = self.provisioner.up(run_id, self.nodes(workflow))
            with self.store.session() as s:
                s.add_all(
                    Agent(run_id=run_id, name=a.name, address=a.address, token=a.token, pid=a.pid)
                    for a in cluster.agents
                )
            state, reason = _RunLoop(self, run_id, workflow, cluster).drive()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if cluster is not None:
                self._set_run(run_id, RunState.TEARDOWN)
                self.provisioner.down(cluster)
            self._set_run(run_id, state, reason)
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            return RunOutcome(run_id, run.state, run.reason)

    def _set_run(self, run_id: str, state: RunState, reason: str = "") -> None:
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            run.state, run.reason = state, reason or run.reason
            if state is RunState.RUNNING and run.started_at is None:
                run.started_at = _now()
            if state in (RunState.FINISHED, RunState.FAILED, RunState.CANCELLED):
                run.finished_at = _now()
            s.add(
                Event(
                    run_id=run_id,
                    kind="run",
                    message=state.value + (f": {reason}" if reason else ""),
                )
            )

    def _event(self, run_id: str, kind: str, message: str, subject: str = "") -> None:
        with self.store.session() as s:
            s.add(Event(run_id=run_id, kind=kind, subject=subject, message=message))


def _supported(wf: Workflow) -> None:
    """What this slice of the engine cannot run yet is refused before anything starts."""
    missing = []
    if wf.services:
        missing.append("services")
    if wf.volumes or any(j.mounts for j in wf.jobs.values()):
        missing.append("volumes and mounts")
    if any(j.multinode for j in wf.jobs.values()):
        missing.append("multinode jobs")
    if any(v.startswith("secret://") for j in wf.jobs.values() for v in j.env.values()):
        missing.append("secrets")
    if missing:
        raise InvalidInput(f"the engine cannot run {', '.join(missing)} yet")


class _RunLoop:
    """The RUNNING phase of one run: start what is ready, apply what ended, until done."""

    def __init__(self, engine: Engine, run_id: str, wf: Workflow, cluster: Cluster) -> None:
        self.engine, self.store, self.run_id, self.wf = engine, engine.store, run_id, wf
        self.stubs = []
        self.channels = []
        for agent in cluster.agents:
            channel, stub = connect(agent.address, agent.token)
            self.channels.append(channel)
            self.stubs.append(stub)
        self.results: queue.Queue[tuple[_Active, Any]] = queue.Queue()
        self.active: dict[TaskKey, _Active] = {}
        self.stop = threading.Event()

    def drive(self) -> tuple[RunState, str]:
        renewer = threading.Thread(target=self._renew_leases, daemon=True)
        try:
            self._pull_images()
            self.engine._set_run(self.run_id, RunState.RUNNING)
            renewer.start()
            while True:
                decision = decide(self.wf, self._phases())
                self._skip(decision.skip)
                started = [self._start(key) for key in decision.start]
                if decision.done and not self.active:
                    break
                if not self.active and not any(started):
                    if decision.skip:
                        continue  # skipping changed the graph: decide again
                    raise RuntimeError("nothing can start: the cluster is too small for a job")
                active, status = self.results.get()
                self._finish(active, status)
            failed = self._failed_jobs()
            if failed:
                return RunState.FAILED, "failed: " + ", ".join(failed)
            return RunState.FINISHED, ""
        finally:
            self.stop.set()
            for channel in self.channels:
                channel.close()

    def _pull_images(self) -> None:
        self.engine._set_run(self.run_id, RunState.STAGING)
        for uri in sorted({j.image.uri for j in self.wf.jobs.values()}):
            for stub in self.stubs:
                for progress in stub.PullImage(pb.PullImageRequest(reference=uri)):
                    if progress.done:
                        self.engine._event(self.run_id, "image", progress.message, uri)

    # ---- state ------------------------------------------------------------------------

    def _phases(self) -> dict[TaskKey, Phase]:
        with self.store.session() as s:
            rows = s.execute(
                select(Job.name, Task.index, Task.state)
                .join(Task.job)
                .where(Job.run_id == self.run_id)
            ).all()
        return {TaskKey(name, index): _PHASE[state] for name, index, state in rows}

    def _task_row(self, s: Any, key: TaskKey) -> Task:
        task: Task = s.scalars(
            select(Task)
            .join(Task.job)
            .where(Job.run_id == self.run_id, Job.name == key.name, Task.index == key.index)
        ).one()
        return task

    def _skip(self, skipped: dict[str, str]) -> None:
        if not skipped:
            return
        with self.store.session() as s:
            for name, why in skipped.items():
                job = s.scalars(
                    select(Job).where(Job.run_id == self.run_id, Job.name == name)
                ).one()
                job.state, job.reason = TaskState.SKIPPED, why
                for task in job.tasks:
                    task.state = TaskState.SKIPPED
                s.add(Event(run_id=self.run_id, kind="job", subject=name, message=why))

    def _failed_jobs(self) -> list[str]:
        phases = self._phases()
        return sorted({k.name for k, p in phases.items() if p in (Phase.FAILED, Phase.SKIPPED)})

    # ---- starting and ending tasks ------------------------------------------------------

    def _start(self, key: TaskKey) -> bool:
        job = self.wf.jobs[key.name]
        r = job.resource
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
            try:
                lease = stub.AcquireLease(lease_request)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    continue  # full: try the next node, or later
                raise
            with self.store.session() as s:  # recorded before the task is started
                task = self._task_row(s, key)
                task.state = TaskState.STARTING
                attempt = Attempt(
                    number=len(task.attempts) + 1,
                    node=f"node-{node}",
                    lease_id=lease.id,
                    started_at=_now(),
                )
                task.attempts.append(attempt)
                s.flush()
                active = _Active(key, task.id, attempt.id, node, lease.id)
            reply = stub.Run(self._run_request(job, key, lease.id))
            active.agent_task_id = reply.task_id
            with self.store.session() as s:
                s.get_one(Attempt, active.attempt_id).agent_task_id = reply.task_id
                s.get_one(Task, active.task_db_id).state = TaskState.RUNNING
            self.active[key] = active
            threading.Thread(target=self._await, args=(active,), daemon=True).start()
            return True
        return False

    def _run_request(self, job: JobSpec, key: TaskKey, lease_id: str) -> pb.RunRequest:
        env = {**job.env, "FB_WORKFLOW_ID": self.run_id}
        if job.task_array is not None:
            env["FB_TASK_ID"] = str(key.index)
        files = []
        for path, content in job.files.items():
            if content.startswith("file://"):
                content = self.wf.files[content.removeprefix("file://")]
            files.append(pb.File(path=path, content=content.encode()))
        return pb.RunRequest(
            lease_id=lease_id,
            name=job.name,
            image=job.image.uri,
            command=list(job.command or ()),
            script=job.script or "",
            args=list(job.args),
            env=env,
            cwd=job.cwd or "",
            files=files,
            network=pb.NETWORK_ISOLATED if job.isolated_network else pb.NETWORK_HOST,
            timeout_seconds=job.policy.timeout or 0,
        )

    def _await(self, active: _Active) -> None:
        stub = self.stubs[active.node]
        try:
            status: Any = stub.Wait(pb.WaitRequest(task_id=active.agent_task_id))
        except grpc.RpcError as exc:
            status = exc
        self.results.put((active, status))

    def _finish(self, active: _Active, status: Any) -> None:
        stub = self.stubs[active.node]
        del self.active[active.key]
        with contextlib.suppress(grpc.RpcError):  # expired, or gone with the agent
            stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=active.lease_id))
        if isinstance(status, grpc.RpcError):
            ok, code, message = False, None, f"lost the task: {status.details()}"
        else:
            ok = status.state == pb.TASK_STATE_EXITED and status.exit_code == 0
            code = status.exit_code
            message = status.message or pb.TaskState.Name(status.state).removeprefix(
                "TASK_STATE_"
            ).lower() + (
                f" (exit {status.exit_code})" if status.state == pb.TASK_STATE_EXITED else ""
            )
        job = self.wf.jobs[active.key.name]
        with self.store.session() as s:
            attempt = s.get_one(Attempt, active.attempt_id)
            attempt.state = TaskState.FINISHED if ok else TaskState.FAILED
            attempt.exit_code, attempt.message, attempt.finished_at = code, message, _now()
            task = s.get_one(Task, active.task_db_id)
            retries_left = (job.policy.retries or 0) + 1 - len(task.attempts)
            if ok:
                task.state = TaskState.FINISHED
            elif retries_left > 0:
                task.state = TaskState.PENDING  # another attempt
            else:
                task.state = TaskState.FAILED
                task.job.state, task.job.reason = TaskState.FAILED, message
            s.add(
                Event(
                    run_id=self.run_id,
                    kind="task",
                    subject=f"{active.key.name}[{active.key.index}]",
                    message=f"attempt {attempt.number}: {message}",
                )
            )

    def _renew_leases(self) -> None:
        while not self.stop.wait(LEASE_TTL / 3):
            for active in list(self.active.values()):
                try:
                    self.stubs[active.node].RenewLease(
                        pb.RenewLeaseRequest(lease_id=active.lease_id)
                    )
                except grpc.RpcError:
                    continue  # ended meanwhile; its result is on the way
