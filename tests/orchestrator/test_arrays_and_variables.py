"""Runs on the local site (real agents, crun, the session's registry, SQLite): variables in
command and args, legacy secret placeholders in env, and task arrays whose tasks fail."""

from __future__ import annotations

import getpass
import textwrap

import pytest
from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.errors import InvalidInput
from orchestrator.runloop import log_path
from orchestrator.scheduler import TaskKey
from orchestrator.store import Attempt, Event, Job, Run, RunState, Task, TaskState

IMAGE = "image: {uri: docker://busybox:1.36}"


def fuzzfile(body: str) -> str:
    return "version: v4\n" + textwrap.dedent(body)


def output(engine: Engine, run_id: str, job: str, index: int = 0, attempt: int = 1) -> str:
    return log_path(engine.data_dir, run_id, TaskKey(job, index), attempt).read_text()


def test_command_and_args_expand_the_job_env_and_fb_variables(engine: Engine) -> None:
    """No shell in these commands: what reaches the program is what Squall expanded."""
    outcome = engine.run(
        "user/variables",
        fuzzfile(f"""
        jobs:
          echo:
            {IMAGE}
            command: [/bin/echo, "${{GREETING}},", "task-$FB_TASK_ID", "$$GREETING", "$UNSET",
                      "$FB_WORKFLOW_ID"]
            env: ["GREETING=hello world"]
            task-array: {{start: 1, end: 2}}
          sleep:  # the seed examples' own form
            {IMAGE}
            command: ["/bin/sleep", "$FB_TASK_ID"]
            task-array: {{start: 0, end: 1}}
          script-args:
            {IMAGE}
            script: |
              #!/bin/sh
              printf '%s|' "$@"
            args: ["$KIND", "$$KIND", "${{KIND}}s"]
            env: [KIND=args]
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    run_id = outcome.run_id
    for i in (1, 2):
        said = output(engine, run_id, "echo", i)
        assert said == f"hello world, task-{i} $GREETING $UNSET {run_id}\n"
    assert output(engine, run_id, "script-args") == "args|$KIND|argss|"


# each value, the argument, and a part of each value (whole values are masked in the log)
SHOW = """'echo "$TOKEN|$LEGACY|$1|${TOKEN%-value}|${LEGACY%-value}"'"""


def test_env_secrets_in_both_forms_reach_the_container_and_never_its_command_line(
    engine: Engine, tmp_path
) -> None:
    engine.secrets.put("secret://user/TOKEN", getpass.getuser(), b"t0ken-value")
    engine.secrets.put("secret://user/LEGACY", getpass.getuser(), b"l3gacy-value")
    outcome = engine.run(
        "user/legacy-env",
        fuzzfile(f"""
        jobs:
          use:
            {IMAGE}
            command: [/bin/sh, -c, {SHOW}, sh, "$TOKEN"]
            env: [TOKEN=secret://user/TOKEN, 'LEGACY=Bearer ${{{{ secret "LEGACY" }}}}']
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    # the shell read both from its environment; the argument stayed `$TOKEN` as written
    said = output(engine, outcome.run_id, "use")
    assert said == "***|Bearer ***|$TOKEN|t0ken|Bearer l3gacy\n"
    with engine.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        assert "l3gacy-value" not in run.fuzzfile
        messages = s.scalars(select(Event.message).where(Event.run_id == run.id)).all()
        assert not any("l3gacy" in m or "t0ken" in m for m in messages)
    for agent_log in (tmp_path / "site").glob("*/*/agent.log"):
        assert "l3gacy-value" not in agent_log.read_text()


def test_a_missing_legacy_env_secret_is_refused_at_submit(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match=r"secrets that are not set: secret://user/NOPE"):
        engine.submit(
            "user/missing-legacy",
            fuzzfile(f"""
            jobs:
              use: {{{IMAGE}, command: [/bin/true], env: ['X=${{{{ secret "NOPE" }}}}']}}
        """),
        )
    with engine.store.session() as s:
        assert s.scalars(select(Run)).all() == []


def test_every_task_of_an_array_runs_and_the_failed_ones_are_named(engine: Engine) -> None:
    """One at a time, so that tasks 3 to 5 start after task 2 has failed."""
    outcome = engine.run(
        "user/some-fail",
        fuzzfile(f"""
        jobs:
          some-fail:
            {IMAGE}
            command: [/bin/sh, -c, 'echo ran $FB_TASK_ID; case $FB_TASK_ID in 2|4) exit 1;; esac']
            task-array: {{start: 1, end: 5, concurrency: 1}}
          after:
            {IMAGE}
            command: [/bin/true]
            depends-on: [{{name: some-fail}}]
    """),
    )
    assert outcome.state is RunState.FAILED
    assert outcome.reason == "failed: after, some-fail[2, 4]"
    with engine.store.session() as s:
        job = s.scalars(
            select(Job).where(Job.run_id == outcome.run_id, Job.name == "some-fail")
        ).one()
        assert job.state is TaskState.FAILED
        assert job.reason == "tasks 2, 4 failed (exit 1)"
        tasks = {t.index: t.state for t in job.tasks}
        assert tasks == {
            1: TaskState.FINISHED,
            2: TaskState.FAILED,
            3: TaskState.FINISHED,
            4: TaskState.FAILED,
            5: TaskState.FINISHED,
        }
        started = s.scalars(
            select(Task.index).join(Attempt.task).where(Task.job_id == job.id)
        ).all()
        assert sorted(started) == [1, 2, 3, 4, 5]
        after = s.scalars(select(Job).where(Job.run_id == outcome.run_id, Job.name == "after"))
        assert after.one().reason == "dependency 'some-fail' failed"
    for i in range(1, 6):
        assert output(engine, outcome.run_id, "some-fail", i) == f"ran {i}\n"
