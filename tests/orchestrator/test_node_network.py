"""The run's node network (orchestrator/provision/node_network.py): when a part of it cannot be
made, the run fails with a ProvisionError that says why (the engine's error for a cluster that
cannot be brought up, not a defect's) and nothing of the network stays; the machine forwards
for its nodes. As root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.provision import ProvisionError
from orchestrator.provision.node_network import RunNetwork

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_node_that_cannot_be_made_is_a_provision_error_and_leaves_nothing() -> None:
    network = RunNetwork("run-taken")
    network.netns(1).touch()  # the name of node 1's namespace is taken
    try:
        with pytest.raises(ProvisionError, match="File exists"):
            network.make(2)
    finally:
        network.remove()
    assert not list(Path("/run/netns").glob(f"sqn{network.key}-*"))
    assert not list(Path("/sys/class/net").glob(f"*{network.key}*"))


FRESH_MACHINE = """
from pathlib import Path
from orchestrator.provision.node_network import RunNetwork
forward = Path("/proc/sys/net/ipv4/ip_forward")
forward.write_text("0")
network = RunNetwork("run-forward")
try:
    network.make(1)
    print(forward.read_text().strip())
finally:
    network.remove()
"""


def test_the_machine_forwards_what_its_nodes_send_elsewhere() -> None:
    """The nodes reach registries and the internet through this machine, which so must
    forward, also where nothing else has turned forwarding on (a fresh machine: here, a
    process in a network namespace of its own, forwarding off)."""
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", FRESH_MACHINE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
