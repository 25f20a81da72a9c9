"""The host network (NETWORK_HOST): a multi-node job's containers on their node's own network,
as on clouds whose nodes do not route each other's pod subnets. Such a container has the
node's address, reaches the other nodes' services there, and is kept from every agent's port;
an agent not told to give it refuses. Real agents, namespaces, crun and nftables (as root)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.provision import LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.node_network import RunNetwork
from substrate.client import connect
from tests.orchestrator.test_separate_nodes import output_of, run_task
from tests.orchestrator.test_separate_nodes_isolation import node_service, two_nodes
from tests.substrate.registry import Registry

MiB = 2**20


def reach(host: str, port: int) -> str:
    """A shell line that prints HOST:PORT open or closed (a connection within 2 s or not)."""
    return f"echo | nc -w 2 {host} {port} >/dev/null 2>&1 && echo {port} open || echo {port} closed"


def test_a_host_network_container_is_on_its_node_and_kept_from_the_agents(
    tmp_path: Path, registry: Registry
) -> None:
    provisioner, cluster = two_nodes(tmp_path, registry, "run-hostnet")
    node0, node1 = (a.address.rsplit(":", 1) for a in cluster.agents)
    listener = node_service(RunNetwork("run-hostnet").netns(1))  # as an MPI daemon listens
    port = listener.getsockname()[1]
    try:
        channel, stub = connect(
            cluster.agents[0].address, cluster.agents[0].token, cluster.agents[0].tls
        )
        probe = "; ".join(
            [
                "ip -4 -o addr show | grep -v ' lo ' | awk '{print $4}'",
                reach(node1[0], port),
                reach(node1[0], int(node1[1])),  # another node's agent
                reach(node0[0], int(node0[1])),  # its own node's agent
            ]
        )
        address, task = run_task(stub, probe, pb.NETWORK_HOST)
        code, output = output_of(stub, task)
        # nor does a port-forward into the task reach the agent (it would, as root)
        _, sleeper = run_task(stub, "sleep 30", pb.NETWORK_HOST)

        def forward():
            start = pb.PortForwardStart(task_id=sleeper, port=int(node0[1]))
            yield pb.PortForwardInput(start=start)

        with pytest.raises(grpc.RpcError) as refused:
            list(stub.PortForward(forward()))
        assert "is the agent's" in (refused.value.details() or "")
        channel.close()
        assert address == node0[0]
        lines = output.splitlines()
        assert code == 0, output
        # the node's interfaces (its address, its pod bridge), not a pod's
        assert node0[0] in {line.split("/")[0] for line in lines[:-3]}
        assert lines[-3:] == [f"{port} open", f"{node1[1]} closed", f"{node0[1]} closed"]
    finally:
        listener.close()
        provisioner.down(cluster)


def test_an_agent_not_told_to_give_the_host_network_refuses_it(tmp_path: Path) -> None:
    provisioner = LocalProvisioner(tmp_path)  # agents on this machine's own network
    cluster = provisioner.up(local_plan("run-nohost", [NodeSlice(cpus=(0,), memory_bytes=0)]))
    try:
        channel, stub = connect(
            cluster.agents[0].address, cluster.agents[0].token, cluster.agents[0].tls
        )
        with pytest.raises(grpc.RpcError) as refused:
            run_task(stub, "true", pb.NETWORK_HOST)
        channel.close()
        assert "gives no host network" in (refused.value.details() or "")
    finally:
        provisioner.down(cluster)
