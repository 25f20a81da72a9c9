"""The run's node network (orchestrator/provision/node_network.py) when a part of it cannot be
made: the run fails with a ProvisionError that says why (the engine's error for a cluster that
cannot be brought up, not a defect's), and nothing of the network stays. As root."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.provision import ProvisionError
from orchestrator.provision.node_network import RunNetwork


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
