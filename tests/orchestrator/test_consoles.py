"""A cloud run's node consoles in the error when its nodes do not join. No AWS account can be
reached here: moto stands in for EC2 (describe_instances, get_console_output), in process."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from orchestrator.provision.consoles import CONSOLE_HINTS, consoles_of


@pytest.fixture
def ec2(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-2")


def launch(ec2, run_id: str) -> dict:
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "squall-run", "Value": run_id}]}]
    made = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=tags)
    return made["Instances"][0]


def test_the_consoles_of_the_runs_own_instances_are_read_by_hostname(ec2):
    mine = launch(ec2, "run-1")
    launch(ec2, "run-2")  # another run's node: not ours to show
    read = consoles_of("aws", "run-1", "us-east-2")
    assert read is not None
    consoles = read()
    hostname = mine["PrivateDnsName"].split(".")[0]  # what the node joins as
    assert list(consoles) == [hostname]
    assert "Linux version" in consoles[hostname]  # moto's console text, decoded


def test_a_console_that_cannot_be_read_says_so_instead_of_failing(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    read = consoles_of("aws", "run-1", "us-east-2")
    assert read is not None
    [(name, text)] = read().items()
    assert name == "consoles"
    assert text.startswith("could not be read: ")


def test_other_clouds_say_where_to_read_the_console():
    assert consoles_of("gcp", "run-1", "us-central1") is None
    assert "get-serial-port-output" in CONSOLE_HINTS["gcp"]
    assert "boot-diagnostics" in CONSOLE_HINTS["azure"]
