"""The local site's separate nodes (`squall run --nodes N`): each agent in a network namespace,
hostname and CPU slice of its own, reached only at its node's address; containers of different
nodes reach each other directly but no node; and the run's bridge, namespaces, veths, routes
and firewall are gone after `down`, also when it is another orchestrator that takes the
cluster down (recovery after a crash). Real agents, namespaces and nftables (as root)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.data.staging import Staging
from orchestrator.engine import Engine
from orchestrator.provision import LocalProvisioner, NodeSlice, ProvisionError, local_plan
from orchestrator.provision.local import Machine, share_machine, this_machine
from orchestrator.provision.node_network import RunNetwork, loopback_ports, run_key
from orchestrator.recovery import recover
from orchestrator.store import Run, RunState, Store
from orchestrator.views import run_events
from substrate.client import connect
from substrate.inventory import Gpu
from tests.substrate.registry import Registry

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent.parent


def test_nodes_share_the_machine_in_disjoint_slices() -> None:
    gpus = tuple(Gpu(index=i, vendor="nvidia", model="x", memory_bytes=1) for i in range(3))
    machine = Machine(cpu_ids=(0, 2, 1, 3, 4), cores=5, memory_bytes=10 * MiB, gpus=gpus)
    two = share_machine(machine, 2)
    assert [n.cpus for n in two] == [(0, 2, 1), (3, 4)]  # NUMA order kept, sizes differ by 1
    assert [n.memory_bytes for n in two] == [5 * MiB, 5 * MiB]
    assert [n.gpus for n in two] == [(0, 2), (1,)]
    # more nodes than CPUs: they take the CPUs in turn (and so share them)
    assert [n.cpus for n in share_machine(machine, 7)] == [(0,), (2,), (1,), (3,), (4,), (0,), (2,)]


def leftovers(run_id: str) -> list[str]:
    """What of the run's node network this machine still has."""
    key = run_key(run_id)
    found = [str(p) for p in Path("/run/netns").glob(f"sqn{key}-*")]
    found += [p.name for p in Path("/sys/class/net").iterdir() if key in p.name]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [line for line in tables.splitlines() if key in line]
    return found


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_task(stub, command: str, network: int = pb.NETWORK_POD) -> tuple[str, str]:
    """`command` in a busybox container of the node: (its address, a task id)."""
    lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1))
    started = stub.Run(
        pb.RunRequest(
            lease_id=lease.id,
            image="docker://busybox:1.36",
            command=["/bin/sh", "-c", command],
            network=network,
            release_lease_at_end=True,
        )
    )
    return started.address, started.task_id


def output_of(stub, task_id: str) -> tuple[int, str]:
    status = stub.Wait(pb.WaitRequest(task_id=task_id, output_limit=65536), timeout=60)
    return status.exit_code, status.output.decode()


def test_each_node_is_a_machine_of_its_own(tmp_path: Path, registry: Registry) -> None:
    provisioner = LocalProvisioner(
        tmp_path,
        search_registries=[registry.address],  # on this machine's loopback: relayed
        insecure_registries=[registry.address],
        namespaced=True,
    )
    nodes = share_machine(this_machine(), 3)
    cluster = provisioner.up(local_plan("run-sep", nodes))
    pids = [a.pid for a in cluster.agents]
    try:
        ours = {kind: os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("net", "uts")}
        addresses = []
        for agent, node in zip(cluster.agents, nodes, strict=True):
            for kind, inode in ours.items():  # a network and a hostname of its own
                assert os.stat(f"/proc/{agent.pid}/ns/{kind}").st_ino != inode
            host, port = agent.address.rsplit(":", 1)
            address = ipaddress.IPv4Address(host)
            assert address.is_private
            assert not address.is_loopback
            addresses.append(address)
            with pytest.raises(ConnectionRefusedError):  # not on this machine's loopback
                socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
            channel, stub = connect(agent.address, agent.token, agent.tls)
            assert stub.Health(pb.HealthRequest()).hostname == agent.name
            inventory = stub.Inventory(pb.InventoryRequest())
            assert tuple(c.id for c in inventory.cpus) == node.cpus
            assert inventory.memory_bytes == node.memory_bytes
            channel.close()
        assert len(set(addresses)) == 3
        assert len({ipaddress.IPv4Interface(f"{a}/24").network for a in addresses}) == 1
        assert len({os.stat(f"/proc/{p}/ns/net").st_ino for p in pids}) == 3

        # a container of node 1 serves; one of node 0 reaches it at its address, directly
        stubs = [connect(a.address, a.token, a.tls) for a in cluster.agents]
        server_address, server = run_task(stubs[1][1], "echo pong | nc -l -p 7000")
        _, client = run_task(
            stubs[0][1],
            f"for i in $(seq 100); do nc {server_address} 7000 2>/dev/null && exit 0; "
            "sleep 0.1; done; exit 1",
        )
        assert output_of(stubs[0][1], client) == (0, "pong\n")
        assert output_of(stubs[1][1], server)[0] == 0
        # ... but no node: not another node's agent, not this machine's side of the bridge
        node1, port1 = cluster.agents[1].address.rsplit(":", 1)
        gateway = next(ipaddress.IPv4Interface(f"{node1}/24").network.hosts())
        _, probe = run_task(
            stubs[0][1],
            f"nc -w 2 {node1} {port1} </dev/null 2>/dev/null && echo agent; "
            f"nc -w 2 {gateway} 22 </dev/null 2>/dev/null && echo gateway; echo done",
        )
        assert output_of(stubs[0][1], probe) == (0, "done\n")
        # the cpus each node's containers may use are its slice
        _, status = run_task(stubs[2][1], "grep Cpus_allowed_list /proc/self/status")
        assert output_of(stubs[2][1], status)[1].split()[-1] == ",".join(map(str, nodes[2].cpus))
        for channel, _ in stubs:
            channel.close()
        assert leftovers("run-sep")  # the network is there while the cluster is
    finally:
        provisioner.down(cluster)
    assert all(_zombie_or_gone(p) for p in pids)
    assert leftovers("run-sep") == []
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert run_key("run-sep") not in routes
    assert not (tmp_path / "run-sep").exists()


def test_another_orchestrator_removes_the_nodes_of_one_that_died(
    tmp_path: Path, registry: Registry
) -> None:
    """Agents killed outright (no clean-up of their own), a container still running on a
    node: taking the cluster down from a new provisioner, as recovery does, removes the
    container, its namespace, the nodes and the run's network."""
    provisioner = LocalProvisioner(
        tmp_path,
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
    )
    nodes = [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2
    cluster = provisioner.up(local_plan("run-dead", nodes))
    channel, stub = connect(
        cluster.agents[1].address, cluster.agents[1].token, cluster.agents[1].tls
    )
    _, task = run_task(stub, "sleep 300")
    channel.close()
    task_netns = Path(f"/run/netns/sq{task}")
    assert task_netns.exists()
    for proc in provisioner._procs.pop("run-dead"):  # this orchestrator forgets them...
        proc.send_signal(signal.SIGKILL)  # ... and they die without a word
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert leftovers("run-dead")

    LocalProvisioner(tmp_path, namespaced=True).down(cluster)

    assert leftovers("run-dead") == []
    assert not task_netns.exists()
    assert not (tmp_path / "run-dead").exists()


def test_recovery_removes_the_nodes_of_a_run_whose_orchestrator_died_making_them(
    cluster_of,
) -> None:
    """The orchestrator died after the run's nodes were made, before any agent was on
    record: recovery, finding the run by its placement's site, still removes them."""
    engine = cluster_of(2)
    text = "version: v4\njobs:\n  a:\n    image: {uri: docker://busybox:1.36}\n    command: [x]\n"
    run_id = engine.submit("user/died-in-up", text)
    with engine.store.session() as s:
        run = s.get_one(Run, run_id)
        run.orchestrator = "elsewhere:1"  # a host that gives no heartbeat
        run.placement = {"site": engine.home}
    RunNetwork(run_id).make(2)
    assert leftovers(run_id)

    staging = Staging(engine.store, engine.data_dir, engine.secrets)
    [(name, _)] = recover(engine.store, engine.providers, staging)

    assert name == "user/died-in-up"
    assert leftovers(run_id) == []
    with engine.store.session() as s:
        assert s.get_one(Run, run_id).state is RunState.FAILED


def test_without_root_separate_nodes_are_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    provisioner = LocalProvisioner(tmp_path, namespaced=True)
    nodes = [NodeSlice(cpus=(0,), memory_bytes=64 * MiB)] * 2
    with pytest.raises(ProvisionError, match="needs root"):
        provisioner.up(local_plan("run-user", nodes))
    assert leftovers("run-user") == []
    assert not list((tmp_path / "run-user").glob("*/agent.log"))  # no agent was started
    with pytest.raises(ProvisionError, match="needs root"):
        RunNetwork("run-user").check()


def test_a_run_across_two_nodes_reaches_its_service_on_the_other(
    tmp_path: Path, registry: Registry
) -> None:
    """examples/service.yaml on two nodes of one CPU each: the service takes one node, so its
    client runs on the other and reaches it at its address; the orchestrator's readiness
    probe reaches it from this machine."""
    provisioner = LocalProvisioner(
        tmp_path / "site",
        nodes=lambda _: [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2,
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
    )
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    engine = Engine(store, [provisioner], data_dir=tmp_path / "data")
    text = (ROOT / "examples" / "service.yaml").read_text()
    text = text.replace("docker://busybox:1.36", f"docker://{registry.address}/busybox:1.36")
    outcome = engine.run("svc", text)
    assert outcome.state is RunState.FINISHED
    placed = {
        event.subject: event.message.rsplit(" on ", 1)[-1]
        for event in run_events(store, outcome.run_id)
        if event.kind == "task" and event.state == "STARTING"
    }
    assert set(placed) == {"web[0]", "client[0]"}
    assert placed["web[0]"] != placed["client[0]"]
    log = tmp_path / "data" / "runs" / outcome.run_id / "logs" / "client" / "0.1.log"
    assert log.read_text() == "served by web\n"
    assert leftovers(outcome.run_id) == []


def test_registries_on_this_machines_loopback_are_the_ones_relayed() -> None:
    registries = ["127.0.0.1:5000", "localhost:5001", "[::1]:5002", "127.0.0.1", "quay.io"]
    registries += ["10.0.0.5:5003", "registry.example:5004", "127.0.0.1:5000"]
    assert loopback_ports(registries) == [443, 5000, 5001, 5002]
