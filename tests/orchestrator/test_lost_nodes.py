"""Nodes lost mid-run: separate local nodes (network namespaces, one CPU each) whose agent
and everything it started are killed while a task runs there, as a spot instance taken back
would be. The loss is noticed within seconds, the task goes back in line without counting
against its retries, a node is started in the lost one's place, and the run finishes; a
run that keeps losing nodes moves (tests/orchestrator/test_cloud_runs.py has the move)."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from orchestrator.cluster_io import ClusterIO
from orchestrator.engine import Engine
from orchestrator.provision import AgentEndpoint, Cluster
from orchestrator.store import Agent, Attempt, Event, Job, Run, RunState, Task, TaskState
from tests.substrate.metadata import metadata_server, noticing_agent

IMAGE = "image: {uri: docker://busybox:1.36}"

TWO_TASKS = "version: v4\n" + textwrap.dedent(f"""
    jobs:
      work:
        {IMAGE}
        command: [/bin/sh, -c, "sleep 6; echo done on $(hostname)"]
        task-array: {{start: 1, end: 2}}
        resource: {{cpu: {{cores: 1}}}}
""")


def kill_node(engine: Engine, run_id: str, name: str) -> int:
    """Kill node `name`'s agent and everything in its process group; its pid."""
    with engine.store.session() as s:
        pid = s.scalars(select(Agent.pid).where(Agent.run_id == run_id, Agent.name == name)).one()
    assert pid > 0  # never 0: that would be this test's own process group
    os.killpg(pid, signal.SIGKILL)
    return pid


def when(engine: Engine, run_id: str, ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        with engine.store.session() as s:
            if s.get_one(Run, run_id).state in (RunState.FAILED, RunState.CANCELLED):
                return
        time.sleep(0.1)


def running_on(engine: Engine, run_id: str) -> dict[str, str]:
    """Task subject -> the node of its running attempt."""
    with engine.store.session() as s:
        rows = s.execute(
            select(Task.index, Attempt.node)
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == run_id, Task.state == TaskState.RUNNING)
            .where(Attempt.state == TaskState.STARTING, Attempt.agent_task_id != "")
        ).all()
    return {f"work[{i}]": node for i, node in rows}


def test_a_killed_node_is_replaced_and_its_task_runs_again(
    cluster_of: Callable[..., Engine],
) -> None:
    engine = cluster_of(2)
    engine.lost_after = 2.0
    run_id = engine.submit("me/lose-one", TWO_TASKS)
    killed: list[tuple[int, float]] = []

    def kill_when_both_run() -> None:
        when(engine, run_id, lambda: len(running_on(engine, run_id)) == 2)
        killed.append((kill_node(engine, run_id, "node-1"), time.monotonic()))

    killer = threading.Thread(target=kill_when_both_run)
    killer.start()
    outcome = engine.execute(run_id)
    killer.join()
    assert outcome.state is RunState.FINISHED, outcome.reason
    assert killed
    with engine.store.session() as s:
        nodes = s.execute(
            select(Event.subject, Event.message, Event.at)
            .where(Event.run_id == run_id, Event.kind == "node")
            .order_by(Event.id)
        ).all()
        attempts = s.execute(
            select(Task.index, Attempt.number, Attempt.node, Attempt.state, Attempt.message)
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == run_id)
            .order_by(Task.index, Attempt.number)
        ).all()
        agent = s.scalars(select(Agent).where(Agent.run_id == run_id, Agent.name == "node-1")).one()
    # noticed within seconds, then replaced: a new agent, recorded as the run's node-1
    assert [(subject, message.split(":")[0]) for subject, message, _ in nodes] == [
        ("node-1", "lost"),
        ("node-1", "replaced"),
    ]
    assert agent.pid != killed[0][0]
    # the lost attempt is said, and the task ran again (it has no retries of its own)
    lost = [a for a in attempts if a.state is TaskState.FAILED]
    assert len(lost) == 1
    assert lost[0].node == "node-1"
    assert lost[0].message.startswith("node-1 was lost (its agent did not answer for 2s")
    finished = {a.index for a in attempts if a.state is TaskState.FINISHED}
    assert finished == {1, 2}
    # the cluster is gone: no process of the run's agents is left
    assert (
        not Path(f"/proc/{agent.pid}").exists()
        or "Z" in Path(f"/proc/{agent.pid}/stat").read_text().split()[2]
    )


def test_a_node_lost_without_replacement_moves_the_run_and_no_site_is_left(
    cluster_of: Callable[..., Engine],
) -> None:
    """On the local site alone, a run that lost its nodes has nowhere to move: it fails,
    saying so, and its cluster is taken down."""
    engine = cluster_of(2)
    engine.lost_after = 2.0
    engine.move_after = 1
    run_id = engine.submit("me/lose-all", TWO_TASKS)

    def kill_when_both_run() -> None:
        when(engine, run_id, lambda: len(running_on(engine, run_id)) == 2)
        kill_node(engine, run_id, "node-0")

    killer = threading.Thread(target=kill_when_both_run)
    killer.start()
    outcome = engine.execute(run_id)
    killer.join()
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith("it lost its nodes at local"), outcome.reason
    with engine.store.session() as s:
        messages = s.scalars(
            select(Event.message).where(Event.run_id == run_id, Event.kind == "run")
        ).all()
        assert any(m.startswith("moving off local: 1 nodes lost") for m in messages)
        assert not s.scalars(select(Agent).where(Agent.run_id == run_id)).all()


def test_the_clouds_notice_makes_a_node_lost_before_it_goes(tmp_path: Path) -> None:
    """An agent watching a (loopback) GCP metadata service says in its Health that the node
    is being preempted: the run loop's watch takes the node as lost at once, while its agent
    still answers, so its work goes back in line before the node stops."""
    token = "notice-test-token-0123456789abcdef"
    with metadata_server() as md, noticing_agent(tmp_path, f"gcp={md.url}", token) as address:
        io = ClusterIO(Cluster("r", "local", (AgentEndpoint("node-0", address, token),)))
        try:
            lost: list[tuple[int, str, float]] = []
            io.watch(0.2, 60.0, lambda n, why: lost.append((n, why, time.monotonic())))
            time.sleep(1.0)
            assert lost == []
            md.gcp_preempted = True
            told = time.monotonic()
            deadline = told + 20
            while not lost and time.monotonic() < deadline:
                time.sleep(0.1)
            [(node, why, at)] = lost
            assert node == 0
            assert why == "the cloud takes it back (gcp: the instance is being preempted)"
            assert at - told < 10  # the agent reads every 5 s; the watch asks every 0.2 s
        finally:
            io.close()
