"""The state machine: a move it forbids raises and changes nothing, and every state change
the engine makes (runs, jobs, tasks: retries, failures, skips, services, cancels, an orphan's
recovery) has its event, so that a run's history replays from its events to the states in
the store. Real agents, crun and SQLite."""

from __future__ import annotations

import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Mapping

import pytest
from sqlalchemy import select

from orchestrator.data.staging import Staging
from orchestrator.engine import Engine, request_cancel
from orchestrator.recovery import recover
from orchestrator.states import (
    JOB_MOVES,
    RUN_MOVES,
    TASK_MOVES,
    ForbiddenMove,
    Moves,
    move_run,
)
from orchestrator.store import Event, Job, Run, RunState, Task, TaskState

from .conftest import MakeEngine

IMAGE = "image: {uri: docker://busybox:1.36}"


def fuzzfile(body: str) -> str:
    return "version: v4\n" + textwrap.dedent(body)


def test_a_forbidden_move_raises_and_changes_nothing(engine: Engine) -> None:
    run_id = engine.submit("user/forbidden", fuzzfile(f"jobs:\n  a: {{{IMAGE}}}\n"))
    with engine.store.session() as s:
        run = s.get_one(Run, run_id)
        with pytest.raises(ForbiddenMove, match="cannot go from PENDING to FINISHED"):
            move_run(s, run, RunState.FINISHED)
        move_run(s, run, RunState.PLACING)
    with engine.store.session() as s:
        run = s.get_one(Run, run_id)
        assert run.state is RunState.PLACING
        assert run.finished_at is None
        with pytest.raises(ForbiddenMove, match="cannot go from PLACING to EGRESS"):
            move_run(s, run, RunState.EGRESS)
        [task] = s.scalars(select(Task).join(Task.job).where(Job.run_id == run_id)).all()
        moves = Moves(run_id)
        for was, to in [
            (TaskState.PENDING, TaskState.RUNNING),  # never started
            (TaskState.FINISHED, TaskState.PENDING),  # an ended task does not come back
            (TaskState.RUNNING, TaskState.SKIPPED),  # only a task that never ran is skipped
        ]:
            with pytest.raises(ForbiddenMove):
                moves.task(task.id, "a[0]", was, to)
        with pytest.raises(ForbiddenMove, match="job a cannot go from FINISHED to RUNNING"):
            moves.job(task.job_id, "a", TaskState.FINISHED, TaskState.RUNNING)
        assert not moves  # nothing was recorded
    with engine.store.session() as s:
        assert s.get_one(Run, run_id).state is RunState.PLACING
        assert [e.state for e in s.scalars(select(Event).where(Event.run_id == run_id))] == [
            "PENDING",
            "PLACING",
        ]


def _replay(
    moves: Mapping[RunState, frozenset[RunState]] | Mapping[TaskState, frozenset[TaskState]],
    path: list[str],
    start: str,
) -> str:
    """Follow `path` (state names) from `start` through the table; where it ends."""
    table = {k.value: {v.value for v in vs} for k, vs in moves.items()}
    at = start
    for to in path:
        assert to in table[at], f"{at} -> {to} is not a move (path {path})"
        at = to
    return at


def assert_history_replays(engine: Engine, run_id: str) -> None:
    """Every run, job and task of the run reaches its stored state through its events, one
    event per move, each an allowed move; every attempt began with a STARTING event."""
    with engine.store.session() as s:
        run = s.get_one(Run, run_id)
        events = s.scalars(
            select(Event).where(Event.run_id == run_id, Event.state.is_not(None)).order_by(Event.id)
        ).all()
        paths: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        for e in events:
            assert e.state is not None
            paths[(e.kind, e.subject)].append(e.state)
        run_path = paths.pop(("run", ""))
        assert run_path[0] == "PENDING"
        assert _replay(RUN_MOVES, run_path[1:], "PENDING") == run.state.value
        jobs = s.scalars(select(Job).where(Job.run_id == run_id)).all()
        for job in jobs:
            path = paths.pop(("job", job.name), [])
            assert _replay(JOB_MOVES, path, "PENDING") == job.state.value, job.name
            for task in job.tasks:
                subject = f"{job.name}[{task.index}]"
                path = paths.pop(("task", subject), [])
                assert _replay(TASK_MOVES, path, "PENDING") == task.state.value, subject
                assert path.count("STARTING") == len(task.attempts), subject
        assert not paths, f"state events of nothing in the store: {sorted(paths)}"


def test_every_state_change_of_a_run_has_its_event(make_engine: MakeEngine) -> None:
    engine = make_engine(nodes=2)
    outcome = engine.run(
        "user/history",
        fuzzfile(f"""
        services:
          web:
            {IMAGE}
            script: |
              #!/bin/sh
              mkdir -p /w && echo ok > /w/index.html && exec httpd -f -p 18080 -h /w
            network: {{ports: [{{name: http, port: 18080}}]}}
            readiness-probe: {{tcp-socket: {{port: http}}, period-seconds: 1}}
        jobs:
          flaky:
            {IMAGE}
            command: [/bin/sh, -c, "exit 3"]
            policy: {{retry: {{attempts: 1}}}}
          after-flaky:
            {IMAGE}
            command: [/bin/true]
            task-array: {{start: 1, end: 3}}
            depends-on: [{{name: flaky}}]
          count:
            {IMAGE}
            command: [/bin/sh, -c, "test $FB_TASK_ID != 4"]
            task-array: {{start: 1, end: 6, concurrency: 3}}
          client:
            {IMAGE}
            command: [wget, -q, -O, -, "http://web.svc:18080/"]
            depends-on: [{{name: web, status: RUNNING}}]
    """),
    )
    assert outcome.state is RunState.FAILED
    assert outcome.reason == "failed: after-flaky, count[4], flaky"
    assert_history_replays(engine, outcome.run_id)
    with engine.store.session() as s:
        states = dict(
            s.execute(select(Job.name, Job.state).where(Job.run_id == outcome.run_id)).all()
        )
    assert states == {
        "web": TaskState.FINISHED,  # stopped once the client was done
        "flaky": TaskState.FAILED,
        "after-flaky": TaskState.SKIPPED,
        "count": TaskState.FAILED,
        "client": TaskState.FINISHED,
    }


def test_a_cancelled_run_and_a_recovered_orphan_replay_from_their_events(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine()
    wait = fuzzfile(
        f"jobs:\n  wait:\n    {IMAGE}\n    command: [sleep, '300']\n"
        f"  next:\n    {IMAGE}\n    depends-on: [{{name: wait}}]\n"
    )
    run_id = engine.submit("user/cancelled", wait)
    worker = threading.Thread(target=engine.execute, args=(run_id,))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.store.session() as s:
            if (
                s.scalars(select(Job.state).where(Job.run_id == run_id, Job.name == "wait")).one()
                is TaskState.RUNNING
            ):
                break
        time.sleep(0.1)
    request_cancel(engine.store, "user/cancelled")
    worker.join(60)
    assert_history_replays(engine, run_id)

    orphan = engine.submit("user/orphan", wait)  # recorded, and its owner never came
    with engine.store.session() as s:
        s.get_one(Run, orphan).orchestrator = "elsewhere:1"  # a host that gives no heartbeat
    staging = Staging(engine.store, engine.data_dir, engine.secrets)
    [(name, _)] = recover(engine.store, engine.providers, staging)
    assert name == "user/orphan"
    assert_history_replays(engine, orphan)
