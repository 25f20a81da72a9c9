"""The engine on a cloud placement, end to end except for the cloud itself.

No cloud and no `pulumi` CLI can be reached here, so: federation is forced onto aws:us-east-2
from the test catalog; the Automation API drives tests/orchestrator/fake_pulumi.py through the
SDK's CLI seam; and the "nodes" that stack reports are real local agents started by the test
(the fake reads their addresses from $FAKE_PULUMI_AGENTS and joins the run as each of them, at
this orchestrator's real join service, with the token the spec carries). The run's CA, which
signs what the nodes serve with, is fixed to the test agents' own by patching `RunAuthority`
and `make_run_pki` (`same_credentials`); the agents were started before the run, so they keep
the certificate they were given and the one their join returns is thrown away.
Everything else (the join service, gRPC to the agents, crun containers, the store) is real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.engine import Engine, request_cancel
from orchestrator.fuzzfile import Workflow, load_text
from orchestrator.placing import Placer
from orchestrator.provision import Cluster, LocalProvisioner, NodeSlice, local_plan
from orchestrator.provision.cloud import CloudProvisioner, CloudSettings, _dial
from orchestrator.provision.pki import RunAuthority, RunPKI
from orchestrator.provision.registrar import Joined
from orchestrator.provision.stacks import StackDriver, StackSettings
from orchestrator.store import Agent, Event, Run, RunState, Stack, StackState, Store
from tests.orchestrator.servers import S3Server
from tests.substrate.registry import Registry

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
TOKEN = "test-agents-token-0123456789abcdef"
IMAGE = "image: {uri: docker://busybox:1.36}"
SITE = "aws:us-east-2"


def cluster_storage(tmp_path: Path) -> Path:
    """The stand-in nodes share this machine's disk: this folder stands for the cluster's
    shared file system (the stack's EFS), which the boot script mounts on every node."""
    return tmp_path / "cluster-storage"


SHARE = "share.example.internal:/squall-volumes"  # the sites file's, for aws:us-east-2


def persistent_share(tmp_path: Path) -> Path:
    """This folder stands for the team's NFS share of persistent volumes (`SHARE`), which
    the boot script mounts on every node of a run that uses one; it outlives the stacks."""
    return tmp_path / "persistent-share"


def same_credentials(monkeypatch: pytest.MonkeyPatch) -> RunPKI:
    """The stand-in agents and the cloud run get one token and one run CA: the token the
    stack's boot data carries, and the CA that signs the nodes' certificates, are those the
    stand-ins were started with."""
    monkeypatch.setattr("secrets.token_urlsafe", lambda n=32: TOKEN)
    monkeypatch.setenv("FAKE_PULUMI_TOKEN", TOKEN)  # what the stand-ins' boot data would say
    authority = RunAuthority("standins")
    node_certificate, node_key = authority.node_pair()
    pki = RunPKI(authority.ca, node_certificate, node_key, authority.orchestrator)
    monkeypatch.setattr("orchestrator.provision.local.make_run_pki", lambda _: pki)
    monkeypatch.setattr("orchestrator.provision.cloud.RunAuthority", lambda _: authority)
    return pki


@pytest.fixture
def nodes(tmp_path: Path, registry: Registry, fake_pulumi, monkeypatch) -> Iterator[Cluster]:
    """Two real agents standing in for the two cloud nodes the stack will report."""
    same_credentials(monkeypatch)
    site = LocalProvisioner(
        tmp_path / "nodes",
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        volume_roots=lambda _: [cluster_storage(tmp_path), persistent_share(tmp_path)],
    )
    cluster = site.up(local_plan("nodes", [NodeSlice(cpus=(0, 1), memory_bytes=2**30)] * 2))
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps([a.address for a in cluster.agents]))
    monkeypatch.setenv("FAKE_PULUMI_AGENTS", str(agents))
    yield cluster
    site.down(cluster)


@pytest.fixture
def engine(tmp_path: Path, nodes: Cluster, monkeypatch) -> Engine:
    # credentials the check before a cloud run finds; the fake stack never uses them
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")

    def never(_: Workflow) -> list[NodeSlice]:
        raise AssertionError("a cloud run asked for local nodes")

    return Engine(
        store,
        [
            LocalProvisioner(tmp_path / "site", nodes=never),
            CloudProvisioner(
                StackDriver(store, StackSettings(tmp_path / "stacks")),
                CloudSettings(
                    orchestrator_cidr="127.0.0.1/32",
                    orchestrator_address="127.0.0.1:0",  # the join service: any free port
                    # the stand-ins join from this machine's loopback (the fake joins for
                    # them): dial the addresses they report, as an orchestrator inside the
                    # cloud's network does
                    use_internal_ips=True,
                    images={"aws": "ami-0123456789"},
                    volume_root=str(cluster_storage(tmp_path)),
                    persistent_root=str(persistent_share(tmp_path)),
                ),
            ),
        ],
        data_dir=tmp_path / "data",
        placer=Placer(catalog_dir=CATALOG, force_site=SITE).decide,
    )


def clouds_of(engine: Engine) -> CloudProvisioner:
    [clouds] = [p for p in engine.providers if isinstance(p, CloudProvisioner)]
    return clouds


def two_jobs(second: str) -> str:
    return "version: v4\n" + textwrap.dedent(f"""
        jobs:
          first:
            {IMAGE}
            command: [/bin/sh, -c, "echo first"]
          second:
            {IMAGE}
            command: [/bin/sh, -c, "{second}"]
    """)


def stack_of(engine: Engine, run_id: str) -> Stack:
    with engine.store.session() as s:
        row = s.scalars(select(Stack).where(Stack.run_id == run_id)).one()
        s.expunge(row)
        return row


def events(engine: Engine, run_id: str, kind: str) -> list[str]:
    with engine.store.session() as s:
        return list(
            s.scalars(select(Event.message).where(Event.run_id == run_id, Event.kind == kind))
        )


def test_a_cloud_run_brings_its_stack_up_runs_on_its_agents_and_destroys_it(engine, fake_pulumi):
    outcome = engine.run("me/cloud-ok", two_jobs("echo second"))
    assert outcome.state is RunState.FINISHED, outcome.reason
    stack = stack_of(engine, outcome.run_id)
    assert stack.name == f"squall-{outcome.run_id}"
    assert (stack.state, stack.site) == (StackState.DESTROYED, SITE)
    verbs = fake_pulumi.verbs()
    assert verbs.index("up") < verbs.index("destroy") < verbs.index("stack rm")
    with engine.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        assert run.site == SITE
        cluster = run.placement["cluster"]
        assert cluster["stack"] == stack.name
        assert sum(g["count"] for g in cluster["groups"]) == 2
    progress = events(engine, outcome.run_id, "provision")
    assert any("created" in line for line in progress)  # `up`'s output, streamed
    assert any("destroyed" in line for line in progress)


def test_the_nodes_join_for_their_certificate_and_no_key_is_in_the_stack(
    engine, fake_pulumi, nodes
):
    outcome = engine.run("me/cloud-tls", two_jobs("echo second"))
    assert outcome.state is RunState.FINISHED, outcome.reason
    [config] = [c for c in fake_pulumi.calls() if c[:2] == ["config", "set-all"]]
    spec = json.loads(config[config.index("--plaintext") + 1].partition("=")[2])
    boot = spec["bootstrap"]
    # the nodes are told where to join and whose certificate the join service shows; no
    # node certificate or key is made before they boot
    host, _, port = boot["orchestrator"].rpartition(":")
    assert (host, port != "0") == ("127.0.0.1", True)  # the port the service got
    assert "BEGIN CERTIFICATE" in boot["ca_certificate"]
    assert not {"node_certificate", "node_key", "tls_ca"} & set(boot)
    assert "PRIVATE KEY" not in fake_pulumi.log.read_text()
    assert TOKEN not in fake_pulumi.log.read_text()  # only in the program's secret scripts
    assert any(
        "2 of 2 nodes joined" in line for line in events(engine, outcome.run_id, "provision")
    )
    # the run's agents, where they joined from, opened only to the run's CA
    with engine.store.session() as s:
        agents = s.scalars(select(Agent).where(Agent.run_id == outcome.run_id)).all()
        assert sorted(a.address for a in agents) == sorted(a.address for a in nodes.agents)
        assert sorted(a.name for a in agents) == ["first-0", "second-0"]
        assert all(a.tls_ca == nodes.agents[0].tls.ca.decode() for a in agents)


def test_a_failed_job_still_destroys_the_stack(engine):
    outcome = engine.run("me/cloud-fail", two_jobs("exit 3"))
    assert outcome.state is RunState.FAILED
    assert stack_of(engine, outcome.run_id).state is StackState.DESTROYED


def test_a_cancelled_run_destroys_the_stack(engine):
    run_id = engine.submit("me/cloud-cancel", two_jobs("sleep 300"))

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.store.session() as s:
                if s.get_one(Run, run_id).state is RunState.RUNNING:
                    break
            time.sleep(0.1)
        request_cancel(engine.store, "me/cloud-cancel")

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    outcome = engine.execute(run_id)
    canceller.join()
    assert outcome.state is RunState.CANCELLED, outcome.reason
    assert stack_of(engine, run_id).state is StackState.DESTROYED


def test_a_cloud_run_that_reaches_its_budget_is_stopped_and_its_stack_destroyed(engine):
    """The running cost is the placement's prices times the hours the stack was held: the
    budget is eight seconds of the two nodes, the second job would sleep five minutes."""
    text = two_jobs("sleep 300")
    comparison = Placer(catalog_dir=CATALOG, force_site=SITE).compare(
        load_text(text).unwrap(), "me/cloud-capped"
    )
    assert comparison.rates is not None
    hourly = comparison.rates.usd_per_hour
    assert hourly == pytest.approx(sum(p.usd_per_hour * p.nodes for p in comparison.chosen.jobs))
    budget = hourly * 8 / 3600
    started = time.monotonic()
    outcome = engine.run("me/cloud-capped", text, budget_usd=budget)
    assert time.monotonic() - started < 120
    assert outcome.state is RunState.CANCELLED
    assert outcome.reason.startswith("budget reached: $"), outcome.reason
    assert stack_of(engine, outcome.run_id).state is StackState.DESTROYED
    with engine.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        held = (run.held_until - run.held_from).total_seconds()
        assert run.cost_usd == pytest.approx(hourly * held / 3600, rel=1e-6)
        assert run.cost_usd >= budget


def _kill_agent(engine: Engine, run_id: str, name: str, but: set[int]) -> int | None:
    """Kill the run's agent `name` (its whole process group) unless its pid is in `but`."""
    with engine.store.session() as s:
        pid = s.scalars(select(Agent.pid).where(Agent.run_id == run_id, Agent.name == name)).first()
    if not pid or pid in but:  # never 0: that would be this test's own process group
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return pid


def test_a_lost_cloud_node_is_noticed_and_with_nowhere_to_move_the_stack_goes(engine, nodes):
    """A stand-in node of the stack dies mid-run (a spot instance taken back): noticed in
    seconds; a cloud cluster's node is not replaced in place, the job that only it could
    run cannot go on, and the run, forced onto this one region, has nowhere to move."""
    engine.lost_after = 2.0
    run_id = engine.submit("me/cloud-lost", two_jobs("sleep 60"))

    def kill_when_running() -> None:
        """Kill the stand-in that joined as second-0 (by its address), once a task runs."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(m.endswith("running") for m in events(engine, run_id, "task")):
                with engine.store.session() as s:
                    address = s.scalars(
                        select(Agent.address).where(
                            Agent.run_id == run_id, Agent.name == "second-0"
                        )
                    ).one()
                [pid] = [a.pid for a in nodes.agents if a.address == address]
                assert pid > 0
                os.killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    started = time.monotonic()
    outcome = engine.execute(run_id)
    killer.join()
    assert time.monotonic() - started < 60  # not the job's minute
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith(f"it lost its nodes at {SITE}, and then:"), outcome.reason
    assert "this run lost its nodes there" in outcome.reason
    lost = events(engine, run_id, "node")
    assert lost[0].startswith("lost: its agent did not answer for 2s")
    assert lost[1].startswith("not replaced: a cloud cluster's lost node is not replaced")
    assert stack_of(engine, run_id).state is StackState.DESTROYED


def test_a_run_that_keeps_losing_its_local_nodes_moves_to_the_cloud(
    tmp_path: Path, registry: Registry, nodes: Cluster, fake_pulumi, monkeypatch
):
    """Two separate local nodes (network namespaces); node-1 is killed, replaced, and killed
    again: the run moves off this machine to the next-cheapest site its policy allows (the
    cloud region of the stand-in nodes), starts its jobs over there and finishes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "allowed-sites: [local]\nallowed-clouds: [aws]\nallowed-regions: [us-east-2]\n"
    )
    cpus = os.cpu_count() or 1
    here = LocalProvisioner(
        tmp_path / "site",
        nodes=lambda _: [NodeSlice(cpus=(i % cpus,), memory_bytes=256 * 2**20) for i in (0, 1)],
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        namespaced=True,
        volume_roots=lambda _: [tmp_path / "volumes", tmp_path / "kept"],
    )
    clouds = CloudProvisioner(
        StackDriver(store, StackSettings(tmp_path / "stacks")),
        CloudSettings(
            orchestrator_cidr="127.0.0.1/32",
            orchestrator_address="127.0.0.1:0",
            use_internal_ips=True,
            images={"aws": "ami-0123456789"},
            volume_root=str(cluster_storage(tmp_path)),
            persistent_root=str(persistent_share(tmp_path)),
        ),
    )
    engine = Engine(
        store,
        [here, clouds],
        data_dir=tmp_path / "data",
        placer=Placer(catalog_dir=CATALOG, policy_file=policy).decide,
        lost_after=2.0,
        move_after=2,
    )
    run_id = engine.submit("me/moves", two_jobs("sleep 12; echo second"))
    killed: set[int] = set()

    def kill_node_1_twice() -> None:
        deadline = time.monotonic() + 120
        while len(killed) < 2 and time.monotonic() < deadline:
            with engine.store.session() as s:
                run = s.get_one(Run, run_id)
                here_now = run.state is RunState.RUNNING and run.site == "local"
            if here_now:
                pid = _kill_agent(engine, run_id, "node-1", killed)
                if pid:
                    killed.add(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_node_1_twice)
    killer.start()
    outcome = engine.execute(run_id)
    killer.join()
    assert outcome.state is RunState.FINISHED, outcome.reason
    assert len(killed) == 2
    with store.session() as s:
        run = s.get_one(Run, run_id)
        assert run.site == SITE
        moved = s.scalars(
            select(Event.message).where(Event.run_id == run_id, Event.kind == "run")
        ).all()
    assert any(m.startswith("moving off local: 2 nodes lost") for m in moved)
    assert any(m.startswith("every job starts over") for m in moved)
    # node-1 lost, replaced, and its replacement lost (before or after it first answered)
    said = [m.split(":")[0] for m in events(engine, run_id, "node")]
    assert said[0] == "lost"
    assert said.count("lost") == 2
    assert stack_of(engine, run_id).state is StackState.DESTROYED
    for pid in killed:
        assert not Path(f"/proc/{pid}").exists()


def test_nodes_that_never_join_fail_the_run_naming_the_groups_and_the_stack_goes(
    engine, monkeypatch
):
    monkeypatch.delenv("FAKE_PULUMI_AGENTS")  # the stack's nodes never boot
    clouds = clouds_of(engine)
    clouds.settings = dataclasses.replace(clouds.settings, join_timeout_s=2)
    outcome = engine.run("me/cloud-nojoin", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert "nodes did not join run" in outcome.reason
    assert "first: 0 of 1" in outcome.reason
    assert "second: 0 of 1" in outcome.reason
    assert stack_of(engine, outcome.run_id).state is StackState.DESTROYED


def test_a_run_cancelled_while_its_nodes_boot_stops_waiting_and_the_stack_goes(engine, monkeypatch):
    monkeypatch.delenv("FAKE_PULUMI_AGENTS")  # the nodes take their time: they never join
    clouds = clouds_of(engine)
    clouds.cancelled = engine.cancel_requested  # as local_site wires it
    run_id = engine.submit("me/cloud-cancel-boot", two_jobs("echo second"))

    def cancel_when_provisioning() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("stack squall-" in m for m in events(engine, run_id, "provision")):
                break
            time.sleep(0.1)
        request_cancel(engine.store, "me/cloud-cancel-boot")

    canceller = threading.Thread(target=cancel_when_provisioning)
    canceller.start()
    started = time.monotonic()
    outcome = engine.execute(run_id)
    canceller.join()
    assert time.monotonic() - started < 60  # not the 900 s join deadline
    assert (outcome.state, outcome.reason) == (RunState.CANCELLED, "cancelled by request")
    assert stack_of(engine, run_id).state is StackState.DESTROYED


def test_a_failed_up_fails_the_run_with_the_reason_and_leaves_nothing(engine, monkeypatch):
    monkeypatch.setenv("FAKE_PULUMI_FAIL", "up")
    outcome = engine.run("me/cloud-noroom", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert "InsufficientInstanceCapacity" in outcome.reason
    assert stack_of(engine, outcome.run_id).state is StackState.DESTROYED


def test_without_the_cli_a_cloud_placement_fails_at_once_in_one_line(engine, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    outcome = engine.run("me/cloud-nocli", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert "pulumi CLI, which is not on PATH: install" in outcome.reason
    assert "\n" not in outcome.reason
    with engine.store.session() as s:
        assert s.scalars(select(Stack)).all() == []


def test_a_persistent_volume_makes_a_cloud_site_infeasible_and_nothing_starts(engine, fake_pulumi):
    """A cloud cluster's storage goes with its stack, so the cloud provider declares that a
    region without a share for persistent volumes keeps none; federation reads it, so the
    forced cloud site is no candidate, with that reason, and no stack is made."""
    text = two_jobs("echo second") + textwrap.dedent("""
        volumes:
          scratch: {name: kept}
    """)
    outcome = engine.run("me/cloud-volumes", text)
    assert outcome.state is RunState.FAILED
    assert outcome.reason == (
        f"no site is feasible (aws:us-east-2: {CloudProvisioner.cannot['persistent volumes']})"
    )
    assert "up" not in fake_pulumi.verbs()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    for bucket in ("inputs", "results"):
        server.client().create_bucket(Bucket=bucket)
    server.client().put_object(Bucket="inputs", Key="input.txt", Body=b"from the bucket\n")
    yield server
    server.stop()


def test_a_cloud_run_with_volumes_keeps_them_on_the_clusters_storage(
    engine, fake_pulumi, s3: S3Server, tmp_path: Path
):
    """Volumes on a cloud cluster: the stack declares shared storage for its two nodes (one
    per job), the stand-in node 0 fetches the ingress into it and pushes the egress out of
    it, both jobs (on different nodes) see the same volume, and nothing of it passes through
    the orchestrator's folder, except the `file:///` egress it asked for."""
    engine.secrets.put("secret://user/S3", getpass.getuser(), json.dumps(s3.credentials).encode())
    home = tmp_path / "home" / "result.txt"
    text = "version: v4\n" + textwrap.dedent(f"""
        files:
          seed.txt: "seed\\n"
        volumes:
          data:
            ingress:
              - source: {{uri: file://seed.txt}}
                destination: {{uri: file://seed.txt}}
              - source: {{uri: s3://inputs/input.txt, secret: secret://user/S3}}
                destination: {{uri: file://in/input.txt}}
            egress:
              - source: {{uri: file://result.txt}}
                destination: {{uri: s3://results/result.txt, secret: secret://user/S3}}
              - source: {{uri: file://result.txt}}
                destination: {{uri: "file://{home}"}}
        jobs:
          first:
            {IMAGE}
            command: [/bin/sh, -c, "cat /data/seed.txt /data/in/input.txt > /data/mid.txt"]
            mounts: {{/data: {{volume: data}}}}
          second:
            {IMAGE}
            requires: [first]
            command: [/bin/sh, -c, "(cat /data/mid.txt; hostname) > /data/result.txt"]
            mounts: {{/data: {{volume: data}}}}
    """)
    outcome = engine.run("me/cloud-data", text)
    assert outcome.state is RunState.FINISHED, outcome.reason
    [config] = [c for c in fake_pulumi.calls() if c[:2] == ["config", "set-all"]]
    spec = json.loads(config[config.index("--plaintext") + 1].partition("=")[2])
    assert spec["storage"] == {"storage_class": "managed", "size_gib": 1}  # 2 nodes share it
    result = s3.client().get_object(Bucket="results", Key="result.txt")["Body"].read()
    assert result.decode().startswith("seed\nfrom the bucket\n")
    assert home.read_bytes() == result
    # the volume lived on the cluster's storage, not in the orchestrator's data folder
    assert (cluster_storage(tmp_path) / "data" / "result.txt").read_bytes() == result
    assert not (tmp_path / "data" / "runs" / outcome.run_id / "volumes").exists()
    with engine.store.session() as s:
        placement = s.get_one(Run, outcome.run_id).placement
    assert placement["estimate"]["storage"] == "managed"


def test_without_the_cloud_extra_a_cloud_run_fails_in_one_line_saying_what_to_install(
    engine, monkeypatch, fake_pulumi
):
    """The `cloud` extra (the Pulumi SDKs) is not installed: its import fails."""
    monkeypatch.setitem(sys.modules, "pulumi", None)
    monkeypatch.setitem(sys.modules, "pulumi.automation", None)
    outcome = engine.run("me/cloud-nosdk", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert "pip install 'squall[cloud]'" in outcome.reason
    assert "\n" not in outcome.reason
    assert "Traceback" not in outcome.reason
    assert "ModuleNotFound" not in outcome.reason
    assert fake_pulumi.calls() == []
    with engine.store.session() as s:
        assert s.scalars(select(Stack)).all() == []


def test_missing_settings_and_credentials_fail_a_cloud_run_in_one_line_each(
    engine, monkeypatch, fake_pulumi, tmp_path
):
    clouds = clouds_of(engine)
    clouds.settings = CloudSettings(images={"aws": "ami-0123456789"})
    outcome = engine.run("me/cloud-nocidr", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert outcome.reason.endswith(
        f"{SITE} needs SQUALL_ORCHESTRATOR_CIDR (this orchestrator's address, e.g. "
        "203.0.113.7/32); SQUALL_ORCHESTRATOR_ADDRESS (HOST:PORT where nodes join this "
        "orchestrator, e.g. 203.0.113.7:7443)"
    )

    clouds.settings = CloudSettings("127.0.0.1/32", "127.0.0.1:0", images={"aws": "ami-0123456789"})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # not on EC2: no instance role
    outcome = engine.run("me/cloud-nocreds", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert f"{SITE} needs aws credentials: none found (AWS_ACCESS_KEY_ID" in outcome.reason
    assert outcome.reason.endswith("`squall doctor` checks")
    assert "\n" not in outcome.reason
    assert "up" not in fake_pulumi.verbs()
    with engine.store.session() as s:
        assert s.scalars(select(Stack)).all() == []

    # not forced: federation chose the cloud (the policy keeps the run off this machine)
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-sites: [lab]\nallowed-clouds: [aws]\nallowed-regions: [us-east-2]\n")
    engine.placer = Placer(catalog_dir=CATALOG, policy_file=policy).decide
    outcome = engine.run("me/cloud-chosen", two_jobs("echo second"))
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith(f"federation placed it on {SITE} (estimated $")
    assert outcome.reason.endswith(
        f"{SITE} needs aws credentials: none found (AWS_ACCESS_KEY_ID"
        "..., aws configure or sso login, or a role); `squall doctor` "
        "checks"
    )


def test_a_failed_egress_on_a_cloud_brings_the_results_home_before_the_stack_goes(
    engine, s3: S3Server, tmp_path: Path
):
    """The cluster's storage goes with its stack: what a failed egress still owes is copied
    to the orchestrator's machine first, and `workflow egress` sends it from there later."""
    engine.secrets.put("secret://user/S3", getpass.getuser(), json.dumps(s3.credentials).encode())
    text = "version: v4\n" + textwrap.dedent(f"""
        volumes:
          data:
            egress:
              - source: {{uri: file://result.txt}}
                destination: {{uri: s3://later/result.txt, secret: secret://user/S3}}
        jobs:
          first:
            {IMAGE}
            command: [/bin/sh, -c, "echo kept > /data/result.txt"]
            mounts: {{/data: {{volume: data}}}}
    """)
    outcome = engine.run("me/cloud-owed", text)  # the bucket `later` does not exist yet
    assert outcome.state is RunState.FAILED
    assert "s3://later/result.txt" in outcome.reason
    assert stack_of(engine, outcome.run_id).state is StackState.DESTROYED
    home = tmp_path / "data" / "runs" / outcome.run_id / "volumes" / "data" / "result.txt"
    assert home.read_text() == "kept\n"
    shutil.rmtree(cluster_storage(tmp_path))  # as the stack's file system is, with the stack
    s3.client().create_bucket(Bucket="later")
    assert engine.retry_egress("me/cloud-owed") == []
    body = s3.client().get_object(Bucket="later", Key="result.txt")["Body"].read()
    assert body == b"kept\n"
    assert not home.exists()  # sent, then let go


def test_persistent_volumes_on_a_cloud_live_on_the_regions_share_and_outlive_each_stack(
    engine: Engine, fake_pulumi, tmp_path: Path
) -> None:
    """With a share for persistent volumes named for the region (the sites file's
    `persistent:`), a workflow with one runs there: the stack's nodes join the subnet named
    with it and mount the share (the spec carries both, the boot script mounts it), the
    volume lives on it as SCOPE/NAME, and a
    second run, on a new stack after the first one's was destroyed, finds what the first
    wrote. Nothing of it is kept on the orchestrator's machine."""
    sites = tmp_path / "sites.yaml"
    sites.write_text(
        "persistent:\n"
        f"  aws:us-east-2: {{share: '{SHARE}', subnet: subnet-0team, cidr: 10.0.8.0/24}}\n"
    )
    with_share = Engine(
        engine.store,
        engine.providers,
        data_dir=tmp_path / "data",
        placer=Placer(catalog_dir=CATALOG, force_site=SITE, sites_file=sites).decide,
    )

    def flow(command: str) -> str:
        return "version: v4\n" + textwrap.dedent(f"""
            volumes:
              keep: {{name: team-data}}
            jobs:
              work:
                {IMAGE}
                command: [/bin/sh, -c, "{command}"]
                mounts: {{/keep: {{volume: keep}}}}
        """)

    first = with_share.run("me/first", flow("echo one > /keep/one.txt"))
    assert first.state is RunState.FINISHED, first.reason
    second = with_share.run("me/second", flow("cat /keep/one.txt > /keep/two.txt"))
    assert second.state is RunState.FINISHED, second.reason

    kept = persistent_share(tmp_path) / "user" / "team-data"
    assert (kept / "one.txt").read_text() == "one\n"
    assert (kept / "two.txt").read_text() == "one\n"  # the second run read the first's
    specs = [
        json.loads(c[c.index("--plaintext") + 1].partition("=")[2])
        for c in fake_pulumi.calls()
        if c[:2] == ["config", "set-all"]
    ]
    assert [spec["persistent_share"] for spec in specs] == [SHARE, SHARE]
    # each run joined the subnet the share is reached from, instead of a network of its own
    assert [(s["network"]["subnet_id"], s["network"]["cidr"]) for s in specs] == [
        ("subnet-0team", "10.0.8.0/24")
    ] * 2
    assert fake_pulumi.verbs().count("destroy") == 2  # each run's stack went
    assert not (tmp_path / "data" / "volumes").exists()  # nothing on this machine


def test_a_joined_node_is_dialled_at_its_public_address_unless_told_otherwise():
    """Behind a cloud's NAT a node reports its private address and calls from its public
    one: the orchestrator dials the public one unless it is inside the network."""
    node = Joined("ring-0", "ring", "ip-10-0-0-5", "10.0.0.5", "203.0.113.9", 7431)
    assert _dial(node, internal=False) == "203.0.113.9:7431"
    assert _dial(node, internal=True) == "10.0.0.5:7431"
    v6 = Joined("ring-1", "ring", "n1", "fd00::5", "2001:db8::9", 7431)
    assert _dial(v6, internal=False) == "[2001:db8::9]:7431"
