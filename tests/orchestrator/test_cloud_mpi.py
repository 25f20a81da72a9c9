"""A multi-node job on a cloud placement, end to end except for the cloud itself (as in
test_cloud_runs.py: federation forced onto aws:us-east-2 from the test catalog, the Pulumi CLI
replaced by tests/orchestrator/fake_pulumi.py, which no cloud can be reached to check). The
"nodes" the stack reports are separate local nodes (network namespaces with their own
addresses and hostnames) standing in for the stack's VMs.

What it shows: the gang lands on the node group federation priced for its job (another job's
node is never used by it, nor the gang's by that job), its containers run on their nodes' own
network (a cloud routes no pod subnets between nodes: MULTINODE_NODE_IP is the node's address
and Open MPI is pinned to the nodes' addresses), and mpirun's daemons start through the same
launcher. Everything after the stack (gRPC, crun, mpirun, the store) is real."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.spec import Network
from orchestrator.engine import Engine
from orchestrator.provision import Cluster, LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.node_network import NODE_POOL
from orchestrator.store import Run, RunState, StackState

# the engine on the forced cloud placement, over this module's `nodes`
from tests.orchestrator.test_cloud_runs import (  # noqa: F401
    cluster_storage,
    engine,
    same_credentials,
    stack_of,
)
from tests.orchestrator.test_gangs import attempts, log_of
from tests.orchestrator.test_mpi import ranks
from tests.substrate.registry import Registry

MiB = 2**20
NODES = 4  # the ring's group (3 nodes), then the group of the job `first` (1)


@pytest.fixture
def nodes(tmp_path: Path, registry: Registry, fake_pulumi, monkeypatch) -> Iterator[Cluster]:
    """Separate local nodes standing in for the stack's VMs, in the order the stack lists
    its node groups' nodes. Their agents' token is the one the boot script would carry."""
    same_credentials(monkeypatch)
    # the stand-ins' addresses are the run's network: the orchestrator dials what they report
    # (use_internal_ips) only inside it
    monkeypatch.setattr(
        "orchestrator.provision.cloud.Network", functools.partial(Network, cidr=NODE_POOL)
    )
    site = LocalProvisioner(
        tmp_path / "nodes",
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
        volume_roots=lambda _: [cluster_storage(tmp_path)],
    )
    cpus = os.cpu_count() or 1
    slices = [NodeSlice(cpus=(i % cpus,), memory_bytes=512 * MiB) for i in range(NODES)]
    cluster = site.up(local_plan("standins", slices))
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps([a.address for a in cluster.agents]))
    monkeypatch.setenv("FAKE_PULUMI_AGENTS", str(agents))
    yield cluster
    site.down(cluster)


def test_an_mpi_job_on_a_cloud_runs_on_its_node_group_over_the_nodes_network(
    engine: Engine,  # noqa: F811 - test_cloud_runs' fixture
    nodes: Cluster,
    mpi: str,
    fake_pulumi,
) -> None:
    # every rank writes its node's address into one volume; `first`, on a fourth node,
    # reads them all: the cluster's storage is one volume for every rank and every node
    text = (
        "version: v4\nvolumes:\n  shared: {}\njobs:\n"
        "  ring:\n"
        f"    image: {{uri: {mpi}}}\n"
        "    command: [sh, -c, 'echo node-ip=$MULTINODE_NODE_IP;"
        " echo $MULTINODE_NODE_IP > /shared/rank-$OMPI_COMM_WORLD_RANK; exec ring']\n"
        "    multinode: {nodes: 3, implementation: openmpi}\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 256MiB}}\n"
        "    mounts: {/shared: {volume: shared}}\n"
        "  first:\n"
        f"    image: {{uri: {mpi}}}\n"
        "    requires: [ring]\n"
        "    command: [sh, -c, 'echo first; cat /shared/rank-*']\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 256MiB}}\n"
        "    mounts: {/shared: {volume: shared}}\n"
    )
    outcome = engine.run("me/cloud-mpi", text)
    assert outcome.state is RunState.FINISHED, outcome.reason
    with engine.store.session() as s:
        groups = s.get_one(Run, outcome.run_id).placement["cluster"]["groups"]
    # the stack had a group per job, sized as federation priced it
    assert [(g["job"], g["count"]) for g in groups] == [("ring", 3), ("first", 1)]
    stack = stack_of(engine, outcome.run_id)
    assert stack.state is StackState.DESTROYED
    hosts = [a.address.rsplit(":", 1)[0] for a in nodes.agents]
    log = log_of(engine, outcome, "ring")
    assert "ring ok" in log, log
    # on the node's own network: the head's address is its node's (the first of the group)
    assert f"node-ip={hosts[0]}" in log
    assert len(set(ranks(log).values())) == 3  # every node of the group took part
    [ring] = attempts(engine, outcome.run_id, "ring")
    [first] = attempts(engine, outcome.run_id, "first")
    assert ring.node == "node-0, node-1, node-2"  # the ring's group, in the stack's order
    assert first.node == "node-3"  # the other group's node, never one of the ring's
    written = log_of(engine, outcome, "first").split()[1:]
    assert sorted(written) == sorted(hosts[:3]), written
