"""What may start, what is skipped and what is stopped next, kept up to date as tasks move.

The run loop tells the scheduler each move of a task (`moved`) and asks it what follows
(`decide`). The work a move costs is proportional to what it changed: each job keeps counts of
its tasks by state and a queue of its pending tasks, and a job whose state changed looks
only at the jobs that depend on it. Rules:

- A job's tasks are its task-array indexes (`FB_TASK_ID`), or one task; a service is one task.
- Every task of an array runs even when some fail; the job then fails, and what depends on
  it is skipped.
- A job is ready when every dependency is met: FINISHED, or READY for a service (its readiness
  probe passed; without a probe, it started). At most `concurrency` tasks of an array run at
  once.
- A dependency that failed, was skipped or was cancelled (or a dependency on a running service
  that ended) skips the job and, in turn, what depends on it; independent branches go on.
- A service with `persist: false` starts only while something still waits on it and is
  stopped once nothing does; a persisting service runs until the run ends (it is cancelled).
- The run is over when every job has ended and no service is left that must run on.

Where a task runs (nodes, cores, memory, devices) is the run loop's business (`capacity`).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from .fuzzfile.model import DependencyStatus, Job, Service, Workflow
from .store import TaskState

__all__ = ["Decision", "Scheduler", "TaskKey", "job_state", "tasks_of"]

_S = TaskState
_ACTIVE = (_S.STARTING, _S.RUNNING, _S.READY)
_BROKEN = (_S.FAILED, _S.CANCELLED, _S.SKIPPED)


@dataclass(frozen=True, slots=True, order=True)
class TaskKey:
    name: str  # the job or service
    index: int = 0  # FB_TASK_ID for task arrays


@dataclass(slots=True)
class Decision:
    skip: dict[str, str] = field(default_factory=dict)  # job/service -> why
    stop: list[str] = field(default_factory=list)  # services nothing needs any more
    ready: list[str] = field(default_factory=list)  # jobs that may start tasks now, oldest first


def tasks_of(container: Job | Service) -> list[TaskKey]:
    """The tasks of a job (one per task-array index) or of a service (one)."""
    if isinstance(container, Job) and container.task_array is not None:
        ta = container.task_array
        return [TaskKey(container.name, i) for i in range(ta.start, ta.end + 1)]
    return [TaskKey(container.name, 0)]


def job_state(counts: Mapping[TaskState, int], tasks: int) -> TaskState:
    """A job's state from how many of its `tasks` are in each state. Every task of an array
    runs, whatever the others did: the job fails once all have ended and one failed (retries
    happen inside a task, as attempts); it is finished when all its tasks are."""
    ended = sum(counts.get(s, 0) for s in (_S.FINISHED, *_BROKEN))
    if ended == tasks:
        if counts.get(_S.FAILED):
            return _S.FAILED
        if counts.get(_S.FINISHED) == tasks:
            return _S.FINISHED
        return _S.CANCELLED if counts.get(_S.CANCELLED) else _S.SKIPPED
    if counts.get(_S.READY):
        return _S.READY
    return _S.PENDING if counts.get(_S.PENDING) == tasks else _S.RUNNING


class _Job:
    __slots__ = ("container", "counts", "dependents", "limit", "on_demand", "pending", "size")

    def __init__(self, container: Job | Service) -> None:
        self.container = container
        keys = tasks_of(container)
        self.size = len(keys)
        self.counts: Counter[TaskState] = Counter({_S.PENDING: self.size})
        self.pending: deque[int] = deque(k.index for k in keys)  # in index order
        self.limit = (
            container.task_array.concurrency
            if isinstance(container, Job) and container.task_array is not None
            else None
        )
        self.on_demand = isinstance(container, Service) and not container.persist
        self.dependents: list[str] = []

    @property
    def state(self) -> TaskState:
        return job_state(self.counts, self.size)

    @property
    def active(self) -> int:
        return sum(self.counts[s] for s in _ACTIVE)


class Scheduler:
    """The DAG of `wf` and where each of its tasks is (`states`; absent: PENDING)."""

    def __init__(self, wf: Workflow, states: Mapping[TaskKey, TaskState] | None = None) -> None:
        self.wf = wf
        self.jobs = {name: _Job(c) for name, c in wf.containers.items()}
        for name, c in wf.containers.items():
            for dep in c.depends_on:
                self.jobs[dep.name].dependents.append(name)
        self.states: dict[TaskKey, TaskState] = {}
        # containers that have not ended and depend on each name (services that must run)
        self.waiters: Counter[str] = Counter()
        for c in wf.containers.values():
            for dep in c.depends_on:
                self.waiters[dep.name] += 1
        self.ready: dict[str, None] = {}  # an ordered set
        self.skip: dict[str, str] = {}
        self.stop: dict[str, None] = {}
        for key, state in (states or {}).items():
            if state is not _S.PENDING:
                self.moved(key, state)
        for name in self.jobs:
            self._review(name)

    def state(self, key: TaskKey) -> TaskState:
        return self.states.get(key, _S.PENDING)

    def job(self, name: str) -> TaskState:
        return self.jobs[name].state

    def moved(self, key: TaskKey, to: TaskState) -> None:
        """Task `key` is now in state `to`."""
        job = self.jobs[key.name]
        was = self.states.get(key, _S.PENDING)
        if was is to:
            return
        before = job.state
        self.states[key] = to
        job.counts[was] -= 1
        job.counts[to] += 1
        if to is _S.PENDING:
            bisect.insort(job.pending, key.index)  # another attempt, in index order
        elif was is _S.PENDING:
            _discard(job.pending, key.index)
        after = job.state
        self._review(key.name)
        if after is before:
            return
        if after.ended and not before.ended:
            for dep in job.container.depends_on:
                self.waiters[dep.name] -= 1
                self._review(dep.name)
        for name in job.dependents:
            self._review(name)

    def decide(self) -> Decision:
        """What to skip and stop (each said once) and which jobs may start tasks now."""
        decision = Decision(skip=self.skip, stop=list(self.stop), ready=list(self.ready))
        self.skip, self.stop = {}, {}
        return decision

    def startable(self, name: str, most: int | None = None) -> list[TaskKey]:
        """The tasks of ready job `name` that may start now, in index order: its pending
        tasks, as many as its concurrency leaves room for, and at most `most`."""
        job = self.jobs[name]
        if name not in self.ready:
            return []
        room = len(job.pending) if job.limit is None else max(0, job.limit - job.active)
        room = room if most is None else min(room, most)
        return [TaskKey(name, i) for i in itertools.islice(job.pending, room)]

    def done(self) -> bool:
        """Nothing more will start: every job has ended, and every service still running is
        one that nothing waits on (it is being stopped)."""
        return (
            not self.ready
            and not self.skip
            and all(
                job.state.ended or (job.on_demand and not self.waiters[name])
                for name, job in self.jobs.items()
            )
        )

    def _review(self, name: str) -> None:
        """Whether `name` is ready, to be skipped or to be stopped, after something it
        depends on (or its own tasks, or what waits on it) moved."""
        job = self.jobs[name]
        state = job.state
        self.ready.pop(name, None)
        if state.ended:
            return
        if job.on_demand and not self.waiters[name]:
            if state in _ACTIVE:
                self.stop[name] = None
            return
        if state is _S.PENDING and name not in self.skip:
            why = self._broken(job)
            if why:
                self.skip[name] = why
                return
        if not job.pending or not self._met(job):
            return
        if job.limit is not None and job.active >= job.limit:
            return
        self.ready[name] = None

    def _broken(self, job: _Job) -> str:
        for dep in job.container.depends_on:
            target = self.jobs[dep.name].state
            gone = dep.status is DependencyStatus.RUNNING and target is _S.FINISHED
            if target in _BROKEN or gone:
                return f"dependency {dep.name!r} {'ended' if gone else target.value.lower()}"
        return ""

    def _met(self, job: _Job) -> bool:
        for dep in job.container.depends_on:
            target = self.jobs[dep.name].state
            if dep.status is DependencyStatus.FINISHED and target is not _S.FINISHED:
                return False
            if dep.status is DependencyStatus.RUNNING and target is not _S.READY:
                return False
        return True


def _discard(queue: deque[int], index: int) -> None:
    """Remove `index` from a queue of pending tasks; the first in line in the common case."""
    if queue and queue[0] == index:
        queue.popleft()
    else:
        queue.remove(index)
