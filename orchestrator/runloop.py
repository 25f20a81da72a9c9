"""The RUNNING phase of one run: start what the scheduler says is ready where it fits, apply
what ended, probe services, obey a cancel, until nothing is left to do.

One thread turns the loop, and nothing else changes a state. Its calls to the agents are made
by `ClusterIO`, whose one asyncio thread posts each answer to the inbox (no thread waits for a
task); a service with a readiness probe has a thread that probes it. Each turn drains the
inbox, applies every message, asks the scheduler what follows, asks for leases where the
capacity count says a task fits, and writes all of it in one commit; a task whose lease came
is started only after that commit, so the store knows every attempt before its container
exists.

Nodes can be lost (a spot instance taken back, a crash, a cut cable): every agent is asked
how it is each WATCH_EVERY seconds, and a node whose agent has not answered for `lost_after`
is lost. What ran there is put back in line, without counting against its retries (it was
not the job's failure, as Kubernetes' pod failure policy ignores a disruption) unless a task
was lost MAX_TASK_LOSSES times; the provider is asked for a node in its place, and until it
comes the work goes on where it fits. After `move_after` lost nodes, or when what is left
can no longer hold a job and no replacement comes, the loop stops its tasks and raises
NodesLost: the engine moves the run to another site.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import func, select

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect

from . import gangs
from .capacity import Capacity, NodeTotal, Shape
from .cluster_io import ClusterIO
from .fuzzfile.endpoints import endpoint_env
from .fuzzfile.model import Affinity, Job, Service, Workflow
from .fuzzfile.variables import expand, secret_references
from .identity import groups_of
from .probes import check
from .provision import AgentEndpoint, Cluster, ProvisionError
from .redaction import current
from .scheduler import Scheduler, TaskKey
from .secrets import SecretStore, SecretView
from .states import Moves
from .store import Attempt, Run, RunState, Store, Task, TaskState
from .store import Job as JobRow

__all__ = ["LOST_AFTER", "MOVE_AFTER", "NodesLost", "RunLoop", "log_path"]

LEASE_TTL = 30.0
POLL = 0.25  # seconds between looks at the cancel flag when nothing happens
WATCH_EVERY = 1.0  # seconds between health checks of each node's agent
LOST_AFTER = 10.0  # seconds without an answer after which a node is lost
MOVE_AFTER = 3  # nodes lost in one run before it moves to another site
MAX_TASK_LOSSES = 3  # times one task may be lost with its node before it fails


class NodesLost(Exception):
    """The run lost too many nodes here (or what is left cannot hold it): it moves."""


_S = TaskState
# a lease the node can never grant (too small for it), or a request it cannot read
_NEVER = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
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


def _has_secret(value: str) -> bool:
    """Whether an env value is (or holds) a secret."""
    return bool(secret_references(value))


def _subject(key: TaskKey) -> str:
    return f"{key.name}[{key.index}]"


@dataclass(slots=True)
class _Member:
    """A node of a multi-node task (a gang) other than the first, whose container idles
    until the first one's launcher runs commands in it (orchestrator/gangs.py)."""

    node: int
    host: str  # its container's hostname
    grant: str  # lets the first member's agent Exec in it
    lease: Any = None  # pb.Lease, or the grpc.RpcError that refused it (None: not answered)
    agent_task_id: str = ""
    address: str = ""
    launched: bool = False  # its Run was answered (started or not)
    ended: Any = None  # its TaskStatus, or the grpc.RpcError that lost it (None: not ended)


@dataclass(slots=True)
class _Active:
    """A task the loop works on: leasing (no lease yet), starting, running or ending. A
    multi-node task runs on `node` (its first member, which runs the job's command) and on
    each of `members`."""

    key: TaskKey
    node: int  # index into the cluster's agents
    shape: Shape
    attempt: int = 0  # 0 while its lease is asked for
    lease_id: str = ""
    agent_task_id: str = ""
    address: str = ""  # on its node's pod network (where a service is reached)
    stopping: bool = False  # a service we stopped, or a task we cancelled
    members: list[_Member] = field(default_factory=list)
    head_lease: Any = None  # a gang's: the first member's lease reply, until all answered
    head_ended: Any = None  # a gang's: the first member's end, until every member ended
    why: str = ""  # a gang's: why it was stopped (a member that ended first)
    head_started: bool = False  # a gang's: its first member's Run was sent
    lost: str = ""  # why it ended with a lost node ("": it did not)


@dataclass(frozen=True, slots=True)
class _Leased:
    active: _Active
    lease: Any  # pb.Lease, or the grpc.RpcError that refused it
    member: int = -1  # which of a gang's members (-1: the task, or a gang's first member)


@dataclass(frozen=True, slots=True)
class _Launched:
    active: _Active
    reply: Any  # pb.RunResponse, or the grpc.RpcError that refused it
    member: int = -1


@dataclass(frozen=True, slots=True)
class _Ended:
    active: _Active
    status: Any  # pb.TaskStatus, or the grpc.RpcError that lost it
    member: int = -1


@dataclass(frozen=True, slots=True)
class _Ready:
    active: _Active


@dataclass(frozen=True, slots=True)
class _Lost:
    node: int
    why: str


@dataclass(frozen=True, slots=True)
class _Replaced:
    node: int
    agent: AgentEndpoint | None  # None: no replacement, `why`
    why: str = ""


class _NodeLost(Exception):
    """The answer a lost node never gave (a lease it will not grant)."""


_Message = _Leased | _Launched | _Ended | _Ready | _Lost | _Replaced


class RunLoop:
    """Drives one run's DAG on `cluster`; `mounts` maps volume names to their paths on the nodes."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        wf: Workflow,
        cluster: Cluster,
        *,
        mounts: Mapping[str, str],
        secrets: SecretStore,
        data_dir: Path,
        report: Callable[[str, str, str], None],
        replace: Callable[[int, tuple[AgentEndpoint, ...]], AgentEndpoint] | None = None,
        lost_after: float = LOST_AFTER,
        move_after: int = MOVE_AFTER,
    ) -> None:
        self.store, self.run_id, self.wf = store, run_id, wf
        self.replace, self.lost_after, self.move_after = replace, lost_after, move_after
        self.lost: dict[int, str] = {}  # nodes lost and not (yet) replaced, with why
        self.losses = 0  # nodes lost in this run
        self.task_losses: defaultdict[TaskKey, int] = defaultdict(int)  # lost with nodes
        self.prior: dict[TaskKey, int] = {}  # attempts made before (at a site it moved from)
        self.moving = ""  # why the run must move to another site ("": it need not)
        self.stopping = False  # cancelling everything: no node is replaced any more
        self.replacing: set[int] = set()  # lost nodes whose replacement is on its way
        self.mounts, self.secrets, self.data_dir, self.report = mounts, secrets, data_dir, report
        self.cluster, self.agents = cluster, list(cluster.agents)
        self.hosts = [a.address.rsplit(":", 1)[0] for a in cluster.agents]
        self.inbox: queue.Queue[_Message] = queue.Queue()
        self.moves = Moves(run_id)
        self.active: dict[TaskKey, _Active] = {}
        self.leased: list[_Active] = []  # leased this turn: started once the turn is written
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
        self.renewed = time.monotonic()
        self.sched = Scheduler(wf, self._load())
        with store.session() as s:
            self.owner = s.get_one(Run, run_id).owner  # whose secrets its containers get
        # the values of the run's secrets, masked in the logs kept of its tasks
        self.io = ClusterIO(cluster, current(run_id))
        try:
            self.capacity = Capacity(
                [
                    NodeTotal.of(self.io.call_now(node, "Inventory", pb.InventoryRequest()))
                    for node in range(len(cluster.agents))
                ]
            )
        except BaseException:
            self.io.close()
            raise
        self.io.watch(WATCH_EVERY, lost_after, lambda n, why: self.inbox.put(_Lost(n, why)))

    # ---- the loop -----------------------------------------------------------------------

    def drive(self) -> tuple[RunState, str]:
        try:
            while True:
                why = self._cancel_requested()
                if why:
                    self._cancel_everything(why)
                    return RunState.CANCELLED, why
                if self.moving:
                    self._cancel_everything(f"the run moves: {self.moving}")
                    raise NodesLost(self.moving)
                asked = self._turn()
                if not self.active and self.sched.done():
                    break
                if not self.active and not asked:
                    if not self.lost:
                        self._fail_unplaceable()
                        continue
                    if not self.replacing:  # nothing left can run it: elsewhere, then
                        gone = ", ".join(f"node-{n}" for n in sorted(self.lost))
                        self.moving = f"what is left cannot run after losing {gone}"
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
            self.io.close()

    def _turn(self) -> int:
        """Skip, stop and place what the scheduler says, write every move of this turn in one
        commit, then start the tasks whose lease came; how many leases were asked for."""
        decision = self.sched.decide()
        while decision.skip:
            self._skip(decision.skip)
            decision.skip = self.sched.decide().skip
        for name in decision.stop:
            self._stop_service(name)
        asked = self._place(self.sched.decide().ready)
        self._write()
        for active in self.leased:
            self._launch(active)
        self.leased = []
        if time.monotonic() - self.renewed > LEASE_TTL / 3:
            self.renewed = time.monotonic()
            self.io.renew(
                [
                    *((a.node, a.lease_id) for a in self.active.values() if a.lease_id),
                    *(
                        (m.node, m.lease.id)
                        for a in self.active.values()
                        if a.lease_id
                        for m in a.members
                    ),
                ],
                LEASE_TTL,
            )
        return asked

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
        if isinstance(message, _Lost):
            self._node_lost(message.node, message.why)
            return
        if isinstance(message, _Replaced):
            self._replaced(message)
            return
        if self.active.get(message.active.key) is not message.active:
            return  # about a task already ended with its lost node
        if isinstance(message, _Leased):
            if message.active.members:
                self._gang_leased(message.active, message.lease, message.member)
            else:
                self._leased(message.active, message.lease)
        elif isinstance(message, _Launched):
            if message.member >= 0:
                self._member_launched(message.active, message.member, message.reply)
            else:
                self._launched(message.active, message.reply)
        elif isinstance(message, _Ended):
            if message.active.members:
                self._gang_member_ended(message.active, message.member, message.status)
            else:
                self._finish(message.active, message.status)
        else:
            self._ready(message.active)

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

    def _cancel_requested(self) -> str:
        """Why the run is to be cancelled ("": it is not), from its row, read at most every
        POLL seconds: the loop turns once per batch of messages, and need not read the run
        row each time."""
        now = time.monotonic()
        if now - self.cancel_checked < POLL:
            return ""
        self.cancel_checked = now
        with self.store.session() as s:
            run = s.get_one(Run, self.run_id)
            return (run.cancel_reason or "cancelled by request") if run.cancel_requested else ""

    def _cancel_everything(self, why: str) -> None:
        """Cancel running tasks, wait for them to end, and mark what never ran."""
        self.stopping = True
        for active in self.leased:  # leased since the last turn, never started: give back
            del self.active[active.key]
            leases = [
                (active.node, active.lease_id),
                *((m.node, m.lease.id) for m in active.members),
            ]
            for node, lease_id in leases:
                self.capacity.give_back(node, active.shape)
                self.io.unary(node, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id))
            task_id = self.ids[active.key][0]
            self.moves.attempt(task_id, active.attempt, state=_S.CANCELLED, message=why)
            self._move(active.key, _S.CANCELLED, why)
        self.leased = []
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
            self.io.unary(active.node, "Cancel", pb.CancelRequest(task_id=active.agent_task_id))
        for member in active.members:  # a gang's: those started (the others when they are)
            if member.agent_task_id and member.ended is None:
                cancel = pb.CancelRequest(task_id=member.agent_task_id)
                self.io.unary(member.node, "Cancel", cancel)

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
            # attempts made at an earlier site (the run moved) do not count against retries
            self.prior[key] = counts.get(task_id, 0)
            self.keys[name].append(key)
            self.job_rows[name] = job_state
        return states

    def _move(
        self, key: TaskKey, to: TaskState, message: str = "", was: TaskState | None = None
    ) -> None:
        """Move a task (checked, with its event, written at the end of the turn), and its
        job's row when the job's state follows. `was`: where the store has the task, when
        the scheduler already counts it elsewhere (a task whose lease is being asked for)."""
        was = was or self.sched.state(key)
        self.moves.task(self.ids[key][0], _subject(key), was, to, message)
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
        """Fail jobs that cannot be placed, and those of their tasks that wait (a task whose
        lease is being asked for is failed when the answer comes)."""
        for name in names:
            why = f"cannot be placed: {self.unplaceable.get(name, 'no node can hold it')}"
            if not self.job_rows[name].ended:
                self._move_job(name, _S.FAILED, why)
            for key in self.keys[name]:
                if self.sched.state(key) is _S.PENDING:
                    self.moves.task(self.ids[key][0], _subject(key), _S.PENDING, _S.FAILED, why)
                    self.sched.moved(key, _S.FAILED)

    # ---- starting -------------------------------------------------------------------------

    def _place(self, ready: list[str]) -> int:
        """Ask for a lease for each task that may start where the count says it fits now (for
        a multi-node task, one on each of as many nodes, all at once); a shape that fits
        nowhere is not tried again this turn, and a job no node could ever hold fails at once.
        How many tasks' leases were asked for."""
        asked = 0
        full: set[tuple[Shape, int, tuple[int, ...] | None]] = set()
        never: list[str] = []
        for name in ready:
            shape = self.shapes[name]
            container = self.wf.containers[name]
            size = gangs.size(container)
            among = self.cluster.groups.get(name)
            if name in self.unplaceable or self.capacity.nodes_that_hold(shape, among) < size:
                never.append(name)
                continue
            if (shape, size, among) in full:
                continue
            request = self._lease_request(container)
            if size > 1:
                for key in self.sched.startable(name):
                    nodes = self.capacity.take_gang(shape, size, among)
                    if nodes is None:
                        full.add((shape, size, among))
                        break
                    self._lease_gang(key, nodes, shape, request)
                    asked += 1
                continue
            for key in self.sched.startable(name, most=self.capacity.room(shape, among)):
                node = self.capacity.take(shape, among)
                if node is None:
                    full.add((shape, size, among))
                    break
                active = _Active(key, node, shape)
                self.active[key] = active
                self.sched.moved(key, _S.STARTING)  # counted as starting; the store still PENDING
                self.io.unary(node, "AcquireLease", request, partial(self._post_leased, active))
                asked += 1
        if never and self.lost and not self.moving:
            gone = ", ".join(f"node-{n}" for n in sorted(self.lost))
            self.moving = f"{never[0]} cannot run on the nodes left after losing {gone}"
            return asked
        if never:
            for name in never:
                self.unplaceable.setdefault(name, self._never_fits(name))
            self._fail_jobs(never)
        return asked

    def _post_leased(self, active: _Active, lease: Any, member: int = -1) -> None:
        self.inbox.put(_Leased(active, lease, member))

    def _leased(self, active: _Active, lease: Any) -> None:
        """The agent answered a lease request: record the attempt (it starts once this turn
        is written); or put the task back in line, counting the node full for its shape, or
        failing its job when no node will ever hold it."""
        key = active.key
        refused = isinstance(lease, grpc.RpcError | _NodeLost)
        failed = self.job_rows[key.name].ended  # its job failed meanwhile: so does it
        if not (refused or active.stopping or failed):
            number = self.attempts[key] + 1
            self.attempts[key] = number
            active.attempt, active.lease_id = number, lease.id
            self._move(key, _S.STARTING, f"attempt {number} on node-{active.node}", was=_S.PENDING)
            self.moves.attempt_started(self.ids[key][0], number, f"node-{active.node}", lease.id)
            self.leased.append(active)
            return
        del self.active[key]
        self.sched.moved(key, _S.PENDING)  # back in line: the store never saw it leave
        failed = self._unused_lease(key, active.node, active.shape, lease) or failed
        if failed:
            self._fail_jobs([key.name])

    def _unused_lease(self, key: TaskKey, node: int, shape: Shape, lease: Any) -> bool:
        """A lease reply the task will not use: a granted lease goes back (cancelled or
        failed meanwhile, or a gang that did not get all its nodes); a refusal marks the node
        full for `shape` (asked elsewhere, or later). True when the node will never hold it
        (the job is unplaceable)."""
        if isinstance(lease, _NodeLost):
            return False  # the node, and what it would have granted, are gone
        if not isinstance(lease, grpc.RpcError):
            self.capacity.give_back(node, shape)
            self.io.unary(node, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease.id))
            return False
        if lease.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.capacity.refused(node, shape)
            return False
        if lease.code() in _NEVER:
            self.capacity.refused(node, shape)
            self.unplaceable[key.name] = str(lease.details() or lease.code().name)
            return True
        # the agent cannot be reached: not asked again until something ends there, and
        # the watch says whether the node is lost
        self.capacity.refused(node, shape)
        return False

    def _never_fits(self, name: str) -> str:
        """Why no node (or too few, for a multi-node job) can hold job `name`, in the agent's
        words (it is asked once)."""
        shape, size = self.shapes[name], gangs.size(self.wf.containers[name])
        among = self.cluster.groups.get(name)
        holding = self.capacity.nodes_that_hold(shape, among)
        if size > 1 and holding:
            return (
                f"it needs {size} nodes and this cluster has {holding} that can hold it"
                f"{gangs.MORE_NODES if holding == len(self.agents) else ''}"
            )
        request = pb.AcquireLeaseRequest(
            holder=f"run/{self.run_id}",
            cores=shape.cores,
            memory_bytes=shape.memory,
            devices=dict(shape.devices),
            exclusive=shape.exclusive,
            ttl_seconds=1,
        )
        try:
            lease = self.io.call_now(0, "AcquireLease", request)
        except grpc.RpcError as exc:
            return str(exc.details() or exc.code().name)
        self.io.unary(0, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease.id))
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

    def _launch(self, active: _Active) -> None:
        if active.members:
            self._launch_members(active)
            return
        key = active.key
        self.io.life(
            active.node,
            self._run_request(self.wf.containers[key.name], key, active.lease_id),
            active.lease_id,
            log_path(self.data_dir, self.run_id, key, active.attempt),
            started=lambda reply: self.inbox.put(_Launched(active, reply)),
            ended=lambda status: self.inbox.put(_Ended(active, status)),
        )

    def _launched(self, active: _Active, reply: Any) -> None:
        """The agent answered a Run: the task runs (or could not start)."""
        if isinstance(reply, grpc.RpcError) and reply.code() is grpc.StatusCode.UNAVAILABLE:
            # its node could not be reached: as if lost with it (the watch will say)
            active.lost = f"node-{active.node} could not be reached ({reply.details()})"
        if isinstance(reply, grpc.RpcError):
            if active.members:
                self._gang_member_ended(active, -1, reply)
            else:
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
        if active.stopping:
            self._cancel(active)
        elif active.why:  # a gang whose other member failed while this one started
            self.io.unary(active.node, "Cancel", pb.CancelRequest(task_id=reply.task_id))

    def _run_request(self, c: Job | Service, key: TaskKey, lease_id: str) -> pb.RunRequest:
        # the secrets as the run's owner sees them now (only read for a value that has one)
        view = self._secrets() if any(map(_has_secret, c.env.values())) else None
        env = {k: view.fill(v) if view and _has_secret(v) else v for k, v in c.env.items()}
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
            mounts=[pb.Mount(source=self.mounts[m.volume], destination=m.path) for m in c.mounts],
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

    def _secrets(self) -> SecretView:
        return self.secrets.view(self.owner, groups_of(self.store, self.owner))

    # ---- gangs (multi-node tasks: orchestrator/gangs.py) -----------------------------------

    def _lease_gang(
        self, key: TaskKey, nodes: list[int], shape: Shape, request: pb.AcquireLeaseRequest
    ) -> None:
        """Ask for a lease on each of `nodes` for a multi-node task, all at once."""
        names = gangs.hosts(key.name, len(nodes))
        members = [_Member(n, h, gangs.grant()) for n, h in zip(nodes[1:], names[1:], strict=True)]
        active = _Active(key, nodes[0], shape, members=members)
        self.active[key] = active
        self.sched.moved(key, _S.STARTING)  # counted as starting; the store still PENDING
        self.io.unary(nodes[0], "AcquireLease", request, partial(self._post_leased, active))
        for i, member in enumerate(members):
            then = partial(self._post_leased, active, member=i)
            self.io.unary(member.node, "AcquireLease", request, then)

    def _gang_leased(self, active: _Active, lease: Any, member: int) -> None:
        """One of a gang's leases was answered. Once all are, the task starts on them as one
        attempt; or, when one was refused, every lease goes back and it waits in line again
        (a gang holds nothing while it waits), failing its job when a node will never hold
        it."""
        if member < 0:
            if active.head_lease is not None:
                return  # answered already (as lost, with its node)
            active.head_lease = lease
        else:
            if active.members[member].lease is not None:
                return
            active.members[member].lease = lease
        replies = [active.head_lease, *(m.lease for m in active.members)]
        if any(r is None for r in replies):
            return
        key = active.key
        nodes = [active.node, *(m.node for m in active.members)]
        refused = [r for r in replies if isinstance(r, grpc.RpcError | _NodeLost)]
        failed = self.job_rows[key.name].ended  # its job failed meanwhile: so does it
        if not (refused or active.stopping or failed):
            number = self.attempts[key] + 1
            self.attempts[key] = number
            active.attempt, active.lease_id = number, active.head_lease.id
            where = ", ".join(f"node-{n}" for n in nodes)
            self._move(key, _S.STARTING, f"attempt {number} on {where}", was=_S.PENDING)
            self.moves.attempt_started(self.ids[key][0], number, where, active.lease_id)
            self.leased.append(active)
            return
        del self.active[key]
        self.sched.moved(key, _S.PENDING)  # back in line: the store never saw it leave
        for node, reply in zip(nodes, replies, strict=True):
            failed = self._unused_lease(key, node, active.shape, reply) or failed
        if failed:
            self._fail_jobs([key.name])

    def _launch_members(self, active: _Active) -> None:
        """Start a gang's members but the first, idling; the first starts once they run."""
        key = active.key
        c = self.wf.containers[key.name]
        assert isinstance(c, Job)
        base = self._run_request(c, key, "")
        gangs.common_request(base, c, host_network=self.cluster.host_network)
        log = log_path(self.data_dir, self.run_id, key, active.attempt)
        for i, m in enumerate(active.members):
            self.io.life(
                m.node,
                gangs.member_request(base, m.lease.id, m.host, m.grant),
                m.lease.id,
                log.with_name(f"{log.stem}.{m.host}.log"),
                started=partial(self._post_member, _Launched, active, i),
                ended=partial(self._post_member, _Ended, active, i),
            )

    def _post_member(
        self, kind: type[_Launched | _Ended], active: _Active, i: int, reply: Any
    ) -> None:
        self.inbox.put(kind(active, reply, i))

    def _member_launched(self, active: _Active, i: int, reply: Any) -> None:
        """A member's Run was answered; once every member runs, the first one starts."""
        member = active.members[i]
        member.launched = True
        if isinstance(reply, grpc.RpcError):  # it never started (its lease is given back)
            self._gang_member_ended(active, i, reply)
            return
        member.agent_task_id = reply.task_id
        member.address = reply.address or self.hosts[member.node]
        if active.stopping or active.why:  # cancelled, or another member failed, meanwhile
            self.io.unary(member.node, "Cancel", pb.CancelRequest(task_id=reply.task_id))
        elif all(m.launched for m in active.members):
            self._launch_head(active)

    def _launch_head(self, active: _Active) -> None:
        key = active.key
        c = self.wf.containers[key.name]
        assert isinstance(c, Job)
        request = self._run_request(c, key, active.lease_id)
        gangs.common_request(request, c, host_network=self.cluster.host_network)
        peers = [
            pb.Peer(
                hostname=m.host,
                agent=self._agent_seen_by_nodes(m),
                task_id=m.agent_task_id,
                grant=m.grant,
            )
            for m in active.members
        ]
        names = gangs.hosts(key.name, 1 + len(active.members))
        gangs.head_request(request, c, names, peers, [m.address for m in active.members])
        active.head_started = True
        self.io.life(
            active.node,
            request,
            active.lease_id,
            log_path(self.data_dir, self.run_id, key, active.attempt),
            started=lambda reply: self.inbox.put(_Launched(active, reply)),
            ended=lambda status: self.inbox.put(_Ended(active, status)),
        )

    def _agent_seen_by_nodes(self, m: _Member) -> str:
        """Where the first member's agent reaches member `m`'s: on the nodes' own network
        (the address its agent gave its container there; this orchestrator may know the
        node by a public one), else where this orchestrator does."""
        agent = self.agents[m.node].address
        if not self.cluster.host_network:
            return agent
        return f"{m.address}:{agent.rsplit(':', 1)[1]}"

    def _gang_member_ended(self, active: _Active, member: int, status: Any) -> None:
        """A member of a gang ended (-1: the first). The first one's end is the task's: the
        others are stopped then. Any other member that ends first fails the attempt (a rank
        or a node lost): the rest are stopped. The task ends once every member has."""
        if member < 0:
            if active.head_ended is not None:
                return  # ended already (with its lost node)
            active.head_ended = status
            node = active.node
        else:
            if active.members[member].ended is not None:
                return
            active.members[member].ended = status
            node = active.members[member].node
            if active.head_ended is None and not (active.stopping or active.why):
                host = active.members[member].host
                active.why = f"{host} ended before the job's command: {_outcome(status)[2]}"
        self.capacity.give_back(node, active.shape)
        if active.head_ended is not None or active.why:
            self._stop_members(active)
        members_done = all(m.ended is not None for m in active.members)
        head_done = active.head_ended is not None or not active.head_started
        if not (members_done and head_done):
            return
        if active.why:
            self._end(active, False, None, active.why)
        elif active.head_ended is not None:
            self._end(active, *_outcome(active.head_ended))
        else:  # cancelled before its first member started
            self._end(active, False, None, "cancelled")

    def _stop_members(self, active: _Active) -> None:
        """Cancel every member still running (the first one too, when another failed)."""
        if active.why and active.agent_task_id and active.head_ended is None:
            self.io.unary(active.node, "Cancel", pb.CancelRequest(task_id=active.agent_task_id))
        for m in active.members:
            if m.agent_task_id and m.ended is None:
                self.io.unary(m.node, "Cancel", pb.CancelRequest(task_id=m.agent_task_id))

    # ---- services -------------------------------------------------------------------------

    def _probe(self, service: Service, active: _Active) -> None:
        probe = service.readiness_probe
        assert probe is not None
        ports = {p.name: p.port for p in service.ports}
        agent = self.agents[active.node]
        channel, stub = connect(agent.address, agent.token, agent.tls)

        def run_exec(command: list[str], timeout: float) -> int:
            return _exec_exit_code(stub, active.agent_task_id, command, timeout)

        try:
            if self.stop.wait(probe.initial_delay):
                return
            passes = failures = 0
            while self.active.get(active.key) is active and not active.stopping:
                ok, why = check(probe, active.address, ports, run_exec)
                passes, failures = (passes + 1, 0) if ok else (0, failures + 1)
                if passes >= probe.success_threshold:
                    self.inbox.put(_Ready(active))
                    return
                if not ok:
                    self.report("service", active.key.name, f"not ready ({failures}x): {why}")
                if self.stop.wait(probe.period):
                    return
        finally:
            channel.close()

    def _ready(self, active: _Active) -> None:
        key = active.key
        if self.active.get(key) is not active or self.sched.state(key) is not _S.RUNNING:
            return  # it ended meanwhile
        self._move(key, _S.READY, "ready")

    def _stop_service(self, name: str) -> None:
        active = self.active.get(TaskKey(name, 0))
        if active is None or active.stopping:
            return
        self.report("service", name, "stopping: nothing needs it any more")
        self._cancel(active)

    # ---- lost nodes -----------------------------------------------------------------------

    def _node_lost(self, node: int, why: str) -> None:
        """Node `node`'s agent stopped answering: what ran there goes back in line, and a
        node is asked for in its place (or the run moves)."""
        if node in self.lost:
            return
        self.lost[node] = why
        self.losses += 1
        self.report("node", f"node-{node}", f"lost: {why}")
        replacing = (
            self.replace is not None
            and self.losses < self.move_after
            and not (self.moving or self.stopping)
        )
        self.capacity.lose(node, replacing=replacing)
        lost = f"node-{node} was lost ({why})"
        for active in list(self.active.values()):
            if node in (active.node, *(m.node for m in active.members)):
                self._lose(active, node, lost)
        if self.losses >= self.move_after and not self.moving:
            self.moving = f"{self.losses} nodes lost (the last: node-{node}, {why})"
        elif replacing:
            self.replacing.add(node)
            threading.Thread(
                target=self._replace_node,
                args=(node, tuple(self.agents)),
                name=f"replace-{node}",
                daemon=True,
            ).start()

    def _replace_node(self, node: int, agents: tuple[AgentEndpoint, ...]) -> None:
        assert self.replace is not None
        try:
            self.inbox.put(_Replaced(node, self.replace(node, agents)))
        except ProvisionError as exc:
            self.inbox.put(_Replaced(node, None, str(exc)))
        except Exception as exc:  # reported, and the run goes on without the node
            self.inbox.put(_Replaced(node, None, f"{type(exc).__name__}: {exc}"))

    def _replaced(self, message: _Replaced) -> None:
        node = message.node
        self.replacing.discard(node)
        if node not in self.lost or self.moving or self.stopping:
            return
        if message.agent is None:
            self.report("node", f"node-{node}", f"not replaced: {message.why}")
            self.capacity.lose(node, replacing=False)
            return
        try:
            self.io.reconnect(node, message.agent)
            total = NodeTotal.of(self.io.call_now(node, "Inventory", pb.InventoryRequest()))
        except grpc.RpcError as exc:  # lost in turn: counted as another lost node
            del self.lost[node]
            why = " ".join((exc.details() or exc.code().name).split())[:200]
            self._node_lost(node, f"its replacement does not answer ({why})")
            return
        self.capacity.restore(node, total)
        self.agents[node] = message.agent
        self.hosts[node] = message.agent.address.rsplit(":", 1)[0]
        del self.lost[node]
        self.report("node", f"node-{node}", f"replaced: {message.agent.address}")
        self.io.watch(
            WATCH_EVERY, self.lost_after, lambda n, why: self.inbox.put(_Lost(n, why)), [node]
        )

    def _lose(self, active: _Active, node: int, why: str) -> None:
        """Task `active` had a part on lost node `node`: it ends (its other parts stopped)
        and goes back in line."""
        active.lost = why
        if active in self.leased:  # leased this turn, not started: give the leases back
            self.leased.remove(active)
            for n, lease_id in (
                (active.node, active.lease_id),
                *((m.node, m.lease.id) for m in active.members),
            ):
                if n != node:
                    self.capacity.give_back(n, active.shape)
                    self.io.unary(n, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id))
            self._end(active, False, None, why)
            return
        if not active.members:
            if active.attempt == 0:  # its lease was asked of the lost node
                self._leased(active, _NodeLost(why))
            else:
                self._cancel_there(node, active.agent_task_id)
                self._end(active, False, None, why)
            return
        if active.attempt == 0:  # a gang waiting for its leases
            parts = [(-1, active.node, active.head_lease)]
            parts += [(i, m.node, m.lease) for i, m in enumerate(active.members)]
            for i, n, reply in parts:  # a lease the lost node granted is gone with it
                if n == node and reply is not None:
                    if i < 0:
                        active.head_lease = _NodeLost(why)
                    else:
                        active.members[i].lease = _NodeLost(why)
            for i, n, reply in parts:
                if n == node and reply is None and self.active.get(active.key) is active:
                    self._gang_leased(active, _NodeLost(why), i)
            return
        active.why = active.why or why
        for i, m in enumerate(active.members):
            if m.node == node and m.ended is None and self.active.get(active.key) is active:
                self._cancel_there(node, m.agent_task_id)
                self._gang_member_ended(active, i, why)
        if active.node == node and self.active.get(active.key) is active:
            if active.head_started and active.head_ended is None:
                self._cancel_there(node, active.agent_task_id)
                self._gang_member_ended(active, -1, why)
            else:
                self._stop_members(active)

    def _cancel_there(self, node: int, task_id: str) -> None:
        """Best effort: stop a task on a node taken as lost that may still run it (the cloud
        gave notice, or the node is cut off and comes back), so that it does not run on
        beside its next attempt."""
        if task_id:
            self.io.unary(node, "Cancel", pb.CancelRequest(task_id=task_id))

    # ---- ending ---------------------------------------------------------------------------

    def _finish(self, active: _Active, status: Any) -> None:
        """A task ended (its output kept, its lease given back), or never started."""
        self.capacity.give_back(active.node, active.shape)
        self._end(active, *_outcome(status))

    def _end(self, active: _Active, ok: bool, code: int | None, message: str) -> None:
        """Record how a task (every member of a gang) ended: finished, failed, cancelled,
        or back in line for another attempt."""
        del self.active[active.key]
        container = self.wf.containers[active.key.name]
        if active.stopping and isinstance(container, Service):
            ok, message = True, "stopped"
        retries = (container.policy.retries or 0) if isinstance(container, Job) else 0
        # attempts lost with a node, or made at a site the run moved from, do not count
        losses = self.task_losses[active.key]
        spared = losses + self.prior.get(active.key, 0)
        if ok:
            to = _S.FINISHED
        elif active.stopping:
            to = _S.CANCELLED
        elif active.lost:
            self.task_losses[active.key] = losses + 1
            to = _S.PENDING if losses + 1 < MAX_TASK_LOSSES else _S.FAILED
            message = active.lost
        elif retries + 1 + spared - active.attempt > 0:
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
    """(succeeded, exit code, what happened) of an agent's TaskStatus, a lost call, or (a
    text) why it ended with its lost node."""
    if isinstance(status, str):
        return False, None, status
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
