"""The share of a local cluster whose nodes are separate (node_share.py): node 0 serves the
run's volume folder over the run's network, every node mounts it with a client in its own
network namespace, the server takes those node addresses alone, and taking the cluster down,
even by another orchestrator after a crash, unmounts and stops everything and leaves the
files as plain files. Real agents, namespaces and GlusterFS (as root)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
from pathlib import Path

from orchestrator.data.staging import volume_roots
from orchestrator.provision import LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.node_network import RunNetwork
from orchestrator.provision.node_share import NodeShare
from substrate import AGENT_PORT

MiB = 2**20
RUN = "run-share"


def mounts_beneath(folder: Path) -> dict[Path, tuple[str, str]]:
    """This machine's mounts beneath `folder`: mount point -> (file system type, source)."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        point = Path(fields.split()[4])
        if point.is_relative_to(folder):
            kind, source = tail.split()[:2]
            found[point] = (kind, source)
    return found


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def pid_in(pid_file: Path) -> int:
    return int(pid_file.read_text().split()[0])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("gluster")
    except FileNotFoundError:
        return False


def test_separate_nodes_mount_one_share_that_node_0_serves_to_node_addresses_alone(
    tmp_path: Path,
) -> None:
    def provisioner() -> LocalProvisioner:
        return LocalProvisioner(
            tmp_path / "site",
            namespaced=True,
            volume_roots=functools.partial(volume_roots, tmp_path / "data"),
        )

    nodes = [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2
    first = provisioner()
    cluster = first.up(local_plan(RUN, nodes, storage="node-share"))
    share = tmp_path / "site" / RUN / "share"
    export, _ = volume_roots(tmp_path / "data", RUN)
    network = RunNetwork(RUN)
    address = [a.address.rsplit(":", 1)[0] for a in cluster.agents]
    pids = {}
    try:
        # each node has the volume folder on a FUSE mount of the share node 0 serves
        assert mounts_beneath(share) == {
            share / f"node-{i}": ("fuse.glusterfs", f"{address[0]}:/squall") for i in (0, 1)
        }
        pids = {
            "glusterd": pid_in(share / "glusterd" / "glusterd.pid"),
            **{f"client-{i}": pid_in(share / "glusterd" / f"client-{i}.pid") for i in (0, 1)},
        }
        [brick_pid] = (share / "glusterd" / "vols" / "squall").glob("*.pid")
        pids["brick"] = pid_in(brick_pid)
        args = Path(f"/proc/{pids['brick']}/cmdline").read_bytes().split(b"\0")
        brick_socket = Path(args[args.index(b"-S") + 1].decode())
        assert brick_socket.exists()
        # its servers run on node 0, and each client on its own node
        assert netns_of(pids["glusterd"]) == os.stat(network.netns(0)).st_ino
        assert netns_of(pids["brick"]) == os.stat(network.netns(0)).st_ino
        for i in (0, 1):
            assert netns_of(pids[f"client-{i}"]) == os.stat(network.netns(i)).st_ino

        # what is written through node 1's client is on node 0's disk and in its mount
        (share / "node-1" / "made-on-1.txt").write_bytes(b"from node 1\n")
        assert (share / "node-0" / "made-on-1.txt").read_bytes() == b"from node 1\n"
        assert (export / "made-on-1.txt").read_bytes() == b"from node 1\n"

        # the server's clients are the nodes, at their own addresses
        status = subprocess.run(
            [
                "gluster",
                f"--glusterd-sock={NodeShare(share, export).socket}",
                "--mode=script",
                "volume",
                "status",
                "squall",
                "clients",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        clients = {
            word.rsplit(":", 1)[0]
            for line in status.splitlines()
            for word in line.split()[:1]
            if word.count(".") == 3 and ":" in word
        }
        assert clients == set(address), status

        # this machine reaches node 0 over the run's bridge (its agent answers there), but
        # neither glusterd nor the brick: only the nodes may ask for the volume or join
        brick_port = int(args[args.index(b"--brick-port") + 1])
        for port in (AGENT_PORT, 24007, brick_port):
            try:
                socket.create_connection((address[0], port), timeout=2).close()
                reached = True
            except OSError:
                reached = False
            assert reached == (port == AGENT_PORT), port
    finally:
        # as if the orchestrator had died: its agents are killed outright, and another
        # orchestrator takes the cluster down, finding the share from the run's folder
        for proc in first._procs.pop(RUN):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        provisioner().down(cluster)

    assert not mounts_beneath(tmp_path)
    assert pids
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert not share.exists()
    assert not brick_socket.exists()
    # the files stay, plain, where the egress retry and the release look for them
    assert (export / "made-on-1.txt").read_bytes() == b"from node 1\n"
    assert not (export / ".glusterfs").exists()
