"""Multi-node jobs for real, across separate local nodes (network namespaces, hostnames and CPU
slices of their own): a gang starts only when all its nodes are leased and holds none while it
waits; its first member reaches the others through the agents' launcher (no sshd anywhere);
a member that ends first fails the job; cancel ends every member; nothing is left."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import select

from orchestrator.engine import Engine, RunOutcome, request_cancel
from orchestrator.store import Attempt, Job, RunState, Task, TaskState
from orchestrator.views import run_events
from tests.orchestrator.test_separate_nodes import leftovers

MiB = 2**20


def gang(
    name: str, nodes: int, script: str, implementation: str = "generic", extra: str = ""
) -> str:
    body = "\n".join("      " + line for line in script.strip().splitlines())
    return (
        f"  {name}:\n"
        "    image: {uri: docker://busybox:1.36}\n"
        f"    multinode: {{nodes: {nodes}, implementation: {implementation}}}\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 64MiB}}\n"
        f"{extra}"
        "    script: |\n"
        "      #!/bin/sh\n"
        f"{body}\n"
    )


def log_of(engine: Engine, outcome: RunOutcome, job: str) -> str:
    path = engine.data_dir / "runs" / outcome.run_id / "logs" / job / "0.1.log"
    return path.read_text()


def attempts(engine: Engine, run_id: str, job: str) -> list[Attempt]:
    with engine.store.session() as s:
        return list(
            s.scalars(
                select(Attempt)
                .join(Attempt.task)
                .join(Task.job)
                .where(Job.run_id == run_id, Job.name == job)
                .order_by(Attempt.number)
            ).all()
        )


def run_in_thread(
    engine: Engine, name: str, text: str
) -> tuple[str, list[RunOutcome], threading.Thread]:
    run_id = engine.submit(name, text)
    result: list[RunOutcome] = []
    worker = threading.Thread(target=lambda: result.append(engine.execute(run_id)))
    worker.start()
    return run_id, result, worker


def wait_running(engine: Engine, run_id: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with engine.store.session() as s:
            state = s.scalars(select(Task.state).join(Task.job).where(Job.run_id == run_id)).one()
        if state is TaskState.RUNNING:
            return
        assert not state.ended, f"the multi-node job ended ({state.value}) before it ran"
        time.sleep(0.1)
    raise AssertionError("the multi-node job did not start")


def test_a_generic_gang_reaches_every_node_through_the_launcher(
    cluster_of: Callable[[int], Engine],
) -> None:
    engine = cluster_of(3)
    script = """
echo "hosts=$MULTINODE_HOSTLIST nohosts=$MULTINODE_HOSTLIST_NOSLOTS total=$MULTINODE_TOTAL_SLOTS"
echo "me=$MULTINODE_NODE_IP ssh=$MULTINODE_SSH_WRAPPER"
for h in $(echo $MULTINODE_HOSTLIST_NOSLOTS | tr , ' '); do
  $MULTINODE_RSH_WRAPPER $h \\
    'echo $(hostname) $(ip -4 -o addr show eth0 | awk "{print \\$4}") \\
      $(tr "\\0" " " </proc/1/cmdline)'
done
"""
    outcome = engine.run("gang", "version: v4\njobs:\n" + gang("mpi", 3, script))
    assert outcome.state is RunState.FINISHED, outcome.reason
    lines = log_of(engine, outcome, "mpi").splitlines()
    assert lines[0] == ("hosts=mpi-0:1,mpi-1:1,mpi-2:1 nohosts=mpi-0,mpi-1,mpi-2 total=3")
    me = lines[1].split()[0].removeprefix("me=")
    assert lines[1].split()[1] == "ssh=/.squall/launch/squall-launch"
    members = [line.split(maxsplit=2) for line in lines[2:]]
    assert [m[0] for m in members] == ["mpi-0", "mpi-1", "mpi-2"]  # every node took part
    addresses = [m[1].split("/")[0] for m in members]
    assert addresses[0] == me
    assert len(set(addresses)) == 3
    assert len({a.rsplit(".", 1)[0] for a in addresses}) == 3  # a pod subnet per node
    assert all("sshd" not in m[2] for m in members)  # the members idle; no sshd
    [attempt] = attempts(engine, outcome.run_id, "mpi")
    assert attempt.node == "node-0, node-1, node-2"
    assert leftovers(outcome.run_id) == []


def test_a_member_that_ends_first_fails_the_job_and_stops_the_rest(
    cluster_of: Callable[[int], Engine],
) -> None:
    engine = cluster_of(2)
    script = "$MULTINODE_RSH_WRAPPER mpi-1 kill 1\nsleep 120"
    started = time.monotonic()
    outcome = engine.run("lost", "version: v4\njobs:\n" + gang("mpi", 2, script))
    assert time.monotonic() - started < 60  # the first member did not sleep its 120 s
    assert outcome.state is RunState.FAILED
    [attempt] = attempts(engine, outcome.run_id, "mpi")
    assert attempt.state is TaskState.FAILED
    assert attempt.message.startswith("mpi-1 ended before the job's command: exited (exit 0)")
    assert leftovers(outcome.run_id) == []


def test_the_first_members_exit_is_the_jobs_and_retries_take_the_whole_gang(
    cluster_of: Callable[[int], Engine],
) -> None:
    engine = cluster_of(2)
    outcome = engine.run(
        "fails",
        "version: v4\njobs:\n"
        + gang("mpi", 2, "echo attempt; exit 3", extra="    policy: {retry: {attempts: 1}}\n"),
    )
    assert outcome.state is RunState.FAILED
    tries = attempts(engine, outcome.run_id, "mpi")
    assert [(a.state, a.exit_code) for a in tries] == [(TaskState.FAILED, 3)] * 2
    assert all(a.node == "node-0, node-1" for a in tries)


def test_gangs_wait_for_all_their_nodes_and_hold_none_meanwhile(
    cluster_of: Callable[[int], Engine],
) -> None:
    """Two gangs of two on three nodes of one core: one runs, the other holds no node
    (a plain job gets the third node meanwhile), then runs; no deadlock."""
    engine = cluster_of(3)
    text = (
        "version: v4\njobs:\n"
        + gang("a", 2, "sleep 2")
        + gang("b", 2, "sleep 2")
        + "  single:\n    image: {uri: docker://busybox:1.36}\n    command: [sleep, '1']\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 64MiB}}\n"
    )
    outcome = engine.run("two", text)
    assert outcome.state is RunState.FINISHED, outcome.reason
    spans = {}
    for name in ("a", "b", "single"):
        [attempt] = attempts(engine, outcome.run_id, name)
        spans[name] = (attempt.started_at, attempt.finished_at)
    first, second = sorted((spans["a"], spans["b"]))
    # the second waited for the first's nodes (its 2 s), holding none: the plain job ran
    assert (second[0] - first[0]).total_seconds() >= 1.5
    assert spans["single"][0] < second[0]


def test_a_gang_larger_than_the_cluster_fails_saying_how_to_run_it(
    cluster_of: Callable[[int], Engine],
) -> None:
    engine = cluster_of(2)
    outcome = engine.run("big", "version: v4\njobs:\n" + gang("mpi", 3, "true"))
    assert outcome.state is RunState.FAILED
    reasons = [e.message for e in run_events(engine.store, outcome.run_id) if e.kind == "job"]
    assert any("it needs 3 nodes and this cluster has 2" in r and "--nodes" in r for r in reasons)


def test_cancel_ends_every_member(cluster_of: Callable[[int], Engine]) -> None:
    engine = cluster_of(3)
    text = "version: v4\njobs:\n" + gang("mpi", 3, "sleep 300")
    run_id, result, worker = run_in_thread(engine, "user/cancel-gang", text)
    wait_running(engine, run_id)
    request_cancel(engine.store, "user/cancel-gang")
    worker.join(60)
    [outcome] = result
    assert outcome.state is RunState.CANCELLED
    [attempt] = attempts(engine, run_id, "mpi")
    assert attempt.state is TaskState.CANCELLED
    assert leftovers(run_id) == []
