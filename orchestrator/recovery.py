"""Runs whose orchestrator died: found, their clusters torn down, and failed with a reason.

A run belongs to the process that executes it (`host:pid` in `runs.orchestrator`), which
writes a heartbeat every few seconds. Any later orchestrator (`squall run`, `squall server`)
looks, when it starts, for runs that have not ended and whose owner is gone: on this host,
the process no longer exists; elsewhere, its heartbeat is stale. Each such run has its agents
stopped through the provisioner of its site, its ephemeral volumes released (those with an
egress still owed are kept), its unfinished tasks failed, and ends FAILED, saying why.
Results already egressed are never touched.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from .data.data_agent import DataAgent
from .data.staging import Staging
from .data.transfers import TransferError
from .engine import HEARTBEAT, identity
from .provision import AgentEndpoint, Cluster, LocalProvisioner, Provisioner, quiet
from .states import Moves, move_run
from .store import RUN_ENDED, Agent, Job, Run, RunState, Stack, StackState, Store, TaskState

__all__ = ["orphaned_runs", "recover"]

STALE = timedelta(seconds=6 * HEARTBEAT)


def _owner_alive(owner: str, heartbeat: datetime | None, now: datetime) -> bool:
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if heartbeat is None:
        return False
    return now - heartbeat < STALE


def orphaned_runs(store: Store) -> list[str]:
    """Ids of runs that have not ended and whose owner is gone."""
    now = datetime.now(UTC)
    with store.session() as s:
        rows = s.execute(
            select(Run.id, Run.orchestrator, Run.heartbeat_at, Run.created_at).where(
                Run.state.not_in(RUN_ENDED)
            )
        ).all()
    orphans = []
    for run_id, owner, heartbeat, created in rows:
        if owner:
            if not _owner_alive(owner, heartbeat, now):
                orphans.append(run_id)
        elif created < now - STALE:
            orphans.append(run_id)  # submitted, never picked up, long ago
    return orphans


def _open_stack(store: Store, run_id: str) -> bool:
    with store.session() as s:
        return (
            s.scalar(
                select(Stack.id).where(Stack.run_id == run_id, Stack.state != StackState.DESTROYED)
            )
            is not None
        )


def _bring_home(staging: Staging, run_id: str, agent: AgentEndpoint) -> str:
    """Copy the results still owed out of a cluster's own storage to this machine before the
    cluster goes (nothing to do for volumes on this machine); what to add to the reason if
    they could not be."""
    try:
        with DataAgent(agent) as data:
            staging.bring_home(run_id, lambda subject, message: None, data)
    except (TransferError, OSError) as exc:
        return f"; results still owed on the cluster could not be kept: {exc}"
    return ""


def recover(
    store: Store, providers: Sequence[Provisioner[Any]], staging: Staging
) -> list[tuple[str, str]]:
    """Tear down and fail every orphaned run; (run name, reason) of each. A run's cluster is
    taken down by the first of `providers` that serves its site."""
    recovered = []
    for run_id in orphaned_runs(store):
        with store.session() as s:
            run = s.get_one(Run, run_id)
            name, owner, was = run.name, run.orchestrator, run.state
            # a run that died while its cluster came up has its placement's site alone
            site = run.site or (run.placement or {}).get("site") or ""
            agents = tuple(
                AgentEndpoint(
                    name=a.name, address=a.address, token=a.token, pid=a.pid, tls=a.endpoint_tls
                )
                for a in s.scalars(select(Agent).where(Agent.run_id == run_id)).all()
            )
            run.orchestrator = identity()  # this process owns the clean-up now
            if run.state is not RunState.TEARDOWN:
                move_run(s, run, RunState.TEARDOWN, "recovering an orphan")
        provisioner = next((p for p in providers if p.serves(site)), None)
        # the local site finds what a run left by its id (its node network, agents' folders),
        # also when its orchestrator died before any agent was on record; a cloud's stack
        # without agents stays open in the ledger for `squall stack gc`
        kept_home = ""
        if agents and provisioner is not None:  # a cloud's storage goes with its stack
            kept_home = _bring_home(staging, run_id, agents[0])
        if provisioner is not None and (agents or isinstance(provisioner, LocalProvisioner)):
            provisioner.down(Cluster(run_id=run_id, site=site, agents=agents), quiet)
        reason = (
            f"its orchestrator ({owner or 'none'}) stopped while it was {was.value}; "
            "the cluster was torn down"
        )
        if _open_stack(store, run_id):
            reason += "; its cloud stack stays open in the ledger until `squall stack gc`"
        elif agents and provisioner is None:
            reason += f"; no provisioner for site {site!r} here: its agents may still run"
        kept = staging.release(run_id)
        if kept:
            reason += f"; volume(s) {', '.join(kept)} kept for the egress still owed"
        reason += kept_home
        died = "orchestrator died"
        with store.session() as s:
            moves = Moves(run_id)
            for job in s.scalars(select(Job).where(Job.run_id == run_id)):
                for task in job.tasks:
                    if not task.state.ended:
                        subject = f"{job.name}[{task.index}]"
                        moves.task(task.id, subject, task.state, TaskState.FAILED, died)
                        for attempt in task.attempts:
                            if not attempt.state.ended:
                                moves.attempt(
                                    task.id, attempt.number, state=TaskState.FAILED, message=died
                                )
                if not job.state.ended:
                    moves.job(job.id, job.name, job.state, TaskState.FAILED, died)
            s.expire_all()
            moves.write(s)
            move_run(s, s.get_one(Run, run_id), RunState.FAILED, reason)
        recovered.append((name, reason))
    return recovered
