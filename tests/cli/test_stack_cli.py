"""`squall stack` and `squall doctor` as real processes. No cloud and no `pulumi` CLI can be
reached here: tests/orchestrator/fake_pulumi.py answers as the CLI through the SDK's seam (the
`fake_pulumi` fixture puts it on PATH) and keeps stacks as files in the file backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SQUALL = str(Path(sys.executable).parent / "squall")
WORKFLOW = """version: v4
jobs:
  hello:
    image: {uri: docker://busybox:1.36}
    command: [/bin/sh, -c, "echo hello"]
"""


def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SQUALL_DATA_DIR": str(tmp_path / "data"),
        "SQUALL_CATALOG": str(ROOT / "tests" / "catalog"),
        "SQUALL_ORCHESTRATOR_CIDR": "198.51.100.10/32",
        "SQUALL_ORCHESTRATOR_ADDRESS": "127.0.0.1:0",  # the join service, on a free port
        "SQUALL_IMAGE_AWS": "ami-0123456789",
        "AWS_ACCESS_KEY_ID": "testing",  # found, never used: the stack is the fake's
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FAKE_PULUMI_SLOW_UP": "120",  # `up` is still running when the orchestrator is killed
    }


def squall(e: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQUALL, *args], env=e, capture_output=True, text=True, timeout=120)


def test_gc_destroys_the_stack_of_an_orchestrator_killed_during_up(tmp_path, fake_pulumi):
    e = env(tmp_path)
    flow = tmp_path / "hello.yaml"
    flow.write_text(WORKFLOW)
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        run = subprocess.Popen(
            [SQUALL, "run", str(flow), "--name", "me/burst-1", "--site", "aws:us-east-2"],
            env=e,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    backend = tmp_path / "data" / "stacks" / "state"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stacks = fake_pulumi.stacks(backend) if backend.exists() else {}
        if any(s["resources"] for s in stacks.values()):
            break
        time.sleep(0.2)
    else:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        raise AssertionError(f"no resources were created: {log.read_text()}")
    listed = json.loads(squall(e, "stack", "list", "-o", "json").stdout)
    assert [(s["run"], s["state"]) for s in listed] == [("me/burst-1", "CREATING")]
    os.killpg(run.pid, signal.SIGKILL)  # the orchestrator and its pulumi, mid-`up`
    run.wait()

    dry = json.loads(squall(e, "stack", "gc", "--dry-run", "-o", "json").stdout)
    assert dry["stale"] == [listed[0]["stack"]]
    assert dry["destroyed"] == []
    assert any(s["resources"] for s in fake_pulumi.stacks(backend).values())

    gc = squall(e, "stack", "gc", "-o", "json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert report["destroyed"] == [listed[0]["stack"]]
    assert fake_pulumi.stacks(backend) == {}  # destroyed, then removed from the backend
    assert json.loads(squall(e, "stack", "list", "-o", "json").stdout) == []
    closed = json.loads(squall(e, "stack", "list", "--all", "-o", "json").stdout)
    assert [(s["state"], s["run_state"]) for s in closed] == [("DESTROYED", "FAILED")]
    status = json.loads(squall(e, "workflow", "status", "me/burst-1", "-o", "json").stdout)
    assert "squall stack gc" in status["reason"]


def test_stack_destroy_refuses_an_unknown_run_and_doctor_reports_the_cli(tmp_path, fake_pulumi):
    e = env(tmp_path)
    missing = squall(e, "stack", "destroy", "me/nothing")
    assert missing.returncode == 1
    assert "no stack for 'me/nothing'" in missing.stderr
    doctor = json.loads(squall(e, "doctor", "-o", "json").stdout)
    checks = {c["check"]: c for c in doctor}
    assert checks["pulumi CLI"]["ok"]
    assert "v3.272.0" in checks["pulumi CLI"]["detail"]
    assert checks["aws cluster settings"]["ok"]
    assert not checks["gcp cluster settings"]["ok"]
    assert "SQUALL_IMAGE_GCP" in checks["gcp cluster settings"]["detail"]
    no_cli = {**e, "PATH": str(tmp_path / "nowhere")}
    doctor = json.loads(squall(no_cli, "doctor", "-o", "json").stdout)
    assert not {c["check"]: c for c in doctor}["pulumi CLI"]["ok"]


def test_gc_reports_aws_resources_tagged_by_a_run_the_ledger_does_not_explain(tmp_path):
    """AWS is moto_server here (the Resource Groups Tagging API over EC2); nothing real."""
    import boto3

    from tests.orchestrator.servers import S3Server

    moto = S3Server(tmp_path)
    try:
        ec2 = boto3.client(
            "ec2",
            endpoint_url=moto.endpoint,
            region_name="us-east-2",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        leaked = "9b2e8c1d-0000-4000-8000-00000000beef"
        ec2.run_instances(
            ImageId="ami-12345678",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "squall-run", "Value": leaked}]}
            ],
        )
        e = {
            **env(tmp_path),
            "SQUALL_AWS_ENDPOINT": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        gc = squall(e, "stack", "gc", "--aws-region", "us-east-2", "-o", "json")
        assert gc.returncode == 0, gc.stderr
        report = json.loads(gc.stdout)
        [orphan] = report["orphans"]
        assert orphan["run_id"] == leaked
        assert orphan["resource"].startswith("arn:aws:ec2:us-east-2:")
        assert report["destroyed"] == []
        # reported, never deleted
        [reservation] = ec2.describe_instances()["Reservations"]
        assert reservation["Instances"][0]["State"]["Name"] == "running"
        text = squall(e, "stack", "gc", "--aws-region", "us-east-2")
        assert f"untracked aws:us-east-2 {orphan['resource']} (squall-run={leaked})" in text.stdout
    finally:
        moto.stop()
