"""The engine end to end on the local site: real agent processes, images from a registry
served here, crun containers, and the store on SQLite."""

from __future__ import annotations

import getpass
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.errors import InvalidInput
from orchestrator.store import Attempt, Event, Job, Run, RunState, Task, TaskState

IMAGE = "image: {uri: docker://busybox:1.36}"
SHOW_TOKEN = """'echo "${#TOKEN} ${TOKEN%-value}"'"""  # length, and a part


def fuzzfile(body: str) -> str:
    return "version: v4\n" + textwrap.dedent(body)


def test_a_dag_with_a_task_array_runs_to_the_end(engine: Engine) -> None:
    outcome = engine.run(
        "user/dag",
        fuzzfile(f"""
        jobs:
          split:
            {IMAGE}
            command: [/bin/sh, -c, "echo split"]
          count:
            {IMAGE}
            script: |
              #!/bin/sh
              echo "task $FB_TASK_ID of $FB_WORKFLOW_ID"
            task-array: {{start: 1, end: 4, concurrency: 2}}
            depends-on: [{{name: split}}]
          merge:
            {IMAGE}
            command: [/bin/sh, -c, "echo merge"]
            depends-on: [{{name: count}}]
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    with engine.store.session() as s:
        states = s.execute(
            select(Job.name, Task.index, Task.state)
            .join(Task.job)
            .where(Job.run_id == outcome.run_id)
        ).all()
        assert sorted(states) == sorted(
            [("split", 0, TaskState.FINISHED), ("merge", 0, TaskState.FINISHED)]
            + [("count", i, TaskState.FINISHED) for i in range(1, 5)]
        )
        kinds = s.scalars(select(Event.message).where(Event.run_id == outcome.run_id)).all()
        assert kinds[0] == "submitted"
        assert kinds[-1] == "FINISHED"


def test_failures_retries_timeouts_and_independent_branches(engine: Engine) -> None:
    outcome = engine.run(
        "user/mixed",
        fuzzfile(f"""
        jobs:
          flaky:
            {IMAGE}
            command: [/bin/sh, -c, "exit 3"]
            policy: {{retry: {{attempts: 1}}}}
          after-flaky:
            {IMAGE}
            command: [/bin/true]
            depends-on: [{{name: flaky}}]
          slow:
            {IMAGE}
            command: [sleep, "30"]
            policy: {{timeout: {{execute: 1s}}}}
          fine:
            {IMAGE}
            command: [/bin/true]
    """),
    )
    assert outcome.state is RunState.FAILED
    assert outcome.reason == "failed: after-flaky, flaky, slow"
    with engine.store.session() as s:

        def attempts(name: str) -> list[Attempt]:
            return list(
                s.scalars(
                    select(Attempt)
                    .join(Attempt.task)
                    .join(Task.job)
                    .where(Job.run_id == outcome.run_id, Job.name == name)
                    .order_by(Attempt.number)
                )
            )

        assert [a.exit_code for a in attempts("flaky")] == [3, 3]  # tried twice
        assert attempts("after-flaky") == []
        [slow] = attempts("slow")
        assert "timeout" in slow.message
        assert attempts("fine")[0].state is TaskState.FINISHED
        skipped = s.scalars(
            select(Job).where(Job.run_id == outcome.run_id, Job.name == "after-flaky")
        ).one()
        assert skipped.state is TaskState.SKIPPED
        assert skipped.reason == "dependency 'flaky' failed"


def test_bad_input_is_refused_before_anything_starts(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"secrets that are not set: secret://user/TOKEN"):
        engine.run(
            "user/secret",
            fuzzfile(f"""
            jobs:
              use: {{{IMAGE}, command: [/bin/true], env: [TOKEN=secret://user/TOKEN]}}
        """),
        )
    assert not (tmp_path / "site").exists()  # no cluster was started
    with engine.store.session() as s:
        assert s.scalars(select(Job)).all() == []  # and nothing was recorded


def test_a_secret_reaches_the_container_and_no_record(engine: Engine, tmp_path: Path) -> None:
    engine.secrets.put("secret://user/TOKEN", getpass.getuser(), b"s3cr3t-value")
    outcome = engine.run(
        "user/secret",
        fuzzfile(f"""
        jobs:
          use:
            {IMAGE}
            command: [/bin/sh, -c, {SHOW_TOKEN}]
            env: [TOKEN=secret://user/TOKEN]
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = engine.data_dir / "runs" / outcome.run_id / "logs" / "use" / "0.1.log"
    assert log.read_text() == "12 s3cr3t\n"
    for agent_log in (tmp_path / "site").glob("*/*/agent.log"):
        assert "s3cr3t-value" not in agent_log.read_text()
    with engine.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        assert "s3cr3t-value" not in run.fuzzfile
        messages = s.scalars(select(Event.message).where(Event.run_id == run.id)).all()
        assert not any("s3cr3t" in m for m in messages)


def test_a_persistent_volume_outlives_its_run(engine: Engine) -> None:
    body = f"""
        volumes:
          keep: {{name: counter}}
        jobs:
          bump:
            {IMAGE}
            command: [/bin/sh, -c, 'echo x >> /keep/marks; wc -l < /keep/marks']
            mounts: {{/keep: {{volume: keep}}}}
    """
    first = engine.run("user/keep-1", fuzzfile(body))
    second = engine.run("user/keep-2", fuzzfile(body))
    assert (first.state, second.state) == (RunState.FINISHED, RunState.FINISHED)
    log = engine.data_dir / "runs" / second.run_id / "logs" / "bump" / "0.1.log"
    assert log.read_text().strip() == "2"
    assert (engine.data_dir / "volumes" / "user" / "counter" / "marks").read_text() == "x\nx\n"


def test_a_job_no_node_can_hold_fails_with_the_reason_and_the_rest_runs(engine: Engine) -> None:
    outcome = engine.run(
        "user/too-big",
        fuzzfile(f"""
        jobs:
          huge:
            {IMAGE}
            command: [/bin/true]
            resource: {{cpu: {{cores: 64}}}}
          fine:
            {IMAGE}
            command: [/bin/true]
    """),
    )
    assert outcome.state is RunState.FAILED
    assert outcome.reason == "failed: huge"
    with engine.store.session() as s:
        jobs = {j.name: j for j in s.scalars(select(Job).where(Job.run_id == outcome.run_id))}
        assert jobs["huge"].state is TaskState.FAILED
        assert jobs["huge"].reason.startswith("cannot be placed: ")
        assert jobs["fine"].state is TaskState.FINISHED


def test_a_job_too_large_for_every_node_fails_at_once_and_one_short_of_room_waits(
    engine: Engine,
) -> None:
    outcome = engine.run(
        "user/at-once",
        fuzzfile(f"""
        jobs:
          slow:
            {IMAGE}
            command: [sleep, "2"]
            resource: {{cpu: {{cores: 1}}, exclusive: true}}
          waits:
            {IMAGE}
            command: [/bin/true]
          huge:
            {IMAGE}
            command: [/bin/true]
            resource: {{cpu: {{cores: 64}}}}
    """),
    )
    assert outcome.reason == "failed: huge"
    with engine.store.session() as s:
        events = s.scalars(
            select(Event).where(Event.run_id == outcome.run_id).order_by(Event.id)
        ).all()
        said = [(e.subject, e.message) for e in events]
        jobs = {j.name: j for j in s.scalars(select(Job).where(Job.run_id == outcome.run_id))}
    assert jobs["waits"].state is TaskState.FINISHED
    huge = said.index(("huge", "cannot be placed: asked for 64 cores; this node has 2"))
    slow = said.index(("slow[0]", "attempt 1: exited (exit 0)"))
    waits = said.index(("waits[0]", "attempt 1: exited (exit 0)"))
    assert huge < slow  # at once, not when the node fell idle
    assert slow < waits  # no room while `slow` held the node: it waited, and ran
