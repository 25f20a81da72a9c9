"""The gang launcher for real (substrate/launcher.py): a container's `squall-launch HOST CMD`
runs CMD in the container of the member named HOST, through the agents, with that member's
exec grant and never the agent token; what the launcher is handed by the container is never
followed out of its folder. One agent stands in for the nodes here (the members are its
tasks, reached at its address); tests/orchestrator/test_gangs.py runs gangs across nodes."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from api.substrate.v1 import agent_pb2_grpc as rpc
from substrate.launcher import GRANT_HEADER, LAUNCHER
from tests.substrate.conftest import Running, code_of

IMAGE = "docker://busybox:1.36"
IDLE = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


def head_and_worker(agent: Running, script: str) -> tuple[str, str]:
    """A worker `w-1` idling, then a head `h-0` running `script` with the worker as its
    peer: (head task, worker task)."""
    grant = secrets.token_urlsafe(16)
    worker = agent.run(
        IDLE, lease=agent.lease(), image=IMAGE, runtime="crun", name="w-1", exec_grant=grant
    )
    peer = pb.Peer(hostname="w-1", agent=agent.address, task_id=worker, grant=grant)
    head = agent.run(
        ["/bin/sh", "-c", script],
        lease=agent.lease(),
        image=IMAGE,
        runtime="crun",
        name="h-0",
        launcher=True,
        peers=[peer],
    )
    return head, worker


def finish(agent: Running, task: str) -> tuple[int, str]:
    status = agent.stub.Wait(pb.WaitRequest(task_id=task, timeout_seconds=60, output_limit=65536))
    assert status.state == pb.TASK_STATE_EXITED, status.message
    return status.exit_code, status.output.decode()


def test_the_head_runs_commands_in_its_peers_and_in_itself(agent: Running) -> None:
    script = (
        f"{LAUNCHER} w-1 hostname; "
        f"{LAUNCHER} -x w-1 'echo to-stderr >&2; exit 3'; echo exit=$?; "
        f"{LAUNCHER} h-0 hostname; "
        f"{LAUNCHER} w-1 'echo one;' echo '$(hostname)'; "
        f"{LAUNCHER} nowhere true; echo exit=$?; "
        "echo node-ip=$MULTINODE_NODE_IP; ls /.squall/launch"
    )
    head, worker = head_and_worker(agent, script)
    code, output = finish(agent, head)
    assert code == 0
    lines = output.splitlines()
    assert lines[0] == "w-1"  # the worker's container answered
    assert lines[1:3] == ["to-stderr", "exit=3"]  # its stderr and exit status came back
    assert lines[3] == "h-0"  # its own hostname: run here
    # as with ssh: the words are joined and run by the shell there
    assert lines[4:6] == ["one", "w-1"]
    assert lines[6].startswith("squall-launch: no host 'nowhere' in this job")
    assert lines[7] == "exit=255"
    ip = agent.stub.Status(pb.StatusRequest(task_id=head)).address
    assert lines[8] == f"node-ip={ip}"
    assert lines[9:] == ["requests", "squall-launch"]  # the requests' folders are cleared
    agent.stub.Cancel(pb.CancelRequest(task_id=worker, grace_seconds=1))


def test_a_grant_opens_exec_into_its_own_task_alone(agent: Running) -> None:
    grant = secrets.token_urlsafe(16)
    mine = agent.run(IDLE, lease=agent.lease(), image=IMAGE, runtime="crun", exec_grant=grant)
    other = agent.run(IDLE, lease=agent.lease(), image=IMAGE, runtime="crun")
    channel = grpc.insecure_channel(agent.address)  # no agent token
    stub = rpc.AgentStub(channel)

    def exec_in(task: str, with_grant: str) -> list[pb.ExecOutput]:
        def requests():
            yield pb.ExecInput(start=pb.ExecStart(task_id=task, command=["hostname"]))
            yield pb.ExecInput(close_stdin=True)

        return list(stub.Exec(requests(), metadata=[(GRANT_HEADER, with_grant)], timeout=30))

    try:
        deadline = time.monotonic() + 10
        while True:  # the container starts
            try:
                outputs = exec_in(mine, grant)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert outputs[-1].exit_code == 0
        assert code_of(lambda: exec_in(other, grant)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: exec_in(mine, "wrong")) == grpc.StatusCode.UNAUTHENTICATED
        # the grant opens Exec alone: no other call
        lease = pb.AcquireLeaseRequest(holder="x", cores=1)
        assert code_of(lambda: stub.AcquireLease(lease, metadata=[(GRANT_HEADER, grant)])) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        channel.close()
        for task in (mine, other):
            agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


@pytest.mark.parametrize("trap", ["out", "argv", "dir"])
def test_links_in_the_launch_folder_are_not_followed(
    agent: Running, tmp_path: Path, trap: str
) -> None:
    """The container makes its request's FIFO, argv or whole folder a link to a file of
    this machine: the agent refuses the request and the file is untouched."""
    target = tmp_path / "host-file"
    target.write_text("precious\n")
    os.chmod(tmp_path, 0o755)
    make = {
        "out": f'printf "w-1\\0hostname\\0" > $d/argv; mkfifo $d/err; ln -s {target} $d/out',
        "argv": f"ln -s {target} $d/argv; mkfifo $d/out $d/err",
        "dir": f"rmdir $d; ln -s {tmp_path} $d",
    }[trap]
    script = (
        "d=/.squall/launch/run.trap; mkdir $d; "
        f"{make}; echo run.trap > /.squall/launch/requests; sleep 2; "
        "ls /.squall/launch/run.trap/ 2>&1; echo done"
    )
    head, worker = head_and_worker(agent, script)
    code, output = finish(agent, head)
    assert code == 0
    assert output.rstrip().endswith("done")
    assert "status" not in output.split()  # the agent answered nothing
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent", "host-file"]
    agent.stub.Cancel(pb.CancelRequest(task_id=worker, grace_seconds=1))
