"""Providers as one family: the engine drives any provider through the same calls (serves,
plan, up, down) and knows nothing of local or cloud. A provider made here, for a site the
engine has never heard of, runs a workflow on real agents with no change to the engine."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.fuzzfile import Workflow
from orchestrator.placing import Placement
from orchestrator.provision import (
    Cluster,
    LocalProvisioner,
    NodeSlice,
    Plan,
    Provisioner,
    ProvisionError,
    Report,
)
from orchestrator.provision.cloud import CloudProvisioner, CloudSettings
from orchestrator.provision.stacks import StackDriver, StackSettings
from orchestrator.store import Event, Run, RunState, Store
from tests.substrate.registry import Registry

RACK = "lab:rack-2"
HELLO = "version: v4\n" + textwrap.dedent("""
    jobs:
      hello:
        image: {uri: docker://busybox:1.36}
        command: [/bin/sh, -c, "echo on the rack"]
""")


class Rack:
    """A provider of one on-prem rack, here a few agents on this machine: it keeps every
    call the engine makes and reports progress as a cloud's stack would."""

    cannot: Mapping[str, str] = {}

    def __init__(self, agents: LocalProvisioner, *, stuck: bool = False) -> None:
        self.agents = agents
        self.stuck = stuck  # its nodes do not go down
        self.calls: list[str] = []

    def serves(self, site: str) -> bool:
        return site == RACK

    def plan(
        self, run_id: str, owner: str, wf: Workflow, placement: Placement
    ) -> Plan[tuple[NodeSlice, ...]]:
        self.calls.append(f"plan {placement.record['site']} for {owner}")
        plan = self.agents.plan(run_id, owner, wf, placement)
        return replace(plan, record={**plan.record, "rack": RACK})

    def up(self, plan: Plan[tuple[NodeSlice, ...]], report: Report) -> Cluster:
        self.calls.append("up")
        report(f"{RACK}: {len(plan.shape)} node(s) booting")
        return replace(self.agents.up(plan), site=RACK)

    def down(self, cluster: Cluster, report: Report) -> None:
        self.calls.append(f"down {cluster.site}")
        self.agents.down(cluster)
        if self.stuck:
            raise ProvisionError(f"{RACK}: node-0 does not power off")
        report(f"{RACK}: powered off")


def engine_with(tmp_path: Path, rack: Rack, site: str = RACK) -> Engine:
    here = LocalProvisioner(tmp_path / "site", nodes=lambda _: [])  # never asked
    providers: list[Provisioner[Any]] = [here, rack]
    return Engine(
        Store(f"sqlite:///{tmp_path / 'squall.db'}"),
        providers,
        data_dir=tmp_path / "data",
        placer=lambda wf, name, **_: Placement({"site": site}),
    )


def rack_of(tmp_path: Path, registry: Registry, *, stuck: bool = False) -> Rack:
    return Rack(
        LocalProvisioner(
            tmp_path / "rack",
            nodes=lambda _: [NodeSlice(cpus=(0, 1), memory_bytes=2**30)],
            search_registries=[registry.address],
            insecure_registries=[registry.address],
        ),
        stuck=stuck,
    )


def test_a_provider_for_a_site_the_engine_never_heard_of_runs_a_workflow(
    tmp_path: Path, registry: Registry
) -> None:
    rack = rack_of(tmp_path, registry)
    engine = engine_with(tmp_path, rack)
    outcome = engine.run("me/racked", HELLO)
    assert outcome.state is RunState.FINISHED, outcome.reason
    assert rack.calls == [f"plan {RACK} for {_owner(engine, outcome.run_id)}", "up", f"down {RACK}"]
    with engine.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        assert run.site == RACK
        assert run.placement == {
            "site": RACK,
            "nodes": [{"cpus": 2, "memory_bytes": 2**30, "gpus": 0}],
            "rack": RACK,
        }
        progress = s.scalars(
            select(Event.message).where(Event.run_id == run.id, Event.kind == "provision")
        ).all()
        states = s.scalars(
            select(Event.state).where(Event.run_id == run.id, Event.kind == "run")
        ).all()
    assert progress == [f"{RACK}: 1 node(s) booting", f"{RACK}: powered off"]
    assert [x for x in states if x] == [
        "PENDING",
        "PLACING",
        "PROVISIONING",
        "STAGING",
        "RUNNING",
        "TEARDOWN",
        "FINISHED",
    ]
    assert not (tmp_path / "site").exists()  # this machine's provider started nothing
    assert not (tmp_path / "rack" / outcome.run_id).exists()  # the rack's agents are gone


def test_a_cluster_that_does_not_go_down_says_so_in_the_reason(
    tmp_path: Path, registry: Registry
) -> None:
    engine = engine_with(tmp_path, rack_of(tmp_path, registry, stuck=True))
    outcome = engine.run("me/stuck", HELLO)
    assert outcome.state is RunState.FINISHED
    assert outcome.reason.endswith(
        f"; {RACK}: node-0 does not power off (`squall stack gc` retries)"
    )


def test_a_site_no_provider_serves_is_refused_and_nothing_is_planned(
    tmp_path: Path, registry: Registry
) -> None:
    rack = rack_of(tmp_path, registry)
    engine = engine_with(tmp_path, rack, site="lab:rack-9")
    outcome = engine.run("me/nowhere", HELLO)
    assert outcome.state is RunState.FAILED
    assert outcome.reason == (
        "federation placed it on lab:rack-9 (estimated $0.00); this orchestrator provisions "
        "only local so far: force it with --site local"
    )
    assert rack.calls == []


def test_each_provider_serves_its_own_sites(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    clouds = CloudProvisioner(StackDriver(store, StackSettings(tmp_path)), CloudSettings())
    here = LocalProvisioner(tmp_path / "site")
    served = {
        site: [p.serves(site) for p in (here, clouds)]
        for site in ("local", "aws:us-east-2", "gcp:europe-west4", "azure:eastus", "lab", "aws")
    }
    assert served == {
        "local": [True, False],
        "aws:us-east-2": [False, True],
        "gcp:europe-west4": [False, True],
        "azure:eastus": [False, True],
        "lab": [False, False],  # an on-prem site of the sites file: no provider yet
        "aws": [False, False],  # a cloud without its region
    }


def _owner(engine: Engine, run_id: str) -> str:
    with engine.store.session() as s:
        return s.get_one(Run, run_id).owner
