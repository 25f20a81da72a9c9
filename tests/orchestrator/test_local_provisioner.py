"""The local site: real agent processes, each owning a slice of this machine, reached over
gRPC on loopback, and gone after `down`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.provision import (
    LocalProvisioner,
    NodeSlice,
    ProvisionError,
    local_plan,
    slice_machine,
)
from orchestrator.store import RunState
from orchestrator.views import run_events
from substrate.client import connect
from tests.substrate.registry import Registry

MiB = 2**20


def test_slices_are_disjoint_and_follow_numa() -> None:
    cpus = [(0, 0), (1, 1), (2, 0), (3, 1)]  # (cpu, NUMA node), interleaved
    slices = slice_machine(cpus, 8 * 2**30, nodes=2, cores=2, memory=2**30)
    assert [s.cpus for s in slices] == [(0, 2), (1, 3)]
    with pytest.raises(ProvisionError, match="need 6 CPUs; this machine has 4"):
        slice_machine(cpus, 8 * 2**30, nodes=3, cores=2, memory=2**30)
    with pytest.raises(ProvisionError, match="bytes of memory"):
        slice_machine(cpus, 2**30, nodes=2, cores=1, memory=2**30)


def test_a_cluster_of_two_agents_each_on_its_slice(tmp_path: Path, registry: Registry) -> None:
    provisioner = LocalProvisioner(
        tmp_path, search_registries=[registry.address], insecure_registries=[registry.address]
    )
    nodes = [
        NodeSlice(cpus=(0,), memory_bytes=256 * MiB),
        NodeSlice(cpus=(1,), memory_bytes=256 * MiB),
    ]
    cluster = provisioner.up(local_plan("run-1", nodes))
    pids = [a.pid for a in cluster.agents]
    try:
        assert [a.name for a in cluster.agents] == ["node-0", "node-1"]
        assert len({a.token for a in cluster.agents}) == 2  # a token per agent
        for agent, node in zip(cluster.agents, nodes, strict=True):
            channel, stub = connect(agent.address, agent.token, agent.tls)
            inv = stub.Inventory(pb.InventoryRequest())
            assert tuple(c.id for c in inv.cpus) == node.cpus
            assert inv.memory_bytes == node.memory_bytes
            assert inv.labels["run"] == "run-1"
            lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1))
            task = stub.Run(
                pb.RunRequest(
                    lease_id=lease.id,
                    image="docker://busybox:1.36",
                    command=["/bin/sh", "-c", "cat /proc/self/status"],
                )
            )
            stub.Wait(pb.WaitRequest(task_id=task.task_id))
            status = b"".join(c.data for c in stub.Logs(pb.LogsRequest(task_id=task.task_id)))
            allowed = next(
                ln for ln in status.decode().splitlines() if ln.startswith("Cpus_allowed_list")
            )
            assert allowed.split()[-1] == str(node.cpus[0])
            channel.close()
        # the two agents share the site's image folder (root's alone): one root, one pull
        assert len(list((tmp_path / "images" / "rootfs").iterdir())) == 1
        assert (tmp_path / "images").stat().st_mode & 0o777 == 0o700
        assert not list((tmp_path / "run-1").glob("node-*/data/images"))
        token_file = tmp_path / "run-1" / "node-0" / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
    finally:
        provisioner.down(cluster)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    # the run's agent state (tokens, task state) is gone with it; the site keeps the image
    assert not (tmp_path / "run-1").exists()
    assert len(list((tmp_path / "images" / "rootfs").iterdir())) == 1
    provisioner.down(cluster)  # twice is harmless


def test_a_later_run_takes_its_image_from_the_sites_cache(make_engine) -> None:
    engine = make_engine()
    text = (
        "version: v4\njobs:\n  a:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
    )
    first, second = engine.run("me/first", text), engine.run("me/second", text)
    assert (first.state, second.state) == (RunState.FINISHED, RunState.FINISHED)
    pulls = [
        [e.message for e in run_events(engine.store, r.run_id) if e.kind == "image"]
        for r in (first, second)
    ]
    assert pulls[0][0].startswith("node-0: pulled"), pulls
    assert pulls[1][0].startswith("node-0: cached"), pulls  # checked with the registry, not pulled


def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    provisioner = LocalProvisioner(tmp_path)
    good = NodeSlice(cpus=(0,), memory_bytes=64 * MiB)
    bad = NodeSlice(cpus=(4095,), memory_bytes=64 * MiB)
    with pytest.raises(ProvisionError, match="not online"):
        provisioner.up(local_plan("run-2", [good, bad]))
    logs = list((tmp_path / "run-2").glob("*/agent.log"))
    assert len(logs) == 2
    assert not _agents_of("run-2")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _agents_of(run_id: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"substrate" in args and f"run={run_id}".encode() in args:
            pid = int(cmdline.parent.name)
            if not _zombie(pid) and pid != os.getpid():
                found.append(pid)
    return found


def test_a_killed_agent_leaves_nothing_once_its_cluster_is_taken_down(
    tmp_path: Path, registry: Registry
) -> None:
    """An agent killed outright (SIGKILL: no clean-up of its own) leaves its container
    running in a session of its own, its cgroups, root mount, network namespace, bridge and
    firewall. Taking the cluster down from another orchestrator (as recovery does) removes
    every one of them, found through the agent's data directory."""
    import hashlib
    import json
    import signal
    import subprocess

    provisioner = LocalProvisioner(
        tmp_path, search_registries=[registry.address], insecure_registries=[registry.address]
    )
    cluster = provisioner.up(local_plan("run-k", [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)]))
    [agent] = cluster.agents
    channel, stub = connect(agent.address, agent.token, agent.tls)
    lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1))
    task = stub.Run(
        pb.RunRequest(lease_id=lease.id, image="docker://busybox:1.36", command=["sleep", "300"])
    )
    channel.close()
    data = tmp_path / "run-k" / "node-0" / "data"
    node = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
    groups = [g for g in (Path("/sys/fs/cgroup/pids/squall") / node).iterdir() if g.is_dir()]
    deadline = time.monotonic() + 10
    while True:  # crun, then the container's `sleep`
        procs = {int(p) for g in groups for p in (g / "cgroup.procs").read_text().split()}
        if len(procs) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(procs) >= 2
    netns = Path(f"/run/netns/sq{task.task_id}")
    assert netns.exists()
    # as if its orchestrator had died: this one forgets it, and the agent is killed outright
    [proc] = provisioner._procs.pop("run-k")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    assert any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in procs)  # orphaned

    LocalProvisioner(tmp_path).down(cluster)  # not the provisioner that started it

    assert all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in procs)
    assert not any(g.exists() for g in groups)
    assert not netns.exists()
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True).stdout)
    assert not [link["ifname"] for link in links if node in link["ifname"]]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"squall_{node}" not in tables
    assert not Path(f"/run/squall/roots/{node}").exists()
    # nor any mount of its runtime, in whatever mount namespace (crun's died with its crun)
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            points = [line.split()[4] for line in info.read_text().splitlines()]
        except OSError:
            continue  # that process has gone
        assert not [p for p in points if p.startswith("/run/squall/") and node in p], info
    assert not (tmp_path / "run-k").exists()


def test_an_oversubscribed_local_node_leases_a_core_to_k_tasks(tmp_path: Path) -> None:
    """LocalProvisioner(oversubscribe=2) starts its agents with --oversubscribe 2: the
    inventory says so, and two one-core leases share the node's one CPU; a third is refused."""
    provisioner = LocalProvisioner(tmp_path, oversubscribe=2)
    cluster = provisioner.up(local_plan("run-o", [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)]))
    try:
        agent = cluster.agents[0]
        channel, stub = connect(agent.address, agent.token, agent.tls)
        assert stub.Inventory(pb.InventoryRequest()).oversubscribe == 2
        leases = [stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1)) for _ in "ab"]
        assert [tuple(x.cpus) for x in leases] == [(0,), (0,)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
    finally:
        provisioner.down(cluster)
