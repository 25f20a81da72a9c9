"""What to start, skip and stop next: a pure function of the workflow and where its tasks are.

The engine keeps task states (in the store) and asks `decide` after every change. Rules:

- A job's tasks are its task-array indexes (`FB_TASK_ID`), or one task; a service is one task.
- Every task of an array runs even when some fail; the job then fails, and what depends on
  it is skipped.
- A job starts when every dependency is met: FINISHED, or RUNNING for a service (RUNNING means
  its readiness probe passed; without a probe, started). At most `concurrency` tasks of an
  array run at once.
- A dependency that failed, was skipped or was cancelled (or a RUNNING dependency on a service
  that ended) skips the job and, in turn, what depends on it; independent branches go on.
- A service with `persist: false` starts only while something still waits on it and is
  stopped once nothing does; a persisting service runs until the run ends (it is cancelled).
- The run is over when every job has ended and no service is left that must run on.

Placement on nodes (cores, memory, devices) is the engine's business with the agents' leases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .fuzzfile.model import DependencyStatus, Job, Service, Workflow

__all__ = ["BROKEN", "ENDED", "Decision", "Phase", "TaskKey", "decide", "job_phase", "tasks_of"]


class Phase(StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"  # asked for, not yet running
    RUNNING = "RUNNING"
    READY = "READY"  # a service whose readiness probe passed
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"


ENDED = frozenset({Phase.FINISHED, Phase.FAILED, Phase.CANCELLED, Phase.SKIPPED})
BROKEN = frozenset({Phase.FAILED, Phase.CANCELLED, Phase.SKIPPED})


@dataclass(frozen=True, slots=True, order=True)
class TaskKey:
    name: str  # the job or service
    index: int = 0  # FB_TASK_ID for task arrays


@dataclass(slots=True)
class Decision:
    start: list[TaskKey] = field(default_factory=list)
    skip: dict[str, str] = field(default_factory=dict)  # job/service -> why
    stop: list[str] = field(default_factory=list)  # services nothing needs any more
    done: bool = False  # nothing more will start; the run can wind down


def tasks_of(container: Job | Service) -> list[TaskKey]:
    """The tasks of a job (one per task-array index) or of a service (one)."""
    if isinstance(container, Job) and container.task_array is not None:
        ta = container.task_array
        return [TaskKey(container.name, i) for i in range(ta.start, ta.end + 1)]
    return [TaskKey(container.name, 0)]


def job_phase(keys: list[TaskKey], states: Mapping[TaskKey, Phase]) -> Phase:
    """A job's phase from its tasks'. Every task of an array runs, whatever the others did:
    the job fails once all have ended and one failed (retries happen inside a task, as
    attempts); it is finished when all its tasks are."""
    phases = [states.get(k, Phase.PENDING) for k in keys]
    if all(p in ENDED for p in phases):
        if Phase.FAILED in phases:
            return Phase.FAILED
        if all(p is Phase.FINISHED for p in phases):
            return Phase.FINISHED
        return Phase.CANCELLED if Phase.CANCELLED in phases else Phase.SKIPPED
    if Phase.READY in phases:
        return Phase.READY
    if any(p is not Phase.PENDING for p in phases):
        return Phase.RUNNING
    return Phase.PENDING


def decide(wf: Workflow, states: Mapping[TaskKey, Phase]) -> Decision:
    """The next moves for a workflow whose tasks are in `states` (absent: PENDING)."""
    keys = {name: tasks_of(c) for name, c in wf.containers.items()}
    phase = {name: job_phase(k, states) for name, k in keys.items()}
    decision = Decision()
    _skip_broken_dependents(wf, phase, decision)
    for name in decision.skip:
        phase[name] = Phase.SKIPPED
    waiting_on = _waiters(wf, phase)
    for name, container in wf.containers.items():
        if phase[name] in ENDED or name in decision.skip:
            continue
        on_demand = isinstance(container, Service) and not container.persist
        if on_demand and not waiting_on[name]:
            if phase[name] in (Phase.RUNNING, Phase.READY):
                decision.stop.append(name)
            continue
        if not _dependencies_met(container, phase):
            continue
        decision.start.extend(_startable(container, keys[name], states))
    decision.done = not decision.start and all(
        phase[name] in ENDED or (isinstance(c, Service) and not c.persist and not waiting_on[name])
        for name, c in wf.containers.items()
    )
    return decision


def _skip_broken_dependents(wf: Workflow, phase: dict[str, Phase], decision: Decision) -> None:
    """Mark, transitively, what waits on something that failed or can no longer be met."""
    changed = True
    while changed:
        changed = False
        for name, c in wf.containers.items():
            if name in decision.skip or phase[name] not in (Phase.PENDING,):
                continue
            for dep in c.depends_on:
                target = phase.get(dep.name, Phase.PENDING)
                if dep.name in decision.skip:
                    target = Phase.SKIPPED
                gone = dep.status is DependencyStatus.RUNNING and target is Phase.FINISHED
                if target in BROKEN or gone:
                    how = "ended" if gone else target.value.lower()
                    decision.skip[name] = f"dependency {dep.name!r} {how}"
                    changed = True
                    break


def _waiters(wf: Workflow, phase: Mapping[str, Phase]) -> dict[str, bool]:
    """For each name, whether something that has not ended still depends on it."""
    waiting = dict.fromkeys(wf.containers, False)
    for name, c in wf.containers.items():
        if phase[name] in ENDED:
            continue
        for dep in c.depends_on:
            if dep.name in waiting:
                waiting[dep.name] = True
    return waiting


def _dependencies_met(container: Job | Service, phase: Mapping[str, Phase]) -> bool:
    for dep in container.depends_on:
        target = phase.get(dep.name, Phase.PENDING)
        if dep.status is DependencyStatus.FINISHED and target is not Phase.FINISHED:
            return False
        if dep.status is DependencyStatus.RUNNING and target is not Phase.READY:
            return False
    return True


def _startable(
    container: Job | Service, keys: list[TaskKey], states: Mapping[TaskKey, Phase]
) -> list[TaskKey]:
    pending = [k for k in keys if states.get(k, Phase.PENDING) is Phase.PENDING]
    limit = None
    if isinstance(container, Job) and container.task_array is not None:
        limit = container.task_array.concurrency
    if limit is None:
        return pending
    active = sum(1 for k in keys if states.get(k) in (Phase.STARTING, Phase.RUNNING))
    return pending[: max(0, limit - active)]
