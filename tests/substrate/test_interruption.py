"""The cloud's notice that a spot or preemptible node is being taken back, read from a
metadata service served on loopback (tests/substrate/metadata.py), and carried by a real
agent's Health reply."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect
from substrate.interruption import InterruptionWatch, read_notice
from tests.substrate.metadata import metadata_server, noticing_agent

TOKEN = "interruption-test-token-0123456789"


def test_each_clouds_notice_is_read_and_none_until_it_is_given() -> None:
    with metadata_server() as md:
        assert [read_notice(c, md.url) for c in ("aws", "gcp", "azure")] == ["", "", ""]
        md.aws_action = {"action": "terminate", "time": "2026-12-05T06:00:00Z"}
        md.gcp_preempted = True
        md.azure_events = [  # a neighbour's preemption is not this VM's
            {"EventType": "Freeze", "NotBefore": "", "Resources": ["squall-node-3"]},
            {"EventType": "Preempt", "NotBefore": "soon", "Resources": ["squall-node-1"]},
        ]
        assert read_notice("azure", md.url) == ""
        md.azure_events.append(
            {
                "EventType": "Preempt",
                "NotBefore": "Sat, 05 Dec 2026 06:00:30 GMT",
                "Resources": ["squall-node-3"],
            }
        )
        assert read_notice("aws", md.url) == (
            "aws: spot instance-action terminate at 2026-12-05T06:00:00Z"
        )
        assert read_notice("gcp", md.url) == "gcp: the instance is being preempted"
        assert read_notice("azure", md.url) == (
            "azure: Preempt scheduled for Sat, 05 Dec 2026 06:00:30 GMT"
        )
    with pytest.raises(ValueError, match="one of aws, gcp, azure"):
        InterruptionWatch("ovh")


def test_an_agent_says_the_notice_in_its_health(tmp_path: Path) -> None:
    with metadata_server() as md, noticing_agent(tmp_path, f"aws={md.url}", TOKEN) as address:
        channel, stub = connect(address, TOKEN)
        assert stub.Health(pb.HealthRequest()).interruption == ""
        md.aws_action = {"action": "stop", "time": "2026-12-05T06:02:00Z"}
        deadline = time.monotonic() + 20  # the agent looks every 5 s
        while not (notice := stub.Health(pb.HealthRequest()).interruption):
            assert time.monotonic() < deadline, "the notice never reached Health"
            time.sleep(0.2)
        assert notice == "aws: spot instance-action stop at 2026-12-05T06:02:00Z"
        channel.close()


def test_an_unknown_cloud_is_refused_at_start(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "substrate", "--data-dir", str(tmp_path / "agent")),
            *("--token-file", str(token_file), "--weak-runtimes", "--no-pod-network"),
            *("--interruption-notices", "ovh"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--interruption-notices: no interruption notices for 'ovh'" in done.stderr
