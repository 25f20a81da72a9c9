"""Agents move the data, on the local site's separate nodes (real agents in network namespaces
of their own, as root): ingress from an HTTPS server and an S3 server and egress to S3 are
carried out by a node of the run's cluster, not by the orchestrator, and jobs of one DAG on
different nodes share one volume; an orchestrator killed mid-egress loses no result, and
`squall workflow egress` finishes it.

The HTTPS and S3 servers stand on a machine of their own (a network namespace joined to this
one by a veth pair, routed, as a data server on the site's network would be): the run's nodes
reach it from their own addresses (`routed_networks`: not masqueraded as this machine), so
the servers' access logs say which machine fetched and stored."""

from __future__ import annotations

import functools
import getpass
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.store import Agent, Attempt, Event, Job, Run, RunState, Store, Task
from tests.orchestrator.servers import FileServer, S3Server
from tests.substrate.registry import Registry

MiB = 2**20
SQUALL = str(Path(sys.executable).parent / "squall")
IMAGE = "image: {uri: docker://busybox:1.36}"


@dataclass(frozen=True)
class Elsewhere:
    """A machine of its own on this one's network: a namespace at `address`, this machine
    at `gateway`, the link between them on `network`."""

    netns: Path
    address: str
    gateway: str
    network: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def elsewhere() -> Iterator[Elsewhere]:
    tag = os.getpid() % 10000
    name, host_end, its_end = f"sqx{tag}", f"sqxh{tag}", f"sqxo{tag}"
    net = f"10.199.{tag % 250}"
    ip("netns", "add", name)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", its_end)
        ip("link", "set", its_end, "netns", name)
        ip("addr", "add", f"{net}.1/24", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("-n", name, "addr", "add", f"{net}.2/24", "dev", its_end)
        ip("-n", name, "link", "set", its_end, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "route", "add", "default", "via", f"{net}.1")
        yield Elsewhere(Path("/run/netns") / name, f"{net}.2", f"{net}.1", f"{net}.0/24")
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def web(tmp_path: Path, elsewhere: Elsewhere) -> Iterator[FileServer]:
    server = FileServer(
        tmp_path,
        {"book.txt": b"call me ishmael\n" * 1000},
        host=elsewhere.address,
        netns=elsewhere.netns,
    )
    yield server
    server.stop()


@pytest.fixture
def s3(tmp_path: Path, elsewhere: Elsewhere) -> Iterator[S3Server]:
    server = S3Server(tmp_path, host=elsewhere.address, netns=elsewhere.netns)
    for bucket in ("inputs", "results"):
        server.client().create_bucket(Bucket=bucket)
    server.client().put_object(Bucket="inputs", Key="table.csv", Body=b"a,b\n1,2\n")
    yield server
    server.stop()


def test_nodes_fetch_and_store_the_data_and_jobs_on_two_nodes_share_the_volume(
    tmp_path: Path, registry: Registry, elsewhere: Elsewhere, web: FileServer, s3: S3Server
) -> None:
    provisioner = LocalProvisioner(
        tmp_path / "site",
        nodes=lambda _: [NodeSlice(cpus=(0,), memory_bytes=256 * MiB)] * 2,
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
        volume_roots=functools.partial(volume_roots, tmp_path / "data"),
        routed_networks=[elsewhere.network],
    )
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    engine = Engine(store, [provisioner], data_dir=tmp_path / "data", ca_file=web.ca_file)
    engine.secrets.put("secret://user/S3", getpass.getuser(), json.dumps(s3.credentials).encode())
    setup_done = s3.log_size()  # the test's own calls (from this machine) end here
    # `left` and `right` wait for each other, so they run at once: on different nodes (one
    # core each); `join` reads what both wrote
    meet = "for i in $(seq 300); do [ -e /data/{0}.host ] && break; sleep 0.1; done"
    # and each says what its /data is: the mount's file system type and source
    mounted = "grep -F ' /data ' /proc/self/mountinfo | sed 's/.* - //' > /data/{0}.mount"
    text = "version: v4\n" + textwrap.dedent(f"""
        volumes:
          data:
            ingress:
              - source: {{uri: "{web.url}/book.txt"}}
                destination: {{uri: file://in/book.txt}}
              - source: {{uri: s3://inputs/table.csv, secret: secret://user/S3}}
                destination: {{uri: file://in/table.csv}}
            egress:
              - source: {{uri: file://result.txt}}
                destination: {{uri: s3://results/result.txt, secret: secret://user/S3}}
        jobs:
          left:
            {IMAGE}
            command: [/bin/sh, -c, "hostname > /data/left.host; {mounted.format("left")};
                                    {meet.format("right")}"]
            mounts: {{/data: {{volume: data}}}}
            resource: {{cpu: {{cores: 1}}}}
          right:
            {IMAGE}
            command: [/bin/sh, -c, "hostname > /data/right.host; {mounted.format("right")};
                                     {meet.format("left")}"]
            mounts: {{/data: {{volume: data}}}}
            resource: {{cpu: {{cores: 1}}}}
          join:
            {IMAGE}
            requires: [left, right]
            command:
              - /bin/sh
              - -c
              - "cat /data/left.host /data/right.host /data/in/table.csv > /data/result.txt;
                 wc -l < /data/in/book.txt >> /data/result.txt;
                 cat /data/left.mount /data/right.mount >> /data/result.txt"
            mounts: {{/data: {{volume: data}}}}
    """)
    outcome = engine.run("user/data", text)
    with store.session() as s:
        messages = s.scalars(select(Event.message).where(Event.run_id == outcome.run_id)).all()
        nodes = {a.address.rsplit(":", 1)[0] for a in s.scalars(select(Agent)).all()}
        ran_on = dict(
            s.execute(
                select(Job.name, Attempt.node)
                .join(Task, Task.job_id == Job.id)
                .join(Attempt, Attempt.task_id == Task.id)
                .where(Job.run_id == outcome.run_id)
            ).all()
        )
    assert outcome.state is RunState.FINISHED, (outcome.reason, messages)
    assert ran_on["left"] != ran_on["right"], ran_on
    stored = s3.clients(since=setup_done)  # before the test reads the result from here
    result = s3.client().get_object(Bucket="results", Key="result.txt")["Body"].read()
    left, right, *table, lines, left_mount, right_mount = result.decode().splitlines()
    assert (left, right) == ("left", "right")  # each job's hostname, written on its node
    assert table == ["a,b", "1,2"]
    assert lines.strip() == "1000"
    # on both nodes the volume was the share one of the nodes serves over the run's network
    # (node_share.py), not a folder of this machine's disk
    kinds = {line.split()[0] for line in (left_mount, right_mount)}
    sources = {line.split()[1] for line in (left_mount, right_mount)}
    assert kinds == {"fuse.glusterfs"}, (left_mount, right_mount)
    assert len(sources) == 1, sources
    server, _, volume = sources.pop().partition(":")
    assert volume == "/squall"
    # every byte went between a node and the servers: they saw node addresses only, never
    # this machine's (where the orchestrator runs)
    assert len(nodes) == 2
    assert server in nodes
    assert web.clients
    assert set(web.clients) <= nodes, web.clients
    assert stored
    assert set(stored) <= nodes, stored
    assert elsewhere.gateway not in set(web.clients) | set(stored)


def wait_for(what: str, check, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_orchestrator_killed_mid_egress_keeps_the_data_and_workflow_egress_finishes_it(
    tmp_path: Path, registry: Registry, s3: S3Server
) -> None:
    env = {
        **os.environ,
        "SQUALL_DATA_DIR": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SQUALL_SEARCH_REGISTRIES": registry.address,
        "SQUALL_INSECURE_REGISTRIES": registry.address,
    }
    env.pop("SQUALL_CONTEXT", None)

    def squall(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SQUALL, *args], env=env, capture_output=True, text=True, input=stdin, timeout=300
        )

    secret = squall("secret", "set", "secret://user/S3", stdin=json.dumps(s3.credentials))
    assert secret.returncode == 0, secret.stderr
    big = 256 * MiB
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "version: v4\n"
        + textwrap.dedent(f"""
        volumes:
          out:
            egress:
              - source: {{uri: file://big.bin}}
                destination: {{uri: s3://results/big.bin, secret: secret://user/S3}}
        jobs:
          make:
            {IMAGE}
            command: [/bin/sh, -c, "head -c {big} /dev/urandom > /out/big.bin"]
            mounts: {{/out: {{volume: out}}}}
    """)
    )
    run = subprocess.Popen(
        [SQUALL, "run", "--nodes", "2", "-o", "json", str(flow), "--name", "user/big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def state() -> str:  # read from the run's store directly: quick enough to catch EGRESS
        db = tmp_path / "data" / "squall.db"
        if not db.exists():
            return ""
        with Store(f"sqlite:///{db}").session() as s:
            state = s.scalar(select(Run.state).where(Run.name == "user/big"))
        return state.value if state is not None else ""

    try:
        wait_for("the egress to start", lambda: state() == "EGRESS")
        time.sleep(0.2)  # the node is pushing the file now
    finally:
        run.send_signal(signal.SIGKILL)  # no chance to clean up
        run.wait()
    retried = None
    try:
        assert not any(
            o["Key"] == "big.bin"
            for o in s3.client().list_objects_v2(Bucket="results").get("Contents", [])
        ), "the egress finished before the orchestrator was killed: nothing was tested"
        retried = squall("workflow", "egress", "user/big")
    finally:
        if retried is None:  # end the dead run all the same: its nodes' network goes
            squall("workflow", "egress", "user/big", "--release")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "recovered user/big" in retried.stderr
    head = s3.client().head_object(Bucket="results", Key="big.bin")
    assert head["ContentLength"] == big
    final = json.loads(squall("workflow", "status", "user/big", "-o", "json").stdout)
    assert final["state"] == "FAILED"
    assert "stopped while it was EGRESS" in final["reason"]
