"""A container of one separate node reaches no service of another node, also not at the
address that node has on its own container bridge: the nodes route each other's container
subnets (host-gw), so a packet a container sends there arrives at that node from outside its
bridge, unmasqueraded. Real agents, namespaces and nftables (as root)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import threading
from pathlib import Path

from orchestrator.provision import Cluster, LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.node_network import RunNetwork, _in_netns
from substrate.client import connect
from tests.orchestrator.test_separate_nodes import output_of, run_task
from tests.substrate.registry import Registry

MiB = 2**20


def bridge_address(netns: Path) -> ipaddress.IPv4Address:
    """The node's address on its container bridge (the agent's `sqb` bridge)."""
    out = subprocess.run(
        ["ip", "-n", netns.name, "-o", "-4", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = [ln for ln in out.splitlines() if ln.split()[1].startswith("sqb")]
    return ipaddress.IPv4Interface(line.split()[3]).ip


def node_service(netns: Path) -> socket.socket:
    """A service in a node's namespace on every address it has (as a daemon of a machine
    listens), answering `node`; close the socket to stop it."""
    listener = _in_netns(netns, lambda: socket.create_server(("0.0.0.0", 0)))

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"node\n")
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    return listener


def two_nodes(tmp_path: Path, registry: Registry, run_id: str) -> tuple[LocalProvisioner, Cluster]:
    """A cluster of two separate nodes of one CPU and 256 MiB each, up; take it down."""
    provisioner = LocalProvisioner(
        tmp_path,
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
    )
    nodes = [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2
    return provisioner, provisioner.up(local_plan(run_id, nodes))


def test_a_container_reaches_no_service_of_another_node(tmp_path: Path, registry: Registry) -> None:
    provisioner, cluster = two_nodes(tmp_path, registry, "run-iso")
    netns = RunNetwork("run-iso").netns(1)
    listener = node_service(netns)
    port = listener.getsockname()[1]
    try:
        probe = f"nc -w 2 {bridge_address(netns)} {port} </dev/null 2>/dev/null; echo done"
        channel, stub = connect(
            cluster.agents[0].address, cluster.agents[0].token, cluster.agents[0].tls
        )
        _, task = run_task(stub, probe)
        output = output_of(stub, task)[1]
        channel.close()
        assert output.splitlines() == ["done"]
    finally:
        listener.close()
        provisioner.down(cluster)
